"""A transformers ``LlamaForCausalLM`` written as an F32 GGUF file that llama.cpp loads, so the
harness's decode peer runs the very weights llmarch runs (``gguf`` package, ``GGUFWriter``).

Tensor names and metadata follow llama.cpp's ``convert_hf_to_gguf.py`` for the ``llama``
architecture. Its one change to the numbers: llama.cpp applies RoPE to adjacent pairs of a head
(the original Meta layout), while transformers rotates the two halves of each head, so the rows of
``q_proj`` and ``k_proj`` are permuted within each head (``hf_to_gguf_rows``); attention scores are
unchanged, so the logits are the same function. The vocabulary is placeholder tokens ``<id>`` with
no merges ("no BOS/EOS added"): prompts are given as token ids.
"""

from __future__ import annotations

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


def write_llama_gguf(hf_model, path) -> None:
    """Writes ``hf_model`` (an untied, bias-free ``LlamaForCausalLM``) to ``path`` as F32 GGUF.

    Raises:
      ValueError: a tied embedding or biases (not written here), or a RoPE scaling type other
        than the default (llama.cpp would need its own metadata for it).
    """
    import gguf

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
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<{i}>" for i in range(c.vocab_size)])
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_types([gguf.TokenType.NORMAL] * c.vocab_size)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    for name, array in gguf_tensors(hf_model).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
