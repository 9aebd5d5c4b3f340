"""Fused Triton kernels for the sharded classifier head (installed as ``dsoft_dist.kernels``).

Nothing here is imported by the rest of the package unless Triton is installed and the
head selects the fused path; the torch path in ``dsoft_dist.head`` is the reference.
"""
