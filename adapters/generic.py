"""The ``generic`` adapter: finds block lists and their streams on a real forward pass."""

from __future__ import annotations

import logging

from torch import nn

from blockprune import Adapter, BlockSpec, hookimpl
from blockprune.errors import BlockpruneError
from blockprune.trace import CallRecord, Trace

logger = logging.getLogger("blockprune")


def _child_paths(path: str, modules: nn.ModuleList) -> list[str]:
    return [f"{path}.{i}" if path else str(i) for i in range(len(modules))]


def infer_spec(record: CallRecord) -> BlockSpec | None:
    """Match each tensor output to the same-shaped input most similar to it; ``None`` if one has no match.

    Each input serves at most one output; ties of shape are settled by cosine similarity, which is
    high between a residual block's input and output.
    """
    if record.output_kind not in ("tensor", "tuple"):
        return None
    candidates = sorted(record.similarity.items(), key=lambda item: -item[1])
    assigned: dict[int, str] = {}
    for (position, name), _ in candidates:
        if position not in assigned and name not in assigned.values():
            assigned[position] = name
    tensor_positions = [i for i, shape in enumerate(record.outputs) if shape is not None]
    if not tensor_positions or any(i not in assigned for i in tensor_positions):
        return None
    if record.output_kind == "tensor":
        return BlockSpec(outputs=assigned[0])
    return BlockSpec(outputs=tuple(assigned.get(i) for i in range(len(record.outputs))))


class GenericAdapter(Adapter):
    """Any model whose blocks sit in an ``nn.ModuleList`` of same-class modules, called once each, in order.

    Streams are inferred per block from one forward pass: every tensor output must have an input of
    the same shape. Lists that fail either test are skipped.
    """

    name = "generic"

    def matches(self, model: nn.Module) -> bool:
        return True

    def candidate_lists(self, model: nn.Module) -> list[str]:
        """Outermost ``nn.ModuleList`` s of at least two modules of one class."""
        found: list[str] = []
        for path, module in model.named_modules():
            if not isinstance(module, nn.ModuleList) or len(module) < 2 or len({type(m) for m in module}) != 1:
                continue
            if any(path.startswith(f"{outer}.") or outer == "" for outer in found):
                continue
            found.append(path)
        return found

    def block_lists(self, model: nn.Module) -> list[str]:
        return self.candidate_lists(model)

    def blocks(self, model: nn.Module, trace: Trace) -> list[tuple[str, BlockSpec]]:
        lists = []
        for path in self.candidate_lists(model):
            children = _child_paths(path, model.get_submodule(path))
            if not trace.called_in_order(children):
                logger.debug("generic adapter: %s is not called once per block in order; skipped", path)
                continue
            specs = [infer_spec(trace.records[child]) for child in children]
            if any(spec is None for spec in specs):
                logger.debug("generic adapter: %s has blocks without residual streams; skipped", path)
                continue
            lists.append((trace.records[children[0]].order, list(zip(children, specs))))
        if not lists:
            raise BlockpruneError(
                f"the generic adapter found no residual block list in {type(model).__name__}: it needs an "
                f"nn.ModuleList of same-class blocks, each called once in order and returning its input "
                f"streams at their input shapes; write an adapter for this model instead"
            )
        return [item for _, items in sorted(lists, key=lambda entry: entry[0]) for item in items]


@hookimpl
def blockprune_register_adapters(register) -> None:
    register(GenericAdapter())
