"""GGUF export checked against llama.cpp: llmarch and llama.cpp continue the same prompts greedily
from the same weights, written by ``llmarch.export.gguf.write_gguf`` as F32, F16 and Q8_0; the
tokens are compared and the table written to experiments/results/15_gguf_llamacpp.md.

Claim (issue #17): with F32 weights llama.cpp's greedy tokens are llmarch's; F16 and Q8_0 round
the weights, so their tokens may part from llmarch's where two logits are close: the table gives
the share that agree. llama.cpp runs with an F32 KV cache (its default F16 cache would round keys
and values too), so only the weights' type differs between the rows. Also checked: llama.cpp
tokenizes every prompt into llmarch's ids (the GGUF vocabulary), and the gap between the two
programs' logits for each prompt's last token.

Models: a tiny preset with random weights and the byte tokenizer (default ``tiny-gqa``), and any
``--checkpoint`` (an llmarch run or a Hugging Face directory with its tokenizer), e.g. experiment
12's trained 4.5M Llama with its BPE tokenizer::

    python experiments/15_gguf_llamacpp.py
    python experiments/15_gguf_llamacpp.py --checkpoint experiments/runs/12_quantization

Needs ``gguf`` and, for the comparison, ``llama-cpp-python`` (``pip install llama-cpp-python``,
which compiles llama.cpp); without it the script exports, runs llmarch's half, says that nothing
was compared and writes no table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
from flax import nnx

import llmarch
from llmarch import machine
from llmarch.data.tokenizer import ByteTokenizer
from llmarch.export.gguf import DTYPES, write_gguf
from llmarch.inference.generate import generate
from llmarch.inference.loading import load_for_inference

HERE = pathlib.Path(__file__).resolve().parent
PROMPTS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "KING RICHARD II:\n",
    "All the world's a stage, and all the men and women",
    "Hello, café 😀!",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-gqa", help="random-weight model ('' for none)")
    parser.add_argument("--checkpoint", action="append", default=[], help="a trained model (repeatable)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--seed", type=int, default=0, help="the preset's initialization")
    parser.add_argument("--out", default=str(HERE / "results" / "15_gguf_llamacpp.md"))
    args = parser.parse_args(argv)
    if not args.preset and not args.checkpoint:
        parser.error("nothing to export: give --preset or --checkpoint")
    if args.new_tokens < 1:
        parser.error(f"--new-tokens {args.new_tokens}: must be >= 1")
    return args


def models(args):
    """``(label, model, cfg, tokenizer)`` of each model to compare."""
    if args.preset:
        cfg = llmarch.presets.get(args.preset)
        label = f"`{args.preset}`, random weights (seed {args.seed}), byte tokenizer"
        yield label, llmarch.Transformer(cfg, rngs=nnx.Rngs(args.seed)), cfg, ByteTokenizer()
    for path in args.checkpoint:
        model, cfg, tokenizer = load_for_inference(path)
        if tokenizer is None:
            raise SystemExit(f"{path} has no tokenizer: GGUF needs the vocabulary")
        yield f"`{path}` ({cfg.name}), {type(tokenizer).__name__}", model, cfg, tokenizer


def llmarch_greedy(model, cfg, ids: np.ndarray, n: int) -> tuple[list[int], np.ndarray]:
    """llmarch's greedy continuation (KV-cache decoding) and its logits for the prompt's last token."""
    tokens = generate(model, ids[None], n)[0, len(ids) :].tolist()
    return tokens, np.asarray(model(ids[None]))[0, -1]


def llama_cpp_greedy(llm, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy continuation (argmax of its logits) and its logits for the prompt's last token."""
    llm.reset()
    llm.eval(ids)
    first = np.array(llm.scores[llm.n_tokens - 1])
    out = []
    for i in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if i < n - 1:
            llm.eval([out[-1]])
    return out, first


def _text(tokenizer, ids: list[int]) -> str:
    """The text of ``ids``, or the ids themselves when some have no token (a random model's
    embedding is wider than the byte tokenizer's 259 ids)."""
    if max(ids) >= tokenizer.vocab_size:
        return f"ids {ids}"
    return repr(tokenizer.decode(ids))


