"""Engine liveness: every request finishes, with its ``n`` completions of the right length, and
greedy completions equal the request run alone, whatever the prompt lengths (chunk boundaries
included), ``n``, prefill chunk, page pool (small ones force preemption) and batch mix.

Every engine loop here runs under a step budget (and the plain regression tests under a wall-clock
deadline too), so a scheduling bug fails the test instead of hanging it. The engines share one
model and fixed shapes: one compiled program per (prefill chunk, pool size), compiled once for all
examples.
"""

import contextlib
import functools
import signal

import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmarch
from llmarch.data.tokenizer import ByteTokenizer
from llmarch.inference import Engine, EngineConfig, SamplingParams
from llmarch.inference.block_manager import BlockManager
from llmarch.inference.scheduler import Request, Scheduler

PAGE, MAX_LEN, MAX_NUM_SEQS, MAX_TOKENS = 4, 40, 4, 4
MAX_PROMPT = MAX_LEN - MAX_TOKENS - 2  # 34 = 2 * 16 + 2: the largest boundary of the largest chunk
CHUNKS = (4, 7, 16)
# 11 pages (10 usable): one long request at a time, so preemption; None: room for every sequence.
# The small pool comes first: Hypothesis draws the first element most often.
POOLS = (11, None)
ENGINE = dict(
    max_num_seqs=MAX_NUM_SEQS,
    max_num_batched_tokens=16,
    max_prefill_rows=2,
    max_len=MAX_LEN,
    page_size=PAGE,
    fixed_shapes=True,
)


@functools.cache
def _model() -> llmarch.Transformer:
    return llmarch.Transformer(llmarch.presets.get("tiny-gqa"), rngs=nnx.Rngs(0))


def _engine(chunk: int = 16, num_pages: int | None = None, **kw) -> Engine:
    return Engine(_model(), **{**ENGINE, "max_prefill_chunk": chunk, "num_pages": num_pages, **kw})


@functools.cache
def _prompt(length: int, variant: int = 0) -> tuple[int, ...]:
    rng = np.random.default_rng(1000 * variant + length)
    return tuple(rng.integers(0, _model().cfg.vocab_size, length).tolist())


