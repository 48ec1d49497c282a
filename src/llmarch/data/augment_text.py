"""Text augmentation: the four EDA operations (Wei & Zou 2019) and sentence reordering.

EDA ("Easy Data Augmentation", arXiv:1901.11196) perturbs a sentence of ``l`` words with
synonym replacement (SR), random insertion (RI), random swap (RS) and random deletion (RD).
SR, RI and RS change ``n = max(1, round(alpha * l))`` words; RD deletes each word with
probability ``p``. The paper finds ``alpha = p = 0.1`` a good default for most data sets.

Each operation has two forms:

- a plain function ``op(text, rng, ...) -> str``, with ``rng`` a ``np.random.Generator``
  (or an int seed);
- a grain ``RandomMap`` transform, so ``MapDataset.random_map(op, seed=...)`` makes the
  augmentation of element ``i`` a function of ``(seed, i)`` alone. It applies to a ``str``
  element, or to the ``field`` of a dict element, leaving the other fields alone.

Words are whitespace-separated tokens, and the output joins them with single spaces. A
token's surrounding punctuation and leading capital survive synonym replacement
("Car," -> "Automobile,").

Synonyms come from a ``SynonymSource``: ``WordNetSynonyms`` (WordNet 3.0 through nltk,
as the paper did) or ``TableSynonyms`` (a user's dict).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import re
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import grain
import numpy as np

__all__ = [
    "STOP_WORDS",
    "EasyDataAugmentation",
    "RandomDeletion",
    "RandomInsertion",
    "RandomSwap",
    "SentenceReorder",
    "SynonymReplacement",
    "SynonymSource",
    "TableSynonyms",
    "WordNetSynonyms",
    "find_wordnet_dir",
    "random_deletion",
    "random_insertion",
    "random_swap",
    "sentence_reorder",
    "split_sentences",
    "synonym_replacement",
]

# The stop-word list of the EDA reference code (itself NLTK's English list, minus a few):
# replacing "the" or "of" by a WordNet "synonym" ("of" has none, "the" none, but "a" ->
# "angstrom") changes grammar rather than wording.
STOP_WORDS: frozenset[str] = frozenset(
    """
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself
she her hers herself it its itself they them their theirs themselves what which who whom
this that these those am is are was were be been being have has had having do does did
doing a an the and but if or because as until while of at by for with about against
between into through during before after above below to from up down in out on off over
under again further then once here there when where why how all any both each few more
most other some such no nor not only own same so than too very s t can will just don
should now
""".split()
)

Rng = np.random.Generator | int


# ---------------------------------------------------------------------------------------
# Synonym sources
# ---------------------------------------------------------------------------------------


@runtime_checkable
class SynonymSource(Protocol):
    """Anything that maps a lower-case word to its synonyms.

    ``synonyms(word)`` returns the synonyms of ``word`` (never ``word`` itself), possibly
    multi-word ("cable car"), in an order that does not change between processes: the
    augmentations pick among them by index, so a set's hash order would break determinism.
    """

    def synonyms(self, word: str) -> Sequence[str]: ...


@dataclasses.dataclass(frozen=True)
class TableSynonyms:
    """Synonyms from a user's table ``{word: [synonym, ...]}``; keys are matched lower-case."""

    table: Mapping[str, Sequence[str]]

    def __post_init__(self):
        clean: dict[str, tuple[str, ...]] = {}
        for word, options in self.table.items():
            if isinstance(options, str) or not all(isinstance(s, str) for s in options):
                raise TypeError(f"table[{word!r}]={options!r}: allowed is a list of str synonyms")
            key = word.lower()
            # dict.fromkeys dedupes and keeps the user's order, which fixes the choice by index.
            merged = dict.fromkeys((*clean.get(key, ()), *(s for s in options if s.lower() != key)))
            clean[key] = tuple(merged)
        object.__setattr__(self, "table", clean)

    def synonyms(self, word: str) -> tuple[str, ...]:
        return self.table.get(word.lower(), ())


# Where WordNet 3.0's dict directory is installed: Debian/Ubuntu `wordnet-base`, Princeton's
# own `make install`, and nltk_data's unzipped corpus. $WNSEARCHDIR and $WNHOME/dict are
# WordNet's own variables for it.
_WORDNET_DIRS = (
    "/usr/share/wordnet",
    "/usr/local/share/wordnet",
    "/usr/local/WordNet-3.0/dict",
    "/usr/share/nltk_data/corpora/wordnet",
    "/usr/local/share/nltk_data/corpora/wordnet",
    "~/nltk_data/corpora/wordnet",
)

