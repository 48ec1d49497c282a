"""Corpus cleaning: quality filters, exact and near-duplicate removal, with counts per rule.

Applied to the documents before the train/validation split, so a duplicate cannot sit on both
sides of it. The rules run in this order, and a document removed by one is counted there only:

1. quality filters, each off by default (``CleanConfig.gopher()`` turns on the repetition rules
   with the thresholds of Gopher's MassiveWeb filters, Rae et al. 2021, "Scaling Language Models:
   Methods, Analysis & Insights from Training Gopher", Appendix A.1.1 and Table A1):

   - ``min_chars`` / ``max_chars``: the document's length in characters;
   - ``min_alpha_fraction``: the share of its non-whitespace characters that are letters (junk,
     tables and code dumps are low; Gopher's rule counts words with a letter instead);
   - ``min_printable_fraction``: the share of its characters that are printable or whitespace
     (binary or mis-decoded text is low);
   - ``max_dup_line_fraction``: the share of its non-empty lines that repeat an earlier line of
     the same document (Gopher: 0.30);
   - ``max_dup_ngram_fraction``: the share of its word characters that lie in word
     ``dup_ngram_size``-grams occurring more than once in the document, overlapping words counted
     once (Gopher: 0.15 for 5-grams, down to 0.10 for 10-grams);

2. exact duplicates: the same text after Unicode NFKC, lower-casing and collapsing whitespace
   (a 128-bit BLAKE2b digest of it); the first occurrence is kept;
3. near duplicates: MinHash (Broder 1997) signatures of the set of word ``shingle_size``-grams, and
   locality-sensitive hashing (``datasketch.MinHashLSH``) to find earlier kept documents whose
   estimated Jaccard similarity is at least ``near_dup_threshold``; the first is kept. This is the
   method of Lee et al. 2022 ("Deduplicating Training Data Makes Language Models Better").

Every per-document computation (normalizing, hashing, the quality rules, the MinHash signature) is
a grain ``MapTransform`` over a ``MapDataset`` of the documents: stateless and order-free, so it
can run on grain's threads. Which duplicate is first is a property of the whole corpus: one
ordered pass over those records decides it, and the removals are a grain ``Filter`` on the
documents. ``clean_documents`` returns the kept documents, in corpus order, and a ``CleanReport``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from llmarch.checks import check_int, check_number, fail

# Rules in the order they are applied; a removed document counts under the first rule it fails.
QUALITY_RULES = (
    "min_chars",
    "max_chars",
    "min_alpha_fraction",
    "min_printable_fraction",
    "max_dup_line_fraction",
    "max_dup_ngram_fraction",
)
RULES = (*QUALITY_RULES, "exact_duplicate", "near_duplicate")
SPEC_WORDS = ("none", "exact", "near", "dedup", "gopher", "all")

_OWNER = "CleanConfig"
_WORD = re.compile(r"\w+")


@dataclasses.dataclass(frozen=True)
class CleanConfig:
    """What ``clean_documents`` removes; the defaults remove exact and near duplicates only.
    A ``min_*`` rule at 0 or a ``max_*`` rule at 1 is off (see the module docstring)."""

    # Drop documents whose normalized text equals an earlier one's.
    exact_dedup: bool = True
    # Drop documents whose MinHash-estimated Jaccard similarity to an earlier kept one is at
    # least near_dup_threshold.
    near_dedup: bool = True
    # MinHash permutations (signature length): the Jaccard estimate's standard error is about
    # 1/sqrt(num_perm); the cost grows in proportion.
    num_perm: int = 128
    # The Jaccard similarity of two documents' shingle sets at and above which they are near duplicates.
    near_dup_threshold: float = 0.8
    # Words per shingle (a document with fewer words is one shingle).
    shingle_size: int = 5
    # The fewest characters a kept document has.
    min_chars: int = 0
    # The most characters a kept document has; null: no limit.
    max_chars: int | None = None
    # The least share of a document's non-whitespace characters that are letters.
    min_alpha_fraction: float = 0.0
    # The least share of a document's characters that are printable or whitespace.
    min_printable_fraction: float = 0.0
    # The largest share of a document's non-empty lines that repeat an earlier line (Gopher: 0.30).
    max_dup_line_fraction: float = 1.0
    # The largest share of a document's word characters inside repeated word n-grams (Gopher: 0.15).
    max_dup_ngram_fraction: float = 1.0
    # n of max_dup_ngram_fraction's n-grams.
    dup_ngram_size: int = 5

    def __post_init__(self):
        for name in ("exact_dedup", "near_dedup"):
            if not isinstance(getattr(self, name), bool):
                fail(_OWNER, name, getattr(self, name), "must be True or False")
        check_int(_OWNER, "num_perm", self.num_perm, low=2, high=4096)
        check_number(
            _OWNER, "near_dup_threshold", self.near_dup_threshold, "must be in (0, 1)", lambda x: 0 < x < 1
        )
        check_int(_OWNER, "shingle_size", self.shingle_size, low=1, high=64)
        check_int(_OWNER, "dup_ngram_size", self.dup_ngram_size, low=1, high=64)
        check_int(_OWNER, "min_chars", self.min_chars, low=0)
        if self.max_chars is not None:
            check_int(_OWNER, "max_chars", self.max_chars, low=max(self.min_chars, 1))
        for name in QUALITY_RULES[2:]:
            check_number(_OWNER, name, getattr(self, name), "must be in [0, 1]", lambda x: 0 <= x <= 1)

    @classmethod
    def gopher(cls, **changes: Any) -> CleanConfig:
        """Deduplication plus Gopher's repetition rules (Rae et al. 2021, Table A1): at most 30%
        duplicate lines, at most 15% of characters in duplicate word 5-grams."""
        return cls(**{"max_dup_line_fraction": 0.30, "max_dup_ngram_fraction": 0.15, **changes})

    @classmethod
    def from_spec(cls, spec: str) -> CleanConfig:
        """A config from a comma list of ``exact``, ``near``, ``dedup`` (both), ``gopher`` (its
        repetition rules), ``all`` (all three) or ``none`` (nothing removed), e.g. ``"exact,gopher"``."""
        words = [w.strip() for w in spec.split(",") if w.strip()]
        unknown = [w for w in words if w not in SPEC_WORDS]
        if unknown or not words:
            fail("", "--clean", spec, f"must be a comma list of {SPEC_WORDS}")
        on = set(words)
        both = bool(on & {"dedup", "all"})
        fields = dict(exact_dedup=both or "exact" in on, near_dedup=both or "near" in on)
        return cls.gopher(**fields) if on & {"gopher", "all"} else cls(**fields)


@dataclasses.dataclass(frozen=True)
class CleanReport:
    """What cleaning did: documents and characters in, out, and removed per rule (``RULES``)."""

    documents_in: int
    chars_in: int
    documents_out: int
    chars_out: int
    removed: dict[str, dict[str, int]]  # rule -> {"documents": n, "chars": c}; every rule listed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        """The report in words, one line per rule that removed something."""
        kept = (
            f"cleaning kept {self.documents_out:,} of {self.documents_in:,} documents "
            f"({self.chars_out:,} of {self.chars_in:,} characters)"
        )
        return [kept] + [
            f"  {rule}: removed {r['documents']:,} documents, {r['chars']:,} characters"
            for rule, r in self.removed.items()
            if r["documents"]
        ]


def normalize(text: str) -> str:
    """The text exact deduplication compares: NFKC, lower case, whitespace runs as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def shingles(text: str, size: int) -> set[str]:
    """The set of word ``size``-grams of ``text`` (its words lower-cased, punctuation dropped)."""
    words = _WORD.findall(unicodedata.normalize("NFKC", text).lower())
    if len(words) <= size:
        return {" ".join(words)}
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def duplicate_line_fraction(text: str) -> float:
    """The share of non-empty lines (stripped) that repeat an earlier line of ``text``."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return 0.0 if not lines else (len(lines) - len(set(lines))) / len(lines)


def duplicate_ngram_fraction(text: str, n: int) -> float:
    """The share of word characters inside word ``n``-grams that occur more than once in ``text``
    (every occurrence, overlapping words counted once), as in Gopher's repetition rule."""
    words = text.split()
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = np.zeros(len(words), bool)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i : i + n] = True
    lengths = np.fromiter((len(w) for w in words), np.int64, len(words))
    return float(lengths[covered].sum() / lengths.sum())


