"""The arrays of one serving step, as the engine hands them to its jitted step program, and
``build``: a scheduler plan laid out in them, padded to a bucket of shapes."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from kernels_pallas.intmath import next_pow2
from llmarch.inference import sampling
from llmarch.inference.engine_config import EngineConfig
from llmarch.inference.scheduler import Plan
from llmarch.inference.scheduler import Sequence as Seq
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
      embeds: float32 ``[N, D]`` input embeddings (image features) for the tokens ``embed_mask``
        ``[N]`` marks, which take them instead of their token's embedding; both None when no
        token of the step has one (every step of a text-only engine), so those steps compile
        and run as before.
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
    embeds: Array | None = None
    embed_mask: Array | None = None


def has_embeds(seq: Seq, start: int, end: int) -> bool:
    """Whether any of ``seq``'s positions ``[start, end)`` takes an input embedding (an image
    feature) instead of its token's."""
    mask = seq.request.embed_mask
    return mask is not None and bool(mask[start : min(end, len(mask))].any())


def bucket(n: int, lo: int, hi: int, *, fine: bool = True) -> int:
    """The smallest bucket >= max(n, lo), capped at hi (0 stays 0). Buckets are the powers of
    two and, when ``fine``, the points 1.5x between them (…, 16, 24, 32, 48, 64, …): at most a
    third of a step is padding, for about twice as many programs as powers of two alone."""
    if n == 0:
        return 0
    n = max(n, lo)
    power = next_pow2(n)
    return min(hi, 3 * power // 4 if fine and n <= 3 * power // 4 and power >= 4 else power)


def build(plan: Plan, c: EngineConfig, max_pages_per_seq: int) -> tuple[StepBatch, tuple[int, ...]]:
    """The step's padded arrays and its bucket ``(N, Rd, Rp, Tc)``: the scheduler's ``plan`` laid
    out as ``StepBatch`` describes, in ``c``'s buckets (or its fixed shapes). Sorts
    ``plan.decode`` shortest first (the step's attention groups rely on it)."""
    ps = c.page_size
    plan.decode.sort(key=lambda seq: seq.num_computed)  # shortest first: see step_program
    dec, pre = plan.decode, plan.prefill
    W = max_pages_per_seq  # attention loops over the pages in use, not the width
    if c.fixed_shapes:
        N, Rd, Rp, Tc = c.max_num_batched_tokens, c.max_num_seqs, c.max_prefill_rows, c.max_prefill_chunk
    else:  # fine buckets for decode-only steps (the steady state), coarse ones with prefill
        Rd = bucket(len(dec), c.min_decode_rows, c.max_num_seqs, fine=not pre)
        # A decode-only step feeds one token per row and no more: every padding token would
        # be a row of every matmul (at batch 1, min_tokens=16 made 16x the FLOPs).
        N = bucket(plan.num_tokens, c.min_tokens, c.max_num_batched_tokens) if pre else Rd
        Rp = c.max_prefill_rows if pre else 0
        Tc = bucket(max((e - s for _, s, e in pre), default=0), c.min_chunk, c.max_prefill_chunk)
    tokens, positions, slots = np.zeros(N, np.int32), np.full(N, -1, np.int32), np.zeros(N, np.int32)
    # Host arrays, filled in place below (the dataclass is frozen, its arrays are not).
    decode = AttentionGroup(
        index=np.zeros((Rd, 1), np.int32),
        positions=np.full((Rd, 1), -1, np.int32),
        tables=np.zeros((Rd, W), np.int32),
        lengths=np.zeros(Rd, np.int32),
    )
    prefill = AttentionGroup(
        index=np.zeros((Rp, Tc), np.int32),
        positions=np.full((Rp, Tc), -1, np.int32),
        tables=np.zeros((Rp, W), np.int32),
        lengths=np.zeros(Rp, np.int32),
    )
    logits_at = np.zeros(Rd + Rp, np.int32)
    params: list = [None] * (Rd + Rp)
    seeds, samples, counters = [0] * (Rd + Rp), [0] * (Rd + Rp), [0] * (Rd + Rp)
    images = [seq for seq in dec if has_embeds(seq, seq.num_computed, seq.num_computed + 1)]
    images += [seq for seq, a, b in pre if has_embeds(seq, a, b)]
    embeds = embed_mask = None
    if images:
        embeds = np.zeros((N, images[0].request.embeds.shape[1]), np.float32)
        embed_mask = np.zeros(N, bool)

    def place(i: int, seq: Seq, start: int, end: int) -> np.ndarray:
        """Puts tokens [start, end) of seq at flat indices i..; returns their positions."""
        pos = np.arange(start, end)
        tokens[i : i + len(pos)] = seq.tokens[start:end]
        positions[i : i + len(pos)] = pos
        pages = np.asarray(seq.pages)
        slots[i : i + len(pos)] = pages[pos // ps] * ps + pos % ps
        if embeds is not None and has_embeds(seq, start, end):
            request, stop = seq.request, min(end, len(seq.request.prompt))
            embeds[i : i + stop - start] = request.embeds[start:stop]
            embed_mask[i : i + stop - start] = request.embed_mask[start:stop]
        return pos

    def sample_row(r: int, seq: Seq, flat: int) -> None:
        logits_at[r] = flat
        if not seq.is_parent:
            params[r], seeds[r] = seq.request.params, seq.request.seed
            samples[r], counters[r] = seq.sample_index, seq.num_generated

    i = 0
    first = Rd - len(dec)  # padding rows first, then the shortest: see step_program's groups
    for r, seq in enumerate(dec, start=first):
        place(i, seq, seq.num_computed, seq.num_computed + 1)
        decode.index[r, 0], decode.positions[r, 0] = i, seq.num_computed
        decode.tables[r, : len(seq.pages)], decode.lengths[r] = seq.pages, seq.num_computed + 1
        sample_row(r, seq, i)
        i += 1
    for r, (seq, start, end) in enumerate(pre):
        pos = place(i, seq, start, end)
        prefill.index[r, : len(pos)] = np.arange(i, i + len(pos))
        prefill.positions[r, : len(pos)] = pos
        prefill.tables[r, : len(seq.pages)], prefill.lengths[r] = seq.pages, end
        if end == len(seq.tokens):
            sample_row(Rd + r, seq, i + len(pos) - 1)
        i += len(pos)
    C = Rd + Rp
    if len(plan.copies) > C:
        raise RuntimeError(f"{len(plan.copies)} page copies in one step, more than its {C} rows")
    copy_src, copy_dst = np.zeros(C, np.int32), np.zeros(C, np.int32)
    for k, (src, dst) in enumerate(plan.copies):
        copy_src[k], copy_dst[k] = src, dst
    batch = StepBatch(
        tokens=tokens,
        positions=positions,
        slots=slots,
        decode=decode,
        prefill=prefill,
        logits_at=logits_at,
        copy_src=copy_src,
        copy_dst=copy_dst,
        rows=sampling.host_rows(params, seeds, samples, counters),
        embeds=embeds,
        embed_mask=embed_mask,
    )
    return batch, (N, Rd, Rp, Tc)
