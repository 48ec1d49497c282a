"""`llmarch serve` under load: 200 requests from 32 concurrent clients (completions and chat, streamed
and not, text and token-id prompts, several prompts per request, n up to 3, greedy and seeded
sampling, 1 to 40 new tokens) all complete, each equal to `Engine.generate` of the same requests,
and the server ends with an empty queue and every page free."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serve_helpers import API_KEY, ENGINE, ServerProcess, make_checkpoint, metric  # noqa: E402

from llmarch.inference import Engine, SamplingParams  # noqa: E402
from llmarch.inference.loading import load_for_inference  # noqa: E402
from llmarch.serve import ChatTemplate  # noqa: E402

pytestmark = pytest.mark.slow
REQUESTS, CLIENTS = 200, 32
WORDS = "the engine serves many requests at once café 東京 😀 each step runs decode tokens".split()


def _requests(vocab: int) -> list[dict]:
    """The load: one dict per HTTP request (its route, body and expected prompts)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(REQUESTS):
        kind = ("chat", "text", "ids", "batch")[i % 4]
        body = {"max_tokens": int(rng.integers(1, 41)), "return_token_ids": True}
        if i % 5 == 4:  # seeded sampling
            body.update(temperature=0.8, top_p=0.95, seed=int(rng.integers(2**31)))
        else:
            body["temperature"] = 0.0
        if kind != "chat":
            body["n"] = int(rng.integers(1, 4))
        body["stream"] = bool(i % 3 == 0)
        if kind == "chat":
            words = " ".join(rng.choice(WORDS, int(rng.integers(1, 30))))
            body["messages"] = [{"role": "user", "content": words}]
        elif kind == "text":
            body["prompt"] = " ".join(rng.choice(WORDS, int(rng.integers(1, 60))))
        elif kind == "ids":
            body["prompt"] = rng.integers(0, vocab, int(rng.integers(1, 120))).tolist()
        else:
            body["prompt"] = [rng.integers(0, vocab, int(rng.integers(1, 40))).tolist() for _ in range(2)]
        out.append(body)
    return out


def _send(client, body: dict) -> dict:
    """{choice index: (token ids, text, finish reason)} and the usage, from either route."""
    body = dict(body)
    chat = "messages" in body
    extra = {"return_token_ids": body.pop("return_token_ids")}
    create = client.chat.completions.create if chat else client.completions.create
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    answer = create(model="tiny", extra_body=extra, **body)
    got, usage = {}, None
    for chunk in answer if body["stream"] else [answer]:
        usage = chunk.usage or usage
        for c in chunk.choices:
            if chat:
                text = (c.delta.content if body["stream"] else c.message.content) or ""
            else:
                text = c.text or ""
            ids, old_text, reason = got.get(c.index, ([], "", None))
            new_ids = (c.model_extra or {}).get("token_ids") or []
            got[c.index] = (ids + new_ids, old_text + text, c.finish_reason or reason)
    return {"choices": got, "usage": (usage.prompt_tokens, usage.completion_tokens)}


def test_200_requests_from_32_clients_equal_engine_generate(tmp_path_factory):
    checkpoint = make_checkpoint(tmp_path_factory.getbasetemp())
    cache = tmp_path_factory.getbasetemp() / "serve-compile-cache"
    server = ServerProcess(checkpoint, tmp_path_factory.mktemp("load"), cache, "--served-model-name", "tiny")
    try:
        model, cfg, tokenizer = load_for_inference(checkpoint)
        bodies = _requests(cfg.vocab_size)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=600)
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(lambda b: _send(client, b), bodies))

        reference = Engine(model, cfg, tokenizer=tokenizer, **ENGINE)
        template = ChatTemplate.from_checkpoint(checkpoint, tokenizer)
        prompts, params, owners = [], [], []
        for i, body in enumerate(bodies):
            p = SamplingParams(
                max_tokens=body["max_tokens"],
                temperature=body["temperature"],
                top_p=body.get("top_p", 1.0),
                seed=body.get("seed"),
                n=body.get("n", 1),
                stop_token_ids=(tokenizer.eos_id,),
            )
            if "messages" in body:
                group = [template.encode(body["messages"])]
            elif isinstance(body["prompt"], str) or isinstance(body["prompt"][0], int):
                group = [body["prompt"]]
            else:
                group = body["prompt"]
            prompts += group
            params += [p] * len(group)
            owners += [i] * len(group)
        outputs = reference.generate(prompts, params)
        want = [{"choices": {}, "usage": [0, 0]} for _ in bodies]
        for i, out in zip(owners, outputs, strict=True):
            choices, usage = want[i]["choices"], want[i]["usage"]
            for c in out.completions:  # choice k * n + j: completion j of the request's prompt k
                choices[len(choices)] = (c.token_ids, c.text, c.finish_reason)
                usage[1] += len(c.token_ids)
            usage[0] += len(out.prompt_token_ids)
        for i, (got, expected) in enumerate(zip(answers, want, strict=True)):
            assert got == {**expected, "usage": tuple(expected["usage"])}, (i, bodies[i])

        assert metric(
            server.url, "llmarch_http_requests_total", {"route": "/v1/completions", "status": "200"}
        ) == (sum("prompt" in b for b in bodies))
        assert metric(server.url, "llmarch_requests_waiting") == 0
        assert metric(server.url, "llmarch_sequences_running") == 0
        assert metric(server.url, "llmarch_kv_cache_pages_used") == 0
    finally:
        server.stop()
