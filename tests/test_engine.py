"""The serving engine: greedy outputs equal full recomputation for every model kind, under
continuous batching, chunked prefill and page pressure; one program per bucket; sampling,
parallel samples, streaming, stop tokens, log-probs and request validation.

Most engines here use ``fixed_shapes=True`` (one compiled program per model and pool size), so
the file compiles little; ``test_bucketed_steps_compile_once_per_bucket`` covers the buckets.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch.config import AttentionConfig
from llmarch.data.tokenizer import ByteTokenizer
from llmarch.inference import Engine, SamplingParams, compiled_programs, generate

MAX_LEN = 96
# Five requests for three batch slots (continuous batching), prompts longer than the 16-token
# prefill chunk (chunked prefill, mixed with other sequences' decode tokens).
PROMPT_LENS = (1, 3, 17, 40, 70)
MAX_TOKENS = (12, 5, 9, 16, 7)
ENGINE = dict(
    max_num_seqs=3,
    max_num_batched_tokens=32,
    max_prefill_chunk=16,
    max_prefill_rows=2,
    max_len=MAX_LEN,
    page_size=8,
    fixed_shapes=True,
)
_MODELS: dict[str, llmarch.Transformer] = {}


def _config(name: str) -> llmarch.ModelConfig:
    if name == "tiny-gqa-window":  # GQA with a sliding window shorter than the prompts
        return llmarch.presets.get("tiny-gqa").replace(
            attention=AttentionConfig(4, 2, 16, sliding_window=8), name=name
        )
    return llmarch.presets.get(name)


def _model(name: str) -> llmarch.Transformer:
    if name not in _MODELS:
        _MODELS[name] = llmarch.Transformer(_config(name), rngs=nnx.Rngs(0))
    return _MODELS[name]


def _prompts(vocab: int, lens=PROMPT_LENS, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lens]


def recompute_greedy(model, prompts, max_tokens) -> list[list[int]]:
    """Greedy continuation by full recomputation: each step runs the whole sequence again
    (one [B, MAX_LEN] buffer; causality makes the padding after a row's end irrelevant)."""
    buf = np.zeros((len(prompts), MAX_LEN), np.int32)
    ends = np.array([len(p) for p in prompts])
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    forward = jax.jit(lambda b: jnp.argmax(model(b), axis=-1))
    for _ in range(max(max_tokens)):
        nxt = np.asarray(forward(jnp.asarray(buf)))
        for i in range(len(prompts)):
            if ends[i] < MAX_LEN:
                buf[i, ends[i]] = nxt[i, ends[i] - 1]
        ends += 1
    return [
        buf[i, len(p) : len(p) + n].tolist() for i, (p, n) in enumerate(zip(prompts, max_tokens, strict=True))
    ]


def _greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0)


KINDS = ["tiny-gqa-window", "tiny-mla", "tiny-moe", "tiny-pkm", "tiny-ultramem"]


@pytest.mark.parametrize("name", KINDS + [pytest.param("tiny-deepseek", marks=pytest.mark.slow)])
def test_greedy_equals_full_recompute(name):
    if name.split("-window")[0] not in llmarch.presets.names():
        pytest.skip(f"preset {name} does not exist")
    model = _model(name)
    prompts = _prompts(model.cfg.vocab_size)
    engine = Engine(model, **ENGINE)
    outs = engine.generate(prompts, [_greedy(n) for n in MAX_TOKENS])
    want = recompute_greedy(model, prompts, MAX_TOKENS)
    assert [o.token_ids for o in outs] == want
    assert all(o.finished and o.completions[0].finish_reason == "length" for o in outs)
    stats = engine.stats
    assert stats["mixed_steps"] > 0  # prefill chunks ran beside other sequences' decode tokens
    assert stats["free_pages"] == stats["num_pages"] - 1  # every page back, the trash page held
    # one program (fixed shapes), and the decode loop's when the tail ran several steps per dispatch
    assert stats["step_shapes"] == 1 + (stats["dispatches"] < stats["steps"])


def test_reference_is_generate_without_cache():
    """The batched recomputation above is ``generate(..., use_cache=False)`` row by row."""
    model = _model("tiny-gqa-window")
    prompt = _prompts(model.cfg.vocab_size, lens=(17,))[0]
    want = generate(model, np.array([prompt]), 9, use_cache=False)[0, 17:].tolist()
    assert recompute_greedy(model, [prompt], [9]) == [want]
    assert Engine(model, **ENGINE).generate([prompt], _greedy(9))[0].token_ids == want


