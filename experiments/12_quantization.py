"""Weight-only quantization (RTN, GPTQ, AWQ, FP8) and quantized KV caches on a model trained here:
held-out perplexity, checkpoint bytes and decode speed, next to the AWQ paper; written to
experiments/results/12_quantization.md.

A Llama-style model (RMSNorm, RoPE, SwiGLU, untied head; D=256, 4 blocks, F=768, 4 heads of 64,
4.2M parameters) is trained on tinyshakespeare with a 2048-token byte-level BPE learned on the
training split (``experiments/_quant_exp.py``), or reused from ``--run``. Then, on the held-out
last 10% of the text (never seen in training, in the tokenizer's merges, or in calibration):

- perplexity of float32; W8 per channel, W4g128, W4g64, W3g128, each by RTN, GPTQ and AWQ
  (``llmarch.quant.quantize``; GPTQ and AWQ calibrate on the first 128 rows of 256 tokens of the
  training split); FP8 e4m3 weights per output channel and in 128x128 blocks; and float weights
  reading keys and values back from an int8 or FP8 KV cache (one pass through the cache, checked
  equal to teacher-forced decoding one token per step);
- bytes on disk of each quantized checkpoint (``save_quantized``: safetensors + config) against
  the float32 weights (``llmarch.hf.save_pretrained``) and the training run's checkpoint;
- batch-1 and batch-32 greedy decode tokens/s through ``llmarch.inference.Engine`` of float32,
  W8 RTN, W4g128 RTN and FP8, as ratios to float32 measured in the same run;
- when ``llama-cpp-python`` and ``gguf`` are installed, batch-1 decode of a random 56M Llama in
  llmarch (float32, W8 and W4 in groups of 32) and in llama.cpp (F32, Q8_0, Q4_0 of the same
  weights, written by ``experiments/_gguf.py``).

    python experiments/12_quantization.py [--steps 1500] [--run DIR] [--methods rtn,gptq,awq,fp8]
    python experiments/12_quantization.py --quick    # a ~2 minute smoke test (tiny model, 60 steps)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import pathlib
import shutil
import sys
import tempfile
import time

import _quant_exp as qx
import jax
import numpy as np
from flax import nnx

from llmarch import hf, machine
from llmarch.inference.loading import load_for_inference
from llmarch.json_config import read_json
from llmarch.quant import QuantConfig, quantize
from llmarch.quant.checkpoint import checkpoint_bytes, save_quantized
from llmarch.run_format import CONFIG_FILE

HERE = pathlib.Path(__file__).resolve().parent
METHODS = ("rtn", "gptq", "awq", "fp8")
# (label, bits, group_size) of the integer settings, each run by every integer method.
INT_SETTINGS = (("w8", 8, None), ("w4g128", 4, 128), ("w4g64", 4, 64), ("w3g128", 3, 128))
# RTN only: every weight at W4g128, the embedding table and the LM head too (the size bound).
ALL_WEIGHTS = ("w4g128-all", 4, 128)
FP8_SETTINGS = (("fp8", None), ("fp8b128", 128))
KV_DTYPES = ("int8", "fp8_e4m3")
# The decode-speed rows: display name -> (method, label) of a measured setting.
DECODE_MODELS = {"W8 RTN": ("rtn", "w8"), "W4g128 RTN": ("rtn", "w4g128"), "FP8 per channel": ("fp8", "fp8")}
NAMES = {
    "w8": "W8 per channel",
    "w4g128": "W4 g128",
    "w4g64": "W4 g64",
    "w3g128": "W3 g128",
    "w4g128-all": "W4 g128, embeddings and LM head too (RTN)",
}
# Decode speed where the float32 weights do not fit in L3 (random weights: speed does not depend
# on their values): the bandwidth-bound case quantized weights are for.
BIG_PRESET = "small-20m"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 1500; --quick 60)")
    parser.add_argument("--quick", action="store_true", help="tiny model and workload: a smoke test")
    parser.add_argument("--run", default=None, help="training run directory to reuse or create")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--data", default=str(qx.DATA))
    parser.add_argument("--new-tokens", type=int, default=None, help="decode tokens per request (128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed decode runs per model (median)")
    parser.add_argument("--out", default=None, help="results file (default results/12_quantization.md)")
    args = parser.parse_args(argv)
    args.methods = tuple(m for m in args.methods.split(",") if m)
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        parser.error(f"--methods {','.join(args.methods)!r}: each must be one of {', '.join(METHODS)}")
    if args.steps is None:
        args.steps = 60 if args.quick else 1500
    if args.new_tokens is None:
        args.new_tokens = 32 if args.quick else 128
    return args


def settings(methods: tuple[str, ...], quick: bool = False) -> list[tuple[str, str, QuantConfig]]:
    """``(method, label, QuantConfig)`` of every weight setting the run measures (``quick``: the
    integer ones at W4g128 and W3g128 only)."""
    out = []
    for label, bits, group in INT_SETTINGS:
        if quick and label not in ("w4g128", "w3g128"):
            continue
        for method in ("rtn", "gptq", "awq"):
            if method in methods:
                out.append((method, label, QuantConfig(method=method, bits=bits, group_size=group)))
    if "rtn" in methods:
        label, bits, group = ALL_WEIGHTS
        out.append(
            (
                "rtn",
                label,
                QuantConfig(bits=bits, group_size=group, include_embeddings=True, include_lm_head=True),
            )
        )
    if "fp8" in methods:
        out += [("fp8", label, QuantConfig(method="fp8", fp8_block=block)) for label, block in FP8_SETTINGS]
    return out


def measure_weights(
    model, cfg, run: pathlib.Path, calib, evaluation, methods, qdir: pathlib.Path, quick=False
):
    """Quantizes ``model`` every way of ``settings(methods)``; each row: perplexity, seconds,
    checkpoint bytes, or the error that kept a method from running (e.g. not implemented yet)."""
    rows = []
    for method, label, qcfg in settings(methods, quick):
        row = dict(method=method, label=label, qcfg=qcfg)
        start = time.perf_counter()
        try:
            qmodel = quantize(model, cfg, qcfg, calib if method in ("gptq", "awq") else None, progress=False)
        except (ImportError, NotImplementedError, AttributeError) as e:
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"{method} {label}: not available ({row['error']})", flush=True)
            rows.append(row)
            continue
        row["seconds"] = time.perf_counter() - start
        row["ppl"] = qx.perplexity(qmodel, evaluation)
        out = qdir / f"{method}-{label}"
        shutil.rmtree(out, ignore_errors=True)
        train = read_json(run / CONFIG_FILE)  # as `llmarch quantize` records the source run
        save_quantized(qmodel, cfg, out, tokenizer=train["tokenizer"], source=str(run), train=train)
        row["bytes"] = checkpoint_bytes(out)
        row["model"] = qmodel
        print(
            f"{method} {label}: perplexity {row['ppl']:.3f}, {row['bytes'] / 1e6:.2f} MB, "
            f"quantized in {row['seconds']:.1f}s",
            flush=True,
        )
        rows.append(row)
    return rows


def reload_check(qdir: pathlib.Path, evaluation: np.ndarray, rows: list[dict]) -> str:
    """The first saved checkpoint loaded back (``load_for_inference``, as ``llmarch eval`` does):
    its perplexity must equal the in-memory model's."""
    done = [r for r in rows if "ppl" in r]
    if not done:
        return "no quantized checkpoint was written"
    r = done[min(1, len(done) - 1)]
    model, _, _ = load_for_inference(qdir / f"{r['method']}-{r['label']}")
    ppl = qx.perplexity(model, evaluation)
    same = math.isclose(ppl, r["ppl"], rel_tol=1e-5)
    return (
        f"{r['method']} {r['label']} loaded back from disk: perplexity {ppl:.4f} "
        f"({'equal to' if same else '**differs from**'} {r['ppl']:.4f} before saving)"
    )