# WordNet 3.0's lexicographer files, numbered as in lexnames(5WN). nltk reads them from a
# `lexnames` file that Debian's wordnet-base leaves out (its README.Debian says why); the
# list is fixed by the database format, so it is given here when the file is absent.
_LEXNAMES = """
adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body
noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location
noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process
noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change
verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation
verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather
adj.ppl
""".split()


def _is_wordnet_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in ("index.noun", "data.noun", "index.verb"))


def find_wordnet_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The WordNet dict directory: ``path`` if it is one, else the first found, else None."""
    if path is not None:
        candidates = [Path(path)]
    else:
        env = [os.environ.get("WNSEARCHDIR"), os.environ.get("WNHOME") and f"{os.environ['WNHOME']}/dict"]
        candidates = [Path(p) for p in (*filter(None, env), *_WORDNET_DIRS)]
    for candidate in candidates:
        candidate = candidate.expanduser()
        if _is_wordnet_dir(candidate):
            return candidate.resolve()
    return None


_READER_LOCK = threading.Lock()


@functools.cache
def _wordnet_reader(root: str):
    """nltk's WordNetCorpusReader on ``root``, built once per process (~1 s to index)."""
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _Reader(WordNetCorpusReader):
        def open(self, file):
            if file == "lexnames" and not os.path.isfile(os.path.join(root, "lexnames")):
                return io.StringIO("".join(f"{i:02d}\t{name}\t0\n" for i, name in enumerate(_LEXNAMES)))
            return super().open(file)

        def map_wn(self, version="wordnet"):
            # Only multilingual (OMW) lookups use this map, and we load no OMW data; nltk's
            # default would go looking for its own downloaded 'wordnet' corpus to map from.
            return None

    # Recent nltk refuses to read outside its data roots; appending the dict directory to
    # nltk.data.path is the opt-in its error names, scoped to exactly this directory.
    if root not in nltk.data.path:
        nltk.data.path.append(root)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions")
        return _Reader(root, None)


@functools.lru_cache(maxsize=1 << 16)
def _wordnet_synonyms(root: str, word: str) -> tuple[str, ...]:
    # One lock: the first call indexes the database (others wait rather than redo it), and
    # nltk's reader seeks in shared file handles, which grain's worker threads must not interleave.
    with _READER_LOCK:
        reader = _wordnet_reader(root)
        names = {
            lemma.name().replace("_", " ").lower()
            for synset in reader.synsets(word)
            for lemma in synset.lemmas()
        }
    names.discard(word)
    return tuple(sorted(names))


@dataclasses.dataclass(frozen=True)
class WordNetSynonyms:
    """Synonyms from WordNet 3.0 (all lemmas of all synsets of the word), read with nltk.

    Args:
      path: the WordNet dict directory (holding ``index.noun``, ``data.noun``, ...). None
        searches $WNSEARCHDIR, $WNHOME/dict and the usual install places (Debian's
        ``apt-get install wordnet-base`` puts it in /usr/share/wordnet). Nothing is
        downloaded. Needs the ``augment`` extra (nltk).

    Only the directory is stored, so the source pickles into grain's worker processes; the
    database is indexed lazily, once per process.
    """

    path: str | os.PathLike | None = None
    root: str = dataclasses.field(init=False)

    def __post_init__(self):
        try:
            import nltk  # noqa: F401
        except ImportError as err:
            raise ImportError("WordNetSynonyms needs nltk: pip install 'llmarch[augment]'") from err
        found = find_wordnet_dir(self.path)
        if found is None and self.path is not None:
            raise ValueError(
                f"path={str(self.path)!r} is not a WordNet dict directory: allowed is a "
                "directory holding index.noun, data.noun and index.verb"
            )
        if found is None:
            raise FileNotFoundError(
                f"no WordNet database found in $WNSEARCHDIR, $WNHOME/dict or {list(_WORDNET_DIRS)}: "
                "install it (Debian/Ubuntu: apt-get install wordnet-base), pass path=, or use "
                "TableSynonyms"
            )
        object.__setattr__(self, "root", str(found))

    def synonyms(self, word: str) -> tuple[str, ...]:
        return _wordnet_synonyms(self.root, word.lower())


# ---------------------------------------------------------------------------------------
# The operations, as plain functions
# ---------------------------------------------------------------------------------------

_CORE = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)
# A sentence ends at . ! or ?, possibly followed by a closing quote or bracket, then space.
# Abbreviations ("Dr. No") split too: good enough to shuffle sentences, not to parse them.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")


def _check_fraction(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r}: allowed range is [0, 1]")
    return float(value)


