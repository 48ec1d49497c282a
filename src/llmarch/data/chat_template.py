"""Chat templates: a conversation as the prompt text its model was trained on, then as token ids.

Used by serving (``llmarch.serve``, which re-exports ``ChatTemplate``) and by the chat data path
of fine-tuning (``llmarch.data.chat``).

A checkpoint's template is the jinja2 source in ``chat_template.jinja`` or in the ``chat_template``
field of ``tokenizer_config.json`` (a string, or a list of ``{"name", "template"}`` from which
"default" is taken), as ``transformers`` reads it. It is rendered the way ``transformers``'
``apply_chat_template`` renders it, since the model learned exactly that text: a sandboxed,
immutable jinja2 environment (templates from the Hub are untrusted code) with ``trim_blocks`` and
``lstrip_blocks``, the loop controls extension, a ``tojson`` filter that does not escape HTML,
``raise_exception`` and ``strftime_now``, and the variables ``messages``,
``add_generation_prompt=True`` and the special tokens (``bos_token``, ``eos_token``, ...).

The rendered text holds special tokens as text (``"<s>"``, ``"<|im_start|>"``), which must become
their ids, whereas llmarch's tokenizers never parse special tokens out of text (a document that
contains ``"</s>"`` must not end early). So the prompt is encoded by a copy of the tokenizer that
does parse them, and without adding any (the template adds BOS itself), as ``transformers`` does.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox

from llmarch.json_config import read_json

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_name(value) -> str | None:
    """A special token of ``tokenizer_config.json``: a string, or an AddedToken dict."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def _special_encoder(tokenizer):
    """``text -> ids`` that turns special-token text into the tokens' ids and adds none."""
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is None:  # the byte tokenizer: no special token has a text form
        return lambda text: [int(t) for t in tokenizer.encode(text)]
    import tokenizers

    copy = tokenizers.Tokenizer.from_str(hf.to_str())
    copy.encode_special_tokens = False
    return lambda text: copy.encode(text, add_special_tokens=False).ids


class ChatTemplate:
    """A compiled chat template and the special tokens it may name.

    Args:
      source: the jinja2 template.
      tokenizer: the model's tokenizer (encodes the rendered prompt).
      special_tokens: ``{"bos_token": "<s>", ...}``; missing ones come from the tokenizer's names.
    """

    def __init__(self, source: str, tokenizer, special_tokens: dict[str, str] | None = None):
        if not isinstance(source, str) or not source.strip():
            raise ValueError("the chat template is empty")
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the chat template does not compile: {e} (line {e.lineno})") from None
        specials = {name: getattr(tokenizer, name, None) for name in SPECIAL_TOKENS}
        specials.update(special_tokens or {})
        self.special_tokens = {k: v if isinstance(v, str) else "" for k, v in specials.items()}
        self.source = source
        self._encode = _special_encoder(tokenizer)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, tokenizer) -> ChatTemplate | None:
        """The template a checkpoint directory ships, or None when it has none."""
        root = Path(path)
        config = read_json(root / TOKENIZER_CONFIG) if (root / TOKENIZER_CONFIG).is_file() else {}
        specials = {name: _token_name(config.get(name)) for name in SPECIAL_TOKENS}
        specials = {k: v for k, v in specials.items() if v is not None}
        if (root / TEMPLATE_FILE).is_file():
            return cls((root / TEMPLATE_FILE).read_text(encoding="utf-8"), tokenizer, specials)
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one serves chat
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            if "default" not in named:
                raise ValueError(
                    f"{root / TOKENIZER_CONFIG} has chat templates {sorted(map(str, named))} but no "
                    "'default' one; pass --chat-template FILE"
                )
            source = named["default"]
        if source is None:
            return None
        if not isinstance(source, str):
            raise ValueError(f"{root / TOKENIZER_CONFIG}: chat_template must be a string, got {source!r:.80}")
        return cls(source, tokenizer, specials)

    @classmethod
    def from_file(
        cls, file: str | os.PathLike, tokenizer, checkpoint: str | os.PathLike | None = None
    ) -> ChatTemplate:
        """A template from a jinja2 file, with the special tokens named by the checkpoint's
        ``tokenizer_config.json`` when there is one."""
        file = Path(file)
        if not file.is_file():
            raise FileNotFoundError(f"--chat-template {file}: no such file")
        specials = {}
        if checkpoint is not None and (Path(checkpoint) / TOKENIZER_CONFIG).is_file():
            config = read_json(Path(checkpoint) / TOKENIZER_CONFIG)
            specials = {n: _token_name(config.get(n)) for n in SPECIAL_TOKENS if _token_name(config.get(n))}
        return cls(file.read_text(encoding="utf-8"), tokenizer, specials)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages``, followed by the start of the assistant's turn unless
        ``add_generation_prompt`` is False (a whole conversation, as trained on).

        Raises:
          ValueError: the template refused the conversation (its ``raise_exception``, e.g.
            "roles must alternate") or failed on it.
        """
        try:
            return self._template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template refused the messages: {e}") from None
        except (TypeError, KeyError, AttributeError) as e:  # a template that assumes other fields
            raise ValueError(f"the chat template failed on the messages: {e}") from None

    def encode(self, messages: list[dict]) -> list[int]:
        """The prompt's token ids."""
        return list(self._encode(self.render(messages)))

    def encode_text(self, text: str) -> list[int]:
        """Token ids of rendered template text: special-token text becomes the tokens' ids, and no
        BOS/EOS is added."""
        return list(self._encode(text))
