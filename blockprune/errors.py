"""Errors that blockprune raises for bad input or data it cannot use."""


class BlockpruneError(ValueError):
    """A problem with the caller's input, stated with what to do about it."""


class NotResidualError(BlockpruneError):
    """A block's output stream does not have its input stream's shape."""


class NonFiniteActivationError(BlockpruneError):
    """NaN or Inf appeared in a block's recorded activations."""