def _fraction(text: str, keep) -> float:
    return sum(map(keep, text)) / len(text) if text else 1.0


def quality_rule(text: str, cfg: CleanConfig) -> str | None:
    """The first quality rule (of ``QUALITY_RULES``) that ``text`` fails, or None."""
    if len(text) < cfg.min_chars:
        return "min_chars"
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return "max_chars"
    if cfg.min_alpha_fraction > 0:
        visible = "".join(text.split())
        if _fraction(visible, str.isalpha) < cfg.min_alpha_fraction:
            return "min_alpha_fraction"
    if cfg.min_printable_fraction > 0:
        if _fraction(text, lambda c: c.isprintable() or c.isspace()) < cfg.min_printable_fraction:
            return "min_printable_fraction"
    if cfg.max_dup_line_fraction < 1 and duplicate_line_fraction(text) > cfg.max_dup_line_fraction:
        return "max_dup_line_fraction"
    if (
        cfg.max_dup_ngram_fraction < 1
        and duplicate_ngram_fraction(text, cfg.dup_ngram_size) > cfg.max_dup_ngram_fraction
    ):
        return "max_dup_ngram_fraction"
    return None


@functools.cache
def _permutations(num_perm: int):
    from datasketch import MinHash

    template = MinHash(num_perm=num_perm, seed=1)
    return template.permutations, template.scheme  # drawing them costs more than the hashing


