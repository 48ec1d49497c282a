import itertools

import numpy as np
import pytest

from llmarch.data import clean
from llmarch.data.clean import CleanConfig, clean_documents, cleaning_dataset, shingles

pytest.importorskip("datasketch")

OFF = dict(exact_dedup=False, near_dedup=False)


def _words(rng, n):
    return [f"w{i}" for i in rng.integers(0, 5000, n)]


def test_exact_duplicates_after_normalization_keep_the_first():
    docs = ["The cat sat.", "the  CAT\nsat.", "A dog ran.", "The cat sat!", "a dog ran."]
    kept, report = clean_documents(docs, CleanConfig(near_dedup=False))
    assert kept == ["The cat sat.", "A dog ran.", "The cat sat!"]  # "!" differs: not exact
    assert report.removed["exact_duplicate"] == {"documents": 2, "chars": len(docs[1]) + len(docs[4])}
    assert (report.documents_in, report.documents_out) == (5, 3)
    assert report.chars_out == sum(map(len, kept))


def test_near_duplicates_match_brute_force_jaccard():
    """MinHash LSH removes exactly the documents whose true shingle Jaccard with an earlier kept one
    is above the threshold, on a set built so that every pair is far from it (|J - 0.7| > 0.15)."""
    rng = np.random.default_rng(0)
    bases = [_words(rng, 200) for _ in range(6)]
    docs = []
    for base in bases:
        docs.append(" ".join(base))
        for changed in (2, 15):  # words replaced, spread out: J ~ 0.9 and ~ 0.45 to the base
            variant = list(base)
            for i in np.linspace(5, 194, changed).astype(int):
                variant[i] = f"new{rng.integers(10**9)}"
            docs.append(" ".join(variant))
    order = rng.permutation(len(docs))
    docs = [docs[i] for i in order]
    sets = [shingles(d, 5) for d in docs]
    jaccard = {
        (i, j): len(sets[i] & sets[j]) / len(sets[i] | sets[j])
        for i, j in itertools.combinations(range(len(docs)), 2)
    }
    assert all(abs(j - 0.7) > 0.15 for j in jaccard.values())  # the test's premise
    expected_kept = []
    for j in range(len(docs)):
        if not any(jaccard[(i, j)] >= 0.7 for i in expected_kept):
            expected_kept.append(j)
    kept, report = clean_documents(docs, CleanConfig(exact_dedup=False, near_dup_threshold=0.7))
    assert kept == [docs[j] for j in expected_kept]
    assert report.removed["near_duplicate"]["documents"] == len(docs) - len(expected_kept) == 6
    # Exact deduplication alone misses them all.
    assert len(clean_documents(docs, CleanConfig(near_dedup=False))[0]) == len(docs)


def test_quality_rules_count_documents_and_characters_under_the_first_rule_failed():
    docs = {
        "ok": "A plain sentence of ordinary English words, long enough to pass.",
        "short": "tiny",
        "long": "word " * 100,
        "alpha": "12345 67890 !!!! #### 1234 5678 90 ++ -- ** == 42 43 44 45 46 47",
        "printable": "plain words make up most of this document" + "\x00\x01\x02\x03\x04\x05\x06\x07",
        "lines": "same line\nsame line\nsame line\nanother line here\n",
        "ngrams": "one two three four five one two three four five and then something else",
    }
    cfg = CleanConfig(
        **OFF,
        min_chars=10,
        max_chars=300,
        min_alpha_fraction=0.5,
        min_printable_fraction=0.9,
        max_dup_line_fraction=0.3,
        max_dup_ngram_fraction=0.15,
    )
    kept, report = clean_documents(list(docs.values()), cfg)
    assert kept == [docs["ok"]]
    expected = {
        "min_chars": "short",
        "max_chars": "long",
        "min_alpha_fraction": "alpha",
        "min_printable_fraction": "printable",
        "max_dup_line_fraction": "lines",
        "max_dup_ngram_fraction": "ngrams",
    }
    for rule, name in expected.items():
        assert report.removed[rule] == {"documents": 1, "chars": len(docs[name])}, rule
    assert report.removed["exact_duplicate"]["documents"] == 0
    lines = report.lines()
    assert lines[0].startswith("cleaning kept 1 of 7 documents") and len(lines) == 7


def test_repetition_measures_on_hand_checked_texts():
    assert clean.duplicate_line_fraction("a\nb\na\n\na\n") == pytest.approx(2 / 4)
    assert clean.duplicate_line_fraction("") == 0.0
    # "a b" occurs twice (words 0-1 and 3-4): the four words a, b, a, b of 5 are covered.
    assert clean.duplicate_ngram_fraction("a b c a b", 2) == pytest.approx(4 / 5)
    assert clean.duplicate_ngram_fraction("aa b c", 2) == 0.0
    assert clean.normalize(" Ａ  b\n") == "a b"  # NFKC folds the full-width letter


def test_cleaning_dataset_is_a_grain_filter_and_threads_agree():
    docs = ["x y z w v u", "x y z w v u", "other text entirely here"]
    dataset, report = cleaning_dataset(docs, CleanConfig())
    assert [dataset[i] for i in range(len(dataset))] == [docs[0], None, docs[2]]
    assert clean_documents(docs * 20, CleanConfig(), num_threads=2)[0] == [docs[0], docs[2]]
    with pytest.raises(ValueError, match="removed every document"):
        clean_documents(["ab", "cd"], CleanConfig(min_chars=5))


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("num_perm", 1, r"\[2, 4096\]"),
        ("near_dup_threshold", 1.0, r"\(0, 1\)"),
        ("near_dup_threshold", float("nan"), r"\(0, 1\)"),
        ("shingle_size", 0, r"\[1, 64\]"),
        ("min_chars", -1, ">= 0"),
        ("max_chars", 0, "positive integer"),
        ("min_alpha_fraction", 1.5, r"\[0, 1\]"),
        ("max_dup_line_fraction", -0.1, r"\[0, 1\]"),
        ("exact_dedup", "yes", "True or False"),
    ],
)
def test_bad_config_values_raise_naming_field_value_and_range(field, value, allowed):
    with pytest.raises(ValueError, match=rf"CleanConfig\.{field}=.*invalid: .*{allowed}"):
        CleanConfig(**{field: value})
    with pytest.raises(ValueError, match="max_chars=5 is invalid"):
        CleanConfig(min_chars=10, max_chars=5)


def test_specs():
    assert CleanConfig.from_spec("exact") == CleanConfig(near_dedup=False)
    assert CleanConfig.from_spec("dedup") == CleanConfig()
    assert CleanConfig.from_spec("none") == CleanConfig(**OFF)
    gopher = CleanConfig.from_spec("near,gopher")
    assert (gopher.exact_dedup, gopher.near_dedup, gopher.max_dup_line_fraction) == (False, True, 0.3)
    assert CleanConfig.from_spec("all") == CleanConfig.gopher()
    with pytest.raises(ValueError, match="--clean='fuzzy' is invalid"):
        CleanConfig.from_spec("fuzzy")
