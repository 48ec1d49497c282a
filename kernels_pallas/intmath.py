"""Integer size arithmetic shared by the kernels and llmarch: one definition of each.

Plain Python with no imports, so anything (data pipelines included) can use it; ``cdiv`` and
``round_up`` also work on integer jax/numpy arrays (``-(-a // b)`` needs only ``//`` and ``-``).
"""


def cdiv(a, b):
    """``ceil(a / b)`` for integers ``a >= 0``, ``b > 0``."""
    return -(-a // b)


def round_up(a, b):
    """``a`` rounded up to a multiple of ``b``."""
    return cdiv(a, b) * b


def next_pow2(a: int) -> int:
    """The smallest power of two ``>= a`` (1 for ``a <= 1``)."""
    return 1 << max(0, int(a) - 1).bit_length()
