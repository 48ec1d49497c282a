"""Automatic prefix caching: time to first token and throughput with a shared system prompt,
caching off and on side by side, written to experiments/results/16_prefix_caching.md.

Every request is one ~1,000-token system prompt (the same random tokens) followed by a short
user turn of 20-40 distinct random tokens, and generates 32 tokens greedily. Two arrival
patterns, each served by fresh engines that differ only in ``enable_prefix_caching``:

- *one after another*: each request arrives when the one before has finished (a chat user at a
  time): time to first token is the prefill of one prompt, nothing queued before it;
- *together*: all requests arrive at once (a burst): time to first token includes queueing
  behind the other prompts, and throughput is the output tokens over the burst's wall time.

Compiling is left out: every (pattern, setting) runs once untimed first, which compiles its step
programs (engines with equal shapes share them), then ``--repeats`` timed rounds run the settings
in turn (off, on, off, on, ...) so that load from other processes falls on both alike; the table
gives the medians. The model is the ``small-20m`` preset (D=512, 7 layers, GQA 8/4 heads of 64,
F=1408) with random weights, its ``max_seq_len`` raised to fit the prompt.

    python experiments/16_prefix_caching.py [--requests 16] [--system 1000] [--repeats 1]
"""

import argparse
import datetime
import pathlib
import statistics
import time

import jax
import numpy as np
from _bench_common import load_average
from flax import nnx

import llmarch
from llmarch import machine
from llmarch.inference import Engine, SamplingParams

PATTERNS = ("one after another", "together")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--system", type=int, default=1000, help="system prompt tokens")
    parser.add_argument("--min-user", type=int, default=20)
    parser.add_argument("--max-user", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--preset", default="small-20m")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-prefill-chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds per pattern and setting")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def workload(args, vocab: int) -> list[list[int]]:
    """The prompts: one random system prompt, then each request's random user turn."""
    rng = np.random.default_rng(args.seed)
    system = rng.integers(0, vocab, args.system).tolist()
    lens = rng.integers(args.min_user, args.max_user + 1, args.requests)
    return [system + rng.integers(0, vocab, n).tolist() for n in lens]


def serve(model, engine_kw: dict, prompts, params: SamplingParams, pattern: str, caching: bool) -> dict:
    """One run on a fresh engine: wall seconds, each request's time to first token, its tokens and
    the engine's stats."""
    engine = Engine(model, **engine_kw, enable_prefix_caching=caching)
    start = time.perf_counter()
    if pattern == "together":
        outs = engine.generate(prompts, params)
    else:
        outs = [engine.generate([p], params)[0] for p in prompts]
    seconds = time.perf_counter() - start
    return dict(
        seconds=seconds,
        ttft=[o.ttft for o in outs],
        tokens=[o.token_ids for o in outs],
        stats=engine.stats,
    )


