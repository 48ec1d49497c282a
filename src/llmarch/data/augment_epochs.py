"""EDA augmentation in training: every epoch's documents augmented anew, then packed into rows.

The plain pipeline tokenizes and packs the corpus once (``PackedRows``) and shuffles row indices.
Augmentation changes the text, hence the tokens and the packing, so it cannot act on packed rows,
and augmenting once up front would show the model the same perturbation every epoch. Here epoch
``e``'s rows are a pure function of ``(seed, e)``:

1. the training documents, shuffled (``MapDataset.shuffle``) so documents meet new neighbours;
2. ``AugmentDocument`` as a grain ``random_map``: with probability ``prob`` a document is
   augmented, line by line (``unit="line"``, which keeps the line breaks that EDA's word-joining
   would erase) or as one text; each line gets one EDA operation (Wei & Zou 2019) drawn from
   ``ops``: synonym replacement (``sr``), random insertion (``ri``), random swap (``rs``) or random
   deletion (``rd``), at rate ``alpha`` (``p_delete`` for ``rd``);
3. tokenized and packed into exactly as many rows as the un-augmented corpus fills (the stream is
   cut, or continued from its start, to that length), so an epoch always has the same number of
   rows and batches whatever the augmentation did to its length;
4. the rows in a permuted order, as in the plain pipeline.

Global row ``i`` is row ``i mod R`` of epoch ``i div R`` (``R`` rows per epoch), so the iterator's
state is still only its position: a resumed run recomputes the epoch it stopped in and sees exactly
the batches an uninterrupted run sees, without replaying earlier epochs. An epoch is computed when
its first row is read (by grain's prefetch threads, once) and kept while it and the next are read.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from llmarch.checks import check_choice, check_number, fail
from llmarch.data import augment_text as eda
from llmarch.data.packing import PackedRows, pack_documents, tokenize_documents
from llmarch.data.tokenizer import Tokenizer

EDA_OPS = ("sr", "ri", "rs", "rd")
OP_ALIASES = {"synonym": "sr", "insert": "ri", "swap": "rs", "delete": "rd"}
UNITS = ("line", "document")
_OWNER = "AugmentConfig"


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Which EDA operations augment the training documents, and how often (module docstring)."""

    # The operations one is drawn from, uniformly, per augmented line (or document): sr (synonym
    # replacement), ri (random insertion), rs (random swap), rd (random deletion); sr and ri read
    # WordNet (the augment extra).
    ops: tuple[str, ...] = EDA_OPS
    # The share of a line's words that sr, ri and rs change (at least one).
    alpha: float = 0.1
    # The probability that rd deletes each word.
    p_delete: float = 0.1
    # The probability that a document is augmented in an epoch (else it is read as written).
    prob: float = 0.5
    # line: each non-empty line separately, keeping line breaks and indentation; document: the
    # document as one sentence (EDA's unit).
    unit: str = "line"
    # The WordNet dict directory; null searches the usual places (see WordNetSynonyms).
    wordnet: str | None = None

    def __post_init__(self):
        if not isinstance(self.ops, tuple) or not self.ops:
            fail(_OWNER, "ops", self.ops, f"must be a non-empty tuple of {EDA_OPS}")
        for op in self.ops:
            if op not in EDA_OPS:
                fail(_OWNER, "ops", self.ops, f"each must be one of {EDA_OPS}; {op!r} is not")
        if len(set(self.ops)) != len(self.ops):
            fail(_OWNER, "ops", self.ops, "must not repeat an operation")
        for name in ("alpha", "p_delete", "prob"):
            check_number(_OWNER, name, getattr(self, name), "must be in (0, 1]", lambda x: 0 < x <= 1)
        check_choice(_OWNER, "unit", self.unit, UNITS)
        if self.wordnet is not None and (not isinstance(self.wordnet, str) or not self.wordnet):
            fail(_OWNER, "wordnet", self.wordnet, "must be a WordNet dict directory or None")

    @property
    def needs_synonyms(self) -> bool:
        return bool({"sr", "ri"} & set(self.ops))

    @classmethod
    def from_spec(cls, spec: str) -> AugmentConfig:
        """``eda`` (all four operations) or a comma list of ``sr``, ``ri``, ``rs``, ``rd`` (or
        ``synonym``, ``insert``, ``swap``, ``delete``), e.g. ``"swap,delete"``."""
        words = [OP_ALIASES.get(w.strip(), w.strip()) for w in spec.split(",") if w.strip()]
        if words == ["eda"]:
            return cls()
        allowed = f"must be 'eda' or a comma list of {EDA_OPS} (or {tuple(OP_ALIASES)})"
        if not words or any(w not in EDA_OPS for w in words):
            fail("", "--augment", spec, allowed)
        return cls(ops=tuple(dict.fromkeys(words)))


