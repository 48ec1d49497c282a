"""GGUF export (``llmarch.export.gguf``): files read back with the ``gguf`` package's own reader
(tensor names, shapes, types, metadata, vocabulary), weights equal to the model's after undoing the
documented q/k permutation, Q8_0 within its rounding error, refusals; and, where llama-cpp-python is
installed, llama.cpp's logits and tokenization equal to llmarch's."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tokenizers
from flax import nnx

import llmarch
from llmarch.config import LowRankWeight, RopeScaling
from llmarch.data.tokenizer import BPETokenizer, ByteTokenizer
from llmarch.hf import to_hf_tensors

gguf = pytest.importorskip("gguf")
from llmarch.export.gguf import (  # noqa: E402
    gguf_tensors,
    rope_halves_rows,
    rope_pairs_rows,
    write_gguf,
)
from llmarch.export.gguf_vocab import byte_alphabet  # noqa: E402

Q = gguf.GGMLQuantizationType
LAYER_TENSORS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)


def _qk_norm(cfg):
    return cfg.replace(attention=dataclasses.replace(cfg.attention, qk_norm=True, qk_norm_eps=cfg.norm_eps))


def _model(cfg, seed=0):
    return llmarch.Transformer(cfg, rngs=nnx.Rngs(seed))


def _abstract(cfg):
    """A model of shapes only: a refusal must come before any weight is read."""
    return nnx.eval_shape(lambda: _model(cfg))


@pytest.fixture(scope="module")
def llama():
    cfg = llmarch.presets.get("tiny-gqa")  # Llama-style: GQA 4/2 heads of 16, RoPE, SwiGLU, untied
    return _model(cfg), cfg


@pytest.fixture(scope="module")
def files(llama, tmp_path_factory):
    model, cfg = llama
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for dtype in ("f32", "f16", "q8_0"):
        written = write_gguf(model, cfg, ByteTokenizer(), root / f"m-{dtype}.gguf", dtype=dtype)
        out[dtype] = (written, gguf.GGUFReader(str(written.path)))
    return out


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def test_tensor_names_shapes_and_types(llama, files):
    model, cfg = llama
    a, F, V, D = cfg.attention, cfg.ffn_dim, cfg.vocab_size, cfg.d_model
    shapes = {  # numpy order: HF's [out, in]
        "attn_norm": (D,),
        "attn_q": (a.num_heads * a.head_dim, D),
        "attn_k": (a.num_kv_heads * a.head_dim, D),
        "attn_v": (a.num_kv_heads * a.head_dim, D),
        "attn_output": (D, a.num_heads * a.head_dim),
        "ffn_norm": (D,),
        "ffn_gate": (F, D),
        "ffn_up": (F, D),
        "ffn_down": (D, F),
    }
    expected = {"token_embd.weight": (V, D), "output_norm.weight": (D,), "output.weight": (V, D)}
    expected |= {f"blk.{i}.{n}.weight": s for i in range(cfg.num_layers) for n, s in shapes.items()}
    for dtype, (written, reader) in files.items():
        tensors = _tensors(reader)
        assert set(tensors) == set(expected) == set(written.tensor_types)
        for name, t in tensors.items():
            assert tuple(int(n) for n in t.shape[::-1]) == expected[name], name  # ggml lists dims reversed
            want = (
                Q.F32 if dtype == "f32" or len(expected[name]) == 1 else {"f16": Q.F16, "q8_0": Q.Q8_0}[dtype]
            )
            assert t.tensor_type == want, (dtype, name)
        assert written.fallbacks == ()


def test_metadata_and_byte_vocabulary(llama, files):
    model, cfg = llama
    a = cfg.attention
    for dtype, (_, reader) in files.items():
        f = _fields(reader)
        file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}.get(
            dtype, gguf.LlamaFileType.MOSTLY_Q8_0
        )
        expected = {
            "general.architecture": "llama",
            "general.name": cfg.name,
            "general.file_type": file_type,
            "llama.context_length": cfg.max_seq_len,
            "llama.embedding_length": cfg.d_model,
            "llama.block_count": cfg.num_layers,
            "llama.feed_forward_length": cfg.ffn_dim,
            "llama.attention.head_count": a.num_heads,
            "llama.attention.head_count_kv": a.num_kv_heads,
            "llama.attention.key_length": a.head_dim,
            "llama.attention.value_length": a.head_dim,
            "llama.rope.dimension_count": a.head_dim,
            "llama.vocab_size": cfg.vocab_size,
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.bos_token_id": ByteTokenizer.BOS,
            "tokenizer.ggml.eos_token_id": ByteTokenizer.EOS,
            "tokenizer.ggml.padding_token_id": ByteTokenizer.PAD,
            "tokenizer.ggml.add_bos_token": False,
            "tokenizer.ggml.add_eos_token": False,
        }
        assert {k: f.get(k) for k in expected} == expected
        assert f["llama.rope.freq_base"] == pytest.approx(a.rope_theta)
        assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
        tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
        assert len(tokens) == len(types) == cfg.vocab_size
        assert tokens[ord("H")] == "H" and tokens[ord(" ")] == "Ġ" and tokens[ord("\n")] == "Ċ"
        assert tokens[256:260] == ["<pad>", "<s>", "</s>", "[PAD259]"]
        T = gguf.TokenType
        assert types[:256] == [T.NORMAL] * 256 and types[256:259] == [T.CONTROL] * 3
        assert set(types[259:]) == {T.UNUSED}
        assert f["tokenizer.ggml.merges"] == ["<pad> <pad>"]  # the documented merge that never applies


def test_byte_alphabet_is_gpt2s():
    alphabet = byte_alphabet()
    assert len(set(alphabet)) == 256 and set(alphabet) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    assert alphabet[ord("a")] == "a" and alphabet[0] == "Ā" and alphabet[0xAD] == "Ń"
    # what tokenizers' byte-level pre-tokenizer writes for the bytes of a text
    text = "héllo wörld\t😀"
    pieces = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(
        text
    )
    assert "".join(p for p, _ in pieces) == "".join(alphabet[b] for b in text.encode())


def test_rope_permutation_turns_halves_into_adjacent_pairs():
    """One head of H=4: rows (a0, a1 | b0, b1) in halves order become (a0, b0, a1, b1); and RoPE on
    adjacent pairs of the permuted q equals RoPE on halves of the original, permuted."""
    w = np.arange(8, dtype=np.float32).reshape(2, 4).T.copy()  # 4 rows of a 2-wide weight
    np.testing.assert_array_equal(rope_pairs_rows(w, heads=1)[:, 0], [0, 2, 1, 3])
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3 * 8, 5)).astype(np.float32)  # 3 heads of 8
    np.testing.assert_array_equal(rope_halves_rows(rope_pairs_rows(w, 3), 3), w)
    x = rng.standard_normal(5).astype(np.float32)
    q = (w @ x).reshape(3, 8)  # per head [H]
    theta = 0.7 * 10000.0 ** (-np.arange(4) / 4)
    c, s = np.cos(theta), np.sin(theta)
    halves = np.concatenate([q[:, :4] * c - q[:, 4:] * s, q[:, 4:] * c + q[:, :4] * s], axis=1)
    p = (rope_pairs_rows(w, 3) @ x).reshape(3, 4, 2)  # adjacent pairs, as llama.cpp's "llama"
    pairs = np.stack([p[..., 0] * c - p[..., 1] * s, p[..., 1] * c + p[..., 0] * s], axis=-1).reshape(3, 8)
    np.testing.assert_allclose(pairs, rope_pairs_rows(halves.reshape(24, 1), 3).reshape(3, 8), rtol=1e-6)


def _model_weights(model, cfg, layer):
    """This layer's weights from the model's own state, in HF's [out, in] layout."""
    L = model.runs[0].layers
    at = L.attention
    a = cfg.attention
    return {
        "attn_norm": L.attn_norm.scale[...][layer],
        "attn_q": at.w_q_dnh.w[...][layer].reshape(cfg.d_model, -1).T,
        "attn_k": at.w_k_dkh.w[...][layer].reshape(cfg.d_model, -1).T,
        "attn_v": at.w_v_dkh.w[...][layer].reshape(cfg.d_model, -1).T,
        "attn_output": at.w_o_nhd.w[...][layer].reshape(a.num_heads * a.head_dim, -1).T,
        "ffn_norm": L.ffn_norm.scale[...][layer],
        "ffn_gate": L.ffn.w_gate_df.w[...][layer].T,
        "ffn_up": L.ffn.w_up_df.w[...][layer].T,
        "ffn_down": L.ffn.w_down_fd.w[...][layer].T,
    }