def group_note(rows: list[dict], float_ppl: float, trained: dict) -> str:
    """Sentences from the numbers: groups of 64 against 128 at 4 bits, and settings that end below
    the float model's perplexity."""
    ppl = {(r["method"], r["label"]): r["ppl"] for r in rows if "ppl" in r}
    parts = [
        f"{m.upper()} {ppl[(m, 'w4g64')] / ppl[(m, 'w4g128')] - 1:+.2%}"
        for m in ("rtn", "gptq", "awq")
        if (m, "w4g64") in ppl and (m, "w4g128") in ppl
    ]
    notes = []
    if parts:
        notes.append(f"W4 with groups of 64 against groups of 128: {', '.join(parts)} perplexity.")
    below = [f"{m.upper()} {NAMES.get(label, label)}" for (m, label), v in ppl.items() if v < float_ppl]
    if below:
        notes.append(
            f"Below the float32 perplexity: {', '.join(below)}. The model's last training loss is "
            f"{trained['train_loss']:.3f} against a validation loss of {trained['val_loss']:.3f}: it "
            "overfits its 1 MB corpus, and a small perturbation of its weights can lower the held-out "
            "loss slightly, which is no accuracy gain to expect of the method in general."
        )
    return " ".join(notes)


def fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def weight_table(rows, float_ppl: float, float_bytes: int, methods) -> str:
    """Perplexity by setting (rows) x method (columns), then sizes."""
    int_methods = [m for m in ("rtn", "gptq", "awq") if m in methods]
    head = (
        "| weights | "
        + " | ".join(f"{m.upper()} ppl" for m in int_methods)
        + " | bytes on disk | / float32 |"
    )
    lines = [head, "|---" * (len(int_methods) + 3) + "|"]
    lines.append(
        f"| float32 | {float_ppl:.3f}"
        + " | —" * (len(int_methods) - 1)
        + f" | {fmt_bytes(float_bytes)} | 1.00 |"
    )
    by = {(r["method"], r["label"]): r for r in rows}
    for label, _, _ in (*INT_SETTINGS, ALL_WEIGHTS):
        cells, size = [], None
        for m in int_methods:
            r = by.get((m, label))
            if r is None or "ppl" not in r:
                cells.append("—" if label == ALL_WEIGHTS[0] else "n/a")
                continue
            cells.append(f"{r['ppl']:.3f} ({r['ppl'] / float_ppl - 1:+.1%})")
            size = r["bytes"] if size is None else size
        size_cells = "— | —" if size is None else f"{fmt_bytes(size)} | {size / float_bytes:.3f}"
        lines.append(f"| {NAMES[label]} | " + " | ".join(cells) + f" | {size_cells} |")
    for label, block in FP8_SETTINGS:
        r = by.get(("fp8", label))
        if r is None or "ppl" not in r:
            continue
        name = "FP8 e4m3, per channel" if block is None else f"FP8 e4m3, {block}x{block} blocks"
        cells = [f"{r['ppl']:.3f} ({r['ppl'] / float_ppl - 1:+.1%})"] + ["—"] * (len(int_methods) - 1)
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {fmt_bytes(r['bytes'])} | {r['bytes'] / float_bytes:.3f} |"
        )
    return "\n".join(lines)


