"""Instruction-tuning data: JSONL conversations rendered by a chat template, the loss on the
assistant's tokens only (``TrainConfig(data_format="chat")``).

Each non-blank line of the file is one conversation::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

The template is, in order: ``TrainConfig.chat_template`` (a Jinja file); the tokenizer's own (the
``chat_template`` of the ``tokenizer_config.json``, or the ``chat_template.jinja``, beside its
``tokenizer.json``, rendered as ``transformers`` renders it: ``llmarch.data.chat_template``); else
``DEFAULT_TEMPLATE``, ChatML written as plain text (``<|im_start|>role\\ncontent<|im_end|>\\n``), which
every tokenizer, the byte one included, spells without special tokens (stop generation at
``<|im_end|>``).

Which tokens count: an assistant message's span is what the template adds for it beyond the
generation prompt: ``render(messages[:i], add_generation_prompt=True)`` is the text before it, and
``render(messages[:i+1])`` the conversation through it, so the span holds its content and the
template's end of turn (``<|im_end|>``, ``</s>``, ``<|eot_id|>``): the model learns to answer and
to stop, never to write the user's turns or the template's role headers. The text is tokenized span
by span (special-token text becoming the tokens' ids), so the mask is exact by construction; a
template whose rendering of a conversation's beginning is not the beginning of its rendering (one
that rewrites earlier turns) is refused, naming the record.

Conversations are packed like documents (``llmarch.data.packing``): each is one segment that
attention never leaves, and none gets an extra EOS (the template ends its turns).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from llmarch.data.chat_template import ChatTemplate
from llmarch.data.corpus import train_val_split
from llmarch.data.packing import PackedRows
from llmarch.data.tokenizer import TOKENIZER_FILE, Tokenizer

ROLES = ("system", "user", "assistant", "tool")
TRAINED_ROLE = "assistant"
DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def load_conversations(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """The conversations of a JSONL file, each a list of ``{"role", "content"}`` messages.

    Raises:
      FileNotFoundError: no such file.
      ValueError: naming file and line, for a line that is not such a record (an unknown role, a
        content that is not a string, no messages), or a file with fewer than two conversations.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat data {str(path)!r} is not a file: give a JSONL file of conversations")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from e
    conversations = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ValueError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                got = message.get("role") if isinstance(message, dict) else message
                raise ValueError(f"{where}: messages[{i}] role {got!r} is invalid; allowed: {ROLES}")
            if not isinstance(message.get("content"), str):
                raise ValueError(f"{where}: messages[{i}] content must be a string")
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if len(conversations) < 2:
        raise ValueError(
            f"chat data {path} has {len(conversations)} conversation(s): at least 2 are needed "
            "(training and validation)"
        )
    return conversations


def chat_template(
    tokenizer: Tokenizer, *, template: str | os.PathLike | None = None, tokenizer_spec: str | None = None
) -> ChatTemplate:
    """The template conversations are rendered with (see the module docstring for the order)."""
    directory = None
    if tokenizer_spec is not None and tokenizer_spec != "byte":
        spec = Path(tokenizer_spec)
        directory = spec if spec.is_dir() else spec.parent
    if template is not None:
        return ChatTemplate.from_file(template, tokenizer, directory)
    if directory is not None and (directory / TOKENIZER_FILE).is_file():
        found = ChatTemplate.from_checkpoint(directory, tokenizer)
        if found is not None:
            return found
    return ChatTemplate(DEFAULT_TEMPLATE, tokenizer)


def encode_conversation(
    template: ChatTemplate, messages: list[dict[str, str]], *, where: str = "conversation"
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, trained)``: the conversation's tokens, int32 ``[n]``, and whether each is an
    assistant token the loss counts (bool ``[n]``); see the module docstring.

    Raises:
      ValueError: a template that refuses the conversation or rewrites its beginning (naming ``where``).
    """
    try:
        full = template.render(messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != TRAINED_ROLE:
                continue
            before = template.render(messages[:i], add_generation_prompt=True)
            through = template.render(messages[: i + 1], add_generation_prompt=False)
            if not (full.startswith(through) and through.startswith(before)):
                raise ValueError(
                    f"the chat template renders the beginning of the conversation differently from the "
                    f"whole (at messages[{i}]): the assistant's tokens cannot be told apart; give a "
                    "template (TrainConfig.chat_template) that renders each turn once"
                )
            spans.append((len(before), len(through)))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    ids, trained, at = [], [], 0
    for start, end in spans:
        for text, counted in ((full[at:start], False), (full[start:end], True)):
            piece = template.encode_text(text) if text else []
            ids.extend(piece)
            trained.extend([counted] * len(piece))
        at = end
    tail = template.encode_text(full[at:]) if full[at:] else []
    ids.extend(tail)
    trained.extend([False] * len(tail))
    return np.asarray(ids, np.int32), np.asarray(trained, bool)


def pack_conversations(
    conversations: list[list[dict[str, str]]],
    template: ChatTemplate,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    model_vocab_size: int | None = None,
    where: str = "chat data",
) -> PackedRows:
    """The conversations as rows (one segment each) whose ``mask`` counts assistant tokens only.

    Raises:
      ValueError: no assistant token at all, a token id past the model's vocabulary, too few tokens.
    """
    if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"the tokenizer has vocab_size={tokenizer.vocab_size}, more than the model's "
            f"model_vocab_size={model_vocab_size}: its ids would index past the embedding"
        )
    encoded = [
        encode_conversation(template, c, where=f"{where}, conversation {i}")
        for i, c in enumerate(conversations)
    ]
    encoded = [(ids, trained) for ids, trained in encoded if len(ids)]
    tokens = np.concatenate([ids for ids, _ in encoded])
    trained = np.concatenate([t for _, t in encoded])
    doc_ids = np.repeat(np.arange(len(encoded), dtype=np.int32), [len(ids) for ids, _ in encoded])
    if not trained.any():
        raise ValueError(f"{where} has no assistant message: nothing to train on")
    if model_vocab_size is not None and int(tokens.max()) >= model_vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= model_vocab_size={model_vocab_size}")
    return PackedRows(tokens, doc_ids, seq_len=seq_len, pad_id=tokenizer.pad_id, trained=trained)


def load_chat_rows(
    path: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    val_fraction: float,
    seed: int = 0,
    template: str | None = None,
    tokenizer_spec: str | None = None,
    model_vocab_size: int | None = None,
) -> tuple[PackedRows, PackedRows]:
    """``(train, val)`` rows of a JSONL file of conversations, split by conversation as documents
    are (``train_val_split``); see the module docstring."""
    conversations = load_conversations(path)
    compiled = chat_template(tokenizer, template=template, tokenizer_spec=tokenizer_spec)
    train, val = _split(conversations, val_fraction, seed)
    pack: dict[str, Any] = dict(seq_len=seq_len, model_vocab_size=model_vocab_size)
    return (
        pack_conversations(train, compiled, tokenizer, **pack, where=f"{path} (training split)"),
        pack_conversations(val, compiled, tokenizer, **pack, where=f"{path} (validation split)"),
    )


def _split(conversations: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """The conversations split as ``train_val_split`` splits documents (by index, same draw)."""
    index = [str(i) for i in range(len(conversations))]
    train, val = train_val_split(index, val_fraction, seed=seed)
    return [conversations[int(i)] for i in train], [conversations[int(i)] for i in val]