def _check_count(name: str, value: int | None) -> int | None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0
    ):
        raise ValueError(f"{name}={value!r}: allowed is None or an int >= 0")
    return value


def _num_changes(num_words: int, alpha: float, n: int | None) -> int:
    """EDA's n = max(1, round(alpha * l)); alpha = 0 turns the operation off; n overrides."""
    _check_fraction("alpha", alpha)
    if _check_count("n", n) is not None:
        return n
    return 0 if alpha == 0 or num_words == 0 else max(1, round(alpha * num_words))


def _key(token: str) -> str:
    """The lower-case word inside a token, without its surrounding punctuation."""
    return _CORE.match(token).group(2).lower()


def _has_synonyms(word: str, synonyms: SynonymSource, stop_words: frozenset[str]) -> bool:
    return bool(word) and word not in stop_words and bool(synonyms.synonyms(word))


def _replace_word(token: str, synonym: str) -> str:
    """``synonym`` in place of the word of ``token``, keeping its punctuation and capital."""
    before, word, after = _CORE.match(token).groups()
    if word[:1].isupper():
        synonym = synonym[:1].upper() + synonym[1:]
    return f"{before}{synonym}{after}"


def synonym_replacement(
    text: str,
    rng: Rng,
    synonyms: SynonymSource,
    *,
    alpha: float = 0.1,
    n: int | None = None,
    stop_words: frozenset[str] = STOP_WORDS,
) -> str:
    """EDA's SR: replace ``n`` randomly chosen words, that are no stop words and have
    synonyms, each by one of its synonyms chosen at random.

    ``n = max(1, round(alpha * num_words))`` unless given; when fewer words are eligible,
    all of them are replaced.
    """
    rng = np.random.default_rng(rng)
    words = text.split()
    n = _num_changes(len(words), alpha, n)
    eligible = [i for i, w in enumerate(words) if _has_synonyms(_key(w), synonyms, stop_words)]
    for i in np.sort(rng.choice(len(eligible), size=min(n, len(eligible)), replace=False)):
        token = words[eligible[i]]
        options = synonyms.synonyms(_key(token))
        words[eligible[i]] = _replace_word(token, options[rng.integers(len(options))])
    return " ".join(words)


def random_insertion(
    text: str,
    rng: Rng,
    synonyms: SynonymSource,
    *,
    alpha: float = 0.1,
    n: int | None = None,
    stop_words: frozenset[str] = STOP_WORDS,
) -> str:
    """EDA's RI, ``n`` times: take a random word of the text that has synonyms (stop words
    excluded, as in SR), and insert a random synonym of it at a random position.

    Each insertion adds one synonym (a multi-word synonym adds its words). A text with no
    word that has a synonym comes back unchanged.
    """
    rng = np.random.default_rng(rng)
    words = text.split()
    n = _num_changes(len(words), alpha, n)
    # Candidates come from the original words, so inserted synonyms are not themselves
    # expanded (the reference code may pick them, which drifts the meaning further).
    candidates = [_key(w) for w in words if _has_synonyms(_key(w), synonyms, stop_words)]
    for _ in range(n if candidates else 0):
        options = synonyms.synonyms(candidates[rng.integers(len(candidates))])
        words.insert(int(rng.integers(len(words) + 1)), options[rng.integers(len(options))])
    return " ".join(words)


def random_swap(text: str, rng: Rng, *, alpha: float = 0.1, n: int | None = None) -> str:
    """EDA's RS: ``n`` times, swap two words at distinct random positions."""
    rng = np.random.default_rng(rng)
    words = text.split()
    n = _num_changes(len(words), alpha, n)
    for _ in range(n if len(words) >= 2 else 0):
        i, j = rng.choice(len(words), size=2, replace=False)
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


def random_deletion(text: str, rng: Rng, *, p: float = 0.1) -> str:
    """EDA's RD: delete each word independently with probability ``p``.

    A non-empty text never comes back empty: if every word was drawn for deletion, one of
    them, chosen at random, is kept (as in the reference code).
    """
    rng = np.random.default_rng(rng)
    _check_fraction("p", p)
    words = text.split()
    if not words:
        return ""
    keep = rng.random(len(words)) >= p
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return " ".join(w for w, k in zip(words, keep, strict=True) if k)


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, split after . ! or ? (and a closing quote) followed by space."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def sentence_reorder(text: str, rng: Rng) -> str:
    """Split ``text`` into sentences and join them, with single spaces, in a random order."""
    rng = np.random.default_rng(rng)
    sentences = split_sentences(text)
    return " ".join(sentences[i] for i in rng.permutation(len(sentences)))


# ---------------------------------------------------------------------------------------
# The same operations as grain transforms
# ---------------------------------------------------------------------------------------


