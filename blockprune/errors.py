"""Errors that blockprune raises for bad input or data it cannot use."""


class BlockpruneError(ValueError):
    """A problem with the caller's input, stated with what to do about it."""


class NotResidualError(BlockpruneError):
    """A block's output stream does not have its input stream's shape."""


class NonFiniteActivationError(BlockpruneError):
    """NaN or Inf appeared in a block's recorded activations."""

    where: tuple[str, str, int] | None = None  # (stream, block, batch index) when found while recording a block


class SandwichDivergedError(BlockpruneError):
    """A sandwich stage's loss became NaN or Inf; the stage was rolled back."""


class CompressionInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped ``compress`` at a safe point (after a finished stage); the message says how to resume."""


class IllConditionedWarning(UserWarning):
    """A least-squares system had too few tokens or a huge condition number."""


class UnusedOptionWarning(UserWarning):
    """A keyword option was given that does nothing in this call (``sandwich_*`` with ``sandwich=False`` ...)."""
