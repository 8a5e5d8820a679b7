"""BRLL: recording a block's streams, fitting the affine map by least squares, swapping it in, fusing runs."""
