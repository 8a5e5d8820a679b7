"""What a residual block is: its spec (streams and kept submodules) and its resolved form."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BlockSpec:
    """Which forward inputs of a block are residual streams, and where its output carries them.

    ``outputs`` describes the block's return value: a stream name when the block returns a
    single tensor, or a tuple with, per position, the name of the input stream returned there
    (``None`` where the block returns ``None``). Every other input is context, passed through.
    ``kept_submodules`` names submodules that the host model reads from outside the block's
    forward (DiT reads ``transformer_blocks[0].norm1.emb``); a surrogate keeps them.
    """

    outputs: str | tuple[str | None, ...]
    kept_submodules: tuple[str, ...] = ()

    @property
    def streams(self) -> tuple[str, ...]:
        """The residual stream names, in output order."""
        if isinstance(self.outputs, str):
            return (self.outputs,)
        return tuple(s for s in self.outputs if s is not None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, the inverse of :meth:`from_dict`."""
        outputs = self.outputs if isinstance(self.outputs, str) else list(self.outputs)
        return {"outputs": outputs, "kept_submodules": list(self.kept_submodules)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockSpec:
        """Rebuild a spec written by :meth:`to_dict`."""
        outputs = data["outputs"]
        return cls(
            outputs=outputs if isinstance(outputs, str) else tuple(outputs),
            kept_submodules=tuple(data.get("kept_submodules", ())),
        )


@dataclass
class Block:
    """One residual block of a model: its module path, kind, spec and stream widths."""

    name: str
    kind: str
    spec: BlockSpec
    stream_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def stream_dims(self) -> dict[str, int]:
        """Channel width (last dimension) of every stream."""
        return {s: shape[-1] for s, shape in self.stream_shapes.items()}
