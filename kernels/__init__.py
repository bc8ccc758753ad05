"""Custom kernels for M3AE. masked_attention: fused multi-head attention with a key-padding mask (Triton).

On a machine without a GPU, set TRITON_INTERPRET=1 before importing this package to run the kernels on
CPU tensors in Triton's interpreter (tests/conftest.py does so).
"""

from .attention import HEAD_DIMS, masked_attention, padding_from_lengths, reference_attention

__all__ = ["HEAD_DIMS", "masked_attention", "padding_from_lengths", "reference_attention"]
