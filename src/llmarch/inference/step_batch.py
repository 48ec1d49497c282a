"""The arrays of one serving step, as the engine hands them to its jitted step program."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from llmarch.layers.paged import AttentionGroup

Array = jax.Array | np.ndarray  # host arrays when built, device arrays inside the step


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
    """One step's ``N`` flat tokens (decode tokens, then prefill chunks, then padding), its
    ``Rd`` decode rows and ``Rp`` prefill rows (``R = Rd + Rp`` sampling rows). Every field is
    an array, so the shapes (the step's bucket) pick the compiled program.

    Attributes:
      tokens: int32 ``[N]`` token ids; padding 0.
      positions: int32 ``[N]`` each token's position in its sequence; padding -1.
      slots: int32 ``[N]`` the flat page slot (``page * page_size + offset``) each token's key
        and value are written to; padding: the trash page.
      decode: the decode rows ``[Rd, 1]``, padding rows first, then by length (shortest first),
        which the step splits into groups that each attend only as far as their longest row.
      prefill: the prefill chunks ``[Rp, Tc]``.
      logits_at: int32 ``[R]`` the flat token whose logits each row samples from.
      copy_src: int32 ``[R]`` copy-on-write pages to copy before any write (unused: the trash
        page, copied onto itself).
      copy_dst: int32 ``[R]`` where each ``copy_src`` page goes.
      rows: the sampling parameters per row, ``sampling.host_rows``'s ``name -> [R]`` arrays.
    """

    tokens: Array
    positions: Array
    slots: Array
    decode: AttentionGroup
    prefill: AttentionGroup
    logits_at: Array
    copy_src: Array
    copy_dst: Array
    rows: dict[str, Array]
