"""Self-speculative decoding with DeepSeek-V3's multi-token-prediction module (V3 report §5.4.3:
85-90% of the second tokens accepted, 1.8x tokens/s): acceptance rate, tokens per target pass and
wall-clock speedup of ``llmarch.inference.mtp_speculative.MTPSpeculativeDecoder`` over plain greedy
decoding with a KV cache (``llmarch.inference.generate``), on a model trained here; written to
experiments/results/19_mtp_speculative.md.

The model is a run directory of ``llmarch train`` with ``--model.mtp-depth 1`` (``--run``), or one
this script trains through ``llmarch.train.trainer.train`` (``tiny-dense`` with one MTP module, λ =
0.3, on tinyshakespeare when it exists, else the default corpus). Prompts are cut from the run's
validation rows; the greedy outputs of both decoders are checked to be identical.

    python experiments/19_mtp_speculative.py [--run DIR] [--steps 600] [--batch 8]
"""

import argparse
import datetime
import functools
import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmarch import accounting, machine, presets
from llmarch.inference import SamplingParams
from llmarch.inference.generate import generate
from llmarch.inference.loading import load_for_inference
from llmarch.inference.mtp_speculative import MTPSpeculativeDecoder
from llmarch.train.config import TrainConfig
from llmarch.train.data import load_rows
from llmarch.train.trainer import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / ".." / "shared" / "data" / "tinyshakespeare.txt"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default=None, help="a trained run directory (mtp_depth >= 1)")
    parser.add_argument("--steps", type=int, default=600, help="training steps when no --run")
    parser.add_argument("--batch", type=int, default=8, help="prompts generated together")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per decoder (fastest)")
    return parser.parse_args(argv)


def trained_run(args) -> str:
    out = tempfile.mkdtemp(prefix="mtp_run_")
    data = str(SHAKESPEARE) if SHAKESPEARE.exists() else "default"
    cfg = TrainConfig(
        out_dir=out,
        model=presets.get("tiny-dense").replace(mtp_depth=1),
        data=data,
        steps=args.steps,
        seq_len=128,
        batch_size=16,
        eval_every=args.steps,
        checkpoint_every=args.steps,
        progress=False,
        tensorboard=False,
    )
    train(cfg, log=print)
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "new"))
def greedy_loop(state, prompts, *, graphdef, new):
    """Plain greedy decoding as one program (prefill, then a ``fori_loop`` of one-token steps):
    the baseline with no per-token host round trip, as the speculative decoder has none."""
    model = nnx.merge(graphdef, state)
    B, T0 = prompts.shape
    positions = jnp.broadcast_to(jnp.arange(T0), (B, T0))
    out = model(prompts, positions=positions, cache=model.init_cache(B, T0 + new))
    tokens = jnp.zeros((B, new), jnp.int32).at[:, 0].set(jnp.argmax(out.logits[:, -1], -1))

    def step(i, carry):
        tokens, cache = carry
        pos = jnp.full((B, 1), T0 + i - 1, jnp.int32)
        out = model(jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1), positions=pos, cache=cache)
        return tokens.at[:, i].set(jnp.argmax(out.logits[:, -1], -1)), out.cache

    return jax.lax.fori_loop(1, new, step, (tokens, out.cache))[0]


def timed(fn, repeats):
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, min(times)  # the least disturbed run: the machine's cores are shared


def main(argv=None) -> None:
    args = parse_args(argv)
    run = args.run or trained_run(args)
    model, cfg, _ = load_for_inference(run)
    run_cfg = TrainConfig.from_dict(json.loads((pathlib.Path(run) / "train_config.json").read_text()))
    _, val = load_rows(run_cfg)
    prompts = np.stack([val[i]["inputs"][: args.prompt_len] for i in range(args.batch)]).astype(np.int32)

    base, t_host = timed(lambda: generate(model, prompts, args.new_tokens), args.repeats)
    base = np.asarray(base)[:, args.prompt_len :]
    graphdef, state = nnx.split(model)

    def loop():
        return np.asarray(greedy_loop(state, jnp.asarray(prompts), graphdef=graphdef, new=args.new_tokens))

    looped, t_base = timed(loop, args.repeats)
    assert (looped == base).all(), "the one-program greedy loop differs from generate()"

    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0)

    def speculative():
        spec = MTPSpeculativeDecoder(model)
        return spec, spec.generate([list(p) for p in prompts], params)

    (spec, outs), t_spec = timed(speculative, args.repeats)
    same = all(o.token_ids == base[i].tolist() for i, o in enumerate(outs))
    tokens = args.batch * args.new_tokens
    rounds = spec.stats["rounds"]
    mtp = accounting.mtp_param_counts(cfg)
    lines = [
        "# 19 · Self-speculative decoding with the MTP module",
        "",
        f"{datetime.date.today()} · {machine.describe()}",
        "",
        f"Model: {cfg.name} (D={cfg.d_model}, {cfg.num_layers} blocks, {accounting.param_count(cfg):,} "
        f"parameters + {mtp.total:,} in its MTP module), run {run}: {run_cfg.steps} steps of "
        f"{run_cfg.batch_size}×{run_cfg.seq_len} tokens of {pathlib.Path(run_cfg.data).name}, λ = "
        f"{run_cfg.mtp_loss_weight}.",
        f"{args.batch} prompts of {args.prompt_len} tokens from the validation rows, {args.new_tokens} "
        "new tokens each, greedy.",
        "",
        "| | value |",
        "|---|---|",
        f"| acceptance rate of the drafted (second) token | {spec.acceptance_rate:.1%} |",
        f"| tokens per target pass (rounds: {rounds}) | {1 + spec.acceptance_rate:.2f} |",
        f"| plain greedy, cached, one program (s) | {t_base:.3f} ({tokens / t_base:,.0f} tokens/s) |",
        f"| plain greedy, `generate` (a host step per token) (s) | {t_host:.3f} "
        f"({tokens / t_host:,.0f} tokens/s) |",
        f"| MTP self-speculative, one program (s) | {t_spec:.3f} ({tokens / t_spec:,.0f} tokens/s) |",
        f"| speedup over the one-program greedy loop | {t_base / t_spec:.2f}x |",
        f"| greedy outputs identical | {same} |",
        "",
        "The report: 85-90% acceptance and 1.8x tokens/s for DeepSeek-V3 (671B, its MTP module "
        "trained with the model). Here the model is tiny and its greedy continuations of byte-level "
        "text fall into repetitive phrases, which make the second token easy to predict: the "
        "acceptance rate of sampled or more varied text would be lower. The speedup compares one "
        "compiled program with another (no per-token host round trip in either); each round costs a "
        "two-token target pass, a two-token MTP pass and the acceptance logic. A tiny model on a CPU "
        "is not bound by reading its weights, so verifying two tokens costs about twice one and "
        "the rounds' overhead is not repaid: the report's 1.8x needs a decode step that costs "
        "about the same for one token as for two (a large model's memory-bound step), where the "
        "tokens per target pass above are the ceiling.",
    ]
    out = ROOT / "experiments" / "results" / "19_mtp_speculative.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