def minhash(text: str, cfg: CleanConfig):
    """The ``datasketch.MinHash`` of ``text``'s shingles (seed 1: the same in every process)."""
    from datasketch import MinHash

    permutations, scheme = _permutations(cfg.num_perm)
    m = MinHash(num_perm=cfg.num_perm, seed=1, permutations=permutations, scheme=scheme)
    m.update_batch([s.encode("utf-8") for s in shingles(text, cfg.shingle_size)])
    return m


@dataclasses.dataclass(frozen=True)
class Inspect(grain.transforms.Map):
    """Per document: ``{"rule": failed quality rule or None, "key": exact digest, "minhash": ...}``.

    The digest and signature are computed only for a document the quality rules keep, and only
    when the config uses them.
    """

    cfg: CleanConfig

    def map(self, text: str) -> dict[str, Any]:
        rule = quality_rule(text, self.cfg)
        record: dict[str, Any] = {"rule": rule, "chars": len(text), "key": None, "minhash": None}
        if rule is None and self.cfg.exact_dedup:
            record["key"] = hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()
        if rule is None and self.cfg.near_dedup:
            record["minhash"] = minhash(text, self.cfg)
        return record


@dataclasses.dataclass(frozen=True)
class KeepIndices(grain.transforms.Filter):
    """Keeps the elements whose position in the source is not in ``removed``."""

    removed: frozenset[int]

    def filter(self, element: tuple[int, str]) -> bool:
        return element[0] not in self.removed


def _decide(records, cfg: CleanConfig) -> dict[int, str]:
    """``{index: rule}`` for every removed document, in one pass in corpus order."""
    from datasketch import MinHashLSH

    removed: dict[int, str] = {}
    seen: set[bytes] = set()
    lsh = MinHashLSH(threshold=cfg.near_dup_threshold, num_perm=cfg.num_perm) if cfg.near_dedup else None
    kept: dict[int, Any] = {}  # index -> MinHash of the documents in the LSH index
    for index, record in enumerate(records):
        if record["rule"] is not None:
            removed[index] = record["rule"]
            continue
        if cfg.exact_dedup:
            if record["key"] in seen:
                removed[index] = "exact_duplicate"
                continue
            seen.add(record["key"])
        if lsh is not None:
            m = record["minhash"]
            # LSH returns candidates that share a band; the estimate from the full signatures
            # decides, so a chance band collision below the threshold does not remove a document.
            if any(m.jaccard(kept[j]) >= cfg.near_dup_threshold for j in lsh.query(m)):
                removed[index] = "near_duplicate"
                continue
            lsh.insert(index, m)
            kept[index] = m
    return removed


def cleaning_dataset(
    documents: Sequence[str], cfg: CleanConfig, *, num_threads: int = 0
) -> tuple[grain.MapDataset, CleanReport]:
    """``(dataset, report)``: a ``MapDataset`` over the documents in which removed ones are None
    (grain's ``filter``; iterating it skips them), and the counts.

    Args:
      documents: the corpus, in order (the first of a set of duplicates is kept).
      cfg: what to remove.
      num_threads: grain threads computing the per-document records (0: this thread).
    """
    if isinstance(documents, str):
        raise TypeError("documents is a str: pass a sequence of documents, e.g. [text]")
    if not isinstance(cfg, CleanConfig):
        raise TypeError(f"cfg={cfg!r}: must be a CleanConfig")
    source = grain.MapDataset.source(list(documents))
    inspected = source.map(Inspect(cfg))
    if num_threads:
        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * num_threads)
        records = inspected.to_iter_dataset(options)  # keeps the order
    else:
        records = (inspected[i] for i in range(len(inspected)))
    removed = _decide(records, cfg)
    counts = {rule: {"documents": 0, "chars": 0} for rule in RULES}
    for index, rule in removed.items():
        counts[rule]["documents"] += 1
        counts[rule]["chars"] += len(documents[index])
    chars_in = sum(map(len, documents))
    report = CleanReport(
        documents_in=len(documents),
        chars_in=chars_in,
        documents_out=len(documents) - len(removed),
        chars_out=chars_in - sum(c["chars"] for c in counts.values()),
        removed=counts,
    )
    indexed = grain.MapDataset.range(len(documents)).map(lambda i: (i, documents[i]))
    kept = indexed.filter(KeepIndices(frozenset(removed))).map(lambda element: element[1])
    return kept, report


def clean_documents(
    documents: Sequence[str], cfg: CleanConfig, *, num_threads: int = 0
) -> tuple[list[str], CleanReport]:
    """``(kept documents in corpus order, report)``; see ``cleaning_dataset``.

    Raises:
      ValueError: every document was removed (the message gives the counts per rule).
    """
    dataset, report = cleaning_dataset(documents, cfg, num_threads=num_threads)
    kept = [d for d in (dataset[i] for i in range(len(dataset))) if d is not None]
    if not kept:
        raise ValueError(
            "cleaning removed every document: " + "; ".join(report.lines()) + "; relax the CleanConfig"
        )
    return kept, report
