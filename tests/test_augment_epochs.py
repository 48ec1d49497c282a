import json
import shutil

import numpy as np
import pytest

from llmarch.data import (
    AugmentConfig,
    AugmentedRows,
    ByteTokenizer,
    batches_per_epoch,
    make_batches,
    pack_documents,
)
from llmarch.data.augment import TableSynonyms
from llmarch.data.augment_epochs import AugmentDocument
from llmarch.data.clean import CleanConfig
from llmarch.train.config import TrainConfig
from llmarch.train.trainer import train

SYNONYMS = TableSynonyms({"quick": ["fast", "speedy"], "dog": ["hound"], "jumps": ["leaps"]})
DOCS = [
    f"The quick brown fox {i} jumps over\n    the lazy dog number {i}.\n\nA second line of doc {i} here."
    for i in range(12)
]


def _rows(cfg=None):
    return AugmentedRows(DOCS, ByteTokenizer(), cfg or AugmentConfig(), seq_len=16, synonyms=SYNONYMS)


def test_line_mode_keeps_line_breaks_and_indentation_and_prob_one_changes_every_document():
    transform = AugmentDocument(AugmentConfig(ops=("rs",), alpha=0.5, prob=1.0), SYNONYMS)
    rng = np.random.default_rng(0)
    out = [transform.random_map(d, rng) for d in DOCS]
    assert all(o != d for o, d in zip(out, DOCS, strict=True))
    for o, d in zip(out, DOCS, strict=True):
        assert [len(line) - len(line.lstrip()) for line in o.split("\n")] == [
            len(line) - len(line.lstrip()) for line in d.split("\n")
        ]
        assert sorted(o.split()) == sorted(d.split())  # swaps only permute words
    whole = AugmentDocument(AugmentConfig(ops=("rd",), p_delete=0.5, prob=1.0, unit="document"))
    assert "\n" not in whole.random_map(DOCS[0], np.random.default_rng(0))


def test_epochs_are_deterministic_differ_and_keep_the_row_count():
    rows = _rows()
    a0, order0 = rows.epoch(seed=3, epoch=0)
    again = _rows().epoch(seed=3, epoch=0)[0]
    a1, order1 = rows.epoch(seed=3, epoch=1)
    assert len(a0) == len(a1) == len(rows) == len(pack_documents(DOCS, ByteTokenizer(), seq_len=16))
    np.testing.assert_array_equal(a0.tokens, again.tokens)
    assert not np.array_equal(a0.tokens, a1.tokens) and not np.array_equal(order0, order1)
    assert rows.documents_of(3, 0) != rows.documents_of(4, 0)
    # ri lengthens every augmented line; rd shortens it: both still fill exactly len(rows) rows.
    for ops in (("ri",), ("rd",)):
        grown = _rows(AugmentConfig(ops=ops, alpha=0.5, p_delete=0.5, prob=1.0))
        assert len(grown.epoch(0, 0)[0]) == len(rows)


def test_batches_resume_exactly_across_epoch_boundaries():
    rows = _rows()  # 68 rows per epoch: 8 batches of 8, the 9th spans two epochs
    assert (len(rows), batches_per_epoch(rows, 8)) == (68, 8)
    it = make_batches(rows, batch_size=8, seed=7)
    full = [next(it) for _ in range(20)]  # two and a half epochs
    for stop in (6, 12):  # in the first epoch; in the second, computed without the first
        it = make_batches(_rows(), batch_size=8, seed=7)
        for _ in range(stop):
            next(it)
        state = it.get_state()
        resumed = make_batches(_rows(), batch_size=8, seed=7)  # a fresh process: nothing cached
        resumed.set_state(state)
        for expected in full[stop:]:
            got = next(resumed)
            for key in expected:
                np.testing.assert_array_equal(got[key], expected[key])
    plain = make_batches(pack_documents(DOCS, ByteTokenizer(), seq_len=16), batch_size=8, seed=7)
    assert any(not np.array_equal(next(plain)["inputs"], b["inputs"]) for b in full)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(ops=()), "AugmentConfig.ops=().*non-empty"),
        (dict(ops=("swap",)), "AugmentConfig.ops=.*'swap' is not"),
        (dict(ops=("rs", "rs")), "must not repeat"),
        (dict(alpha=0.0), r"AugmentConfig.alpha=0.0 is invalid: must be in \(0, 1\]"),
        (dict(prob=1.5), r"AugmentConfig.prob=1.5 is invalid"),
        (dict(unit="word"), "AugmentConfig.unit='word' is invalid"),
    ],
)
def test_bad_augment_configs_raise(changes, message):
    with pytest.raises(ValueError, match=message):
        AugmentConfig(**changes)


def test_augment_specs():
    assert AugmentConfig.from_spec("eda") == AugmentConfig()
    assert AugmentConfig.from_spec("swap, delete").ops == ("rs", "rd")
    with pytest.raises(ValueError, match="--augment='flip' is invalid"):
        AugmentConfig.from_spec("flip")


def test_trainer_cleans_augments_reports_and_resumes_to_the_same_losses(tmp_path):
    """A corpus with duplicates, trained with --clean and --augment: the report counts the
    removals, and a run resumed mid-way (past an epoch boundary) repeats the uninterrupted one."""
    corpus = tmp_path / "corpus.jsonl"
    docs = [" ".join(f"word{(i * 7 + j) % 50}" for j in range(4)) + f"\nline two of {i}" for i in range(16)]
    with corpus.open("w") as f:
        for doc in docs + docs[:4]:  # four exact duplicates
            f.write(json.dumps({"text": doc}) + "\n")
    common = dict(
        data=str(corpus),
        seq_len=32,
        batch_size=8,
        steps=6,
        eval_every=3,
        eval_batches=1,
        checkpoint_every=3,
        log_every=1,
        progress=False,
        tensorboard=False,
        val_fraction=0.2,
        clean=CleanConfig(),
        augment=AugmentConfig(ops=("rs", "rd"), prob=1.0),
    )
    run = lambda: train(TrainConfig(out_dir=str(tmp_path / "run"), **common), log=lambda s: None)  # noqa: E731
    full = run()
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["clean"]["removed"]["exact_duplicate"]["documents"] == 4
    assert report["augment"]["ops"] == ["rs", "rd"]
    assert len(full.train_rows) < 6 * 8 / 2  # more than two epochs in six steps
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "6")
    resumed = run()
    assert sorted(resumed.losses) == [4, 5, 6]
    assert all(resumed.losses[s] == full.losses[s] for s in resumed.losses)
