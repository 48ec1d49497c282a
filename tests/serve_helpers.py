"""A tiny served checkpoint and an `llmarch serve` subprocess on it, for the serving tests.

The checkpoint is a Hugging Face directory: a random tiny-dense Llama (init_std 0.3, so that greedy
argmaxes are far from ties), a byte-level BPE tokenizer trained on a fixed text, and a
``tokenizer_config.json`` with its special tokens and a chat template. Both test modules build it
in the session's base temp directory and share one compilation cache, so the second server loads
the programs the first one compiled.
"""

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import llmarch
from llmarch.data.tokenizer import BPETokenizer

API_KEY = "test-key"
# The engine of the server and of the reference `Engine.generate` alike: fixed shapes, so that
# both run the same programs (two, compiled once each).
ENGINE = dict(
    max_num_seqs=8,
    max_num_batched_tokens=64,
    max_prefill_chunk=32,
    max_len=256,
    page_size=8,
    fixed_shapes=True,
)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('this template has no role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_TEXT = (
    "The engine serves many requests at once. Each step runs the decode tokens of the running "
    "sequences and chunks of the prompts that wait, side by side. Café, naïve, 東京, 😀. "
) * 40


def make_checkpoint(root: Path) -> Path:
    """The tiny checkpoint in ``root/checkpoint`` (built once per session)."""
    from flax import nnx

    path = root / "checkpoint"
    if (path / "tokenizer_config.json").is_file():
        return path
    tok = BPETokenizer.train([_TEXT], 300, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    cfg = llmarch.presets.get("tiny-dense").replace(vocab_size=tok.vocab_size, init_std=0.3)
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    llmarch.hf.save_pretrained(model, cfg, path)
    tok.save(path)
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def engine_flags(**overrides) -> list[str]:
    flags = []
    for name, value in {**ENGINE, **overrides}.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


class ServerProcess:
    """`llmarch serve` on 127.0.0.1 and a free port, its output in a log file."""

    def __init__(self, checkpoint: Path, workdir: Path, cache: Path, *args: str):
        env = dict(os.environ)
        # One device is enough to serve; the tests' 8 simulated devices would only slow it.
        env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
        env["JAX_PLATFORMS"] = "cpu"
        env["LLMARCH_COMPILE_CACHE"] = str(cache)
        self.log_path = workdir / "server.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115  (closed in stop)
        argv = [sys.executable, "-m", "llmarch.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0"]
        self.proc = subprocess.Popen(
            [*argv, *engine_flags(), "--log-level", "warning", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.url = self._wait_ready()

    def log(self) -> str:
        return self.log_path.read_text()

    def _wait_ready(self, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        url = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            if url is None and (m := re.search(r"on (http://127\.0\.0\.1:\d+)", self.log())):
                url = m.group(1)
            if url is not None:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=5) as r:
                        if r.status == 200:
                            return url
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready in {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


def get(url: str, *, key: str | None = API_KEY, timeout: float = 30) -> tuple[int, str]:
    """``(status, body)`` of a GET."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def post(url: str, body, *, key: str | None = API_KEY, timeout: float = 120) -> tuple[int, dict]:
    """``(status, json body)`` of a POST; ``body`` is JSON-encoded unless it is bytes."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def metric(url: str, name: str, labels: dict | None = None) -> float:
    """One sample of the server's /metrics, parsed with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = get(url + "/metrics")
    assert status == 200, text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    raise KeyError(f"no sample {name} {labels or ''} in /metrics")
