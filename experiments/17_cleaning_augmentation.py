"""Data cleaning and augmentation in training (the survey's §3.4): what deduplication, Gopher's
repetition rules and each EDA operation do to a small model's held-out loss; written to
experiments/results/17_cleaning_augmentation.md.

The documents are tinyshakespeare's speeches (blocks between blank lines). The last 10% of them are
the held-out set, never in any training file; every model is scored on all of it (byte tokens, rows
of 128), so runs on different training files share one yardstick. Each run is ``llmarch train``'s
trainer (``TrainConfig.clean`` / ``TrainConfig.augment``) with the same model, optimizer, steps,
batch and seed; only the data differs.

Part A, cleaning: a pool of speeches from the first 90%, into which duplicates are injected at
random positions: ``--dup-docs`` speeches copied ``--copies`` times verbatim (exact duplicates) and
``--near-docs`` speeches of 80 words or more copied ``--copies`` times with their punctuation
changed and one word replaced (near duplicates: a different normalized text, shingle Jaccard about
0.9, which is above the 0.8 threshold). Runs: no cleaning; exact deduplication; exact + MinHash
near deduplication; the latter with Gopher's repetition rules. Each row says what was removed.

Part B, augmentation in a low-resource setting: the first ``--small-docs`` speeches, trained for
many epochs, without augmentation and with each EDA operation alone (synonym replacement, random
insertion, random swap, random deletion; alpha = p = 0.1, half the documents per epoch, per line)
and with all four. Synonyms come from WordNet (Debian's ``wordnet-base``); without it the ``sr``,
``ri`` and ``eda`` rows are skipped.

A second seed of each part's baseline measures run-to-run spread: a difference smaller than it
is noise.

    nice -n 10 python experiments/17_cleaning_augmentation.py [--steps 300] [--aug-steps 400]
    python experiments/17_cleaning_augmentation.py --quick     # a ~2 minute smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import re
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

from llmarch import machine
from llmarch.data import AugmentConfig, ByteTokenizer, CleanConfig, pack_documents
from llmarch.data.augment import find_wordnet_dir
from llmarch.train.config import TrainConfig
from llmarch.train.heldout import make_evaluator
from llmarch.train.optim import OptimizerConfig
from llmarch.train.trainer import train

HERE = pathlib.Path(__file__).resolve().parent
DATA = HERE.parent / ".." / "shared" / "data" / "tinyshakespeare.txt"
SEQ_LEN, BATCH = 128, 16


def speeches() -> list[str]:
    text = DATA.read_text(encoding="utf-8")
    return [s.strip() for s in text.split("\n\n") if s.strip()]


def near_copy(text: str, rng: np.random.Generator, vocabulary: list[str]) -> str:
    """``text`` with its punctuation changed (each mark dropped or turned into another with
    probability 1/2) and one word replaced by a random word of the corpus."""
    marks = ".,;:!?"
    text = re.sub(
        r"[.,;:!?]",
        lambda m: rng.choice(["", marks[rng.integers(len(marks))]]) if rng.random() < 0.5 else m[0],
        text,
    )
    words = text.split(" ")
    i = int(rng.integers(len(words)))
    words[i] = vocabulary[rng.integers(len(vocabulary))]
    return " ".join(words)


def inject(pool: list[str], args, rng) -> tuple[list[str], dict[str, int], list[int]]:
    """The pool with exact and near duplicates inserted at random positions; the counts; the
    indices of the duplicated speeches in the pool."""
    vocabulary = sorted({w for d in pool for w in re.findall(r"[a-z]+", d.lower())})
    exact = rng.choice(len(pool), args.dup_docs, replace=False)
    long = [i for i in range(len(pool)) if len(pool[i].split()) >= 80 and i not in set(exact)]
    near = rng.choice(long, min(args.near_docs, len(long)), replace=False)
    extra = [pool[i] for i in exact for _ in range(args.copies)]
    extra += [near_copy(pool[i], rng, vocabulary) for i in near for _ in range(args.copies)]
    docs = list(pool)
    for doc in extra:
        docs.insert(int(rng.integers(len(docs) + 1)), doc)
    counts = {
        "pool": len(pool),
        "exact": len(exact) * args.copies,
        "near": len(near) * args.copies,
        "chars": sum(map(len, docs)),
        "dup_chars": sum(map(len, extra)),
    }
    return docs, counts, sorted({*exact.tolist(), *near.tolist()})


def write_jsonl(path: pathlib.Path, docs: list[str]) -> str:
    with path.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    return str(path)


def run(name: str, data: str, steps: int, root: pathlib.Path, probes: dict, seed: int = 0, **changes) -> dict:
    """Trains one model; its loss on each of ``probes`` (``held`` first: the held-out speeches)."""
    cfg = TrainConfig(
        out_dir=str(root / name),
        preset="tiny-dense",
        data=data,
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        steps=steps,
        seed=seed,
        val_fraction=0.02,
        eval_every=steps,
        eval_batches=4,
        log_every=steps,
        checkpoint_every=steps,
        tensorboard=False,
        progress=False,
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=25, weight_decay=0.01),
        **changes,
    )
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    start = time.perf_counter()
    result = train(cfg, log=lambda s: None)
    seconds = time.perf_counter() - start
    losses = {
        key: make_evaluator(result.graphdef, rows, batch_size=BATCH, batches=10**9)(
            result.params, result.rest
        )
        for key, rows in probes.items()
    }
    loss = losses["held"]
    report = json.loads((pathlib.Path(cfg.out_dir) / "data_report.json").read_text())
    epochs = steps * BATCH / report["train_rows_per_epoch"]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
    print(f"{name}: {shown}, {epochs:.1f} epochs, {seconds:.0f} s", flush=True)
    return {"name": name, "loss": loss, "seconds": seconds, "epochs": epochs, "report": report, **losses}


def removed(report: dict) -> str:
    clean = report["clean"]
    if clean is None:
        return "—"
    parts = [
        f"{r['documents']} {rule.replace('_', ' ')}" for rule, r in clean["removed"].items() if r["documents"]
    ]
    return ", ".join(parts) or "nothing"


def table(rows: list[dict], base: dict, extra: str, cell, probes: dict[str, str]) -> str:
    """One row per run; ``probes``: the extra loss columns, key -> header."""
    head = ["run", extra, "train bytes", "epochs", "held-out loss (nats/byte)", "perplexity", "vs baseline"]
    head += [*probes.values(), "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        chars = r["report"]["train_tokens"] - r["report"]["train_documents"]  # bytes, less the EOS
        diff = "—" if r is base else f"{r['loss'] - base['loss']:+.4f}"
        cells = [r["name"], cell(r), f"{chars:,}", f"{r['epochs']:.1f}", f"{r['loss']:.4f}"]
        cells += [f"{math.exp(r['loss']):.3f}", diff, *(f"{r[k]:.4f}" for k in probes), f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="steps of each cleaning run")
    parser.add_argument("--aug-steps", type=int, default=400, help="steps of each augmentation run")
    parser.add_argument("--pool-docs", type=int, default=2500, help="unique speeches of part A")
    parser.add_argument("--dup-docs", type=int, default=100, help="speeches copied verbatim")
    parser.add_argument("--near-docs", type=int, default=60, help="long speeches copied with edits")
    parser.add_argument("--copies", type=int, default=10, help="copies of each duplicated speech")
    parser.add_argument("--small-docs", type=int, default=400, help="speeches of part B")
    parser.add_argument("--quick", action="store_true", help="a smoke test: few steps, small sets")
    parser.add_argument(
        "--out", default=None, help="results file (default results/17_cleaning_augmentation.md)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.aug_steps, args.pool_docs, args.small_docs = 20, 20, 600, 150
        args.dup_docs, args.near_docs, args.copies = 20, 10, 3
    if not DATA.is_file():
        raise SystemExit(f"{DATA} is absent: this experiment needs the shared tinyshakespeare corpus")
    begin = time.perf_counter()
    docs = speeches()
    cut = int(len(docs) * 0.9)
    train_docs, held_docs = docs[:cut], docs[cut:]
    held = pack_documents(held_docs, ByteTokenizer(), seq_len=SEQ_LEN)
    root = pathlib.Path(tempfile.mkdtemp(prefix="llmarch-17-"))
    # Every run compiles the same programs (one model and batch shape): compile each once.
    jax.config.update("jax_compilation_cache_dir", str(root / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    rng = np.random.default_rng(0)

    # -- Part A: cleaning ----------------------------------------------------------------------
    pool = train_docs[: args.pool_docs]
    dirty, injected, duplicated = inject(pool, args, rng)
    dirty_file = write_jsonl(root / "dirty.jsonl", dirty)
    others = [i for i in range(len(pool)) if i not in set(duplicated)]
    others = sorted(rng.choice(others, min(len(duplicated), len(others)), replace=False).tolist())
    tok = ByteTokenizer()
    probes_a = {
        "held": held,
        "dup": pack_documents([pool[i] for i in duplicated], tok, seq_len=SEQ_LEN),
        "other": pack_documents([pool[i] for i in others], tok, seq_len=SEQ_LEN),
    }
    exact = CleanConfig(near_dedup=False)
    part_a = [
        run("no cleaning", dirty_file, args.steps, root, probes_a),
        run("no cleaning, seed 1", dirty_file, args.steps, root, probes_a, seed=1),
        run("exact dedup", dirty_file, args.steps, root, probes_a, clean=exact),
        run("exact + near dedup (MinHash)", dirty_file, args.steps, root, probes_a, clean=CleanConfig()),
        run(
            "dedup + Gopher repetition rules",
            dirty_file,
            args.steps,
            root,
            probes_a,
            clean=CleanConfig.gopher(),
        ),
    ]
    unique = run(
        "reference: the pool without injected copies",
        write_jsonl(root / "pool.jsonl", train_docs[: args.pool_docs]),
        args.steps,
        root,
        probes_a,
    )

    # -- Part B: augmentation ----------------------------------------------------------------
    small_file = write_jsonl(root / "small.jsonl", train_docs[: args.small_docs])
    probes_b = {"held": held, "train": pack_documents(train_docs[: args.small_docs], tok, seq_len=SEQ_LEN)}
    wordnet = find_wordnet_dir() is not None
    ops = [
        ("sr", "synonym replacement"),
        ("ri", "random insertion"),
        ("rs", "random swap"),
        ("rd", "random deletion"),
    ]
    part_b = [
        run("no augmentation", small_file, args.aug_steps, root, probes_b),
        run("no augmentation, seed 1", small_file, args.aug_steps, root, probes_b, seed=1),
    ]
    skipped = []
    for op, label in [*ops, ("eda", "EDA: one of the four per line")]:
        if op in ("sr", "ri", "eda") and not wordnet:
            skipped.append(label)
            continue
        cfg = AugmentConfig() if op == "eda" else AugmentConfig(ops=(op,))
        part_b.append(run(f"{label} ({op})", small_file, args.aug_steps, root, probes_b, augment=cfg))
    minutes = (time.perf_counter() - begin) / 60

    path = pathlib.Path(args.out) if args.out else HERE / "results" / "17_cleaning_augmentation.md"
    if args.quick and not args.out:
        path = root / "17_cleaning_augmentation.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    command = "python experiments/17_cleaning_augmentation.py" + (" --quick" if args.quick else "")
    if not args.quick and argv is None and len(sys.argv) > 1:
        command = "python experiments/17_cleaning_augmentation.py " + " ".join(sys.argv[1:])
    spread_a = abs(part_a[1]["loss"] - part_a[0]["loss"])
    spread_b = abs(part_b[1]["loss"] - part_b[0]["loss"])
    aug = AugmentConfig()
    for r in (*part_a, unique):
        r["gap"] = r["dup"] - r["other"]
    table_a = table(
        [*part_a, unique],
        part_a[0],
        "removed (documents, by rule)",
        lambda r: removed(r["report"]),
        {
            "dup": "loss on the duplicated speeches",
            "other": "loss on as many other pool speeches",
            "gap": "gap (duplicated − other)",
        },
    )
    table_b = table(
        part_b,
        part_b[0],
        "augmentation",
        lambda r: "—" if r["report"]["augment"] is None else ",".join(r["report"]["augment"]["ops"]),
        {"train": "loss on its training speeches (as written)"},
    )
    skipped_text = f" Skipped without WordNet: {', '.join(skipped)}." if skipped else ""
    held_bytes = held.num_tokens - len(held_docs)
    dup_share = injected["dup_chars"] / injected["chars"]
    text = f"""# 17 Data cleaning and augmentation in training

