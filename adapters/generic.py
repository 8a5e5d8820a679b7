"""The ``generic`` adapter: finds block lists and their streams on a real forward pass."""

from __future__ import annotations

import dataclasses
import logging

from torch import nn

from blockprune import Adapter, BlockSpec, CallRecord, Trace, hookimpl
from blockprune.errors import BlockpruneError

logger = logging.getLogger("blockprune")


def _child_paths(path: str, modules: nn.ModuleList) -> list[str]:
    return [f"{path}.{i}" if path else str(i) for i in range(len(modules))]


def infer_spec(
    record: CallRecord, carried: set[str] = frozenset(), context: set[str] = frozenset()
) -> BlockSpec | None:
    """Match each tensor output to a same-shaped input; ``None`` if one has no match.

    Each input serves at most one output, and inputs in ``context`` serve none. Inputs in ``carried``
    (those holding what the previous block of the list returned) outrank the others, so that a
    same-shaped context input such as a skip connection from an earlier block is not taken for the
    stream; cosine similarity, which is high between a residual block's input and output, settles the rest.
    """
    if record.output_kind not in ("tensor", "tuple"):
        return None
    pairs = [item for item in record.similarity.items() if item[0][1] not in context]
    candidates = sorted(pairs, key=lambda item: (item[0][1] not in carried, -item[1]))
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


def constant_inputs(records: list[CallRecord]) -> set[str]:
    """Inputs holding the same values in every block of a list.

    Unless one block passes them to the next (blocks that are still identities at initialisation do),
    they are context that every block reads, such as an embedding, never a stream.
    """
    first = records[0].digests
    return {name for name, digest in first.items() if all(r.digests.get(name) == digest for r in records[1:])}


class GenericAdapter(Adapter):
    """Any model whose blocks sit in an ``nn.ModuleList`` of same-class modules, called once each, in order.

    Streams are inferred per block from one forward pass: every tensor output must have an input of
    the same shape, other than an input that every block of the list receives unchanged from outside
    the list. A list is a chain of blocks only if what one block returns flows into the next (reshaped
    perhaps, or through blocks of another list); a list whose outputs are only added to something by
    the caller (``x = x + layer(norm(x))``) is not. Lists that fail a test are skipped. Submodules of a
    block that the model calls from outside the block (DiT calls ``transformer_blocks[0].norm1.emb``)
    are kept.
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
        found = []
        for path in self.candidate_lists(model):
            children = _child_paths(path, model.get_submodule(path))
            if not trace.called_in_order(children):
                logger.debug("generic adapter: %s is not called once per block in order; skipped", path)
                continue
            carried = [set()] + [trace.inputs_fed_by(a, b) for a, b in zip(children, children[1:])]
            if not any(carried):
                logger.debug("generic adapter: no block of %s feeds the next one; skipped", path)
                continue
            records = [trace.records[child] for child in children]
            context = constant_inputs(records) - set().union(*carried)
            specs = [infer_spec(record, inputs, context) for record, inputs in zip(records, carried)]
            if any(spec is None for spec in specs):
                logger.debug("generic adapter: %s has blocks without residual streams; skipped", path)
                continue
            found += [
                (child, dataclasses.replace(spec, kept_submodules=trace.called_outside.get(child, ())))
                for child, spec in zip(children, specs)
            ]
        if not found:
            raise BlockpruneError(
                f"the generic adapter found no residual block list in {type(model).__name__}: it needs an "
                f"nn.ModuleList of same-class blocks, each called once in order, returning its input streams at "
                f"their input shapes, and feeding the next block; write an adapter for this model instead"
            )
        return sorted(found, key=lambda item: trace.records[item[0]].order)


@hookimpl
def blockprune_register_adapters(register) -> None:
    register(GenericAdapter())
