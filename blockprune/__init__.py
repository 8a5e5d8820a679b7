"""blockprune: make diffusion transformers faster by replacing whole blocks with fitted linear layers.

The flow, one subpackage a stage: :mod:`~blockprune.discovery` (which blocks, which streams) →
:mod:`~blockprune.scoring` (which blocks matter) → :mod:`~blockprune.brll` (least-squares surrogates) →
:mod:`~blockprune.sandwich` (local training) → :mod:`~blockprune.serialization` (save / load), driven by
:func:`compress`. docs/architecture.md walks through it.
"""

from ._version import __version__
from .adapter import Adapter
from .brll.fusion import fuse
from .brll.replacement import SurrogateKind
from .brll.surrogate import LinearSurrogate
from .compress import compress, importance
from .config import CompressConfig, SandwichConfig, ScoringConfig
from .discovery.inspection import BlockInfo, inspect
from .discovery.spec import Block, BlockSpec
from .discovery.trace import CallRecord, Trace
from .errors import (
    BlockpruneError,
    CompressionInterrupted,
    IllConditionedWarning,
    NonFiniteActivationError,
    NotResidualError,
    SandwichDivergedError,
)
from .hookspecs import hookimpl
from .plan import Plan, ReplacedBlock, StageReport, StreamReport, plan
from .plugins import register_plugin, unregister_plugin
from .scoring import Metric, ScoringContext
from .scoring.selection import ImportanceTable
from .serialization import from_pretrained, save_pretrained

__all__ = [
    "__version__",
    "Adapter",
    "Block",
    "BlockInfo",
    "BlockSpec",
    "BlockpruneError",
    "CallRecord",
    "CompressConfig",
    "CompressionInterrupted",
    "IllConditionedWarning",
    "ImportanceTable",
    "LinearSurrogate",
    "Metric",
    "NonFiniteActivationError",
    "NotResidualError",
    "Plan",
    "ReplacedBlock",
    "SandwichConfig",
    "SandwichDivergedError",
    "StageReport",
    "StreamReport",
    "ScoringConfig",
    "ScoringContext",
    "SurrogateKind",
    "Trace",
    "compress",
    "from_pretrained",
    "fuse",
    "hookimpl",
    "importance",
    "inspect",
    "plan",
    "register_plugin",
    "unregister_plugin",
    "save_pretrained",
]
