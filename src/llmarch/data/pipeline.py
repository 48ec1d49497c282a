"""The grain input pipeline: packed rows -> shuffle -> epochs -> per-process batches -> prefetch.

Everything before the iterator is a ``grain.MapDataset``: random access by index, no hidden
state. Shuffling permutes row indices (``MapDataset.shuffle``; epoch ``e`` uses seed ``seed + e``,
so each epoch has its own order) and ``repeat`` concatenates epochs. Global batch ``k`` is the
rows at indices ``[k*B, (k+1)*B)`` of that sequence, so a batch may span an epoch boundary, as in
any repeat-then-batch pipeline. Process ``p`` of ``P`` reads only its contiguous slice
``[k*B + p*B/P, k*B + (p+1)*B/P)`` of each global batch, which is the layout
``jax.make_array_from_process_local_data`` expects when the batch axis is split over processes in
process order.

The iterator's state is therefore just the number of batches consumed (grain's
``{"next_index": ...}``). ``get_state()``/``set_state()`` — or ``grain.checkpoint.CheckpointSave``
and ``CheckpointRestore`` in an orbax ``CheckpointManager`` — restore it exactly: the restored
iterator yields the same batches an uninterrupted one would, with no replay or skipped data.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import grain
import jax

from kernels_pallas.intmath import cdiv
from llmarch.data.augment_epochs import AugmentedRows
from llmarch.data.packing import PackedRows, pack_documents
from llmarch.data.tokenizer import Tokenizer


class _ProcessRows(grain.MapDataset):
    """This process's rows of every global batch, in order; padding rows past the end of the data."""

    def __init__(
        self,
        parent: grain.MapDataset,
        *,
        batch_size: int,
        process_index: int,
        process_count: int,
        drop_remainder: bool,
        padding_row: dict[str, Any],
    ):
        super().__init__(parent)
        self._parent_length = len(parent)  # sys.maxsize when repeated forever
        self._global, self._local = batch_size, batch_size // process_count
        self._offset = process_index * self._local
        if drop_remainder or self._parent_length >= sys.maxsize:
            num_batches = self._parent_length // batch_size
        else:
            num_batches = cdiv(self._parent_length, batch_size)
        self._length = num_batches * self._local
        self._padding_row = padding_row

    def __len__(self) -> int:
        return self._length

    def _global_index(self, index: int) -> int:
        batch, within = divmod(index, self._local)
        return batch * self._global + self._offset + within

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range [0, {self._length})")
        g = self._global_index(index)
        return self._parent[g] if g < self._parent_length else self._padding_row

    def __str__(self) -> str:
        return f"_ProcessRows(global={self._global}, local={self._local}, offset={self._offset})"


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    count = jax.process_count() if process_count is None else process_count
    index = jax.process_index() if process_index is None else process_index
    if count < 1:
        raise ValueError(f"process_count={count}: must be >= 1")
    if not 0 <= index < count:
        raise ValueError(f"process_index={index}: must be in [0, process_count={count})")
    return index, count


def batches_per_epoch(
    num_rows: int | PackedRows | AugmentedRows, batch_size: int, *, drop_remainder: bool = True
) -> int:
    """Global batches that one epoch of ``num_rows`` rows fills (a partial one counts unless dropped)."""
    n = len(num_rows) if isinstance(num_rows, PackedRows | AugmentedRows) else num_rows
    return n // batch_size if drop_remainder else cdiv(n, batch_size)


def batch_dataset(
    rows: PackedRows | AugmentedRows,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """The ``MapDataset`` of this process's batches (dicts of int32 ``[B_local, seq_len]``).

    Args:
      rows: the packed corpus (``pack_documents``), or ``AugmentedRows`` (each epoch augmented
        anew, its documents and rows shuffled by ``seed`` and the epoch; see ``augment_epochs``).
      batch_size: the global batch B, summed over processes; each gets ``B / process_count`` rows.
      seed: the shuffle seed, in [0, 2**32).
      shuffle: permute rows (a new order every epoch); False reads them in corpus order.
      num_epochs: passes over the rows; None repeats forever.
      drop_remainder: drop the last partial global batch; if False it is filled with padding rows
        (``mask`` 0), so every batch has the same shape and the step compiles once.
      process_index, process_count: this process and how many there are; default
        ``jax.process_index()`` / ``jax.process_count()``.
    """
    p, P = _process(process_index, process_count)
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r}: must be a positive int")
    if batch_size % P:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by process_count={P}: every "
            f"process needs the same number of rows"
        )
    if batch_size > len(rows):
        raise ValueError(
            f"batch_size={batch_size} is larger than the {len(rows)} rows the data yields "
            f"per epoch at seq_len={rows.seq_len}: use a smaller batch, a shorter "
            f"seq_len or more data"
        )
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs <= 0):
        raise ValueError(f"num_epochs={num_epochs!r}: must be a positive int or None (forever)")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed}: must be in [0, 2**32)")
    if isinstance(rows, AugmentedRows):  # its epochs differ, so it repeats (and shuffles) itself
        ds = rows.dataset(seed=seed, shuffle=shuffle, num_epochs=num_epochs)
    else:
        ds = grain.MapDataset.source(rows)
        if shuffle:
            ds = ds.shuffle(seed)  # index-level permutation; reshuffled per epoch by the index's epoch
        ds = ds.repeat(num_epochs)
    ds = _ProcessRows(
        ds,
        batch_size=batch_size,
        process_index=p,
        process_count=P,
        drop_remainder=drop_remainder,
        padding_row=rows.padding_row(),
    )
    return ds.batch(batch_size // P, drop_remainder=True)  # _ProcessRows' length is a multiple


def make_batches(
    documents: Sequence[str] | PackedRows | AugmentedRows,
    tokenizer: Tokenizer | None = None,
    *,
    seq_len: int | None = None,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    bos: bool = False,
    prefetch: int = 2,
    model_vocab_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """An iterator of batches for the train step, with exact ``get_state``/``set_state``.

    Each batch is a dict of numpy int32 ``[batch_size / process_count, seq_len]`` arrays: ``inputs``,
    ``targets``, ``segment_ids``, ``positions``, ``mask`` (see ``llmarch.data.packing``).

    Args:
      documents: the corpus (tokenized here, once), or rows already packed by ``pack_documents``
        or ``AugmentedRows`` (then ``tokenizer``, ``seq_len``, ``bos`` and ``model_vocab_size`` are
        not used).
      tokenizer, seq_len, bos, model_vocab_size: as in ``pack_documents``.
      prefetch: batches prepared ahead by background threads; 0 reads in the calling thread.
      batch_size, seed, shuffle, num_epochs, drop_remainder, process_index, process_count: as in
        ``batch_dataset``.
    """
    if isinstance(documents, PackedRows | AugmentedRows):
        rows = documents
    else:
        if tokenizer is None or seq_len is None:
            raise ValueError("make_batches of documents needs tokenizer= and seq_len=")
        rows = pack_documents(
            documents, tokenizer, seq_len=seq_len, bos=bos, model_vocab_size=model_vocab_size
        )
    if not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch={prefetch!r}: must be an int >= 0")
    ds = batch_dataset(
        rows,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        drop_remainder=drop_remainder,
        process_index=process_index,
        process_count=process_count,
    )
    # Threads suffice: a batch is a few numpy slices, and threads keep the state exact and cheap.
    options = grain.ReadOptions(num_threads=min(prefetch, 4), prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))