def _read(t) -> np.ndarray:
    """A reader tensor as float32 in numpy order."""
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return data.reshape([int(n) for n in t.shape[::-1]])


def test_f32_tensors_equal_the_weights_after_undoing_the_permutation(llama, files):
    model, cfg = llama
    tensors = _tensors(files["f32"][1])
    np.testing.assert_array_equal(_read(tensors["token_embd.weight"]), model.embed.table_vd[...])
    np.testing.assert_array_equal(_read(tensors["output.weight"]), model.lm_head.w[...].T)
    np.testing.assert_array_equal(_read(tensors["output_norm.weight"]), model.final_norm.scale[...])
    heads = {"attn_q": cfg.attention.num_heads, "attn_k": cfg.attention.num_kv_heads}
    for layer in range(cfg.num_layers):
        for name, w in _model_weights(model, cfg, layer).items():
            got = _read(tensors[f"blk.{layer}.{name}.weight"])
            if name in heads:
                assert not np.array_equal(got, w)  # permuted in the file
                got = rope_halves_rows(got, heads[name])
            np.testing.assert_array_equal(got, w, err_msg=f"blk.{layer}.{name}")


def test_f16_and_q8_0_within_their_rounding(llama, files):
    model, cfg = llama
    f32 = {n: _read(t) for n, t in _tensors(files["f32"][1]).items()}
    for name, t in _tensors(files["f16"][1]).items():
        np.testing.assert_array_equal(_read(t), f32[name].astype(np.float16).astype(np.float32))
    for name, t in _tensors(files["q8_0"][1]).items():
        w, got = f32[name], _read(t)
        if w.ndim == 1:
            np.testing.assert_array_equal(got, w)
            continue
        blocks = w.reshape(-1, 32)  # Q8_0: 32 weights along a row share one float16 scale
        scale = np.abs(blocks).max(axis=1, keepdims=True) / 127
        # half a quantization step, plus the float16 rounding of the scale (2^-11 relative) times 127
        bound = scale * (0.5 + 127 * 2.0**-11) + 1e-12
        assert np.all(np.abs(got.reshape(-1, 32) - blocks) <= bound), name
        assert np.abs(got - w).max() > 0  # it was quantized


