"""Greedy decoding of a checkpoint two ways, for the parity tests: llmarch's ``Engine`` (chunked
prefill and continuous batching over three prompts) and transformers' ``generate``."""

import numpy as np
import torch

from llmarch.inference import Engine, SamplingParams


def engine_and_transformers_greedy(model, cfg, ref, vocab: int, max_tokens: int):
    """``(ours, want)``: the greedy continuations of three random prompts (5, 23 and 40 tokens)
    by the ``Engine`` over ``model`` and by ``ref.generate``."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab, n).tolist() for n in (5, 23, 40)]
    engine = Engine(
        model,
        cfg,
        max_num_seqs=2,
        max_num_batched_tokens=32,
        max_prefill_chunk=16,
        max_prefill_rows=1,
        max_len=64,
        page_size=8,
        fixed_shapes=True,
    )
    outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    with torch.no_grad():
        want = [
            ref.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(p) :].tolist()
            for p in prompts
        ]
    return [o.token_ids for o in outs], want