@functools.cache
def _alone(prompt: tuple[int, ...]) -> list[int]:
    """Greedy tokens of ``prompt`` run alone (one request, n=1) on a roomy engine."""
    engine = _engine()
    _budget_steps(engine, 10 * (len(prompt) + MAX_TOKENS))
    [out] = engine.generate([list(prompt)], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return out.token_ids


def _budget_steps(engine: Engine, limit: int) -> None:
    """Makes the engine's ``step`` (which ``generate`` and ``stream`` call) fail after ``limit``
    calls: a loop that would spin forever fails instead."""
    step, calls = engine.step, [0]

    def bounded():
        calls[0] += 1
        if calls[0] > limit:
            stuck = {
                rid: [(s.sample_index, s.status.value, len(s.tokens)) for s in r.completions]
                for rid, r in engine.requests.items()
                if not r.finished
            }
            raise AssertionError(f"the engine ran {limit} steps without finishing; unfinished: {stuck}")
        return step()

    engine.step = bounded


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fails, rather than hangs, a block still running after ``seconds`` (SIGALRM, where there is
    one; the step budgets cover the rest)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: an engine loop does not terminate")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _expected(prompt, max_tokens: int, stop: tuple[int, ...]) -> list[int]:
    want = _alone(tuple(prompt))[:max_tokens]
    cut = next((i + 1 for i, t in enumerate(want) if t in stop), len(want))
    return want[:cut]


def _check(engine: Engine, rid: str, prompt, params: SamplingParams) -> None:
    """The request finished with its n completions, each of the right length (and, greedy, the
    tokens of the request run alone)."""
    out = engine.output(rid)
    assert out.finished, rid
    assert [c.index for c in out.completions] == list(range(params.n)), rid
    for c in out.completions:
        if params.temperature == 0:
            assert c.token_ids == _expected(prompt, params.max_tokens, params.stop_token_ids), (rid, c.index)
        assert 1 <= len(c.token_ids) <= params.max_tokens
        if c.token_ids[-1] in params.stop_token_ids:
            assert c.finish_reason == "stop"
        else:
            assert len(c.token_ids) == params.max_tokens and c.finish_reason == "length", (rid, c.index)
        assert not any(t in params.stop_token_ids for t in c.token_ids[:-1])


def _check_idle(engine: Engine) -> None:
    assert not engine.has_unfinished()
    engine.block_manager.check([])  # every page back, no reference leaked


# Regression tests: the reported hangs ---------------------------------------------------------


def test_parent_with_one_token_left_is_a_prefill_piece_not_a_decode_row():
    """The scheduler's decision, without a model: an ``n > 1`` parent whose last prefill piece is
    one token (a two-token prompt, or an 18-token prompt after a 16-token chunk) is planned as a
    prefill piece (which forks), never as a decode row (which would sample)."""
    for prompt_len, chunk, pieces in ((2, 16, [(0, 1)]), (18, 16, [(0, 16), (16, 17)])):
        sched = Scheduler(
            BlockManager(32, PAGE),
            max_num_seqs=4,
            max_num_batched_tokens=16,
            max_prefill_chunk=chunk,
            max_prefill_rows=2,
        )
        request = Request("0", list(range(prompt_len)), SamplingParams(max_tokens=3, n=2), 0, 0.0)
        parent = sched.new_sequence(request, -1, request.prompt[:-1])
        sched.add(parent)
        for start, end in pieces:
            plan = sched.schedule()
            assert plan.decode == [] and plan.prefill == [(parent, start, end)]
            parent.num_computed = end
        assert not parent.decoding


def _scheduler(admission: str, max_wait_steps: int = 64, pages: int = 64) -> Scheduler:
    return Scheduler(
        BlockManager(pages, PAGE),
        max_num_seqs=8,
        max_num_batched_tokens=16,
        max_prefill_chunk=16,
        max_prefill_rows=1,
        admission=admission,
        max_wait_steps=max_wait_steps,
    )


def _queue(sched: Scheduler, lengths: list[int]) -> list:
    seqs = []
    for i, n in enumerate(lengths):
        request = Request(str(i), list(range(n)), SamplingParams(max_tokens=1), 0, 0.0)
        seqs.append(sched.new_sequence(request, 0, request.prompt))
        sched.add(seqs[-1])
    return seqs


def _admitted(sched: Scheduler, steps: int) -> list[int]:
    """Prompt lengths of the sequences whose prefill starts in each of ``steps`` steps (one
    prefill row per step, so one admission per step; computed at once so none decodes)."""
    order = []
    for _ in range(steps):
        plan = sched.schedule()
        for seq, start, end in plan.prefill:
            if start == 0:
                order.append(len(seq.tokens))
            seq.num_computed = end
    return order


@pytest.mark.parametrize(
    "admission, max_wait_steps, expected",
    [
        ("fcfs", 64, [12, 3, 7, 2]),
        ("shortest", 64, [2, 3, 7, 12]),
        # With max_wait_steps=2 every queued sequence is overdue from the second step on: FCFS.
        ("shortest", 2, [2, 12, 3, 7]),
    ],
)
def test_admission_order(admission, max_wait_steps, expected):
    sched = _scheduler(admission, max_wait_steps)
    _queue(sched, [12, 3, 7, 2])
    assert _admitted(sched, 4) == expected


def test_shortest_first_puts_a_preempted_sequence_first():
    sched = _scheduler("shortest")
    long, short = _queue(sched, [12, 3])
    assert _admitted(sched, 1) == [3]
    sched.preempt(short)
    _queue(sched, [1])
    assert sched.next_waiting() is short  # recomputes before a shorter newcomer and the long one


@pytest.mark.parametrize("field, value", [("admission", "sjf"), ("max_wait_steps", 0)])
def test_engine_config_rejects_bad_admission(field, value):
    with pytest.raises(ValueError, match=f"EngineConfig.{field}={value!r} is invalid"):
        EngineConfig(**{field: value})


def test_two_token_prompt_with_n_2_finishes():
    """``llmarch generate --prompt "hi" --n 2 --max-tokens 3``: the engine the CLI builds."""
    tok = ByteTokenizer()
    params = SamplingParams(max_tokens=3, temperature=1.0, seed=0, n=2, stop_token_ids=(tok.eos_id,))
    engine = Engine(
        _model(),
        tokenizer=tok,
        max_num_seqs=2,
        max_num_batched_tokens=256,
        max_prefill_chunk=256,
        max_len=2 + 3,
    )
    _budget_steps(engine, 20)
    with _deadline(120):
        [out] = engine.generate(["hi"], params)
        events = list(engine.stream(["hi"], params))
    assert out.finished and len(out.completions) == 2
    assert all(c.finish_reason in ("length", "stop") and 1 <= len(c.token_ids) <= 3 for c in out.completions)
    assert sorted({e.index for e in events}) == [0, 1] and sum(e.finished for e in events) == 2
    _check_idle(engine)


@pytest.mark.parametrize("n", [2, 3])
def test_prompt_one_past_the_chunk_with_n_samples(n):
    """An 18-token prompt with ``max_prefill_chunk=16``: the shared prefix (17 tokens) ends with
    a one-token piece; then n greedy completions equal the prompt run alone."""
    prompt = list(_prompt(18))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, n=n)
    engine = _engine(16)
    _budget_steps(engine, 50)
    with _deadline(120):
        [out] = engine.generate([prompt], params)
    assert [c.token_ids for c in out.completions] == [_alone(tuple(prompt))] * n
    _check_idle(engine)


