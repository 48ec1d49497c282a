"""The engine's jitted programs: one serving step, and several decode steps in one dispatch.

``run_step`` runs one fixed-shape step (page copies, the model over the paged cache, sampling).
``run_decode`` runs up to ``Program.decode_steps`` decode-only steps in a ``lax.while_loop``: each
feeds the tokens the previous one sampled, on the device, so a steady decode pays the host's
scheduling, argument transfer and dispatch once per several tokens, not per token (at batch 1 on
CPU that overhead is a large share of a memory-bound step).

Both take the model's parameters as a flat list of arrays and everything static in one
``Program``, whose hash is computed once: jit hashes its static arguments on every call, and
hashing a model's graphdef (and flattening an ``nnx.State``) cost milliseconds per step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llmarch.inference import paged_cache, sampling
from llmarch.inference.step_batch import StepBatch
from llmarch.layers.paged import PageMeta

# Decode rows attend in up to DECODE_GROUPS groups (of at least DECODE_GROUP_ROWS rows) by length.
DECODE_GROUPS, DECODE_GROUP_ROWS = 8, 8


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """What the step programs need besides arrays: the model's structure, the kinds of its paged
    caches, the log-prob width and the most decode steps per dispatch. Made by ``program``, which
    returns one object per distinct value, so jit's per-call lookup compares identities (engines
    over equal models share their compiled programs)."""

    graphdef: Any
    treedef: Any  # of the parameter state, whose leaves the programs take as a list
    kinds: tuple[str, ...]
    num_logprobs: int
    decode_steps: int

    def __hash__(self) -> int:
        return id(self)

    def model(self, leaves: list[jax.Array]):
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


@functools.cache
def program(graphdef, treedef, kinds: tuple[str, ...], num_logprobs: int, decode_steps: int) -> Program:
    """The one ``Program`` of these values (hashing the graphdef here, once per engine)."""
    return Program(graphdef, treedef, kinds, num_logprobs, decode_steps)


def _forward(program: Program, leaves, pools, batch: StepBatch):
    """The model over the paged cache for ``batch``, then per-row sampling: (pools, sampled)."""
    # Decode rows come padding first, then sorted by length; groups of them attend separately,
    # so each group's loop over pages stops at its own longest sequence.
    decode, rows = batch.decode, batch.decode.rows
    parts = max(1, min(DECODE_GROUPS, rows // DECODE_GROUP_ROWS))
    bounds = [j * (rows // parts) for j in range(parts)] + [rows]  # the last takes the rest
    split = [
        jax.tree.map(lambda v, a=a, b=b: v[a:b], decode) for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    meta = PageMeta(slots=batch.slots, groups=(*split, batch.prefill))
    model = program.model(leaves)
    embeddings = None
    if batch.embeds is not None:  # image features over their placeholders (llmarch.vision.llava)
        x = model.embed.encode(batch.tokens[None], jnp.dtype(model.cfg.dtype))
        embeddings = jnp.where(batch.embed_mask[None, :, None], batch.embeds[None].astype(x.dtype), x)
    out = model(
        batch.tokens[None],
        positions=batch.positions[None],
        cache=paged_cache.attach(program.kinds, pools, meta),
        logits_at=batch.logits_at[None],
        embeddings=embeddings,
    )
    sampled = sampling.sample_rows(out.logits[0], batch.rows, num_logprobs=program.num_logprobs)
    return [c.pools for c in out.cache], sampled


@functools.partial(jax.jit, static_argnames=("program",), donate_argnames=("pools",))
def run_step(leaves, pools, batch: StepBatch, *, program: Program):
    """One fixed-shape serving step: page copies, the model over the paged cache, sampling."""
    pools = paged_cache.copy_pages(pools, batch.copy_src, batch.copy_dst)
    return _forward(program, leaves, pools, batch)


def _advance(batch: StepBatch, tokens: jax.Array, page_size: int) -> StepBatch:
    """The next decode step of a decode-only ``batch``: each row feeds the token it just
    sampled, one position further, into the slot its block table gives."""
    decode = batch.decode
    rows = decode.rows
    valid = batch.positions >= 0  # [N]: flat token i < the live rows belongs to row first + i
    first = rows - jnp.sum(valid)  # padding rows come first
    row = jnp.minimum(jnp.arange(valid.shape[0]) + first, rows - 1)
    positions = jnp.where(valid, batch.positions + 1, -1)
    pos = jnp.maximum(positions, 0)
    pages = decode.tables[row, pos // page_size]
    live = decode.positions >= 0  # [Rd,1]
    return dataclasses.replace(
        batch,
        tokens=jnp.where(valid, tokens[row], 0),
        positions=positions,
        slots=jnp.where(valid, pages * page_size + pos % page_size, batch.slots),
        decode=dataclasses.replace(
            decode,
            positions=jnp.where(live, decode.positions + 1, -1),
            lengths=jnp.where(live[:, 0], decode.lengths + 1, decode.lengths),
        ),
        rows={**batch.rows, "counter": batch.rows["counter"] + 1},
    )


@functools.partial(jax.jit, static_argnames=("program", "page_size"), donate_argnames=("pools",))
def run_decode(leaves, pools, batch: StepBatch, steps: jax.Array, *, program: Program, page_size: int):
    """``steps`` (<= ``program.decode_steps``) decode-only steps of ``batch`` in one program.

    The caller has given every row's block table the pages for all ``steps`` positions and made
    sure no copy-on-write is pending. Returns the pools and the sampled dict with a leading
    ``[decode_steps]`` axis (entries past ``steps`` are zeros).
    """
    shapes = jax.eval_shape(lambda: _forward(program, leaves, pools, batch)[1])
    out = jax.tree.map(lambda s: jnp.zeros((program.decode_steps, *s.shape), s.dtype), shapes)

    def body(carry):
        i, pools, batch, out = carry
        pools, sampled = _forward(program, leaves, pools, batch)
        out = jax.tree.map(lambda o, s: o.at[i].set(s), out, sampled)
        return i + 1, pools, _advance(batch, sampled["tokens"], page_size), out

    _, pools, _, out = jax.lax.while_loop(lambda c: c[0] < steps, body, (jnp.int32(0), pools, batch, out))
    return pools, out


def compiled_programs() -> int:
    """Programs the engine has compiled in this process (one per bucket and model, and one per
    decode bucket for several decode steps per dispatch)."""
    return run_step._cache_size() + run_decode._cache_size()