@dataclasses.dataclass(frozen=True)
class AugmentDocument(grain.transforms.RandomMap):
    """A grain transform: the document, augmented with probability ``cfg.prob`` (see the module
    docstring); ``synonyms`` serves ``sr`` and ``ri``."""

    cfg: AugmentConfig
    synonyms: eda.SynonymSource | None = None

    def __post_init__(self):
        if self.cfg.needs_synonyms and self.synonyms is None:
            raise ValueError(f"AugmentConfig.ops={self.cfg.ops} use synonyms: pass synonyms=")

    def random_map(self, text: str, rng: np.random.Generator) -> str:
        if rng.random() >= self.cfg.prob:
            return text
        if self.cfg.unit == "document":
            return self._augment(text, rng)
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if line.strip():
                indent = line[: len(line) - len(line.lstrip())]
                lines[i] = indent + self._augment(line, rng)
        return "\n".join(lines)

    def _augment(self, text: str, rng: np.random.Generator) -> str:
        op, cfg = self.cfg.ops[int(rng.integers(len(self.cfg.ops)))], self.cfg
        if op == "sr":
            return eda.synonym_replacement(text, rng, self.synonyms, alpha=cfg.alpha)
        if op == "ri":
            return eda.random_insertion(text, rng, self.synonyms, alpha=cfg.alpha)
        if op == "rs":
            return eda.random_swap(text, rng, alpha=cfg.alpha)
        return eda.random_deletion(text, rng, p=cfg.p_delete)