@pytest.mark.parametrize("num_pages", POOLS)
def test_mixed_batch_of_24_requests(num_pages):
    """24 requests of every prompt length from 1 to 24 (chunk boundaries, and one-token pieces
    left by the step's token budget), n from 1 to 4, greedy and sampled, in one ``generate``."""
    lens = range(1, 25)
    prompts = [list(_prompt(n, 1)) for n in lens]
    params = [
        SamplingParams(
            max_tokens=1 + i % MAX_TOKENS,
            n=1 + (i * 3) % MAX_NUM_SEQS,
            temperature=0.0 if i % 3 else 1.0,
            seed=i,
        )
        for i in range(len(prompts))
    ]
    engine = _engine(16, num_pages)
    _budget_steps(engine, 2000)
    with _deadline(180):
        outs = engine.generate(prompts, params)
    for out, prompt, p in zip(outs, prompts, params, strict=True):
        _check(engine, out.request_id, prompt, p)
    _check_idle(engine)
    assert (engine.stats["preemptions"] > 0) == (num_pages is not None)


def test_a_request_that_cannot_progress_raises_instead_of_hanging():
    """A request whose sequences vanished (the state the hang left behind): ``generate`` and
    ``stream`` raise a RuntimeError naming it and its state, instead of looping on empty steps."""
    for run in (
        lambda e: e.generate([[5, 6, 7]], SamplingParams(max_tokens=2, n=2)),
        lambda e: list(e.stream([[5, 6, 7]], SamplingParams(max_tokens=2, n=2))),
    ):
        engine = _engine()
        engine.scheduler.add = lambda seq: None  # the request's sequences never reach a queue
        _budget_steps(engine, 5)
        with pytest.raises(
            RuntimeError,
            match=r"no progress.*request '0' \(prompt of 3 tokens, n=2.*"
            r"unfinished, in neither queue",
        ):
            run(engine)


# Property: liveness over prompt lengths, n, chunk, pool and batch mix -------------------------


@st.composite
def _workloads(draw):
    chunk = draw(st.sampled_from(CHUNKS))
    boundaries = sorted(
        {1, 2, chunk - 1, chunk, chunk + 1, chunk + 2, 2 * chunk + 1, 2 * chunk + 2}
        & set(range(1, MAX_PROMPT + 1))
    )
    length = st.one_of(st.sampled_from(boundaries), st.integers(1, MAX_PROMPT))
    request = st.fixed_dictionaries(
        dict(
            length=length,
            variant=st.integers(0, 1),
            n=st.integers(1, MAX_NUM_SEQS),
            max_tokens=st.integers(1, MAX_TOKENS),
            sampled=st.booleans(),
            stop_at=st.none() | st.integers(0, MAX_TOKENS - 1),
        )
    )
    requests = draw(st.lists(request, min_size=1, max_size=6))
    early = draw(st.integers(0, len(requests)))  # added before the rest arrive, after `delay` steps
    return dict(
        chunk=chunk,
        num_pages=draw(st.sampled_from(POOLS)),
        requests=requests,
        early=early,
        delay=draw(st.integers(0, 3)),
        admission=draw(st.sampled_from(("shortest", "fcfs"))),
        max_wait_steps=draw(st.sampled_from((64, 1))),  # 1: the starvation bound fires at once
    )


@settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(_workloads())
def test_every_request_finishes_with_n_completions_equal_to_running_alone(work):
    prompts, params = [], []
    for i, r in enumerate(work["requests"]):
        prompt = list(_prompt(r["length"], r["variant"]))
        stop = ()
        if r["stop_at"] is not None and not r["sampled"]:
            stop = (_alone(tuple(prompt))[r["stop_at"]],)
        prompts.append(prompt)
        params.append(
            SamplingParams(
                max_tokens=r["max_tokens"],
                n=r["n"],
                stop_token_ids=stop,
                seed=i,
                temperature=1.0 if r["sampled"] else 0.0,
            )
        )
    engine = _engine(
        work["chunk"], work["num_pages"], admission=work["admission"], max_wait_steps=work["max_wait_steps"]
    )
    # Generous: each step computes a token, and preemption recomputes at most every sequence's
    # tokens once per preemption, each of which needs a newer sequence to have run.
    work_tokens = sum(len(p) + q.n * q.max_tokens for p, q in zip(prompts, params, strict=True))
    _budget_steps(engine, 20 * work_tokens + 100)
    early = work["early"]
    ids = [engine.add_request(p, q) for p, q in zip(prompts[:early], params[:early], strict=True)]
    for _ in range(work["delay"]):
        engine.step()
    outs = engine.generate(prompts[early:], params[early:])  # runs beside the early ones
    ids += [o.request_id for o in outs]
    while engine.has_unfinished():  # the early ones still running
        engine.step()
    for rid, prompt, p in zip(ids, prompts, params, strict=True):
        _check(engine, rid, prompt, p)
    _check_idle(engine)