def big_model_decode(new_tokens: int, repeats: int, batches: tuple[int, ...]) -> tuple[str, dict, dict]:
    """Decode tokens/s of a random ``BIG_PRESET`` model in float32, W8 RTN, W4g128 RTN and FP8:
    ``(description, {name: weight bytes}, rates)``."""
    from llmarch import Transformer, presets
    from llmarch.quant import QuantParam

    cfg = presets.get(BIG_PRESET)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    models = {"float32": model}
    for name, qcfg in (
        ("W8 RTN", QuantConfig(bits=8)),
        ("W4g128 RTN", QuantConfig(bits=4, group_size=128)),
        ("FP8 per channel", QuantConfig(method="fp8")),
    ):
        models[name] = quantize(model, cfg, qcfg, progress=False)

    def weight_bytes(m) -> int:  # float parameters and quantized values, scales, zero points
        return sum(x.nbytes for x in jax.tree.leaves(nnx.state(m, nnx.Any(nnx.Param, QuantParam))))

    sizes = {name: weight_bytes(m) for name, m in models.items()}
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(max(batches), 32))
    rates = qx.decode_rates(models, prompts, new_tokens, batches, repeats)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    what = (
        f"`{BIG_PRESET}` with random weights (D={cfg.d_model}, {cfg.num_layers} blocks, "
        f"F={cfg.ffn_dim}, V={cfg.vocab_size}; {n_params / 1e6:.1f}M parameters)"
    )
    return what, sizes, rates


