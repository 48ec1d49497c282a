"""Held-out loss over packed rows: the summed next-token loss of a model's parameters over a
fixed, ordered set of batches, computed exactly as the training step computes its loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmarch.data import PackedRows, batches_per_epoch, make_batches
from llmarch.train.step import DEFAULT_LOSS_CHUNK, token_losses


def to_global(batch: dict[str, np.ndarray], data_sharding, blocks: int = 1) -> dict[str, jax.Array]:
    """The global batch of every process's rows (this one's: one of ``blocks`` equal blocks)."""
    if data_sharding is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    return {
        k: jax.make_array_from_process_local_data(data_sharding, v, (v.shape[0] * blocks, *v.shape[1:]))
        for k, v in batch.items()
    }


def make_nll_totals(
    graphdef: nnx.GraphDef,
    rows: PackedRows,
    *,
    batch_size: int,
    batches: int,
    data_sharding=None,
    loss_chunk: int | None = DEFAULT_LOSS_CHUNK,
    progress: Callable[[Any], Any] | None = None,
    rows_block: tuple[int, int] | None = None,
):
    """``totals(params, rest) -> (nats, tokens)``: the summed next-token loss over the scored
    targets of the first ``batches`` batches of ``rows`` in order (padding and cross-document
    targets do not count) and how many targets that is. The loss is the training step's
    (``token_losses`` with ``loss_chunk``); the last batch is padded, not recompiled. ``progress``
    wraps the batch loop (e.g. a ``tqdm`` bar), and is told the running loss if it has
    ``set_postfix_str``. ``totals.batches`` and ``totals.rows`` are how many batches and rows are
    read (``batches`` clamped to the rows there are). ``rows_block``: ``(index, count)``, the block
    of each batch's rows this process feeds (``distributed.process_rows``); None: jax's process
    index and count."""

    @jax.jit
    def eval_step(params, rest, batch):
        nll, _, _ = token_losses(nnx.merge(graphdef, params, rest), batch, loss_chunk)
        mask = batch["mask"].astype(jnp.float32)
        return (nll * mask).sum(), mask.sum()

    batch_size = min(batch_size, len(rows))
    batches = min(batches, batches_per_epoch(rows, batch_size, drop_remainder=False))

    def totals(params, rest) -> tuple[float, int]:
        index, count = rows_block or (None, None)
        it = make_batches(
            rows,
            batch_size=batch_size,
            shuffle=False,
            num_epochs=1,
            drop_remainder=False,
            process_index=index,
            process_count=count,
        )
        loop = zip(range(batches), it, strict=False)
        if progress is not None:
            loop = progress(loop)
        nats, tokens = 0.0, 0
        for _, batch in loop:
            global_batch = to_global(batch, data_sharding, (rows_block or (0, jax.process_count()))[1])
            total, count = eval_step(params, rest, global_batch)
            nats, tokens = nats + float(total), tokens + int(count)
            if hasattr(loop, "set_postfix_str"):
                loop.set_postfix_str(f"loss {nats / max(tokens, 1):.4f}", refresh=False)
        return nats, tokens

    totals.batches = batches
    totals.rows = min(len(rows), batches * batch_size)
    return totals


def make_evaluator(graphdef: nnx.GraphDef, rows: PackedRows, **kwargs):
    """``evaluate(params, rest) -> mean loss`` (nats per scored token) over the batches that
    ``make_nll_totals`` with the same arguments sums."""
    totals = make_nll_totals(graphdef, rows, **kwargs)

    def evaluate(params, rest) -> float:
        nats, tokens = totals(params, rest)
        return nats / max(tokens, 1)

    return evaluate
