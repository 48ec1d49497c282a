"""FP8 training (issue #19 item 2): the same small model and data trained in float32, bf16 and
three FP8 policies, and what per-tensor scaling loses to an outlier channel; written to
experiments/results/22_fp8_training.md and 22_fp8_training.png.

Runs (``llmarch.train.precision``), each from the same initial weights on the same batches in the
same order (seed 0), through ``llmarch.train.trainer.train``:

- ``float32``, ``bf16`` (bfloat16 compute, float32 master weights and optimizer state);
- ``fp8``: DeepSeek-V3's recipe (§3.3): the blocks' linear GEMMs (Fprop, Dgrad, Wgrad) take E4M3
  operands, activations per 1×128 tile and weights per 128×128 block, online (current) scales,
  float32 promotion every 128 products;
- ``fp8-tensor``: one current scale per operand tensor;
- ``fp8-delayed``: one *delayed* scale per operand tensor from a 16-step amax history
  (TransformerEngine's default algorithm, ``llmarch.quant.fp8_delayed``).

The model is tiny-dense widened to D=128 (every contracted size, D, N·H and F, a multiple of 128,
so the blockwise tiles are real ones). The corpus is the library's default (the English text of
Python's documentation, byte tokenizer). Reported: loss curves, the mean training loss of the last
50 steps and its relative error against bf16 (DeepSeek-V3: under 0.25% at its scale), and
float32 against bf16 as the yardstick of what a change of rounding alone does.

Outliers: (1) one GEMM ``x [256, 1024] · w [1024, 256]`` whose input has one channel α× the others,
quantized per tensor and per 1×128 tile (weights per tensor and per 128×128 block): the relative
error of the product, of the ordinary channels' share of it, and how many ordinary inputs round to
zero. (2) The trained bf16 model reparametrized so that one input channel of every q/k/v and
gate/up GEMM is α× larger (that channel of each RMSNorm scale ×α, the matching weight rows ÷α: the
same function): its loss and gradient under each FP8 policy against bf16's.

The blockwise runs use ``fp8_linear.chunked_promotion()`` (Fprop and Dgrad by per-chunk dots,
equal to the bit-exact reference GEMM to float32 rounding), which makes them ~100x faster here.

    python experiments/22_fp8_training.py [--steps 1000] [--runs bf16,fp8,...] [--fresh]
    python experiments/22_fp8_training.py --quick    # a few minutes' smoke test (60 steps)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmarch import machine, presets
from llmarch.config import AttentionConfig
from llmarch.quant import fp8_blockwise as fb
from llmarch.quant.fp8_linear import chunked_promotion
from llmarch.train import fp8 as fp8_install
from llmarch.train import metrics
from llmarch.train.config import TrainConfig
from llmarch.train.optim import OptimizerConfig
from llmarch.train.precision import policy
from llmarch.train.step import loss_fn
from llmarch.train.trainer import train

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
RUNS_DIR = HERE / "runs" / "22_fp8_training"
RUNS = ("float32", "bf16", "fp8", "fp8-tensor", "fp8-delayed")
FP8_RUNS = ("fp8", "fp8-tensor", "fp8-delayed")
TAIL = 50  # steps whose mean loss is compared
ALPHAS = (1.0, 100.0, 1e3, 1e4, 1e5)
MODEL_ALPHAS = (1e3, 1e4)
EVAL_BATCHES = 4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 1000; --quick 60)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, cosine)")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"subset of {','.join(RUNS)} (bf16 needed)")
    parser.add_argument("--quick", action="store_true", help="60 steps, results under a _quick name")
    parser.add_argument("--fresh", action="store_true", help="retrain runs whose losses are cached")
    args = parser.parse_args(argv)
    args.steps = args.steps or (60 if args.quick else 1000)
    args.runs = tuple(args.runs.split(","))
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown or "bf16" not in args.runs:
        parser.error(f"--runs {','.join(args.runs)}: each must be one of {RUNS}, bf16 included")
    return args


def model_config(layers: int):
    base = presets.get("tiny-dense")
    attention = AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=32)
    return dataclasses.replace(base, d_model=128, ffn_dim=256, num_layers=layers, attention=attention)


def train_config(args, name: str, steps: int | None = None) -> TrainConfig:
    steps = steps or args.steps
    return TrainConfig(
        out_dir=str(RUNS_DIR / ("quick" if args.quick else "full") / name),
        model=model_config(args.layers),
        precision=name,
        steps=steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        eval_every=max(steps // 4, 1),
        eval_batches=EVAL_BATCHES,
        log_every=10,
        checkpoint_every=steps,
        resume="never",
        progress=False,
        tensorboard=False,
        optimizer=OptimizerConfig(learning_rate=args.lr, warmup_steps=min(50, steps // 10)),
    )


def run(args, name: str):
    """``(losses [steps], seconds, result or None)``; cached in the run directory."""
    cfg = train_config(args, name)
    cache = pathlib.Path(cfg.out_dir) / "losses.json"
    settings = json.loads(cfg.to_json())
    if cache.exists() and not args.fresh and name != "bf16":
        saved = json.loads(cache.read_text())
        if saved["settings"] == settings:
            print(f"{name}: reusing {cache}")
            return np.array(saved["losses"]), saved["seconds"], None
    if pathlib.Path(cfg.out_dir).exists():
        import shutil

        shutil.rmtree(cfg.out_dir)
    start = time.perf_counter()
    result = train(cfg, log=lambda s: None)
    seconds = time.perf_counter() - start
    losses = np.array([result.losses[s] for s in sorted(result.losses)])
    cache.write_text(json.dumps({"settings": settings, "losses": losses.tolist(), "seconds": seconds}))
    print(f"{name}: {args.steps} steps in {seconds:.0f} s, last-{TAIL} mean loss {losses[-TAIL:].mean():.4f}")
    return losses, seconds, result


def final_val_loss(args, name: str) -> float:
    """The run's last validation loss (``EVAL_BATCHES`` held-out batches), from its metrics.jsonl."""
    records = metrics.read(pathlib.Path(train_config(args, name).out_dir) / "metrics.jsonl")
    return [r["val_loss"] for r in records if "val_loss" in r][-1]


