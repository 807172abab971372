"""Pieces shared by the chunk kernels: the chunk sweeps (TPU and GPU bodies, forward and
reverse), platform selection, residual maps and small in-kernel math helpers."""
