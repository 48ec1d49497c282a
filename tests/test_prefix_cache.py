"""Automatic prefix caching (issue 17): greedy outputs equal with the cache on and off for requests
sharing a prefix (GQA with a sliding window, MLA, an int8 cache), arriving together or one after
another; a later request computes only what is not cached; eviction under page pressure,
preemption, abort and parallel samples stay exact and leak nothing (the block manager's invariants
are checked after every step); the chain hash and the block manager's cache on their own; models
whose pages depend on more than their prefix turn caching off.

The engines use fixed shapes (one compiled program per model, pool and cache dtype), like
test_engine.py, so the file compiles little.
"""

import dataclasses
import functools

import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch import cli, hf
from llmarch.config import AttentionConfig
from llmarch.inference import Engine, EngineConfig, SamplingParams, prefix_cache
from llmarch.inference.block_manager import BlockManager
from llmarch.layers.paged import TRASH_PAGE

PAGE, MAX_LEN = 8, 96
ENGINE = dict(
    max_num_seqs=3,
    max_num_batched_tokens=32,
    max_prefill_chunk=16,
    max_prefill_rows=2,
    max_len=MAX_LEN,
    page_size=PAGE,
    fixed_shapes=True,
)
PREFIX = 43  # five full pages of 8 and three tokens of a sixth


@functools.cache
def _model(name: str) -> llmarch.Transformer:
    cfg = llmarch.presets.get(name.removesuffix("-window"))
    if name.endswith("-window"):  # a window shorter than the shared prefix
        cfg = cfg.replace(attention=AttentionConfig(4, 2, 16, sliding_window=8), name=name)
    return llmarch.Transformer(cfg, rngs=nnx.Rngs(0))


def _shared(vocab: int, suffixes, prefix: int = PREFIX, seed: int = 0) -> list[list[int]]:
    """Prompts of one random ``prefix`` followed by distinct random suffixes of the given lengths."""
    rng = np.random.default_rng(seed)
    head = rng.integers(0, vocab, prefix).tolist()
    return [head + rng.integers(0, vocab, n).tolist() for n in suffixes]


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def _check(engine: Engine) -> None:
    """Reference counts equal the holds of the live sequences; the free and evictable pages are the
    rest; the prefix cache's table is one-to-one and its evictable pages are the idle cached ones."""
    s = engine.scheduler
    engine.block_manager.check([seq.pages for seq in (*s.running, *s.waiting)])