def test_many_decode_rows_attend_in_groups_by_length():
    """From 16 decode rows on, rows attend in groups sorted by length (17 rows: 8 and 9)."""
    model = _model("tiny-gqa-window")
    lens = (2, 60, 5, 33, 9, 47, 1, 21, 14, 70, 3, 28)
    prompts = _prompts(model.cfg.vocab_size, lens=lens, seed=6)
    max_tokens = [4 + (7 * i) % 13 for i in range(len(lens))]
    engine = Engine(model, **{**ENGINE, "max_num_seqs": 17, "max_num_batched_tokens": 64})
    outs = engine.generate(prompts, [_greedy(n) for n in max_tokens])
    assert [o.token_ids for o in outs] == recompute_greedy(model, prompts, max_tokens)


def test_page_pressure_preempts_and_every_request_completes():
    model = _model("tiny-gqa-window")
    prompts = _prompts(model.cfg.vocab_size, lens=(20, 33, 9, 26), seed=1)
    max_tokens = (30, 20, 40, 25)
    engine = Engine(model, **{**ENGINE, "num_pages": 10})  # 9 usable pages of 8: one request at a time
    outs = engine.generate(prompts, [_greedy(n) for n in max_tokens])
    assert [o.token_ids for o in outs] == recompute_greedy(model, prompts, max_tokens)
    assert engine.stats["preemptions"] > 0
    engine.block_manager.check([])  # nothing leaked


def test_parallel_samples_share_the_prompt_pages():
    model = _model("tiny-gqa-window")
    prompt = _prompts(model.cfg.vocab_size, lens=(21,), seed=2)[0]
    engine = Engine(model, **ENGINE)
    request = engine.add_request(prompt, SamplingParams(max_tokens=6, temperature=0.0, n=3))
    while not engine.requests[request].completions:  # until the prompt prefix is prefilled
        engine.step()
    children = engine.requests[request].completions
    assert len(children) == 3 and all(c.pages == children[0].pages for c in children)
    assert all(engine.block_manager.refcount[p] == 3 for p in children[0].pages)
    while engine.has_unfinished():
        engine.step()
    full_pages = (len(prompt) - 1) // 8  # the full prompt pages stay shared to the end
    assert all(c.pages == [] for c in children)  # released when they finished
    out = engine.output(request)
    want = recompute_greedy(model, [prompt], [6])[0]
    assert [c.token_ids for c in out.completions] == [want] * 3
    assert full_pages == 2 and engine.stats["free_pages"] == engine.stats["num_pages"] - 1
    # Sampled: reproducible with a seed, and the three completions differ.
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=3)
    a = Engine(model, **ENGINE).generate([prompt], params)[0]
    b = Engine(model, **ENGINE).generate([prompt], params)[0]
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
    assert len({tuple(c.token_ids) for c in a.completions}) > 1


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    model = _model("tiny-gqa-window")
    prompts = _prompts(model.cfg.vocab_size, lens=(5, 30, 12), seed=3)
    params = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=11)
    alone = Engine(model, **ENGINE).generate([prompts[0]], params)[0].token_ids
    others = [SamplingParams(max_tokens=10, temperature=1.0, seed=s) for s in (1, 2)]
    together = Engine(model, **ENGINE).generate(prompts, [params, *others])
    assert together[0].token_ids == alone
    reseeded = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=12)
    assert Engine(model, **ENGINE).generate([prompts[0]], reseeded)[0].token_ids != alone
    assert len(set(alone)) > 1  # sampled, not stuck on one token


def test_bad_requests_are_rejected_without_disturbing_requests_in_flight():
    model = _model("tiny-gqa-window")
    V = model.cfg.vocab_size
    prompts = _prompts(V, lens=(25, 4), seed=4)
    engine = Engine(model, **ENGINE)
    ids = [engine.add_request(p, _greedy(10)) for p in prompts]
    for _ in range(3):
        engine.step()
    bad = [
        ([], _greedy(4), "prompt is empty"),
        ([1] * MAX_LEN, _greedy(4), f"prompt has {MAX_LEN} tokens: longer than the maximum"),
        ([1] * 90, _greedy(10), "exceeds max_len=96"),
        ([1, 2], SamplingParams(max_tokens=4, stop_token_ids=(V + 5,)), "unknown tokens"),
        ([1, V], _greedy(4), "prompt token ids span"),
        ([1, 2], SamplingParams(max_tokens=4, n=4), "exceeds max_num_seqs=3"),
        ("text", _greedy(4), "needs a tokenizer"),
    ]
    for prompt, params, match in bad:
        with pytest.raises(ValueError, match=match):
            engine.add_request(prompt, params)
    with pytest.raises(ValueError, match="max_tokens=0"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1, 2], _greedy(2), request_id=ids[0])
    with pytest.raises(ValueError, match="request 1: prompt is empty"):
        engine.generate([[1, 2], []], _greedy(2))
    assert len(engine.requests) == 2  # nothing was queued by the failed calls
    while engine.has_unfinished():
        engine.step()
    assert [engine.output(i).token_ids for i in ids] == recompute_greedy(model, prompts, [10, 10])


