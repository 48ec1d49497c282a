"""`llmarch serve`: an OpenAI-compatible server over the Engine, tested through the official `openai`
client against a server subprocess (shared by the tests of this module; the SIGTERM test, last,
ends it), and in process with Starlette's TestClient where a fake engine failure is needed.

Greedy outputs must equal `Engine.generate` on the same checkpoint with the same engine settings.
"""

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serve_helpers import API_KEY, ENGINE, ServerProcess, get, make_checkpoint, metric, post  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from llmarch import cli  # noqa: E402
from llmarch.inference import Engine, SamplingParams  # noqa: E402
from llmarch.inference.loading import load_for_inference  # noqa: E402
from llmarch.inference.outputs import TokenEvent  # noqa: E402
from llmarch.serve import ChatTemplate, ServeLimits, create_app  # noqa: E402
from llmarch.serve.tracker import CompletionTracker, merge  # noqa: E402

MODEL = "tiny"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café 東京?"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    args = ["--api-key", API_KEY, "--served-model-name", MODEL, "--max-n", "4", "--max-body-bytes", "65536"]
    cache = tmp_path_factory.getbasetemp() / "serve-compile-cache"
    process = ServerProcess(checkpoint, tmp_path_factory.mktemp("server"), cache, *args)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The engine the server's outputs must equal, and the tokenizer's EOS (a stop token)."""
    model, cfg, tokenizer = load_for_inference(checkpoint)
    return Engine(model, cfg, tokenizer=tokenizer, **ENGINE)


def _params(reference, **kw):
    return SamplingParams(temperature=0.0, stop_token_ids=(reference.tokenizer.eos_id,), **kw)


def _ids(choice):
    return choice.model_extra["token_ids"]


def _joined_stream(stream, chat=False):
    """{index: (text, token ids, finish reason)} of a streamed response, and its usage."""
    texts, ids, reasons, usage = {}, {}, {}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            piece = c.delta.content if chat else c.text
            texts[c.index] = texts.get(c.index, "") + (piece or "")
            ids[c.index] = ids.get(c.index, []) + (c.model_extra or {}).get("token_ids", [])
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    return {i: (texts[i], ids[i], reasons[i]) for i in texts}, usage


# The OpenAI-compatible API against Engine.generate -----------------------------------------------


def test_completions_equal_engine_generate(client, reference):
    prompts = ["The engine serves", "Café 東京 😀"]
    want = reference.generate(prompts, _params(reference, max_tokens=12))
    extra = {"return_token_ids": True}
    got = client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=12, temperature=0, extra_body=extra
    )
    assert [c.index for c in got.choices] == [0, 1]
    for choice, out in zip(got.choices, want, strict=True):
        assert (_ids(choice), choice.text, choice.finish_reason) == (
            out.token_ids,
            out.text,
            out.completions[0].finish_reason,
        )
    prompt_tokens = sum(len(w.prompt_token_ids) for w in want)
    generated = sum(len(w.token_ids) for w in want)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (prompt_tokens, generated)

    stream = client.completions.create(
        model=MODEL,
        prompt=prompts,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    joined, usage = _joined_stream(stream)
    assert joined == {i: (w.text, w.token_ids, w.completions[0].finish_reason) for i, w in enumerate(want)}
    assert usage.completion_tokens == generated

    ids = [5, 17, 42, 200, 7]  # a token-id prompt
    (want,) = reference.generate([ids], _params(reference, max_tokens=6))
    got = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, extra_body=extra)
    assert (_ids(got.choices[0]), got.choices[0].text) == (want.token_ids, want.text)


def test_chat_completions_equal_engine_generate(client, reference, checkpoint):
    prompt = ChatTemplate.from_checkpoint(checkpoint, reference.tokenizer).encode(MESSAGES)
    (want,) = reference.generate([prompt], _params(reference, max_tokens=10))
    got = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    message = got.choices[0].message
    assert (message.role, message.content, got.choices[0].finish_reason) == (
        "assistant",
        want.text,
        want.completions[0].finish_reason,
    )
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(prompt), len(want.token_ids))
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=10, temperature=0, stream=True
    )
    joined, _ = _joined_stream(stream, chat=True)
    assert joined == {0: (want.text, [], want.completions[0].finish_reason)}


def test_n_seed_and_sampling_equal_engine_generate(client, reference):
    params = SamplingParams(
        max_tokens=8,
        temperature=1.0,
        top_k=50,
        top_p=0.9,
        seed=7,
        n=3,
        stop_token_ids=(reference.tokenizer.eos_id,),
    )
    (want,) = reference.generate(["Each step runs"], params)
    got = client.completions.create(
        model=MODEL,
        prompt="Each step runs",
        max_tokens=8,
        temperature=1.0,
        top_p=0.9,
        seed=7,
        n=3,
        extra_body={"top_k": 50, "return_token_ids": True},
    )
    assert [_ids(c) for c in got.choices] == [c.token_ids for c in want.completions]


def test_stop_strings_cut_the_text_also_across_tokens(client, reference):
    prompt, params = "Each step runs the", SamplingParams(max_tokens=24, temperature=0.0)
    pieces = [e.text for e in reference.stream([prompt], params)]
    full = "".join(pieces)
    # A stop string made of the end of one token's text and the start of the next one's.
    j = next(j for j in range(2, len(pieces) - 1) if pieces[j] and pieces[j + 1])
    stop = pieces[j][-1] + pieces[j + 1][0]
    want = full[: full.find(stop)]
    for stream in (False, True):
        got = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            stop=[stop, "never seen"],
            stream=stream,
            extra_body={"ignore_eos": True},
        )
        if stream:
            text, _, reason = _joined_stream(got)[0][0]
        else:
            text, reason = got.choices[0].text, got.choices[0].finish_reason
        assert (text, reason) == (want, "stop")


def test_stop_token_ids_and_logprobs(client, reference):
    prompt = "The engine"
    (free,) = reference.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, logprobs=2))
    stop_id = free.token_ids[3]
    first = free.token_ids.index(stop_id)
    got = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=10,
        temperature=0,
        logprobs=2,
        extra_body={"stop_token_ids": [stop_id], "ignore_eos": True, "return_token_ids": True},
    )
    choice = got.choices[0]
    assert (_ids(choice), choice.finish_reason) == (free.token_ids[: first + 1], "stop")
    logprobs = free.completions[0].logprobs[: first + 1]
    assert choice.logprobs.token_logprobs == pytest.approx(logprobs, abs=1e-5)
    tops = free.completions[0].top_logprobs[: first + 1]
    assert [sorted(t.values()) for t in choice.logprobs.top_logprobs] == [
        pytest.approx(sorted(t.values()), abs=1e-5) for t in tops
    ]
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)


# Bad requests, keys and limits --------------------------------------------------------------------

BAD = [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "unknown_field": 1}, "unknown_field"),
    ({"prompt": "x", "n": 5}, "n"),  # --max-n 4
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "logprobs": 9}, "logprobs"),  # max_logprobs 5
    ({"prompt": "x", "stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1] * 300}, "prompt"),  # longer than max_len 256
    ({"prompt": [10**6]}, None),  # out of the vocabulary: the engine's own check refuses it
    ({"prompt": [1, 2], "max_tokens": 255}, None),  # prompt + max_tokens > max_len: the engine's
    ({"prompt": [[1], "two", 3]}, "prompt"),
    ({"prompt": "x", "presence_penalty": 0.5}, None),
    ({"prompt": "x", "echo": True}, None),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"messages": []}, None),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),  # the template's raise_exception
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
]


def test_bad_requests_get_400_and_never_disturb_others(server, client, reference):
    (want,) = reference.generate(["A request in flight"], _params(reference, max_tokens=40))
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            client.completions.create, model=MODEL, prompt="A request in flight", max_tokens=40, temperature=0
        )
        for body, param in BAD:
            route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            status, answer = post(server.url + route, {"model": MODEL, **body})
            assert status == 400, (body, answer)
            error = answer["error"]
            assert (
                set(error) == {"message", "type", "param", "code"}
                and error["type"] == "invalid_request_error"
            )
            assert error["message"] and (param is None or error["param"] == param), (body, error)
        assert running.result(timeout=300).choices[0].text == want.text
    status, answer = post(server.url + "/v1/completions", b'{"prompt": ')  # not JSON
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    assert (
        "this template has no role tool"
        in post(server.url + "/v1/chat/completions", BAD[-2][0])[1]["error"]["message"]
    )
    status, answer = post(server.url + "/v1/completions", {"model": "other", "prompt": "x"})
    assert (status, answer["error"]["code"]) == (404, "model_not_found")
    status, answer = post(server.url + "/v1/completions", {"prompt": "x" * 70_000})  # --max-body-bytes 65536
    assert status == 413 and "65536" in answer["error"]["message"]
    assert get(server.url + "/v1/nowhere")[0] == 404
    got = client.completions.create(model=MODEL, prompt="still serving", max_tokens=2)
    assert got.choices[0].finish_reason in ("stop", "length")


def test_api_key_is_needed_everywhere_but_health(server):
    anonymous = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.completions.create(model=MODEL, prompt="x", max_tokens=1)
    for path in ("/v1/models", "/metrics"):
        status, body = get(server.url + path, key=None)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert get(server.url + "/health", key=None) == (200, '{"status":"ok"}')
    models = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY).models.list()
    assert [m.id for m in models.data] == [MODEL]


# Disconnects, metrics ---------------------------------------------------------------------------


def _until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_client_that_disconnects_frees_its_pages(server, client):
    aborted = metric(server.url, "llmarch_aborted_requests_total")
    long = {"ignore_eos": True}
    stream = client.completions.create(
        model=MODEL, prompt="x", max_tokens=240, n=4, stream=True, extra_body=long
    )
    next(iter(stream))
    assert metric(server.url, "llmarch_kv_cache_pages_used") > 0
    stream.close()
    _until(lambda: metric(server.url, "llmarch_aborted_requests_total") == aborted + 1)
    _until(lambda: metric(server.url, "llmarch_kv_cache_pages_used") == 0)
    assert metric(server.url, "llmarch_sequences_running") == 0

    # Not streamed: the client gives up long before 32 prompts x 4 completions x 240 tokens are done.
    impatient = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=MODEL, prompt=["x"] * 32, max_tokens=240, n=4, extra_body=long)
    _until(lambda: metric(server.url, "llmarch_aborted_requests_total") >= aborted + 1 + 16)
    _until(lambda: metric(server.url, "llmarch_kv_cache_pages_used") == 0)
    assert metric(server.url, "llmarch_requests_waiting") == 0


def test_metrics_parse_with_prometheus_client(server):
    from prometheus_client.parser import text_string_to_metric_families

    status, text = get(server.url + "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "llmarch_http_requests",
        "llmarch_prompt_tokens",
        "llmarch_generation_tokens",
        "llmarch_requests_waiting",
        "llmarch_sequences_running",
        "llmarch_kv_cache_usage",
        "llmarch_time_to_first_token_seconds",
        "llmarch_inter_token_latency_seconds",
    ):
        assert name in families, name
    assert (
        metric(server.url, "llmarch_http_requests_total", {"route": "/v1/completions", "status": "200"}) > 0
    )
    assert (
        metric(server.url, "llmarch_http_requests_total", {"route": "/v1/completions", "status": "400"}) > 0
    )
    assert metric(server.url, "llmarch_generation_tokens_total") > 0
    assert metric(server.url, "llmarch_time_to_first_token_seconds_count") > 0
    assert metric(server.url, "llmarch_kv_cache_pages_total") == ENGINE["max_num_seqs"] * 256 // 8


# In process: queue limit, engine failure ------------------------------------------------------


def _app(checkpoint, step=None, **kw):
    model, cfg, tokenizer = load_for_inference(checkpoint)
    engine = Engine(model, cfg, tokenizer=tokenizer, **ENGINE)
    if step is not None:
        engine.step = step  # the engine thread calls it
    return create_app(engine, model_name=MODEL, drain_timeout=5, **kw)


def test_queue_limit_gives_429_and_an_engine_failure_500_and_unhealthy(checkpoint):
    entered, release = threading.Event(), threading.Event()

    def stuck_step():
        entered.set()
        release.wait(60)
        raise RuntimeError("boom")

    app = _app(checkpoint, stuck_step, limits=ServeLimits(max_queue=2))
    body = {"prompt": [1, 2, 3], "max_tokens": 4}
    try:
        with TestClient(app) as http, ThreadPoolExecutor(2) as pool:
            first = pool.submit(http.post, "/v1/completions", json=body)
            assert entered.wait(60)
            second = pool.submit(http.post, "/v1/completions", json=body)
            _until(lambda: app.state.server.worker.num_waiting == 2)
            refused = http.post("/v1/completions", json=body)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
            release.set()
            for future in (first, second):  # the one in the engine and the one still queued
                answer = future.result(60)
                assert answer.status_code == 500 and "boom" in answer.json()["error"]["message"]
            health = http.get("/health")
            assert health.status_code == 503 and "boom" in health.json()["error"]
            assert http.post("/v1/completions", json=body).status_code == 503
    finally:
        release.set()


def test_a_stream_reports_an_engine_failure_and_ends(checkpoint):
    def failing_step():
        raise RuntimeError("boom")

    with TestClient(_app(checkpoint, failing_step)) as http:
        with http.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True}) as answer:
            assert answer.status_code == 200
            lines = [line for line in answer.iter_lines() if line]
    assert "boom" in json.loads(lines[0].removeprefix("data: "))["error"]["message"]
    assert lines[-1] == "data: [DONE]"


def test_draining_refuses_new_requests_with_503(checkpoint):
    app = _app(checkpoint)
    with TestClient(app) as http:
        app.state.server.draining = True  # as the first SIGTERM sets it
        answer = http.post("/v1/completions", json={"prompt": "x"})
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down"
        assert http.get("/health").json() == {"status": "draining"}
        assert http.get("/metrics").status_code == 200


def test_a_model_without_tokenizer_serves_token_ids_only(checkpoint, reference):
    model, cfg, _ = load_for_inference(checkpoint)
    app = create_app(Engine(model, cfg, **ENGINE), model_name=MODEL, drain_timeout=5)
    with TestClient(app) as http:
        for route, body, param in (
            ("/v1/completions", {"prompt": "text"}, "prompt"),
            ("/v1/completions", {"prompt": [1, 2], "stop": "x"}, "stop"),
            ("/v1/chat/completions", {"messages": MESSAGES}, "messages"),
        ):
            answer = http.post(route, json=body)
            assert answer.status_code == 400 and answer.json()["error"]["param"] == param
        answer = http.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0})
    (want,) = reference.generate([[5, 6, 7]], SamplingParams(max_tokens=5, temperature=0.0))  # no EOS
    choice = answer.json()["choices"][0]
    assert (choice["text"], choice["token_ids"], choice["finish_reason"]) == (None, want.token_ids, "length")


# Pieces -------------------------------------------------------------------------------------


def _event(token, text, finished=False, reason=None):
    return TokenEvent("r", 0, token, text, None, finished, reason)


def test_tracker_holds_back_a_possible_stop_string_and_cuts_at_it():
    tracker = CompletionTracker(0, ("END", "xyz"))
    shown = [tracker.push(_event(i, t)).text for i, t in enumerate(["ab", "cE", "N"])]
    assert shown == ["ab", "c", ""]  # "E", then "EN", could start a stop string
    last = tracker.push(_event(3, "Dq"))
    assert (last.text, last.finish_reason, tracker.text) == ("", "stop", "abc")
    assert tracker.push(_event(4, "more")) is None and tracker.token_ids == [0, 1, 2, 3]
    other = CompletionTracker(0, ("END", "xyz"))
    assert [other.push(_event(i, t)).text for i, t in enumerate(["ENx", "y!"])] == ["EN", "xy!"]
    ended = CompletionTracker(0, ("END",))
    pieces = [ended.push(_event(0, "a E")), ended.push(_event(1, "N", True, "length"))]
    assert [(p.text, p.finish_reason) for p in pieces] == [("a ", None), ("EN", "length")]
    assert [(d.text, d.token_ids) for d in merge(pieces)] == [("a EN", [0, 1])]


def test_chat_template_renders_as_transformers_does(checkpoint):
    transformers = pytest.importorskip("transformers")
    model_tokenizer = load_for_inference(checkpoint)[2]
    template = ChatTemplate.from_checkpoint(checkpoint, model_tokenizer)
    want = transformers.AutoTokenizer.from_pretrained(checkpoint).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True
    )
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert template.encode(MESSAGES) == list(want)
    assert template.encode(MESSAGES)[0] == model_tokenizer.bos_id  # "<s>" became BOS, not text
    with pytest.raises(ValueError, match="no role tool"):
        template.render([{"role": "tool", "content": "x"}])
    sneaky = ChatTemplate("{{ ''.__class__.__mro__ }}", model_tokenizer)
    with pytest.raises(ValueError, match="refused"):  # the sandbox
        sneaky.render(MESSAGES)


def test_serve_command_errors_are_one_line(checkpoint, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--checkpoint", str(checkpoint), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot listen on 127.0.0.1:{port}" in err
    assert cli.main(["serve", "--checkpoint", str(checkpoint), "--max-queue", "0"]) == 2
    assert "ServeLimits.max_queue=0" in capsys.readouterr().err
    assert cli.main(["serve", "--checkpoint", str(checkpoint), "--page-size", "0"]) == 2
    assert "page_size" in capsys.readouterr().err


# Last: it ends the shared server ---------------------------------------------------------------


def test_sigterm_drains_in_flight_requests_then_exits_0(server, client):
    stream = client.completions.create(
        model=MODEL,
        prompt="x",
        max_tokens=200,
        n=2,
        stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    chunks = iter(stream)
    first = next(chunks)
    server.proc.send_signal(signal.SIGTERM)
    counts = {c.index: len(c.model_extra["token_ids"]) for c in first.choices}
    reasons = {}
    for chunk in chunks:
        for c in chunk.choices:
            counts[c.index] = counts.get(c.index, 0) + len(c.model_extra["token_ids"])
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    assert counts == {0: 200, 1: 200} and reasons == {0: "length", 1: "length"}
    assert server.proc.wait(120) == 0, server.log()
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=5).close()
