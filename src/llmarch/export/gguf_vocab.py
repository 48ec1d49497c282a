"""An llmarch tokenizer as llama.cpp's GGUF vocabulary: the ``tokenizer.ggml.*`` metadata.

Both llmarch tokenizers are byte-level, so both are written as llama.cpp's ``"gpt2"`` tokenizer
model (byte-level BPE): tokens are strings over GPT-2's byte alphabet (each byte shown as one
printable character), merges are ``"left right"`` strings in priority order, and a pre-tokenizer
name (``tokenizer.ggml.pre``) tells llama.cpp how to split text before BPE.

- ``BPETokenizer``: its ``tokenizer.json``'s vocabulary, merges and added tokens, as llama.cpp's
  ``convert_hf_to_gguf.py`` writes them (special added tokens CONTROL, other added tokens
  USER_DEFINED, ids no token has ``[PAD<id>]`` UNUSED). A ``ByteLevel`` pre-tokenizer with GPT-2's
  regex and no prefix space is llama.cpp's ``"gpt-2"``; any other pre-tokenizer (Llama 3's and
  Qwen's split regexes) must be named by the caller (``tokenizer_pre``), since llama.cpp knows them
  by name only (its converter recognizes them by hashing a test encoding).
- ``ByteTokenizer``: ids 0..255 are the bytes (their byte-level characters), 256..258 are
  ``<pad>``, ``<s>``, ``</s>`` (CONTROL), with no merges, so BPE leaves every byte a token of
  its own whatever the pre-tokenizer splits. llama.cpp requires a merges array and the ``gguf``
  writer refuses an empty one, so one merge is written that can never apply: ``"<pad> <pad>"``,
  whose left side is a control token, never a symbol of the text BPE sees.

Neither tokenizer adds BOS or EOS to a prompt (``add_bos_token`` false), as llmarch encodes them.
"""

from __future__ import annotations

import dataclasses
import json

import gguf

from llmarch.data.tokenizer import BPETokenizer, ByteTokenizer

# A merge no text can trigger (see the module docstring): ByteTokenizer's vocabulary has no merges.
UNUSED_MERGE = "<pad> <pad>"
BYTE_SPECIALS = {ByteTokenizer.PAD: "<pad>", ByteTokenizer.BOS: "<s>", ByteTokenizer.EOS: "</s>"}
# llama.cpp's name of the GPT-2 split regex, which ``tokenizers``' ByteLevel(use_regex=True) uses.
GPT2_PRE = "gpt-2"


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: entry b is the character that stands for byte b.

    Bytes that are printable Latin-1 characters other than space and soft hyphen stand for
    themselves; the other 68 take the code points 256, 257, ... in byte order, so that no
    token string holds whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    kept = set(printable)
    out, extra = [], 256
    for b in range(256):
        if b in kept:
            out.append(chr(b))
        else:
            out.append(chr(extra))
            extra += 1
    return out


