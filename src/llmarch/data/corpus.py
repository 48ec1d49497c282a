"""Corpora. The default one is embedded in Python itself, so it exists on every machine."""

from __future__ import annotations


def default_corpus() -> str:
    """The English reference text of Python's documentation (``pydoc_data.topics``), ~1 MB."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))
