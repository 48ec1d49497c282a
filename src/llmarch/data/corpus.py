"""Corpora as lists of documents, and a deterministic train/validation split.

A document is one string; the pipeline ends each with EOS and keeps documents from attending to
each other. The default corpus is embedded in Python itself, so it exists on every machine.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

TEXT_SUFFIXES = (".txt", ".md")  # in a directory: one document per file
JSONL_SUFFIX = ".jsonl"  # one document per line


def default_documents() -> list[str]:
    """The English reference topics of Python's documentation (``pydoc_data.topics``), one per document."""
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics)]


def default_corpus() -> str:
    """The English reference text of Python's documentation (``pydoc_data.topics``), ~1 MB."""
    return "\n\n".join(default_documents())


def load_documents(source: str | os.PathLike, *, text_field: str = "text") -> list[str]:
    """The documents of ``source``.

    Args:
      source: ``"default"`` (Python's documentation, one topic per document); a ``.jsonl`` file (one
        document per non-blank line, its text under ``text_field``); any other file (one
        document, e.g. tinyshakespeare.txt); or a directory, searched recursively in sorted path
        order, whose ``.txt``/``.md`` files are one document each and ``.jsonl`` files as above.
      text_field: the key holding the text in each JSON line.
    Returns:
      The documents, in file (and line) order.
    Raises:
      FileNotFoundError: ``source`` does not exist.
      ValueError: a JSON line is malformed or lacks a string ``text_field`` (the message names file
        and line), or the corpus has no documents or only empty ones.
    """
    if isinstance(source, str) and source == "default":
        return _non_empty(default_documents(), "default")
    path = pathlib.Path(source)
    if not path.exists():
        suffixes = "/".join(TEXT_SUFFIXES + (JSONL_SUFFIX,))
        raise FileNotFoundError(
            f"corpus source {str(source)!r} does not exist: allowed are 'default', "
            f"a file, or a directory of {suffixes} files"
        )
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (JSONL_SUFFIX,)
        )
        documents = [doc for f in files for doc in _read_file(f, text_field)]
    else:
        documents = _read_file(path, text_field)
    return _non_empty(documents, path)


def _read_file(path: pathlib.Path, text_field: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from e
    if path.suffix != JSONL_SUFFIX:
        return [text]
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) hold no document
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{number}: no field text_field={text_field!r} (found {keys})")
        if not isinstance(record[text_field], str):
            raise ValueError(
                f"{path}:{number}: field {text_field!r} is a "
                f"{type(record[text_field]).__name__}, expected a string"
            )
        documents.append(record[text_field])
    return documents


def _non_empty(documents: list[str], source) -> list[str]:
    if not any(documents):
        what = "no documents" if not documents else f"only {len(documents)} empty document(s)"
        raise ValueError(f"corpus {str(source)!r} is empty: it has {what}")
    return documents


def train_val_split(
    documents: Sequence[str], val_fraction: float, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Splits ``documents`` into ``(train, val)``, the same way for the same ``seed``.

    With several documents, ``round(val_fraction * n)`` of them (at least one, and at least one left
    for training) are drawn at random for validation; both lists keep the corpus order. A single
    document (e.g. tinyshakespeare) is cut instead: its last ``val_fraction`` of characters is the
    validation text, so nothing the model validates on was trained on.
    """
    if isinstance(documents, str):
        raise TypeError("documents is a str: pass a sequence of documents, e.g. [text]")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: must be in (0, 1)")
    documents = list(documents)
    if not documents:
        raise ValueError("documents is empty: nothing to split")
    if len(documents) == 1:
        text = documents[0]
        cut = int(len(text) * (1.0 - val_fraction))
        if cut == 0 or cut == len(text):
            raise ValueError(
                f"the single document has {len(text)} characters: too short to hold out "
                f"val_fraction={val_fraction} of it"
            )
        return [text[:cut]], [text[cut:]]
    n_val = min(max(round(val_fraction * len(documents)), 1), len(documents) - 1)
    is_val = np.zeros(len(documents), bool)
    is_val[np.random.default_rng(seed).permutation(len(documents))[:n_val]] = True
    return (
        [d for d, v in zip(documents, is_val, strict=True) if not v],
        [d for d, v in zip(documents, is_val, strict=True) if v],
    )
