"""Discovery: a model's residual blocks, their streams and signatures, found on a traced forward pass."""