def summary(runs: list[dict], output_tokens: int) -> dict:
    """Medians over the timed rounds of: wall seconds, mean and median TTFT, throughput."""
    med = statistics.median
    return dict(
        seconds=med(r["seconds"] for r in runs),
        ttft_mean=med(statistics.mean(r["ttft"]) for r in runs),
        ttft_median=med(statistics.median(r["ttft"]) for r in runs),
        rate=med(output_tokens / r["seconds"] for r in runs),
        stats=runs[-1]["stats"],
        tokens=runs[-1]["tokens"],
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    base = llmarch.presets.get(args.preset)
    max_len = args.system + args.max_user + args.max_tokens
    cfg = base.replace(max_seq_len=max(base.max_seq_len, max_len))
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(args.seed))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    prompts = workload(args, cfg.vocab_size)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    output_tokens = args.requests * args.max_tokens
    engine_kw = dict(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_prefill_chunk=args.max_prefill_chunk,
        max_prefill_rows=4,
        max_len=max_len,
    )
    print(
        f"model: {args.preset} ({n_params / 1e6:.1f}M parameters); {args.requests} requests of "
        f"{args.system} + {args.min_user}-{args.max_user} tokens, {args.max_tokens} new tokens each",
        flush=True,
    )
    load_before = load_average()
    results: dict[tuple[str, bool], dict] = {}
    compile_seconds = {}
    for pattern in PATTERNS:
        for caching in (False, True):  # untimed: compiles this pattern's step programs
            warm = serve(model, engine_kw, prompts, params, pattern, caching)
            compile_seconds[pattern, caching] = warm["seconds"]
            setting = "on" if caching else "off"
            print(f"warm-up {pattern}, caching {setting}: {warm['seconds']:.1f}s", flush=True)
        timed: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.repeats):
            for caching in (False, True):
                run = serve(model, engine_kw, prompts, params, pattern, caching)
                timed[caching].append(run)
                print(
                    f"{pattern}, caching {'on' if caching else 'off'}: {run['seconds']:.1f}s, "
                    f"mean TTFT {statistics.mean(run['ttft']) * 1e3:.0f} ms, "
                    f"prefill tokens {run['stats']['prefill_tokens']}, "
                    f"hit rate {run['stats']['prefix_cache_hit_rate']:.1%}",
                    flush=True,
                )
        for caching in (False, True):
            results[pattern, caching] = summary(timed[caching], output_tokens)

    rows, ratios = [], []
    for pattern in PATTERNS:
        off, on = results[pattern, False], results[pattern, True]
        same = sum(a == b for a, b in zip(off["tokens"], on["tokens"], strict=True))
        for caching, r in ((False, off), (True, on)):
            s = r["stats"]
            rows.append(
                f"| {pattern} | {'on' if caching else 'off'} | {r['ttft_mean'] * 1e3:.0f} | "
                f"{r['ttft_median'] * 1e3:.0f} | {r['rate']:.1f} | {r['seconds']:.1f} | "
                f"{s['prefill_step_seconds']:.1f} / {s['decode_step_seconds']:.1f} | "
                f"{s['prefill_tokens']} | {s['prefix_cache_hit_rate']:.1%} |"
            )
        ratios.append(
            f"- {pattern}: mean TTFT {off['ttft_mean'] / on['ttft_mean']:.1f}x lower, median TTFT "
            f"{off['ttft_median'] / on['ttft_median']:.1f}x lower, throughput "
            f"{on['rate'] / off['rate']:.2f}x; greedy tokens identical for {same} of {args.requests} requests"
        )
    table = (
        "| arrival | prefix caching | TTFT mean, ms | TTFT median, ms | output tokens/s | wall s | "
        "steps with prefill / decode-only, s | prompt tokens computed | hit rate (tokens) |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    print(table)
    print("\n".join(ratios))
    command = "python experiments/16_prefix_caching.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
    )
    out = pathlib.Path(__file__).parent / "results" / "16_prefix_caching.md"
    out.write_text(
        "# 16 Automatic prefix caching: a shared system prompt\n\n"
        f"Command: `{command}`\n\n"
        f"Machine: {machine.describe()}  \nDate: {datetime.date.today()}  \n"
        f"Load average (1 min) at the start: {load_before:.1f}, at the end: {load_average():.1f} (the "
        "machine's cores are shared with other jobs: compare the ratios, which both settings ran "
        "under alike, rather than the absolute times)\n\n"
        f"Model: the `{args.preset}` preset with random weights, {n_params / 1e6:.1f}M parameters "
        f"(D={cfg.d_model}, {cfg.num_layers} layers, {cfg.attention.num_heads} query / "
        f"{cfg.attention.num_kv_heads} KV heads of {cfg.attention.head_dim}, F={cfg.ffn_dim}, "
        f"vocabulary {cfg.vocab_size}), float32.\n\n"
        f"Workload: {args.requests} requests, each the same {args.system}-token system prompt and a "
        f"distinct user turn of {args.min_user}-{args.max_user} random tokens, {args.max_tokens} "
        f"new tokens each, greedy. Engine: `Engine(max_num_seqs={args.max_num_seqs}, "
        f"max_num_batched_tokens={args.max_num_batched_tokens}, max_prefill_chunk="
        f"{args.max_prefill_chunk}, max_prefill_rows=4, page_size=16)`, caching off and on, a fresh "
        "engine (an empty cache) per run. *One after another*: each request arrives when the one "
        "before has finished; *together*: all arrive at once, so time to first token (TTFT) includes "
        "queueing. Every (arrival, setting) ran once untimed first to compile its step programs "
        f"(those runs took {', '.join(f'{v:.0f}s' for v in compile_seconds.values())}); then "
        f"{args.repeats} timed round(s) ran the two settings in turn; medians shown. Prompt tokens "
        "computed: prefill tokens the engine ran; the hit rate is the share of looked-up prompt "
        "tokens found in the cache; the seconds spent in steps holding prompt chunks and in decode-only "
        "steps show where the time went.\n\n"
        + table
        + "\n\nWith caching on:\n\n"
        + "\n".join(ratios)
        + "\n\n"
        "One after another, only the first request computes the system prompt; every later one "
        "finds its full pages (all of the shared prefix but its partial last page) and prefills only "
        "its user turn, so its TTFT is a short prefill. Throughput gains less than TTFT there: each "
        "request then decodes its tokens alone, which takes as long in both settings. Together, the "
        "requests admitted in the first steps prefill the system prompt side by side before any of "
        "its pages is cached (the engine does not hold a request back for a prefix another is still "
        "computing); the rest find it once it is, and since the burst's time is "
        "mostly prefill, its throughput gains about as much as its TTFT.\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