# --- outliers: one GEMM --------------------------------------------------------------------------


def _e4m3_zero(q) -> np.ndarray:
    return np.asarray(q).astype(np.float32) == 0


def outlier_gemm(alpha: float, seed: int = 0) -> dict[str, float]:
    """Per-tensor vs blockwise quantization of ``x`` with channel 7 scaled by ``alpha``."""
    M, K, N, c = 256, 1024, 256, 7
    kx, kw = jax.random.split(jax.random.key(seed))
    x = np.array(jax.random.normal(kx, (M, K), jnp.float32))
    x[:, c] *= alpha
    w = np.asarray(jax.random.normal(kw, (K, N), jnp.float32)) * 0.05
    ordinary = np.ones(K, bool)
    ordinary[c] = False
    exact = x.astype(np.float64) @ w
    exact_ord = x[:, ordinary].astype(np.float64) @ w[ordinary]
    out = {}
    # per tensor (current amax)
    sx, sw = fb.scale_from_amax(np.abs(x).max()), fb.scale_from_amax(np.abs(w).max())
    xq, wq = fb.quantize_per_tensor(x, sx), fb.quantize_per_tensor(w, sw)
    xd = np.asarray(xq).astype(np.float64) * float(sx)
    wd = np.asarray(wq).astype(np.float64) * float(sw)
    zero_t = _e4m3_zero(xq)[:, ordinary].mean()
    # blockwise: x per 1x128 tile, w per 128x128 block
    xbq, xbs = fb.quantize_activation_tiles(jnp.asarray(x))
    wbq, wbs = fb.quantize_weight_blocks(jnp.asarray(w))
    xb = np.asarray(fb.dequantize_activation_tiles(xbq, xbs), np.float64)
    wb = np.asarray(fb.dequantize_weight_blocks(wbq, wbs), np.float64)
    zero_b = _e4m3_zero(xbq)[:, ordinary].mean()
    rel = lambda got, want: float(np.linalg.norm(got - want) / np.linalg.norm(want))  # noqa: E731
    out["tensor_y"], out["block_y"] = rel(xd @ wd, exact), rel(xb @ wb, exact)
    out["tensor_ord"] = rel(xd[:, ordinary] @ wd[ordinary], exact_ord)
    out["block_ord"] = rel(xb[:, ordinary] @ wb[ordinary], exact_ord)
    out["tensor_zero"], out["block_zero"] = float(zero_t), float(zero_b)
    return out


# --- outliers: the trained model, reparametrized --------------------------------------------------


