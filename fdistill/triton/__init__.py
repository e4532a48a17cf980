"""Triton kernels (imported lazily by fdistill: triton reads TRITON_INTERPRET when it is imported)."""
