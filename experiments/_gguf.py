"""A transformers ``LlamaForCausalLM`` written as a GGUF file that llama.cpp loads, so the
harness's decode peer runs the very weights llmarch runs (``gguf`` package, ``GGUFWriter``): F32,
or Q8_0 / Q4_0 (llama.cpp's blocks of 32 input weights with one scale each, quantized by the
``gguf`` package's reference quantizer) for every matrix but the token embedding, which stays F32
(a lookup reads one row per token; llmarch's weight quantization leaves embeddings float too).

Tensor names and metadata follow llama.cpp's ``convert_hf_to_gguf.py`` for the ``llama``
architecture. Its one change to the numbers: llama.cpp applies RoPE to adjacent pairs of a head
(the original Meta layout), while transformers rotates the two halves of each head, so the rows of
``q_proj`` and ``k_proj`` are permuted within each head (``hf_to_gguf_rows``); attention scores are
unchanged, so the logits are the same function. The vocabulary is placeholder tokens ``<id>`` with
no merges ("no BOS/EOS added"): prompts are given as token ids.
"""

from __future__ import annotations

import os
import pathlib
import time

import numpy as np

TENSORS = {  # HF name (per layer, after "model.layers.{i}.") -> GGUF name (after "blk.{i}.")
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def hf_to_gguf_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """``w [heads·H, D]`` with each head's rows in halves order (transformers) -> pairs order
    (llama.cpp): row ``j`` of the first half and row ``j`` of the second become rows ``2j, 2j+1``."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_tensors(hf_model) -> dict[str, np.ndarray]:
    """The GGUF name -> float32 array of every weight of ``hf_model`` (q and k rows permuted)."""
    c = hf_model.config
    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    out = {gguf: state[hf] for hf, gguf in GLOBAL_TENSORS.items()}
    for i in range(c.num_hidden_layers):
        for hf, gguf in TENSORS.items():
            w = state[f"model.layers.{i}.{hf}"]
            if hf == "self_attn.q_proj.weight":
                w = hf_to_gguf_rows(w, c.num_attention_heads)
            elif hf == "self_attn.k_proj.weight":
                w = hf_to_gguf_rows(w, c.num_key_value_heads)
            out[f"blk.{i}.{gguf}"] = np.ascontiguousarray(w, dtype=np.float32)
    return out


FILE_TYPES = ("f32", "q8_0", "q4_0")


def write_llama_gguf(hf_model, path, file_type: str = "f32") -> None:
    """Writes ``hf_model`` (an untied, bias-free ``LlamaForCausalLM``) to ``path`` as GGUF of
    ``file_type`` (one of ``FILE_TYPES``).

    Raises:
      ValueError: a tied embedding or biases (not written here), or a RoPE scaling type other
        than the default (llama.cpp would need its own metadata for it).
    """
    import gguf

    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type={file_type!r} is invalid: must be one of {FILE_TYPES}")
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}.get(file_type)
    c = hf_model.config
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", 10000.0)}
    if c.tie_word_embeddings or c.attention_bias or c.mlp_bias:
        raise ValueError("write_llama_gguf: tied embeddings and biases are not supported")
    if rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"write_llama_gguf: rope_type={rope['rope_type']!r} is not supported (only 'default')"
        )
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("llmarch bench random llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(
        {"f32": gguf.LlamaFileType.ALL_F32, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}.get(
            file_type, gguf.LlamaFileType.MOSTLY_Q4_0
        )
    )
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<{i}>" for i in range(c.vocab_size)])
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_types([gguf.TokenType.NORMAL] * c.vocab_size)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    for name, array in gguf_tensors(hf_model).items():
        if qtype is None or array.ndim != 2 or name == "token_embd.weight":
            w.add_tensor(name, array)
        else:  # rows of [out, in]: blocks of 32 along the input, as llama.cpp quantizes
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_runner(hf_model, n_ctx: int, tmp: str, file_type: str = "f32"):
    """A batch-1 greedy llama.cpp run on ``hf_model``'s weights written as ``file_type`` GGUF in
    the directory ``tmp``: ``run(prompt_ids, n) -> (seconds between successive tokens, ids)``;
    None when ``llama-cpp-python`` or ``gguf`` is not installed."""
    try:
        import gguf  # noqa: F401
        import llama_cpp
    except ImportError:
        return None
    path = pathlib.Path(tmp) / f"model-{file_type}.gguf"
    write_llama_gguf(hf_model, path, file_type)
    llm = llama_cpp.Llama(
        str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=os.cpu_count(), logits_all=False, verbose=False
    )

    def run(prompt: list[int], n: int):
        llm.reset()
        gaps, ids, last = [], [], None
        for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            ids.append(int(token))
            if len(ids) == n:
                break
        return gaps, ids

    run.version = llama_cpp.__version__
    run.nbytes = path.stat().st_size
    return run