def llama_cpp_decode(new_tokens: int, repeats: int) -> str:
    """Batch-1 greedy decode of ``experiments/bench.py``'s random 56M Llama in llmarch (float32,
    and W8 / W4 RTN in groups of 32 with the LM head quantized too) and in llama.cpp (F32, Q8_0,
    Q4_0 of the same weights: blocks of 32 inputs, every matrix but the token embedding); a
    markdown table, or a line saying why it was skipped."""
    from _bench_common import random_llama
    from _gguf import llama_cpp_runner

    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None:
        return "Skipped: `llama-cpp-python` or `gguf` is not installed."
    hf_model, model, cfg = random_llama(
        vocab=32000, d_model=512, layers=8, heads=8, kv_heads=4, ffn=1408, max_len=512, seed=0
    )
    models = {"float32": model}
    for name, bits in (("W8 g32", 8), ("W4 g32", 4)):
        qcfg = QuantConfig(bits=bits, group_size=32, include_lm_head=True)
        models[name] = quantize(model, cfg, qcfg, progress=False)
    prompt = np.random.default_rng(1).integers(1, cfg.vocab_size, (1, 16))
    ours = qx.decode_rates(models, prompt, new_tokens, (1,), repeats)
    theirs, sizes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for file_type in ("f32", "q8_0", "q4_0"):
            run = llama_cpp_runner(hf_model, 16 + new_tokens + 8, tmp, file_type)
            run(prompt[0].tolist(), new_tokens)  # warm
            per_token = [np.mean(run(prompt[0].tolist(), new_tokens)[0]) for _ in range(repeats)]
            theirs[file_type], sizes[file_type] = 1 / float(np.median(per_token)), run.nbytes
            version = run.version
    lines = [
        f"The random 56M Llama of `experiments/bench.py` (D=512, 8 blocks, GQA 8/4, F=1408, V=32000), "
        f"batch 1, {new_tokens} greedy tokens after 16, median of {repeats} runs: llmarch through the "
        f"`Engine` (decode-only steps), llama.cpp through llama-cpp-python {version} (seconds between "
        "tokens); the two sides ran one after the other in this process.",
        "",
        "| weights | llmarch tok/s | / its float32 | llama.cpp | GGUF bytes | tok/s | / its F32 "
        "| llmarch / llama.cpp |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ours_name, file_type in (("float32", "f32"), ("W8 g32", "q8_0"), ("W4 g32", "q4_0")):
        a, b = ours[(ours_name, 1)], theirs[file_type]
        lines.append(
            f"| {ours_name} | {a:,.0f} | {a / ours[('float32', 1)]:.2f} | {file_type.upper()} | "
            f"{fmt_bytes(sizes[file_type])} | {b:,.0f} | {b / theirs['f32']:.2f} | {a / b:.2f} |"
        )
    return "\n".join(lines)


def big_verdict(rates: dict, sizes: dict) -> str:
    """One sentence from the measured batch-1 ratios: what reading fewer bytes bought."""
    ratio = rates[("W8 RTN", 1)] / rates[("float32", 1)]
    fewer = sizes["float32"] / sizes["W8 RTN"]
    if ratio > 1:
        return f"W8 reads {fewer:.1f}x fewer bytes and decodes {ratio:.2f}x as fast at batch 1."
    return (
        f"W8 reads {fewer:.1f}x fewer bytes yet decodes at {ratio:.2f}x float32's speed at batch 1: "
        "the int8 weights are widened to float32 at fewer elements per second than float32 weights "
        "stream from memory, so on this CPU the dequantization, not the memory traffic, bounds the step."
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    data = pathlib.Path(args.data)
    if not data.is_file():
        print(f"{data} is absent: this experiment needs the shared tinyshakespeare corpus; skipping")
        return
    run = (
        pathlib.Path(args.run)
        if args.run
        else HERE / "runs" / ("12_quantization-quick" if args.quick else "12_quantization")
    )
    began = time.perf_counter()
    trained = qx.ensure_trained(run, args.steps, args.quick, data)
    train_cfg = trained["config"]
    how = "trained earlier (run reused)" if trained["reused"] else "trained"
    verb = "reused" if trained["reused"] else "trained"
    print(f"{verb} {run}: {trained['steps']} steps, validation loss {trained['val_loss']:.4f}", flush=True)
    model, cfg, _ = load_for_inference(run)
    calib, evaluation = qx.held_out(train_cfg, rows=24 if args.quick else None)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    eval_tokens = evaluation.shape[0] * (evaluation.shape[1] - 1)

    float_ppl = qx.perplexity(model, evaluation)
    print(f"float32: perplexity {float_ppl:.3f} on {eval_tokens} held-out tokens", flush=True)
    qdir = pathlib.Path(tempfile.mkdtemp(prefix="llmarch-quant-"))
    hf.save_pretrained(model, cfg, qdir / "float32")
    float_bytes = checkpoint_bytes(qdir / "float32")
    run_bytes = sum(p.stat().st_size for p in (run / "checkpoints").rglob("*") if p.is_file())

    rows = measure_weights(model, cfg, run, calib, evaluation, args.methods, qdir, args.quick)
    reload_line = reload_check(qdir, evaluation, rows)
    print(reload_line, flush=True)

    kv = {"float32": qx.kv_perplexity(model, evaluation, "float32")}
    kv_check = {"float32": qx.decode_matches(model, evaluation[:2, :64], "float32")}
    for dtype in KV_DTYPES:
        kv[dtype] = qx.kv_perplexity(model, evaluation, dtype)
        kv_check[dtype] = qx.decode_matches(model, evaluation[:2, :64], dtype)
        print(
            f"KV cache {dtype}: perplexity {kv[dtype]:.3f} (decode check {kv_check[dtype][0]:.1e})",
            flush=True,
        )

    by = {(r["method"], r["label"]): r for r in rows if "model" in r}
    models = {"float32": model}
    for name, (method, label) in DECODE_MODELS.items():
        if (method, label) in by:
            models[name] = by[(method, label)]["model"]
    prompt_len = 32
    starts = np.random.default_rng(0).choice(evaluation.shape[0], 32, replace=len(evaluation) < 32)
    prompts = evaluation[starts, :prompt_len]
    batches = (1, 32)
    rates = qx.decode_rates(models, prompts, args.new_tokens, batches, 1 if args.quick else args.repeats)
    big_what, big_sizes, big_rates = big_model_decode(
        args.new_tokens, 1 if args.quick else args.repeats, batches
    )
    llama_table = llama_cpp_decode(args.new_tokens, 1 if args.quick else args.repeats)
    seconds = time.perf_counter() - began
    shutil.rmtree(qdir, ignore_errors=True)

    # -- the results file ---------------------------------------------------------------------
    ppl = {(r["method"], r["label"]): r.get("ppl") for r in rows}
    missing = [f"{r['method']} {r['label']}: {r['error']}" for r in rows if "error" in r]
    decode_lines = [
        "| weights | batch 1 tok/s | / float32 | batch 32 tok/s | / float32 |",
        "|---|---|---|---|---|",
    ]
    for name in models:
        cells = []
        for b in batches:
            cells += [f"{rates[(name, b)]:,.0f}", f"{rates[(name, b)] / rates[('float32', b)]:.2f}"]
        decode_lines.append(f"| {name} | " + " | ".join(cells) + " |")
    big_lines = [
        "| weights | bytes | batch 1 tok/s | / float32 | batch 32 tok/s | / float32 |",
        "|---|---|---|---|---|---|",
    ]
    for name, size in big_sizes.items():
        cells = [fmt_bytes(size)]
        for b in batches:
            cells += [
                f"{big_rates[(name, b)]:,.0f}",
                f"{big_rates[(name, b)] / big_rates[('float32', b)]:.2f}",
            ]
        big_lines.append(f"| {name} | " + " | ".join(cells) + " |")
    kv_lines = [
        "| KV cache (float32 weights) | perplexity | vs float32 cache "
        "| decode check: max \\|Δ logit\\| | decode check: \\|Δ mean loss\\| |",
        "|---|---|---|---|---|",
    ]
    for d in ("float32", *KV_DTYPES):
        vs = "—" if d == "float32" else f"{kv[d] / kv['float32'] - 1:+.2%}"
        kv_lines.append(f"| {d} | {kv[d]:.3f} | {vs} | {kv_check[d][0]:.1e} | {kv_check[d][1]:.1e} |")
    command = "python experiments/12_quantization.py " + " ".join(argv if argv is not None else sys.argv[1:])
    quant_times = ", ".join(f"{r['method']} {r['label']} {r['seconds']:.1f}s" for r in rows if "seconds" in r)
    text = f"""# 12 Weight quantization and quantized KV caches on a model trained here

Command: `{command.strip()}`

Machine: {machine.describe()}  \nDate: {datetime.date.today()}

Model: `{cfg.name}`, Llama-style (RMSNorm, RoPE, SwiGLU, untied LM head), D={cfg.d_model},
{cfg.num_layers} blocks, F={cfg.ffn_dim}, {cfg.attention.num_heads} heads of {cfg.attention.head_dim},
{cfg.vocab_size}-token byte-level BPE learned on the training split; {n_params / 1e6:.2f}M parameters,
{how} for {trained["steps"]} steps of {train_cfg.batch_size}x{train_cfg.seq_len} tokens on
tinyshakespeare (validation loss {trained["val_loss"]:.4f}; the training invocation that finished the run
took {trained["seconds"] / 60:.1f} min; {trained["tokens_per_s"]:,.0f} tokens/s, the mean of the run's logged
steps). Whole experiment: {seconds / 60:.1f} min.

Perplexity: on the held-out last 10% of tinyshakespeare, {evaluation.shape[0]} rows of
{evaluation.shape[1] - 1} tokens ({eval_tokens} predictions), one forward pass per row. GPTQ/AWQ
calibration: the first {calib.shape[0]} rows of {calib.shape[1]} tokens of the training split. The
embedding table and the LM head stay float32 (`QuantConfig` defaults), as in the AWQ/GPTQ papers.

## Weights: perplexity and checkpoint size

{weight_table(rows, float_ppl, float_bytes, args.methods)}

Bytes: the quantized checkpoints' safetensors (`save_quantized`) against the float32 weights as
safetensors (`llmarch.hf.save_pretrained`): {fmt_bytes(float_bytes)}; the training run's checkpoint
(parameters with the optimizer state) takes {fmt_bytes(run_bytes)}. Int3 is stored in 4-bit nibbles,
so W3g128 has W4g128's size. The float embedding and LM head
({2 * cfg.vocab_size * cfg.d_model * 4 / 1e6:.2f} MB) bound the ratio from below in a model this small.

{group_note(rows, float_ppl, trained)}

{reload_line}. Quantizing took: {quant_times or "—"}.
{"".join(f"{chr(10)}Not measured: {m}" for m in missing)}

## KV cache quantization (float32 weights)

{chr(10).join(kv_lines)}

Measured through the cache: each batch of rows runs once through an empty int8/FP8 cache, so every
layer writes the keys and values quantized (one scale per token and KV head) and every query
attends over the dequantized cache. The decode check runs 2 rows x 64 tokens both ways, in one pass and
by teacher-forced decoding one token per step through the same kind of cache: the logits and the mean
loss differ by these amounts. (A batched pass and a one-token step compute keys and values in
different float orders; in an int8/FP8 cache such a last-bit difference can move a value to the next
quantization step, so there the logits may differ by more than float rounding.)

## Greedy decode through the Engine

{args.new_tokens} new tokens after {prompt_len}-token prompts; decode tokens over the seconds of
decode-only steps, median of {1 if args.quick else args.repeats} runs after a compiling run, the models
taking turns.

{chr(10).join(decode_lines)}

This model's float32 weights ({fmt_bytes(float_bytes)}) fit in the CPU's last-level cache, so
a decode step is not bound by memory bandwidth. Where the float32 weights do not fit, the same
measurement on {big_what}:

{chr(10).join(big_lines)}

Bytes: the arrays a decode step reads (quantized values, scales and zero points, and the float
parameters left: norms, embedding table). {big_verdict(big_rates, big_sizes)}

### Against llama.cpp

{llama_table}

## Against the AWQ paper (Lin et al. 2024, Llama-2-7B, WikiText-2)

{qx.paper_comparison(ppl, float_ppl)}

The setting differs: a {n_params / 1e6:.1f}M-parameter model with K={cfg.d_model}/{cfg.ffn_dim}
(so a group of 128 is 1/{cfg.d_model // 128} or 1/{cfg.ffn_dim // 128} of a weight's input row, against
1/32 or 1/86 in Llama-2-7B's 4096 and 11008), trained
{trained["steps"]} steps on 1 MB of Shakespeare, evaluated on its own held-out text.
"""
    # A smoke test's numbers stay beside its run, out of results/.
    default = run / "12_quantization_quick.md" if args.quick else HERE / "results" / "12_quantization.md"
    path = pathlib.Path(args.out) if args.out else default
    path.write_text(text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