def with_outlier(model, alpha: float, channel: int = 0) -> None:
    """In place: channel ``channel`` of every block's RMSNorm scales ×alpha, the matching input rows
    of w_q/w_k/w_v and w_gate/w_up ÷alpha: the same function, an alpha× input channel for FP8."""
    for run in model.runs:
        block = run.layers
        for norm, weights in (
            (block.attn_norm, (block.attention.w_q_dnh, block.attention.w_k_dkh, block.attention.w_v_dkh)),
            (block.ffn_norm, (block.ffn.w_gate_df, block.ffn.w_up_df)),
        ):
            norm.scale[...] = norm.scale[...].at[..., channel].multiply(alpha)  # [L, D]
            for layer in weights:
                layer.w[...] = layer.w[...].at[:, channel].divide(alpha)  # [L, D, ...]


def model_outlier_rows(result, args) -> list[dict]:
    """The bf16-trained model's loss and gradient on ``EVAL_BATCHES`` training batches, reparametrized
    with each alpha, under bf16 and each FP8 policy (fresh histories for fp8-delayed: its first step
    uses current scales, so its row equals what its steady state would give only roughly)."""
    rows_src = result.train_rows
    B = args.batch_size
    batches = [
        {k: jnp.asarray(np.stack([rows_src[i * B + j][k] for j in range(B)])) for k in ("inputs", "targets")}
        for i in range(EVAL_BATCHES)
    ]
    trained = nnx.merge(result.graphdef, result.params, result.rest)
    cfg = model_config(args.layers)
    out = []
    for alpha in (1.0, *MODEL_ALPHAS):
        ref_grads = None
        for name in ("bf16", *FP8_RUNS):
            model = type(trained)(policy(name).apply(cfg), rngs=nnx.Rngs(0))
            nnx.update(model, nnx.state(trained, nnx.Param))
            with_outlier(model, alpha)
            if policy(name).fp8:
                fp8_install.install(model, policy(name).fp8)
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            grad_fn = jax.jit(jax.value_and_grad(lambda p, r, b, g=graphdef: loss_fn(g, p, r, b)[0]))
            losses, grads = [], None
            for batch in batches:
                loss, g = grad_fn(params, rest, batch)
                losses.append(float(loss))
                grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
            flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(grads)])
            if name == "bf16":
                ref_grads, ref_loss = flat, np.mean(losses)
            out.append(
                {
                    "alpha": alpha,
                    "policy": name,
                    "loss": float(np.mean(losses)),
                    "loss_rel": float(np.mean(losses) / ref_loss - 1),
                    "grad_rel": float(np.linalg.norm(flat - ref_grads) / np.linalg.norm(ref_grads)),
                }
            )
            print(out[-1])
    return out


def findings(curves, val, gemm, model_rows) -> str:
    """The reading of the tables, from their numbers."""
    tail = {n: c[-TAIL:].mean() for n, c in curves.items()}
    rel = {n: (tail[n] / tail["bf16"] - 1) * 100 for n in tail if n != "bf16"}
    fp8_rel = {n: r for n, r in rel.items() if n in FP8_RUNS}
    floor = abs(rel.get("float32", float("nan")))
    lines = [
        f"- Yardstick: float32 ends {rel.get('float32', float('nan')):+.2f}% from bf16 (last-{TAIL} mean); "
        f"the FP8 runs end {', '.join(f'{n} {r:+.2f}%' for n, r in fp8_rel.items())}. "
        + (
            "The FP8 runs are within about the float32–bf16 spread: at this size and length, changing only "
            "the rounding moves a run's loss by more than DeepSeek-V3's 0.25%, so one seed can neither "
            "confirm nor refute that bound, nor rank the FP8 recipes by their training curves."
            if all(abs(r) <= max(floor, 0.25) * 1.5 for r in fp8_rel.values())
            else "Some FP8 run differs from bf16 by more than float32 does (see the table)."
        ),
    ]
    if val:
        lines.append(
            "- Final validation loss (one evaluation of 4 batches) vs bf16: "
            + ", ".join(f"{n} {(val[n] / val['bf16'] - 1) * 100:+.2f}%" for n in val if n != "bf16")
            + "."
        )
    one = {r["policy"]: r for r in model_rows if r["alpha"] == 1.0}
    if one:
        lines.append(
            "- Same weights, no outlier (the trained model, α=1): gradient error against bf16 "
            + ", ".join(f"{n} {one[n]['grad_rel']:.4f}" for n in FP8_RUNS if n in one)
            + "; loss "
            + ", ".join(f"{n} {one[n]['loss_rel'] * 100:+.3f}%" for n in FP8_RUNS if n in one)
            + ". This comparison has no trajectory noise: it is the per-step error of each recipe."
        )
    big = max(gemm)
    lines.append(
        f"- One outlier channel in a GEMM: the ordinary channels' error per tensor goes "
        f"{gemm[1.0]['tensor_ord']:.4f} → {gemm[big]['tensor_ord']:.4f} from α=1 to α={big:g} "
        f"({gemm[big]['tensor_zero'] * 100:.1f}% of them rounded to zero), per 1×128 tile "
        f"{gemm[1.0]['block_ord']:.4f} → {gemm[big]['block_ord']:.4f}. E4M3's range with subnormals "
        "(448 down to 2^-9, 2^17.8) absorbs a 100-1000× outlier with little loss; per-tensor scaling "
        "breaks when the outlier approaches that range, and tiles confine the damage to the outlier's "
        "own tile."
    )
    worst = [r for r in model_rows if r["alpha"] == max(MODEL_ALPHAS)]
    if worst:
        lines.append(
            f"- The reparametrized model at α={max(MODEL_ALPHAS):g}: loss vs bf16 "
            + ", ".join(f"{r['policy']} {r['loss_rel'] * 100:+.3f}%" for r in worst if r["policy"] != "bf16")
            + "; gradient error "
            + ", ".join(f"{r['policy']} {r['grad_rel']:.4f}" for r in worst if r["policy"] != "bf16")
            + ". The weight rows shrunk by α sit in the same 128×128 blocks as ordinary rows, so at large α "
            "they lose precision in both recipes alike; only the activation side differs."
        )
    return "\n".join(lines)