@dataclasses.dataclass(frozen=True)
class GGUFVocab:
    """What llama.cpp reads as the vocabulary: ``tokens[i]`` and ``token_types[i]`` for each id
    ``i < vocab_size``, the merges, the pre-tokenizer's name and the special ids."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    bos_id: int
    eos_id: int
    pad_id: int

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        """Writes the ``tokenizer.ggml.*`` keys."""
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        writer.add_bos_token_id(self.bos_id)
        writer.add_eos_token_id(self.eos_id)
        writer.add_pad_token_id(self.pad_id)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)


def _padded(tokens: dict[int, tuple[str, int]], vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types for ids ``0..vocab_size-1``; ids no token has get ``[PAD<id>]``
    UNUSED (the model's embedding may be larger than the tokenizer's vocabulary)."""
    out = [tokens.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    return [t for t, _ in out], [int(k) for _, k in out]


def byte_vocab(vocab_size: int) -> GGUFVocab:
    """``ByteTokenizer``'s vocabulary padded to the model's ``vocab_size``."""
    tokens = {b: (ch, gguf.TokenType.NORMAL) for b, ch in enumerate(byte_alphabet())}
    tokens |= {i: (name, gguf.TokenType.CONTROL) for i, name in BYTE_SPECIALS.items()}
    names, types = _padded(tokens, vocab_size)
    t = ByteTokenizer
    return GGUFVocab(names, types, [UNUSED_MERGE], GPT2_PRE, t.BOS, t.EOS, t.PAD)


def _pre_tokenizer_name(spec: dict | None) -> str | None:
    """llama.cpp's name of a ``tokenizer.json`` pre-tokenizer it can name for sure: GPT-2's
    ByteLevel split; None for anything else."""
    if (
        spec is not None
        and spec.get("type") == "ByteLevel"
        and spec.get("use_regex", True)
        and not spec.get("add_prefix_space", False)
    ):
        return GPT2_PRE
    return None


def bpe_vocab(tokenizer: BPETokenizer, vocab_size: int, tokenizer_pre: str | None = None) -> GGUFVocab:
    """A byte-level ``BPETokenizer``'s vocabulary padded to the model's ``vocab_size``.

    Raises:
      ValueError: a tokenizer that is not byte-level BPE (another model type, a normalizer, byte
        fallback), a pre-tokenizer llama.cpp cannot be told about without ``tokenizer_pre``, or ids
        at or past ``vocab_size``.
    """
    spec = json.loads(tokenizer.hf_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(
            f"tokenizer model type={model.get('type')!r} (byte_fallback={model.get('byte_fallback')!r}) "
            "is not supported for GGUF: allowed: byte-level 'BPE' without byte fallback"
        )
    if spec.get("normalizer") is not None:
        raise ValueError(
            f"tokenizer normalizer={spec['normalizer'].get('type')!r} is not supported for GGUF: "
            "llama.cpp's byte-level BPE has none; allowed: no normalizer"
        )
    decoder = (spec.get("decoder") or {}).get("type")
    if decoder != "ByteLevel":
        raise ValueError(f"tokenizer decoder={decoder!r} is not supported for GGUF; allowed: 'ByteLevel'")
    if tokenizer_pre is not None and (not isinstance(tokenizer_pre, str) or not tokenizer_pre):
        raise ValueError(
            f"tokenizer_pre={tokenizer_pre!r} is invalid: must be a llama.cpp pre-tokenizer name or None"
        )
    found = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if tokenizer_pre is None and found is None:
        raise ValueError(
            f"tokenizer pre_tokenizer={json.dumps(spec.get('pre_tokenizer'))} has no llama.cpp name "
            "llmarch can tell; pass its llama.cpp name as tokenizer_pre= (e.g. 'llama-bpe' for Llama 3, "
            "'qwen2' for Qwen) or use a GPT-2 ByteLevel pre-tokenizer ('gpt-2')"
        )
    ids = {int(i): (str(t), gguf.TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        ids[int(added["id"])] = (added["content"], kind)
    largest = max(ids)
    if largest >= vocab_size:
        raise ValueError(
            f"tokenizer id {largest} ({ids[largest][0]!r}) does not fit the model: "
            f"allowed ids are [0, vocab_size={vocab_size})"
        )
    # tokenizers writes merges as "a b" strings (older files) or [a, b] pairs (0.20+).
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    names, types = _padded(ids, vocab_size)
    return GGUFVocab(
        names,
        types,
        merges or [UNUSED_MERGE],
        tokenizer_pre if tokenizer_pre is not None else found,
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.pad_id,
    )


def gguf_vocab(tokenizer: object, vocab_size: int, tokenizer_pre: str | None = None) -> GGUFVocab:
    """The GGUF vocabulary of an llmarch tokenizer for a model of ``vocab_size`` ids.

    Raises:
      ValueError: a tokenizer that is neither a ``ByteTokenizer`` nor a byte-level
        ``BPETokenizer``, or one whose ids do not fit ``vocab_size``.
    """
    if isinstance(tokenizer, ByteTokenizer):
        if vocab_size < ByteTokenizer.vocab_size:
            raise ValueError(
                f"ByteTokenizer needs vocab_size >= {ByteTokenizer.vocab_size}; the model has {vocab_size}"
            )
        if tokenizer_pre not in (None, GPT2_PRE):
            raise ValueError(
                f"tokenizer_pre={tokenizer_pre!r} does not apply to ByteTokenizer; "
                f"allowed: None or {GPT2_PRE!r}"
            )
        return byte_vocab(vocab_size)
    if isinstance(tokenizer, BPETokenizer):
        return bpe_vocab(tokenizer, vocab_size, tokenizer_pre)
    raise ValueError(
        f"tokenizer={tokenizer!r} is not supported for GGUF: llama.cpp needs the vocabulary; "
        "allowed: llmarch's ByteTokenizer or a byte-level BPETokenizer"
    )
