"""blockprune: make diffusion transformers faster by replacing whole blocks with fitted linear layers."""

from ._version import __version__
from .adapter import Adapter
from .brll.fusion import fuse
from .brll.surrogate import LinearSurrogate
from .compress import compress, importance
from .discovery.inspection import inspect
from .discovery.spec import Block, BlockSpec
from .errors import (
    BlockpruneError,
    IllConditionedWarning,
    NonFiniteActivationError,
    NotResidualError,
)
from .hookspecs import hookimpl
from .plan import Plan, plan
from .plugins import register_plugin, unregister_plugin
from .scoring import Metric
from .scoring.selection import ImportanceTable
from .serialization import from_pretrained, save_pretrained

__all__ = [
    "__version__",
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