def _run(engine: Engine, prompts, params, *, together: bool = True, max_steps: int = 2000) -> list:
    """Each request's completions (token id lists), the requests queued all at once or each after
    the one before finished; the block manager checked after every step."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    groups = [range(len(prompts))] if together else [[i] for i in range(len(prompts))]
    outs: list = [None] * len(prompts)
    steps = 0
    for group in groups:
        ids = {i: engine.add_request(prompts[i], params[i]) for i in group}
        while engine.has_unfinished():
            engine.step()
            _check(engine)
            steps += 1
            assert steps < max_steps, "the engine does not finish"
        for i, rid in ids.items():
            outs[i] = [c.token_ids for c in engine.output(rid).completions]
    return outs


# The engine: equal outputs, fewer computed tokens ---------------------------------------------


@pytest.mark.parametrize(
    "name, kv_dtype", [("tiny-gqa-window", "auto"), ("tiny-mla", "auto"), ("tiny-gqa-window", "int8")]
)
@pytest.mark.parametrize("together", [True, False], ids=["together", "one-after-another"])
def test_greedy_outputs_equal_with_caching_on_and_off(name, kv_dtype, together):
    model = _model(name)
    prompts = _shared(model.cfg.vocab_size, (4, 9, 2, 13))
    params = [_greedy(n) for n in (10, 6, 12, 8)]
    runs = {}
    for on in (False, True):
        engine = Engine(model, **ENGINE, kv_cache_dtype=kv_dtype, enable_prefix_caching=on)
        runs[on] = (_run(engine, prompts, params, together=together), engine.stats)
    (off, off_stats), (on, on_stats) = runs[False], runs[True]
    assert on == off
    assert not off_stats["prefix_caching"] and off_stats["prefix_cache_hit_tokens"] == 0
    assert on_stats["prefix_caching"] and on_stats["prefix_cache_queries"] == len(prompts)
    hit = on_stats["prefix_cache_hit_tokens"]
    if together:  # the first two prefill side by side; the later ones find the first's pages
        assert hit >= 2 * 40
    else:  # every request after the first finds the five full pages of the shared prefix
        assert hit == 40 * (len(prompts) - 1)
    assert on_stats["prefill_tokens"] == off_stats["prefill_tokens"] - hit  # cached tokens not computed
    assert on_stats["prefix_cache_hit_rate"] == hit / sum(map(len, prompts))
    assert on_stats["free_pages"] == on_stats["num_pages"] - 1  # cached pages are evictable, so free


def test_a_later_request_computes_only_what_is_not_cached():
    model = _model("tiny-gqa-window")
    V = model.cfg.vocab_size
    rng = np.random.default_rng(1)
    head = rng.integers(0, V, 48).tolist()  # six full pages
    prompts = {
        "first": head + [5, 6, 7],
        "suffix": head + [9, 10, 11, 12],  # finds all six pages, computes its 4 tokens
        "aligned": head,  # six pages, but the last token must be computed: finds five, computes 8
        "one-more": head + [9],  # finds six, has one token left: a decode row at once
    }
    want = {
        k: Engine(model, **ENGINE, enable_prefix_caching=False).generate([p], _greedy(6))[0].token_ids
        for k, p in prompts.items()
    }
    engine = Engine(model, **ENGINE)
    computed = {"first": 51, "suffix": 4, "aligned": 8, "one-more": 0}
    for key, prompt in prompts.items():
        before = engine.stats
        [out] = _run(engine, [prompt], _greedy(6))
        after = engine.stats
        assert out == [want[key]], key
        assert after["prefill_tokens"] - before["prefill_tokens"] == computed[key], key
        hit = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
        assert hit == len(prompt) - computed[key] - (key == "one-more"), key  # the decode row's token
        # 6 new tokens: the first sampled by the last prefill piece (by a decode row when none is
        # left to prefill), the rest by decode steps
        assert after["decode_tokens"] - before["decode_tokens"] == 5 + (key == "one-more"), key
    stats = engine.stats
    assert stats["prefix_cache_queries"] == 4
    assert stats["prefix_cache_query_tokens"] == sum(map(len, prompts.values()))


def test_a_conversation_reuses_the_pages_of_its_earlier_turns():
    """Each turn's prompt is the conversation so far: the pages of earlier prompts *and outputs*
    are found, but a page is cached only once all its tokens were fed (the last sampled token of a
    turn never was)."""
    model = _model("tiny-mla")
    V = model.cfg.vocab_size
    rng = np.random.default_rng(6)
    turns = [rng.integers(0, V, n).tolist() for n in (37, 5, 9)]
    history: list[int] = []
    on, off = Engine(model, **ENGINE), Engine(model, **ENGINE, enable_prefix_caching=False)
    hits = []
    for turn in turns:
        history += turn
        before = on.stats["prefix_cache_hit_tokens"]
        [out] = _run(on, [history], _greedy(11))
        assert [off.generate([history], _greedy(11))[0].token_ids] == out
        hits.append(on.stats["prefix_cache_hit_tokens"] - before)
        history += out[0]
    # Turn 1 ends at 48 tokens, 47 fed: five full pages. Turn 2 (53 tokens) finds them; it ends at
    # 64, 63 fed: seven pages, all found by turn 3 (73 tokens).
    assert hits == [0, 40, 56]


def test_a_page_is_found_only_once_all_its_tokens_are_computed():
    """Prefill chunks of 12 tokens end in the middle of pages of 8: a request arriving then finds
    only the pages before the one being filled."""
    model = _model("tiny-gqa-window")
    prompts = _shared(model.cfg.vocab_size, (5, 6), seed=7)
    kw = {**ENGINE, "max_prefill_chunk": 12}
    engine = Engine(model, **kw)
    first = engine.add_request(prompts[0], _greedy(5))
    engine.step()  # the first computes tokens [0, 12): page 0 full, page 1 half
    assert engine.stats["prefix_cache_pages"] == 1
    second = engine.add_request(prompts[1], _greedy(5))
    engine.step()  # the second finds page 0 alone, and computes from token 8
    assert engine.stats["prefix_cache_hit_tokens"] == 8
    assert engine.requests[second].completions[0].pages[0] == engine.requests[first].completions[0].pages[0]
    while engine.has_unfinished():
        engine.step()
        _check(engine)
    want = Engine(model, **kw, enable_prefix_caching=False).generate(prompts, _greedy(5))
    assert [engine.output(r).token_ids for r in (first, second)] == [o.token_ids for o in want]


def test_eviction_under_page_pressure_keeps_outputs_and_invariants():
    """Three prefixes taking turns in a pool too small to keep them all: cached pages are evicted
    (least recently released first) and found again when they survive."""
    model = _model("tiny-gqa-window")
    V = model.cfg.vocab_size
    groups = [_shared(V, (3, 6, 5), prefix=24, seed=s) for s in (10, 11, 12)]
    prompts = [groups[i % 3][i // 3] for i in range(9)]  # A, B, C, A, B, C, ...
    params = _greedy(8)
    kw = {**ENGINE, "num_pages": 13}  # 12 usable pages; a request takes about 5
    off = _run(Engine(model, **kw, enable_prefix_caching=False), prompts, params, together=False)
    engine = Engine(model, **kw)
    assert _run(engine, prompts, params, together=False) == off
    stats = engine.stats
    assert stats["prefix_cache_evictions"] > 0 and stats["prefix_cache_hit_tokens"] > 0
    assert stats["free_pages"] == stats["num_pages"] - 1
    # Together: pages are evicted while others are running and being found.
    engine = Engine(model, **kw)
    off = _run(Engine(model, **kw, enable_prefix_caching=False), prompts, params)
    assert _run(engine, prompts, params) == off
    assert engine.stats["prefix_cache_evictions"] > 0


def test_preemption_with_caching():
    """A pool for about one request at a time: sequences are preempted, and recomputing them finds
    their own (or their neighbours') cached pages."""
    model = _model("tiny-gqa-window")
    prompts = _shared(model.cfg.vocab_size, (4, 17, 1, 10), prefix=16, seed=3)
    params = [_greedy(n) for n in (30, 20, 40, 25)]
    kw = {**ENGINE, "num_pages": 10}  # 9 usable pages of 8
    off_engine = Engine(model, **kw, enable_prefix_caching=False)
    off = _run(off_engine, prompts, params)
    engine = Engine(model, **kw)
    assert _run(engine, prompts, params) == off
    stats = engine.stats
    assert stats["preemptions"] > 0 and off_engine.stats["preemptions"] > 0
    assert stats["prefix_cache_queries"] == len(prompts) + stats["preemptions"]  # recomputed ones look up
    assert stats["prefix_cache_hit_tokens"] > 0
    assert stats["prefill_tokens"] < off_engine.stats["prefill_tokens"]


def test_abort_releases_the_cached_pages_it_held():
    model = _model("tiny-gqa-window")
    prompts = _shared(model.cfg.vocab_size, (5, 7, 3), seed=4)
    engine = Engine(model, **ENGINE)
    bm = engine.block_manager
    a = engine.add_request(prompts[0], _greedy(20))
    while engine.stats["decode_tokens"] == 0:  # until the first prompt is computed
        engine.step()
    pages = list(engine.requests[a].completions[0].pages[:5])  # the shared prefix's full pages
    assert all(bm.cache.is_cached(p) for p in pages)
    b = engine.add_request(prompts[1], _greedy(20))
    engine.step()
    seq_b = engine.requests[b].completions[0]
    assert seq_b.pages[:5] == pages and all(bm.refcount[p] == 2 for p in pages)  # shared, not copied
    engine.abort(a)
    assert all(bm.refcount[p] == 1 for p in pages)
    _check(engine)
    engine.abort(b)
    assert not engine.has_unfinished() and all(bm.refcount[p] == 0 for p in pages)
    assert bm.num_free == bm.capacity and bm.cache.num_evictable == len(bm.cache) >= 5
    bm.check([])
    # Still cached after the aborts: a third request finds them and gives the right tokens.
    want = Engine(model, **ENGINE, enable_prefix_caching=False).generate([prompts[2]], _greedy(6))
    before = engine.stats["prefix_cache_hit_tokens"]
    assert _run(engine, [prompts[2]], _greedy(6)) == [[want[0].token_ids]]
    assert engine.stats["prefix_cache_hit_tokens"] - before == 40
    bm.check([])


@pytest.mark.parametrize("suffix", [6, 7], ids=["fork-on-a-page-boundary", "fork-into-a-shared-page"])
def test_parallel_samples_with_caching(suffix):
    """n > 1: the prompt parent finds the cached prefix, its children share the pages (copy on
    write where they write into a shared one); greedy and seeded samples equal caching off."""
    model = _model("tiny-gqa-window")
    first, prompt = _shared(model.cfg.vocab_size, (2, suffix), seed=5)  # prompt: 49 or 50 tokens
    greedy, sampled = _greedy(6, n=3), SamplingParams(max_tokens=6, temperature=1.0, seed=3, n=3)
    requests = [(first, _greedy(4)), (prompt, greedy), (prompt, sampled)]
    results = {}
    for on in (False, True):
        engine = Engine(model, **ENGINE, enable_prefix_caching=on)
        results[on] = _run(engine, [p for p, _ in requests], [s for _, s in requests], together=False)
    assert results[True] == results[False]
    assert len(set(map(tuple, results[True][1]))) == 1  # greedy: the three completions agree
    engine = Engine(model, **ENGINE)
    _run(engine, [first], _greedy(4))
    rid = engine.add_request(prompt, greedy)
    while not engine.requests[rid].completions:  # the parent, until it forks
        engine.step()
        _check(engine)
    children = engine.requests[rid].completions
    prefix_pages = children[0].pages[:5]
    assert all(c.pages[:5] == prefix_pages for c in children)
    assert all(engine.block_manager.refcount[p] == 3 for p in prefix_pages)
    assert engine.stats["prefix_cache_hit_tokens"] == 40
    # Together: two n=3 requests of the same prompt at once, and the first prompt beside them.
    outs = {}
    for on in (False, True):
        engine = Engine(model, **ENGINE, enable_prefix_caching=on)
        outs[on] = _run(engine, [prompt, first, prompt], [greedy, _greedy(4), sampled])
    assert outs[True] == outs[False]


# The pieces on their own ----------------------------------------------------------------------


def test_chain_hashes_name_a_page_by_its_whole_prefix():
    tokens = list(range(100, 140))  # five pages of 8
    hashes = prefix_cache.extend_hashes([], tokens, 8, 5)
    assert len(set(hashes)) == 5 and all(len(h) == 32 for h in hashes)  # sha256 digests
    assert prefix_cache.extend_hashes(hashes[:2], tokens, 8, 5) == hashes  # extends what is known
    late = tokens[:20] + [7] + tokens[21:]  # one token changed in the third page
    assert prefix_cache.extend_hashes([], late, 8, 5)[:2] == hashes[:2]
    assert not set(prefix_cache.extend_hashes([], late, 8, 5)[2:]) & set(hashes)
    early = [7] + tokens[1:]  # the same later pages after a different first page
    assert not set(prefix_cache.extend_hashes([], early, 8, 5)) & set(hashes)
    with pytest.raises(ValueError, match="num_pages=5 is invalid: 39 tokens fill only 4 pages"):
        prefix_cache.extend_hashes([], tokens[:39], 8, 5)


def test_block_manager_keeps_cached_pages_and_evicts_the_least_recently_released():
    bm = BlockManager(num_pages=9, page_size=4, prefix_caching=True)  # 8 usable pages
    tokens = list(range(12))
    hashes = prefix_cache.extend_hashes([], tokens, 4, 3)
    table: list[int] = []
    bm.prepare_write(table, 0, 12)
    for page, h in zip(table, hashes, strict=True):
        bm.cache_page(page, h)
    kept = list(table)
    bm.release(table)
    assert bm.num_free == bm.capacity == 8 and bm.cache.num_evictable == 3
    assert bm.cache.evictable_pages() == kept[::-1]  # the last page first: evicted first
    bm.check([])
    assert bm.lookup(hashes) == kept and bm.lookup([b"?" * 32, *hashes]) == []  # runs from the first
    assert bm.pages_revived(kept[:2]) == 2
    again = bm.take(kept[:2])
    assert again == kept[:2] and bm.num_free == 6 and bm.cache.evictable_pages() == [kept[2]]
    bm.check([again])
    bm.release(again)  # released later than kept[2]: evicted after it
    assert bm.cache.evictable_pages() == [kept[2], kept[1], kept[0]]
    # Never-cached free pages go first; then the oldest evictable page.
    other: list[int] = []
    bm.prepare_write(other, 0, 20)  # 5 pages: exactly the never-cached ones
    assert not set(other) & set(kept) and bm.cache.evictions == 0
    bm.prepare_write(other, 20, 24)  # one more: evicts kept[2]
    assert other[-1] == kept[2] and bm.cache.evictions == 1 and bm.lookup(hashes) == kept[:2]
    bm.check([other])
    # A second page with a cached hash stays uncached (the first is kept) and is freed plainly.
    dup: list[int] = []
    bm.prepare_write(dup, 0, 4)  # evicts kept[1]
    bm.cache_page(dup[0], hashes[0])
    assert bm.lookup(hashes[:1]) == [kept[0]] and not bm.cache.is_cached(dup[0])
    bm.release(dup)
    bm.check([other])
    bm.release(other)
    bm.check([])
    assert bm.cache.evictable_pages() == [kept[0]] and bm.cache.evictions == 2
    with pytest.raises(RuntimeError, match="nobody holds it"):
        bm.cache_page(kept[0], b"?" * 32)
    assert not bm.cache.is_cached(TRASH_PAGE)


def test_block_manager_check_catches_a_held_page_marked_evictable():
    bm = BlockManager(num_pages=4, page_size=2, prefix_caching=True)
    table: list[int] = []
    bm.prepare_write(table, 0, 2)
    bm.cache_page(table[0], b"h" * 32)
    bm.check([table])
    bm.cache.park(table[0])  # evictable while held: a later allocation would overwrite it
    with pytest.raises(AssertionError, match="free and evictable pages are not exactly"):
        bm.check([table])


def test_caching_is_off_when_pages_depend_on_more_than_their_prefix():
    cfg = llmarch.presets.get("tiny-moe")
    capacity = cfg.replace(moe=dataclasses.replace(cfg.moe, strategy="capacity"))
    engine = Engine(llmarch.Transformer(capacity, rngs=nnx.Rngs(0)), **ENGINE)
    assert "strategy='capacity'" in engine.prefix_caching_off and engine.block_manager.cache is None
    assert not engine.stats["prefix_caching"]
    assert prefix_cache.unsafe_reason(cfg) is None  # dropless MoE acts on each token alone
    off = Engine(_model("tiny-mla"), **ENGINE, enable_prefix_caching=False)
    assert off.prefix_caching_off == "EngineConfig.enable_prefix_caching=False"
    assert Engine(_model("tiny-mla"), **ENGINE).prefix_caching_off is None
    with pytest.raises(ValueError, match="EngineConfig.enable_prefix_caching='yes' is invalid"):
        EngineConfig(enable_prefix_caching="yes")


def test_cli_generate_reports_the_hit_rate_and_can_turn_caching_off(tmp_path, capsys):
    model = _model("tiny-gqa")
    hf.save_pretrained(model, model.cfg, tmp_path)
    ids = ",".join(map(str, range(1, 20)))  # two identical 19-token prompts: 16 tokens are found
    argv = ["generate", "--checkpoint", str(tmp_path), "--prompt-ids", ids, "--prompt-ids", ids]
    argv += ["--max-tokens", "2", "--temperature", "0", "--max-num-batched-tokens", "16"]
    assert cli.main(argv) == 0
    on = capsys.readouterr()
    assert cli.main([*argv, "--no-prefix-caching"]) == 0
    off = capsys.readouterr()
    assert on.out == off.out and "prefix caching off" in off.err
    assert "prefix cache hit rate 42%" in on.err, on.err  # 16 of 38 looked-up tokens