def test_stream_text_stop_tokens_logprobs_and_abort():
    model = _model("tiny-gqa-window")
    tok = ByteTokenizer()
    engine = Engine(model, **ENGINE, tokenizer=tok)
    texts = ["Hello, world", "The quick brown fox"]
    ids = [tok.encode(t).tolist() for t in texts]
    want = recompute_greedy(model, ids, [8, 8])
    stop = want[1][3]
    params = [
        SamplingParams(max_tokens=8, temperature=0.0, logprobs=2),
        SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(stop,)),
    ]
    events = list(engine.stream(texts, params))
    by_request: dict[str, list] = {}
    for e in events:
        by_request.setdefault(e.request_id, []).append(e)
    first, second = (by_request[k] for k in sorted(by_request, key=int))
    assert [e.token_id for e in first] == want[0] and first[-1].finish_reason == "length"
    cut = want[1].index(stop) + 1
    assert [e.token_id for e in second] == want[1][:cut] and second[-1].finish_reason == "stop"
    out = engine.output(first[0].request_id)
    assert "".join(e.text for e in first) == out.text == engine.decode(want[0])
    assert engine.decode([72, 105, 300, 33]) == "Hi\ufffd!"  # ids past the tokenizer's vocabulary
    # Log-probabilities of the chosen tokens under the model's distribution.
    seq = np.array([ids[0] + want[0]], np.int32)
    logp = jax.nn.log_softmax(model(jnp.asarray(seq))[0], axis=-1)
    start = len(ids[0]) - 1
    expect = [float(logp[start + i, t]) for i, t in enumerate(want[0])]
    np.testing.assert_allclose(out.completions[0].logprobs, expect, atol=1e-4)
    top = out.completions[0].top_logprobs
    assert all(len(t) == 2 and max(t, key=t.get) == w for t, w in zip(top, want[0], strict=True))
    assert out.ttft is not None and len(out.token_latencies) == 7
    # Abort frees the request's pages at once.
    rid = engine.add_request(ids[1], _greedy(20))
    engine.step()
    engine.abort(rid)
    assert engine.requests[rid].finished and not engine.has_unfinished()
    engine.block_manager.check([])


def test_bucketed_steps_compile_once_per_bucket():
    """Bucketed shapes: one program per bucket, and a second identical workload (steady state)
    compiles nothing."""
    model = _model("tiny-gqa-window")
    prompts = _prompts(model.cfg.vocab_size, lens=(3, 30, 12, 7), seed=5)
    params = [_greedy(n) for n in (40, 8, 20, 33)]
    kw = dict(
        max_num_seqs=4,
        max_num_batched_tokens=32,
        max_prefill_chunk=16,
        max_prefill_rows=1,
        max_len=64,
        page_size=16,
        min_decode_rows=4,
        min_tokens=16,
        min_chunk=16,
    )
    before = compiled_programs()
    engine = Engine(model, **kw)
    first = engine.generate(prompts, params)
    assert compiled_programs() - before == engine.stats["step_shapes"] <= 8
    again = Engine(model, **kw)
    second = again.generate(prompts, params)
    assert compiled_programs() - before == engine.stats["step_shapes"]  # no new program
    assert [o.token_ids for o in first] == [o.token_ids for o in second]
    assert engine.stats["steps"] > 2 * engine.stats["step_shapes"]  # most steps reuse a program


def test_an_engine_on_committed_weights_compiles_each_step_shape_once():
    """Weights a trainer or a loader placed on a device are committed arrays, as every step's
    output pools are: pools created uncommitted made the second request's step a new program."""
    model = _model("tiny-dense")
    graphdef, state = nnx.split(model)
    committed = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))
    engine = Engine(committed, max_num_seqs=2, max_len=64)
    engine.generate([[1, 2, 3, 4]], _greedy(4))
    before = compiled_programs()
    engine.generate([[1, 2, 3, 4]], _greedy(4))
    assert compiled_programs() == before
