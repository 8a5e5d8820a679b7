"""Registering surrogate classes in diffusers' transformer-block registry, which its block caches
(FirstBlockCache, MagCache) look blocks up in by class."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

logger = logging.getLogger("blockprune")


def _registry() -> Any:
    try:
        from diffusers.hooks._helpers import (
            TransformerBlockMetadata,
            TransformerBlockRegistry,
        )
    except ImportError:  # a diffusers without block caches: nothing to register with
        return None, None
    return TransformerBlockRegistry, TransformerBlockMetadata


def _metadata_from_outputs(metadata_class: type, outputs: Any) -> Any:
    """Metadata for a block class diffusers does not know: where the spec's outputs put the two streams."""
    if isinstance(outputs, str):
        return metadata_class(return_hidden_states_index=0) if outputs == "hidden_states" else None
    if outputs is None or "hidden_states" not in outputs:
        return None
    text = outputs.index("encoder_hidden_states") if "encoder_hidden_states" in outputs else None
    return metadata_class(return_hidden_states_index=outputs.index("hidden_states"),
                          return_encoder_hidden_states_index=text)


def register_block(surrogate_class: type, block_class: type, outputs: Any = None) -> None:
    """Register ``surrogate_class`` with the metadata diffusers has for ``block_class`` (or, for a class it does not
    know, metadata from the spec's ``outputs``); without either, the surrogate is left out, as the block is."""
    registry, metadata_class = _registry()
    if registry is None:
        return
    try:
        known = registry.get(block_class)
    except ValueError:  # diffusers: "Model class ... not registered"
        metadata = _metadata_from_outputs(metadata_class, outputs)
    else:
        metadata = replace(known, _cls=None, _cached_parameter_indices=None)
    if metadata is not None:
        registry.register(surrogate_class, metadata)
        logger.debug("registered the %s surrogate in diffusers' block registry", block_class.__name__)