def test_q8_0_falls_back_to_f16_for_partial_blocks(tmp_path):
    """A row of 48 weights is not whole Q8_0 blocks of 32: as llama.cpp's converter, F16, listed."""
    cfg = llmarch.presets.get("tiny-gqa").replace(d_model=48)
    written = write_gguf(_model(cfg), cfg, ByteTokenizer(), tmp_path / "m.gguf", dtype="q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(written.path)).tensors}
    narrow = {"token_embd.weight", "output.weight"}  # [V, D]: rows of D
    narrow |= {
        f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")
    }
    assert set(written.fallbacks) == narrow
    assert {n for n, t in types.items() if t == Q.F16} == narrow
    assert types["blk.0.ffn_down.weight"] == types["blk.0.attn_output.weight"] == Q.Q8_0  # rows of F, N·H


def test_mixtral_and_qwen3_tensor_layouts(tmp_path):
    moe_cfg = llmarch.presets.get("tiny-moe")  # Mixtral-shaped: an MoE (8 experts, top 2) in every layer
    moe = _model(moe_cfg)
    written = write_gguf(moe, moe_cfg, ByteTokenizer(), tmp_path / "moe.gguf", dtype="q8_0")
    assert written.architecture == "llama"
    tensors = _tensors(gguf.GGUFReader(str(written.path)))
    m, D = moe_cfg.moe, moe_cfg.d_model
    shapes = {
        "ffn_gate_exps": (m.num_experts, m.expert_dim, D),
        "ffn_down_exps": (m.num_experts, D, m.expert_dim),
    }
    for name, shape in shapes.items():
        assert tuple(int(n) for n in tensors[f"blk.1.{name}.weight"].shape[::-1]) == shape
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == Q.F32  # the router stays F32
    assert tensors["blk.0.ffn_up_exps.weight"].tensor_type == Q.Q8_0
    hf = to_hf_tensors(moe, moe_cfg)
    up = np.stack(
        [hf[f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight"] for e in range(m.num_experts)]
    )
    np.testing.assert_array_equal(gguf_tensors(moe, moe_cfg)["blk.1.ffn_up_exps.weight"], up)

    qwen_cfg = _qk_norm(llmarch.presets.get("tiny-gqa"))
    qwen = _model(qwen_cfg)
    written = write_gguf(qwen, qwen_cfg, ByteTokenizer(), tmp_path / "qwen3.gguf")
    reader = gguf.GGUFReader(str(written.path))
    assert _fields(reader)["general.architecture"] == "qwen3"
    tensors = _tensors(reader)
    assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= set(tensors)
    hf = to_hf_tensors(qwen, qwen_cfg)  # Qwen3 rotates halves in llama.cpp too: no permutation
    np.testing.assert_array_equal(
        _read(tensors["blk.1.attn_q.weight"]), hf["model.layers.1.self_attn.q_proj.weight"]
    )


def test_tied_embeddings_and_rope_scaling(tmp_path):
    base = llmarch.presets.get("tiny-gqa")
    scaling = RopeScaling(factor=8.0, original_max_position_embeddings=32)
    cfg = base.replace(
        tie_embeddings=True, attention=dataclasses.replace(base.attention, rope_scaling=scaling)
    )
    written = write_gguf(_model(cfg), cfg, ByteTokenizer(), tmp_path / "m.gguf")
    tensors = _tensors(gguf.GGUFReader(str(written.path)))
    assert "output.weight" not in tensors  # llama.cpp reads token_embd for a missing output
    factors = _read(tensors["rope_freqs.weight"])
    assert factors.shape == (cfg.attention.head_dim // 2,)
    assert factors[0] == 1 and factors[-1] == pytest.approx(8.0)  # fastest kept, slowest divided by factor


def _bpe(vocab_size: int) -> BPETokenizer:
    """Byte-level BPE learned on a little of Python's documentation (DESIGN.md's default corpus)."""
    from pydoc_data.topics import topics

    return BPETokenizer.train([topics[k] for k in sorted(topics)[:20]], vocab_size)


def test_bpe_vocabulary_and_merges(llama, tmp_path):
    model, cfg = llama
    tok = _bpe(300)
    written = write_gguf(model, cfg, tok, tmp_path / "bpe.gguf")
    f = _fields(gguf.GGUFReader(str(written.path)))
    spec = json.loads(tok.hf_tokenizer.to_str())
    vocab = tok.hf_tokenizer.get_vocab(with_added_tokens=True)
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size and all(tokens[i] == t for t, i in vocab.items())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert f["tokenizer.ggml.merges"] == merges and len(merges) > 10
    assert f["tokenizer.ggml.pre"] == "gpt-2"
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (tok.bos_id, tok.eos_id)
    types = f["tokenizer.ggml.token_type"]
    assert types[tok.pad_id] == types[tok.bos_id] == gguf.TokenType.CONTROL
    assert types[vocab["Ġ"]] == gguf.TokenType.NORMAL and types[-1] == gguf.TokenType.UNUSED


def test_refusals(llama, tmp_path):
    model, cfg = llama
    byte = ByteTokenizer()
    out = tmp_path / "x.gguf"

    def refused(match, m, c, tok=byte, **kw):
        with pytest.raises(ValueError, match=match):
            write_gguf(m, c, tok, out, **kw)
        assert not out.exists() and not list(tmp_path.iterdir())

    refused(
        r"dtype='q4_0' is not supported for GGUF; allowed: \('f32', 'f16', 'q8_0'\)", model, cfg, dtype="q4_0"
    )
    refused("cfg does not describe model", model, cfg.replace(ffn_dim=96))
    for preset, match in (
        ("tiny-mla", "ModelConfig.mla=.*multi-head latent attention"),
        ("tiny-pkm", "ModelConfig.memory=.*no memory layers"),
        ("tiny-ultramem", "ModelConfig.(memory|skip_layers)=.*no memory layers"),
    ):
        c = llmarch.presets.get(preset)
        refused(match, _abstract(c), c)
    window = cfg.replace(attention=dataclasses.replace(cfg.attention, sliding_window=8))
    refused("AttentionConfig.sliding_window=8 cannot be written as GGUF", _abstract(window), window)
    qwen = _qk_norm(cfg)
    qwen = qwen.replace(attention=dataclasses.replace(qwen.attention, rope_scaling=RopeScaling()))
    refused("llama.cpp's 'qwen3' has no Llama-3 RoPE scaling", _abstract(qwen), qwen)
    moe = _qk_norm(llmarch.presets.get("tiny-moe"))
    moe = moe.replace(moe=dataclasses.replace(moe.moe, norm_topk=False))
    refused("MoEConfig.norm_topk=False .*always renormalizes", _abstract(moe), moe)
    entry = LowRankWeight(path="lm_head", shape=(64, 320), contracted=(0,), ranks=(8,), counted_as="lm_head")
    low = llmarch.presets.get("tiny-dense").replace(low_rank=(entry,))
    refused("ModelConfig.low_rank=.*dense matrices", _abstract(low), low)
    from llmarch.quant import QuantConfig, quantize

    dense = llmarch.presets.get("tiny-dense")
    refused(
        "quantized by llmarch.quant", quantize(_model(dense), dense, QuantConfig(), progress=False), dense
    )
    refused("tokenizer=None is not supported for GGUF", model, cfg, tok=None)
    refused(r"tokenizer id 399 .*allowed ids are \[0, vocab_size=320\)", model, cfg, tok=_bpe(400))
    whitespace = tokenizers.Tokenizer(tokenizers.models.BPE())
    whitespace.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    whitespace.decoder = tokenizers.decoders.ByteLevel()
    whitespace.add_special_tokens(["<pad>", "<s>", "</s>"])
    refused(
        "pre_tokenizer=.*Whitespace.* pass its llama.cpp name as tokenizer_pre=",
        model,
        cfg,
        tok=BPETokenizer(whitespace),
    )


# llama.cpp itself, where llama-cpp-python is installed -------------------------------------------

TEXTS = (
    "Hello, café 😀 world!",
    "  two spaces,\ttab\n\nnewlines",
    "日本語 naïve <s> </s> literal",
    "It's 3.14",
)


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.mark.parametrize("kind", ["llama", "llama-tied-rope-scaled", "mixtral", "qwen3", "qwen3-moe"])
def test_llama_cpp_logits_equal_llmarch(llama_cpp, kind, tmp_path):
    base, moe = llmarch.presets.get("tiny-gqa"), llmarch.presets.get("tiny-moe")
    scaled = dataclasses.replace(
        base.attention, rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16)
    )
    cfg = {
        "llama": base,
        "llama-tied-rope-scaled": base.replace(tie_embeddings=True, attention=scaled),
        "mixtral": moe,
        "qwen3": _qk_norm(base),
        "qwen3-moe": _qk_norm(moe),
    }[kind]
    model = _model(cfg, seed=1)
    written = write_gguf(model, cfg, ByteTokenizer(), tmp_path / "m.gguf")
    ids = ByteTokenizer().encode(" ".join(TEXTS))[:100]
    llm = llama_cpp.Llama(
        str(written.path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0
    )
    try:
        llm.eval(ids.tolist())
        theirs = np.asarray(llm.scores[: len(ids)])
        for text in TEXTS:  # the byte vocabulary tokenizes as ByteTokenizer does
            assert (
                llm.tokenize(text.encode(), add_bos=True, special=False)
                == ByteTokenizer().encode(text).tolist()
            )
    finally:
        llm.close()
    ours = np.asarray(model(ids[None]))[0]
    np.testing.assert_allclose(theirs, ours, atol=2e-5, rtol=0)


def test_llama_cpp_tokenizes_bpe_as_llmarch(llama_cpp, llama, tmp_path):
    model, cfg = llama
    tok = _bpe(300)
    written = write_gguf(model, cfg, tok, tmp_path / "bpe.gguf")
    llm = llama_cpp.Llama(str(written.path), n_ctx=64, verbose=False, n_threads=2)
    try:
        for text in (*TEXTS, "The quick brown fox's café", "x = f(3)  # done\n"):
            ids = llm.tokenize(text.encode(), add_bos=True, special=False)
            assert ids == tok.encode(text).tolist(), text
            assert llm.detokenize(ids).decode() == text
    finally:
        llm.close()