def apply_to_field(element: Any, field: str, fn: Callable[[Any], Any]) -> Any:
    """``fn(element)`` for a bare value, else a copy of the dict with ``fn`` applied to one field."""
    if not isinstance(element, Mapping):
        return fn(element)
    if field not in element:
        raise ValueError(f"field={field!r} is not in the element: allowed are its keys {list(element)}")
    return {**element, field: fn(element[field])}


@dataclasses.dataclass(frozen=True)
class _TextAugment(grain.transforms.RandomMap):
    """Applies ``self.augment`` to a ``str`` element or to ``element[field]``."""

    field: str = dataclasses.field(default="text", kw_only=True)

    def random_map(self, element, rng: np.random.Generator):
        def run(text):
            if not isinstance(text, str):
                raise TypeError(f"{type(self).__name__} got a {type(text).__name__}: allowed is str")
            return self.augment(text, rng)

        return apply_to_field(element, self.field, run)

    def augment(self, text: str, rng: np.random.Generator) -> str:
        raise NotImplementedError


def _check_counted(alpha: float, n: int | None) -> None:
    _check_fraction("alpha", alpha)
    _check_count("n", n)


@dataclasses.dataclass(frozen=True)
class SynonymReplacement(_TextAugment):
    """Grain form of ``synonym_replacement``."""

    synonyms: SynonymSource
    alpha: float = 0.1
    n: int | None = None
    stop_words: frozenset[str] = dataclasses.field(default=STOP_WORDS, repr=False)

    def __post_init__(self):
        _check_counted(self.alpha, self.n)

    def augment(self, text, rng):
        return synonym_replacement(
            text, rng, self.synonyms, alpha=self.alpha, n=self.n, stop_words=self.stop_words
        )


@dataclasses.dataclass(frozen=True)
class RandomInsertion(_TextAugment):
    """Grain form of ``random_insertion``."""

    synonyms: SynonymSource
    alpha: float = 0.1
    n: int | None = None
    stop_words: frozenset[str] = dataclasses.field(default=STOP_WORDS, repr=False)

    def __post_init__(self):
        _check_counted(self.alpha, self.n)

    def augment(self, text, rng):
        return random_insertion(
            text, rng, self.synonyms, alpha=self.alpha, n=self.n, stop_words=self.stop_words
        )


@dataclasses.dataclass(frozen=True)
class RandomSwap(_TextAugment):
    """Grain form of ``random_swap``."""

    alpha: float = 0.1
    n: int | None = None

    def __post_init__(self):
        _check_counted(self.alpha, self.n)

    def augment(self, text, rng):
        return random_swap(text, rng, alpha=self.alpha, n=self.n)


@dataclasses.dataclass(frozen=True)
class RandomDeletion(_TextAugment):
    """Grain form of ``random_deletion``."""

    p: float = 0.1

    def __post_init__(self):
        _check_fraction("p", self.p)

    def augment(self, text, rng):
        return random_deletion(text, rng, p=self.p)


@dataclasses.dataclass(frozen=True)
class SentenceReorder(_TextAugment):
    """Grain form of ``sentence_reorder``."""

    def augment(self, text, rng):
        return sentence_reorder(text, rng)


@dataclasses.dataclass(frozen=True)
class EasyDataAugmentation(_TextAugment):
    """The paper's procedure for one augmented sentence: one of SR, RI, RS, RD, chosen
    uniformly at random per element, with its own rate (0 leaves that operation out)."""

    synonyms: SynonymSource
    alpha_sr: float = 0.1
    alpha_ri: float = 0.1
    alpha_rs: float = 0.1
    p_rd: float = 0.1

    def __post_init__(self):
        for name in ("alpha_sr", "alpha_ri", "alpha_rs", "p_rd"):
            _check_fraction(name, getattr(self, name))
        if not any((self.alpha_sr, self.alpha_ri, self.alpha_rs, self.p_rd)):
            raise ValueError("alpha_sr = alpha_ri = alpha_rs = p_rd = 0: allowed is at least one > 0")

    def augment(self, text, rng):
        ops = [
            op
            for op, rate in (
                (lambda: synonym_replacement(text, rng, self.synonyms, alpha=self.alpha_sr), self.alpha_sr),
                (lambda: random_insertion(text, rng, self.synonyms, alpha=self.alpha_ri), self.alpha_ri),
                (lambda: random_swap(text, rng, alpha=self.alpha_rs), self.alpha_rs),
                (lambda: random_deletion(text, rng, p=self.p_rd), self.p_rd),
            )
            if rate > 0
        ]
        return ops[rng.integers(len(ops))]()
