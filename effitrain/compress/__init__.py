"""Compression beside pruning and quantization: low-rank factorisation and weight clustering."""