# --- the report ----------------------------------------------------------------------------------


def plot(curves: dict[str, np.ndarray], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    window = 20
    for i, (name, losses) in enumerate(curves.items()):
        color = f"C{RUNS.index(name) if name in RUNS else i}"  # the same colour in both panels
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        steps = np.arange(window, len(losses) + 1)
        axes[0].plot(steps, smooth, label=name, lw=1, color=color)
        if name != "bf16":
            rel = (smooth / np.convolve(curves["bf16"], np.ones(window) / window, mode="valid") - 1) * 100
            axes[1].plot(steps, rel, label=name, lw=1, color=color)
    axes[0].set(xlabel="step", ylabel=f"training loss (mean of {window} steps)", title="loss")
    axes[0].set_yscale("log")
    axes[1].axhline(0.25, color="grey", ls=":", lw=1)
    axes[1].axhline(-0.25, color="grey", ls=":", lw=1)
    axes[1].set(xlabel="step", ylabel="% relative to bf16", title="relative loss difference vs bf16")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    suffix = "_quick" if args.quick else ""
    md_path = RESULTS / f"22_fp8_training{suffix}.md"
    png_path = md_path.with_suffix(".png")
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    curves, seconds, bf16_result = {}, {}, None
    for name in args.runs:
        curves[name], seconds[name], result = run(args, name)
        if name == "bf16":
            bf16_result = result
    ref = curves["bf16"][-TAIL:].mean()
    val = {name: final_val_loss(args, name) for name in args.runs}
    train_rows = []
    for name in args.runs:
        tail = curves[name][-TAIL:].mean()
        train_rows.append(
            [
                name,
                f"{curves[name][0]:.4f}",
                f"{curves[name][len(curves[name]) // 2 - 1]:.4f}",
                f"{tail:.4f}",
                "—" if name == "bf16" else f"{(tail / ref - 1) * 100:+.3f}%",
                f"{val[name]:.4f}",
                "—" if name == "bf16" else f"{(val[name] / val['bf16'] - 1) * 100:+.3f}%",
                f"{seconds[name]:.0f}",
            ]
        )
    plot(curves, png_path)

    gemm = {alpha: outlier_gemm(alpha) for alpha in ALPHAS}
    gemm_rows = [
        [
            f"{alpha:g}",
            f"{g['tensor_y']:.4f}",
            f"{g['block_y']:.4f}",
            f"{g['tensor_ord']:.4f}",
            f"{g['block_ord']:.4f}",
            f"{g['tensor_zero'] * 100:.1f}%",
            f"{g['block_zero'] * 100:.2f}%",
        ]
        for alpha, g in gemm.items()
    ]
    model_rows_raw = model_outlier_rows(bf16_result, args)
    model_rows = [
        [f"{r['alpha']:g}", r["policy"], f"{r['loss']:.4f}", f"{r['loss_rel'] * 100:+.3f}%"]
        + [f"{r['grad_rel']:.4f}"]
        for r in model_rows_raw
    ]
    header_train = ["precision", "step 1", f"step {args.steps // 2}", f"last-{TAIL} mean", "vs bf16"]
    header_train += ["final val loss", "vs bf16", "wall s"]
    header_gemm = ["α", "y per-tensor", "y 1×128 tiles", "ordinary per-tensor", "ordinary tiles"]
    header_gemm += ["zeroed per-tensor", "zeroed tiles"]

    reading = findings(curves, val, gemm, model_rows_raw)
    command = "python experiments/22_fp8_training.py " + " ".join(sys.argv[1:] if argv is None else argv)
    n_tokens = args.steps * args.batch_size * args.seq_len
    text = f"""# 22 FP8 training: DeepSeek-V3's blockwise recipe, per-tensor current and delayed scaling

Command: `{command.strip()}`

Machine: {machine.describe()}  \nDate: {datetime.date.today()}

Model: tiny-dense at D=128, {args.layers} blocks, F=256, 4 heads of 32, byte vocabulary of 320
(every contracted size a multiple of 128). Data: the library's default corpus, rows of
{args.seq_len} tokens, batch {args.batch_size}; {args.steps} steps ({n_tokens / 1e6:.2f}M tokens),
AdamW, peak learning rate {args.lr:g}, cosine schedule; seed 0 for every run (same initial
weights, same batches in the same order). FP8 runs are bf16 runs whose blocks' attention and FFN
linears (Fprop, Dgrad, Wgrad) take E4M3 operands; embedding, output head, norms, softmax and loss
stay as in bf16. All FP8 arithmetic is the XLA emulation on this CPU (no FP8 hardware): the
numbers are about accuracy, the seconds are not FP8 speed. The blockwise GEMMs run
`fp8_linear.chunked_promotion()`: per 128-chunk dots of the exact e4m3 products, promoted into
float32 with the tile and block scales, equal to the bit-exact reference GEMM to float32
rounding and ~100x faster on a CPU. Whole experiment
{(time.perf_counter() - started) / 60:.1f} min.

## Training loss

Last-{TAIL} mean: the mean training loss of the last {TAIL} steps; vs bf16: its relative
difference from bf16's (DeepSeek-V3 reports under 0.25% for its FP8 recipe against BF16, at 16B
and 230B parameters and up to 1T tokens). Final val loss: the trainer's last evaluation
({EVAL_BATCHES} held-out batches, the same for every run). float32 against bf16 is the yardstick:
what changing the rounding alone does to a run this small and short.

{md_table(header_train, train_rows)}

![curves](22_fp8_training.png)

## One outlier channel: one GEMM

`x [256, 1024]` standard normal with channel 7 multiplied by α, `w [1024, 256]` normal ×0.05;
products of the dequantized operands in float64 (the quantization alone, no accumulation error).
"y": relative Frobenius error of the product; "ordinary": of the other 1023 channels' share of
it; "zeroed": ordinary inputs that became exactly 0 in E4M3.

{md_table(header_gemm, gemm_rows)}

## One outlier channel: the trained model, reparametrized

The bf16 run's final weights with channel 0 of every RMSNorm scale ×α and the matching input rows
of w_q, w_k, w_v, w_gate, w_up ÷α: the same function in exact arithmetic, but every q/k/v and
gate/up GEMM input now has one channel α× the rest. Loss: the mean over {EVAL_BATCHES} training
batches; vs bf16: relative to bf16's loss at the same α; gradient error: relative error of the
summed parameter gradient against bf16's at the same α. fp8-delayed starts with empty histories
here, so its one step uses current per-tensor scales (as fp8-tensor).

{md_table(["α", "precision", "loss", "vs bf16", "gradient error"], model_rows)}

## Reading

{reading}

fp8-delayed's histories start empty, so its first step uses current per-tensor scales (TE starts
from a stored scale of 1.0); afterwards each step quantizes with the max amax of the 16 steps before
it, and values beyond that stale range saturate at ±448·scale (TE's behaviour).
"""
    md_path.write_text(text)
    print(text)
    print(f"wrote {md_path} and {png_path}")


if __name__ == "__main__":
    with chunked_promotion():  # blockwise Fprop/Dgrad by per-chunk dots: ~100x faster on CPU
        main()