def _seed(seed: int, epoch: int, stream: int) -> int:
    """A 32-bit seed for one random stream of one epoch (0: document order, 1: text, 2: rows)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


class AugmentedRows:
    """The training rows, augmented anew every epoch; ``len`` is the rows of one epoch.

    Args:
      documents: the training documents.
      tokenizer, seq_len, bos, model_vocab_size: as in ``pack_documents``.
      cfg: the augmentation.
      synonyms: for ``sr``/``ri``; None reads WordNet (``cfg.wordnet``).
    """

    def __init__(
        self,
        documents: Sequence[str],
        tokenizer: Tokenizer,
        cfg: AugmentConfig,
        *,
        seq_len: int,
        bos: bool = False,
        model_vocab_size: int | None = None,
        synonyms: eda.SynonymSource | None = None,
    ):
        if not isinstance(cfg, AugmentConfig):
            raise TypeError(f"cfg={cfg!r}: must be an AugmentConfig")
        if cfg.needs_synonyms and synonyms is None:
            synonyms = eda.WordNetSynonyms(cfg.wordnet)  # fails now if WordNet is missing
        self.documents, self.tokenizer, self.cfg, self.bos = list(documents), tokenizer, cfg, bos
        self.transform = AugmentDocument(cfg, synonyms)
        # The corpus as written: it fixes the rows per epoch, and is what the run's fingerprint reads.
        self.base = pack_documents(
            self.documents, tokenizer, seq_len=seq_len, bos=bos, model_vocab_size=model_vocab_size
        )
        self.seq_len = seq_len
        self._cache: dict[tuple[int, int, bool], tuple[PackedRows, np.ndarray | None]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.base)

    def padding_row(self) -> dict[str, np.ndarray]:
        return self.base.padding_row()

    def documents_of(self, seed: int, epoch: int, *, shuffle: bool = True) -> list[str]:
        """Epoch ``epoch``'s documents: shuffled (unless ``shuffle=False``) and augmented."""
        ds = grain.MapDataset.source(self.documents)
        if shuffle:
            ds = ds.shuffle(_seed(seed, epoch, 0))
        ds = ds.random_map(self.transform, seed=_seed(seed, epoch, 1))
        return [ds[i] for i in range(len(ds))]

    def epoch(self, seed: int, epoch: int, *, shuffle: bool = True) -> tuple[PackedRows, np.ndarray | None]:
        """``(rows, order)`` of one epoch: its packed rows and the order they are read in (None:
        as packed). Computed once, by whichever thread asks first; the two latest are kept."""
        key = (seed, epoch, shuffle)
        with self._lock:
            if key not in self._cache:
                rows = self._pack(self.documents_of(seed, epoch, shuffle=shuffle))
                order = None
                if shuffle:
                    order = np.random.default_rng(_seed(seed, epoch, 2)).permutation(len(self))
                self._cache[key] = (rows, order)
                while len(self._cache) > 2:  # a batch spans at most one epoch boundary
                    del self._cache[next(iter(self._cache))]  # the oldest computed
            return self._cache[key]

    def _pack(self, texts: list[str]) -> PackedRows:
        """Exactly ``len(self)`` rows of ``texts``: ``len(self) * T + 1`` tokens (a row's targets
        reach one token past it), the stream cut there or, if shorter, continued from its start."""
        tokens, doc_ids = tokenize_documents(texts, self.tokenizer, bos=self.bos)
        need = len(self) * self.seq_len + 1
        if len(tokens) < need:
            copies = -(-need // len(tokens))
            offsets = np.arange(copies, dtype=np.int32) * (int(doc_ids[-1]) + 1)  # documents stay numbered
            tokens = np.tile(tokens, copies)
            doc_ids = np.tile(doc_ids, copies) + np.repeat(offsets, len(doc_ids))
        return PackedRows(tokens[:need], doc_ids[:need], seq_len=self.seq_len, pad_id=self.tokenizer.pad_id)

    def dataset(self, *, seed: int, shuffle: bool = True, num_epochs: int | None = None) -> grain.MapDataset:
        """A ``MapDataset`` of the rows of every epoch in turn (forever when ``num_epochs`` is None)."""
        return _EpochRows(self, seed=seed, shuffle=shuffle, num_epochs=num_epochs)

    def __repr__(self) -> str:
        return f"AugmentedRows(rows_per_epoch={len(self)}, seq_len={self.seq_len}, cfg={self.cfg})"


class _EpochRows(grain.MapDataset):
    """Row ``i`` is row ``i mod R`` of epoch ``i div R``, read in that epoch's order."""

    def __init__(self, rows: AugmentedRows, *, seed: int, shuffle: bool, num_epochs: int | None):
        super().__init__()
        self._rows, self._seed, self._shuffle = rows, seed, shuffle
        self._length = sys.maxsize if num_epochs is None else len(rows) * num_epochs

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range [0, {self._length})")
        epoch, row = divmod(int(index), len(self._rows))
        rows, order = self._rows.epoch(self._seed, epoch, shuffle=self._shuffle)
        return rows[int(order[row]) if order is not None else row]

    def __str__(self) -> str:
        return f"_EpochRows(rows_per_epoch={len(self._rows)}, seed={self._seed}, shuffle={self._shuffle})"


def describe(cfg: AugmentConfig) -> dict[str, Any]:
    """The augmentation as the run's data report records it."""
    return {**dataclasses.asdict(cfg), "ops": list(cfg.ops)}
