"""The grain pipeline: packing, shuffling, epochs, per-process sharding, exact resume, errors."""

import itertools

import grain
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llmarch.data import (
    ByteTokenizer,
    batches_per_epoch,
    load_documents,
    make_batches,
    pack_documents,
    train_val_split,
)
from llmarch.data.packing import ROW_KEYS
from llmarch.model import segment_positions

TOK = ByteTokenizer()
# 40 short documents of varied length: several per row, some spanning rows.
DOCS = [f"doc{i}:" + "xyz"[i % 3] * (i % 7) for i in range(40)]


def take(it, n):
    return list(itertools.islice(it, n))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_hand_made_rows():
    # Stream: a b EOS | c d e EOS | f EOS | g h i j EOS  (14 tokens), rows of 4 overlapping by one.
    rows = pack_documents(["ab", "cde", "f", "ghij"], TOK, seq_len=4)
    E, P = TOK.eos_id, TOK.pad_id
    assert len(rows) == 4  # ceil((14 - 1) / 4): the short last row is padded, not dropped
    expected = [
        # inputs, targets, segment_ids, positions, mask
        ([97, 98, E, 99], [98, E, 99, 100], [1, 1, 1, 2], [0, 1, 2, 0], [1, 1, 0, 1]),
        ([100, 101, E, 102], [101, E, 102, E], [1, 1, 1, 2], [0, 1, 2, 0], [1, 1, 0, 1]),
        ([E, 103, 104, 105], [103, 104, 105, 106], [1, 2, 2, 2], [0, 0, 1, 2], [0, 1, 1, 1]),
        ([106, P, P, P], [E, P, P, P], [1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]),
    ]
    for i, want in enumerate(expected):
        row = rows[i]
        for key, value in zip(ROW_KEYS, want, strict=True):
            assert row[key].dtype == np.int32
            assert row[key].tolist() == value, (i, key)


def test_bos_starts_each_document():
    rows = pack_documents(["ab", "cd"], TOK, seq_len=7, bos=True)
    B, E = TOK.bos_id, TOK.eos_id
    row = rows[0]
    assert row["inputs"].tolist() == [B, 97, 98, E, B, 99, 100]
    assert row["targets"].tolist() == [97, 98, E, B, 99, 100, E]
    assert row["mask"].tolist() == [1, 1, 1, 0, 1, 1, 1]
    assert row["positions"].tolist() == [0, 1, 2, 3, 0, 1, 2]


def test_batch_invariants():
    rows = pack_documents(DOCS, TOK, seq_len=16)
    batches = take(make_batches(rows, batch_size=4, seed=0, num_epochs=1, drop_remainder=False), 100)
    assert len(batches) == batches_per_epoch(rows, 4, drop_remainder=False)
    for b in batches:
        assert set(b) == set(ROW_KEYS)
        assert all(v.shape == (4, 16) and v.dtype == np.int32 for v in b.values())
        real = b["segment_ids"] > 0
        # targets are the inputs shifted by one within a row.
        assert np.array_equal(b["targets"][:, :-1][real[:, 1:]], b["inputs"][:, 1:][real[:, 1:]])
        # A target from another document is masked: exactly the inputs that are EOS.
        assert np.array_equal(b["mask"] == 0, ~real | (b["inputs"] == TOK.eos_id))
        # Positions are those the model derives from segment_ids.
        model_positions = np.asarray(segment_positions(jnp.asarray(b["segment_ids"]), (4, 16)))
        assert np.array_equal(b["positions"][real], model_positions[real])
        # Segments are numbered 1, 2, ... from each row's start.
        for seg in b["segment_ids"]:
            seg = seg[seg > 0]
            assert seg[0] == 1 and set(np.diff(seg)) <= {0, 1}


def test_mask_against_document_membership():
    rows = pack_documents(DOCS, TOK, seq_len=16)
    T = rows.seq_len
    for i in range(len(rows)):
        n = min(T, rows.num_tokens - 1 - i * T)
        doc = rows.doc_ids[i * T : i * T + n + 1]
        assert rows[i]["mask"][:n].tolist() == (doc[1:] == doc[:-1]).tolist()


def test_seed_determinism_and_epochs():
    rows = pack_documents(DOCS, TOK, seq_len=8)
    R = len(rows)
    assert R % 4 == 0  # so each epoch is whole batches

    def order(seed, epochs):
        it = make_batches(rows, batch_size=4, seed=seed, num_epochs=epochs, prefetch=0)
        firsts = [tuple(r) for b in it for r in b["inputs"]]
        index = {tuple(rows[i]["inputs"]): i for i in range(R)}
        return [index[f] for f in firsts]

    a, b, c = order(0, 2), order(0, 2), order(1, 2)
    assert a == b and a != c
    assert sorted(a[:R]) == sorted(a[R:]) == list(range(R))  # every row once per epoch
    assert a[:R] != a[R:]  # reshuffled each epoch
    assert order(0, 1) == a[:R]
    unshuffled = take(make_batches(rows, batch_size=4, seed=0, shuffle=False), 1)[0]
    assert np.array_equal(unshuffled["inputs"], np.stack([rows[i]["inputs"] for i in range(4)]))