def compare(label, model, cfg, tokenizer, args, tmp: pathlib.Path, llama_cpp) -> list[dict]:
    n = min(args.new_tokens, cfg.max_seq_len - max(len(tokenizer.encode(p)) for p in PROMPTS))
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    t0 = time.perf_counter()
    ours = [llmarch_greedy(model, cfg, ids, n) for ids in prompts]
    print(f"{label}: llmarch greedy, {len(prompts)} prompts x {n} tokens, {time.perf_counter() - t0:.1f} s")
    rows = []
    for dtype in DTYPES:
        written = write_gguf(model, cfg, tokenizer, tmp / f"{cfg.name}-{dtype}.gguf", dtype=dtype)
        row = dict(model=label, dtype=dtype, bytes=written.path.stat().st_size, prompts=len(prompts), new=n)
        print(f"  wrote {written.path.name}: {row['bytes'] / 1e6:.2f} MB")
        if llama_cpp is None:
            rows.append(row)
            continue
        llm = llama_cpp.Llama(
            str(written.path),
            n_ctx=cfg.max_seq_len,
            n_threads=os.cpu_count(),
            type_k=0,  # GGML_TYPE_F32: keys and values unrounded
            type_v=0,
            logits_all=True,  # llama-cpp-python keeps llm.scores only with it
            verbose=False,
        )
        try:
            tokenized = [llm.tokenize(p.encode(), add_bos=True, special=False) for p in PROMPTS]
            theirs = [llama_cpp_greedy(llm, ids.tolist(), n) for ids in prompts]
        finally:
            llm.close()
        agree = [np.mean(np.asarray(a) == np.asarray(b)) for (a, _), (b, _) in zip(ours, theirs, strict=True)]
        row |= dict(
            tokenized=sum(t == ids.tolist() for t, ids in zip(tokenized, prompts, strict=True)),
            identical=sum(a == b for (a, _), (b, _) in zip(ours, theirs, strict=True)),
            agreement=float(np.mean(agree)),
            logit_gap=max(float(np.abs(a - b).max()) for (_, a), (_, b) in zip(ours, theirs, strict=True)),
            sample=(_text(tokenizer, ours[0][0]), _text(tokenizer, theirs[0][0])),
        )
        print(
            f"  {dtype}: {row['identical']}/{len(prompts)} prompts identical, agreement "
            f"{row['agreement']:.1%}, max |Δlogit| {row['logit_gap']:.2e}"
        )
        rows.append(row)
    return rows


def report(rows: list[dict], args, version: str, seconds: float) -> str:
    command = "python experiments/15_gguf_llamacpp.py" + "".join(
        f" --checkpoint {c}" for c in args.checkpoint
    )
    lines = [
        "# 15 GGUF export: llmarch against llama.cpp",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine.describe()}  ",
        f"Date: {datetime.date.today()}; llama-cpp-python {version}; whole run {seconds:.0f} s",
        "",
        f"Each model continues {len(PROMPTS)} prompts greedily by {rows[0]['new']} tokens (fewer where "
        "the context is short) in llmarch (KV-cache `generate`) and in llama.cpp (argmax of its logits, "
        "F32 KV cache) from the GGUF file `write_gguf` wrote. *Tokenized*: prompts llama.cpp splits into "
        "llmarch's ids; *identical*: prompts whose continuations are the same; *agreement*: the share "
        "of positions holding the same token; *|Δlogit|*: the largest gap between the two programs' "
        "logits for a prompt's last token.",
        "",
        "| model | GGUF | size | tokenized | identical | agreement | max \\|Δlogit\\| |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype'].upper()} | {r['bytes'] / 1e6:.2f} MB | "
            f"{r['tokenized']}/{r['prompts']} | {r['identical']}/{r['prompts']} | {r['agreement']:.1%} | "
            f"{r['logit_gap']:.1e} |"
        )
    lines += [
        "",
        "Agreement counts every position, so after a first difference (where the continuations start "
        "to condition on different text) it falls quickly. A random model's logits are nearly flat, so "
        "Q8_0's rounding of the weights flips many of its argmaxes; a trained model's are far apart "
        "except at a few close calls. The reference for every row is llmarch's float32 model: the F16 "
        "and Q8_0 rows measure the GGUF types' rounding, the F32 row the export itself.",
        "",
        "First prompt's continuation, F32 (llmarch, then llama.cpp):",
        "",
    ]
    for r in rows:
        if r["dtype"] == "f32":
            lines += [f"- {r['model']}: `{r['sample'][0]}` / `{r['sample'][1]}`"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, model, cfg, tokenizer in models(args):
            rows += compare(label, model, cfg, tokenizer, args, pathlib.Path(tmp), llama_cpp)
    if llama_cpp is None:
        print(
            "llama-cpp-python is not installed, so nothing was compared with llama.cpp (the GGUF files "
            "were written and llmarch's half ran). Install it with `pip install llama-cpp-python` (it "
            "compiles llama.cpp) and run this again.",
            file=sys.stderr,
        )
        return 0
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(rows, args, llama_cpp.__version__, time.perf_counter() - start))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