Command: `{command}`

Machine: {machine.describe()}  \nDate: {datetime.date.today()}

Data: tinyshakespeare's {len(docs):,} speeches (blocks between blank lines). Held-out: the last
{len(held_docs):,} ({held_bytes:,} bytes), never in a training file; the held-out loss is the mean
next-byte cross-entropy over all {len(held)} rows of {SEQ_LEN} of it. Model: `tiny-dense` (D=64, 2
blocks), byte tokens, batches of {BATCH}x{SEQ_LEN}, AdamW at 3e-3 with 25 warmup steps, weight decay
0.01, seed 0, trained by `llmarch.train.trainer` with `TrainConfig.clean` / `TrainConfig.augment`. One
run each: the seed-1 row of each part shows how far two seeds of the same data land apart
({spread_a:.4f} and {spread_b:.4f} nats here); smaller differences are noise. Wall seconds include
compiling, evaluating, and the load of other jobs on this shared machine. Whole experiment
{minutes:.1f} min.

## A. Cleaning: {args.steps} steps on a corpus with injected duplicates

The first {injected["pool"]:,} training speeches, plus {injected["exact"]:,} exact copies
({args.dup_docs} speeches x {args.copies}) and {injected["near"]:,} near copies ({args.near_docs} speeches
of at least 80 words x {args.copies}, punctuation changed and one word replaced) at random positions:
{len(dirty):,} documents, {injected["chars"]:,} characters, {dup_share:.0%} of them in injected copies.
Near deduplication: MinHash of word 5-gram shingles, 128 permutations, LSH at Jaccard 0.8
(`datasketch`); two near copies of one speech differ in two words, so when a copy precedes its
original, the later copies (Jaccard about 0.77 to it) can stay. Gopher: at most 30% duplicate lines
and 15% of characters in duplicate 5-grams per document (Rae et al. 2021, Table A1). The last row
trains on the pool alone. The two right-hand losses are on training text: the original speeches that
were duplicated, and as many pool speeches that were not. Their gap without injected copies (the
last row) is how the two sets differ by themselves; a smaller gap is the extra fit to the
duplicated text that its copies bought.

{table_a}

## B. Augmentation: {args.aug_steps} steps on {args.small_docs} speeches (low-resource)

The first {args.small_docs} training speeches, {part_b[0]["epochs"]:.0f} epochs. Each epoch every
document is augmented with probability {aug.prob}, line by line, each line by one operation of the
row's set (EDA, Wei & Zou 2019: alpha = {aug.alpha} of the words changed by sr/ri/rs, each word
deleted with p = {aug.p_delete} by rd); WordNet synonyms. The epochs differ (seeded by seed and
epoch) and the rows per epoch stay those of the unaugmented text. The right-hand loss is on the
training speeches as written: its gap to the held-out loss is the overfitting.{skipped_text}

{table_b}
"""
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    if not args.quick:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