def test_drop_remainder_false_pads_last_batch():
    rows = pack_documents(DOCS, TOK, seq_len=8)
    R = len(rows)
    batches = list(make_batches(rows, batch_size=R - 1, seed=0, num_epochs=1, drop_remainder=False))
    assert len(batches) == 2 and all(b["inputs"].shape == (R - 1, 8) for b in batches)
    last = batches[1]
    assert last["mask"][1:].sum() == 0 and (last["segment_ids"][1:] == 0).all()
    assert len(list(make_batches(rows, batch_size=R - 1, seed=0, num_epochs=1))) == 1


def test_process_shards_are_disjoint_halves_of_the_global_batch():
    rows = pack_documents(DOCS, TOK, seq_len=8)
    kw = dict(batch_size=6, seed=5, num_epochs=2, drop_remainder=False)
    whole = list(make_batches(rows, **kw, process_index=0, process_count=1))
    parts = [list(make_batches(rows, **kw, process_index=p, process_count=2)) for p in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for g, p0, p1 in zip(whole, *parts, strict=True):
        assert p0["inputs"].shape == (3, 8)
        for key in ROW_KEYS:
            assert np.array_equal(np.concatenate([p0[key], p1[key]]), g[key])
    with pytest.raises(ValueError, match="not divisible by process_count=4"):
        make_batches(rows, batch_size=6, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match=r"process_index=2: must be in \[0, process_count=2\)"):
        make_batches(rows, batch_size=6, seed=0, process_index=2, process_count=2)


def test_resume_with_get_state():
    rows = pack_documents(DOCS, TOK, seq_len=8)
    kw = dict(batch_size=4, seed=7, num_epochs=None)  # runs across epoch boundaries
    reference = take(make_batches(rows, **kw), 12)
    it = make_batches(rows, **kw)
    head = take(it, 5)
    state = it.get_state()
    fresh = make_batches(rows, **kw)
    fresh.set_state(state)
    assert_batches_equal(head + take(fresh, 7), reference)


def test_resume_with_orbax_checkpoint_manager(tmp_path):
    rows = pack_documents(DOCS, TOK, seq_len=8)
    kw = dict(batch_size=4, seed=3, num_epochs=None)
    reference = take(make_batches(rows, **kw), 10)
    it = make_batches(rows, **kw)
    take(it, 6)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(6, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    take(it, 2)  # the live iterator moves on; the checkpoint must not
    fresh = make_batches(rows, **kw)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        assert manager.latest_step() == 6
        manager.restore(6, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_batches_equal(take(fresh, 4), reference[6:])


def test_model_vocab_check_and_errors():
    with pytest.raises(ValueError, match="vocab_size=259, more than the model's model_vocab_size=256"):
        pack_documents(DOCS, TOK, seq_len=8, model_vocab_size=256)
    assert len(pack_documents(DOCS, TOK, seq_len=8, model_vocab_size=259)) > 0
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"seq_len={bad}: must be a positive int"):
            pack_documents(DOCS, TOK, seq_len=bad)
    with pytest.raises(ValueError, match="too short: 3 tokens.*seq_len=8 needs seq_len \\+ 1 = 9"):
        pack_documents(["ab"], TOK, seq_len=8)
    rows = pack_documents(DOCS, TOK, seq_len=8)
    with pytest.raises(ValueError, match=f"batch_size={len(rows) + 1} is larger than the {len(rows)} rows"):
        make_batches(rows, batch_size=len(rows) + 1, seed=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        make_batches(rows, batch_size=0, seed=0)
    with pytest.raises(ValueError, match="num_epochs=0"):
        make_batches(rows, batch_size=2, seed=0, num_epochs=0)
    with pytest.raises(TypeError, match="documents is a str"):
        make_batches("just a string", TOK, seq_len=4, batch_size=1)
    with pytest.raises(ValueError, match="needs tokenizer= and seq_len="):
        make_batches(DOCS, batch_size=1)


def test_tinyshakespeare_batches(shared_data):
    train, val = train_val_split(load_documents(shared_data / "tinyshakespeare.txt"), 0.1, seed=0)
    it = make_batches(train, TOK, seq_len=128, batch_size=8, seed=0)
    batch = next(it)
    assert batch["inputs"].shape == (8, 128) and batch["mask"].all()  # one document: nothing masked
    assert (batch["segment_ids"] == 1).all()
    val_rows = pack_documents(val, TOK, seq_len=128)
    assert batches_per_epoch(val_rows, 8) == len(val_rows) // 8 > 0
    assert TOK.decode(val_rows[0]["inputs"]) in val[0]
