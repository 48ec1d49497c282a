"""Hugging Face Hub repository ids wherever a checkpoint directory is accepted.

``--checkpoint Qwen/Qwen3-0.6B`` (or ``load_for_inference("Qwen/Qwen3-0.6B")``) means that
repository's files in the local Hugging Face cache, downloaded first when they are not there and
downloading is allowed. ``huggingface_hub.snapshot_download`` does the work, so the cache is the
one transformers and vLLM share (``HF_HOME``, ``HF_HUB_CACHE``), offline mode (``HF_HUB_OFFLINE=1``)
is honoured, and a token (``HF_TOKEN``, ``hf auth login``) opens gated repositories. Only the files
llmarch reads are fetched: configs, safetensors weights (the ``model*.safetensors`` set the loader
reads, not a repository's other copies of them) and tokenizer files; never pickled ``*.bin``
weights.

A string is taken for a repository id only when no file or directory of that name exists and it
has the Hub's ``org/name`` form, so local paths always win; a ``Path`` is always a path.
"""

from __future__ import annotations

import os

# What `llmarch.inference.loading` and `llmarch.export` read from a Hugging Face checkpoint.
ALLOW_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def is_repo_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hub model id, ``org/name`` (by the Hub's own rule,
    ``huggingface_hub.utils.validate_repo_id``). A bare ``name`` is not taken for one: it reads as a
    directory that is missing more often than as one of the few ids without an organization."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve(path: str | os.PathLike, *, what: str = "checkpoint") -> str | os.PathLike:
    """``path`` itself when it exists on disk or is not a repository id; else the local directory
    of the repository's snapshot (from the cache, downloaded there first when needed); ``what``
    names it in errors (e.g. "--teacher").

    Raises:
      FileNotFoundError: naming the id, when it is neither cached nor downloadable (offline mode, no
        network, no such repository) and saying how to fix it.
      PermissionError: for a gated or private repository without a token that opens it.
    """
    if not isinstance(path, str) or os.path.lexists(path) or not is_repo_id(path):
        return path
    import huggingface_hub
    from huggingface_hub import errors

    where = f"{what} {path!r} is not a local directory, and as a Hugging Face repo id it"
    local = "or pass a local checkpoint directory"
    try:
        return huggingface_hub.snapshot_download(repo_id=path, allow_patterns=list(ALLOW_PATTERNS))
    except errors.GatedRepoError:
        raise PermissionError(
            f"{where} is gated: accept its terms on huggingface.co, then log in (`hf auth login` or "
            f"HF_TOKEN=...), {local}"
        ) from None
    except errors.RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{where} does not exist on the Hub (or is private: log in with `hf auth login` or "
            f"HF_TOKEN=...); check the id, {local}"
        ) from None
    except errors.RevisionNotFoundError as e:
        raise FileNotFoundError(f"{where} has no revision 'main' ({_line(e)}); {local}") from None
    except errors.LocalEntryNotFoundError as e:
        cache = f"(cache: {huggingface_hub.constants.HF_HUB_CACHE})"
        fetch = f"`hf download {path}` where there is network, into the same cache"
        if huggingface_hub.is_offline_mode():
            problem = f"is not in the cache {cache}, and HF_HUB_OFFLINE is set"
            fix = f"set HF_HUB_OFFLINE=0 to download it, run {fetch},"
        else:
            partly = "only partly" if isinstance(e, errors.IncompleteSnapshotError) else "not"
            problem = f"is {partly} in the cache {cache}, and the Hub cannot be reached"
            fix = f"check the network, run {fetch},"
        raise FileNotFoundError(f"{where} {problem}: {fix} {local}") from None
    except errors.HfHubHTTPError as e:
        raise FileNotFoundError(f"{where} cannot be downloaded: {_line(e)}; {local}") from None


def _line(error: BaseException) -> str:
    """The first line of an error's message (the Hub's errors carry request ids and URLs after it)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
