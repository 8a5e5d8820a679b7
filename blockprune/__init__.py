"""blockprune: make diffusion transformers faster by replacing whole blocks with fitted linear layers."""

__version__ = "0.1.0"

from .adapter import Adapter, Block, BlockSpec
from .compress import compress
from .errors import BlockpruneError, NonFiniteActivationError, NotResidualError
from .fit import IllConditionedWarning
from .fusion import fuse
from .hookspecs import hookimpl
from .inspection import inspect
from .metrics import Metric
from .plan import Plan, plan
from .ranking import ImportanceTable, importance
from .plugins import register_plugin, unregister_plugin
from .serialization import from_pretrained, save_pretrained
from .surrogate import LinearSurrogate

__all__ = [
    "Adapter",
    "Block",
    "BlockSpec",
    "BlockpruneError",
    "IllConditionedWarning",
    "ImportanceTable",
    "LinearSurrogate",
    "Metric",
    "NonFiniteActivationError",
    "NotResidualError",
    "Plan",
    "compress",
    "from_pretrained",
    "fuse",
    "hookimpl",
    "importance",
    "inspect",
    "plan",
    "register_plugin",
    "save_pretrained",
    "unregister_plugin",
]
