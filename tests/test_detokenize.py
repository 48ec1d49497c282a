"""Streaming text: pieces never hold part of a character, and join to the whole text.

``TextStream`` is fed the tokens of accented, CJK and emoji text one at a time, for the byte
tokenizer (every non-ASCII character spans 2-4 tokens) and a byte-level BPE (merges cover some
characters, others stay split). The engine test makes a model emit a scripted token sequence
(each token's successor is the argmax of its logits), so ``Engine.stream`` itself streams that text.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch.data.tokenizer import BPETokenizer, ByteTokenizer
from llmarch.inference import Engine, SamplingParams
from llmarch.inference.detokenize import TextStream

TEXTS = [
    "café!",
    "naïve café, déjà vu",
    "日本語のテキスト",
    "emoji 👍🏽🎉 and 🇫🇷 flags",
    "mixé 中文 👩‍💻 end",
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    corpus = ["café déjà vu naïve", "日本語 日本 中文 テキスト", "the quick brown fox", *TEXTS[:2]] * 20
    return BPETokenizer.train(corpus, 300, min_frequency=2)


def _pieces(tok, text: str) -> list[str]:
    stream, ids = TextStream(tok.decode), tok.encode(text).tolist()
    return [stream.push(t, final=i == len(ids) - 1) for i, t in enumerate(ids)]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_pieces_are_whole_characters_and_join_to_the_text(text, kind, bpe):
    tok = ByteTokenizer() if kind == "byte" else bpe
    pieces = _pieces(tok, text)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    if kind == "byte":  # one non-empty piece per character's last byte
        assert [p for p in pieces if p] == list(text)


def test_cafe_streams_without_repeating():
    """The reported bug: 'café!' streamed as 'caf\\ufffd' + 'café!'."""
    assert _pieces(ByteTokenizer(), "café!") == ["c", "a", "f", "", "é", "!"]


def test_broken_utf8_is_shown_once_it_cannot_be_completed():
    """A stray continuation byte is shown (as U+FFFD) when later text proves it broken, or at the
    end; nothing is lost and nothing repeats."""
    tok = ByteTokenizer()
    stream = TextStream(tok.decode)
    assert [stream.push(t) for t in [104, 0xC3]] == ["h", ""]
    assert stream.push(105) == "\ufffdi"  # 0xC3 followed by ASCII can never complete
    assert stream.push(0xE6) == ""
    assert stream.push(0x97, final=True) == "\ufffd"  # the end: show what is left
    assert tok.decode([104, 0xC3, 105, 0xE6, 0x97]) == "h\ufffdi\ufffd"


class _Scripted:
    """A tokenizer over token ids 0..n-1 whose id i stands for ``inner``'s i-th token of a text."""

    def __init__(self, inner, ids):
        self.inner, self.ids = inner, list(ids)
        self.vocab_size = len(self.ids)

    def decode(self, ids):
        return self.inner.decode([self.ids[i] for i in ids])


def _successor_model(n: int) -> llmarch.Transformer:
    """A model whose greedy next token after token i is i + 1: blocks add nothing (zero output
    projections), the embeddings are orthogonal, and the LM head's column i + 1 is token i's
    normalized embedding, so its logit is the largest by a wide margin."""
    cfg = llmarch.presets.get("tiny-dense")
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    D, V = cfg.d_model, cfg.vocab_size
    assert n < D
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(V, D)))
    table = q * np.sqrt(D)  # rows orthogonal in the first D; RMS 1 after the final norm
    head = np.zeros((D, V), np.float32)
    head[:, 1:n] = (table[: n - 1] / np.sqrt(D)).T * 10
    model.embed.table_vd[...] = jnp.asarray(table, jnp.float32)
    model.lm_head.w[...] = jnp.asarray(head)
    for run in model.runs:
        run.layers.attention.w_o_nhd.w[...] = jnp.zeros_like(run.layers.attention.w_o_nhd.w[...])
        run.layers.ffn.w_down_fd.w[...] = jnp.zeros_like(run.layers.ffn.w_down_fd.w[...])
    return model


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_engine_streams_whole_characters(kind, bpe):
    text = "café 日本 👍🏽!"
    inner = ByteTokenizer() if kind == "byte" else bpe
    script = inner.encode(text).tolist()
    tok = _Scripted(inner, [inner.encode("A").tolist()[0], *script])  # token 0: the prompt "A"
    engine = Engine(_successor_model(len(tok.ids)), tokenizer=tok, max_len=64, page_size=8, max_num_seqs=2)
    params = SamplingParams(max_tokens=len(script), temperature=0.0)
    events = list(engine.stream([[0]], params))
    assert [e.token_id for e in events] == list(range(1, len(tok.ids)))
    pieces = [e.text for e in events]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert events[-1].finished and events[-1].finish_reason == "length"
    assert engine.generate([[0]], params)[0].text == text
    assert not engine._texts  # finished streams are dropped


def test_release_forgets_finished_requests(bpe):
    """A server releases each finished request, so the engine's memory stays bounded."""
    engine = Engine(_successor_model(8), max_len=64, page_size=8, max_num_seqs=2)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    rid = engine.add_request([0], params)
    with pytest.raises(ValueError, match=f"request {rid!r} is unfinished: abort it"):
        engine.release(rid)
    while engine.has_unfinished():
        engine.step()
    assert engine.output(rid).token_ids == [1, 2, 3, 4]
    engine.release(rid)
    assert rid not in engine.requests and not engine._seq_times
    with pytest.raises(ValueError, match="is unknown"):
        engine.release(rid)
    aborted = engine.add_request([0], params)
    engine.step()
    engine.abort(aborted)
    engine.release(aborted)
    assert not engine.requests and not engine._texts
