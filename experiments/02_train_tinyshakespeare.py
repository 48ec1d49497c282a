"""tiny-dense on tinyshakespeare with byte tokens: does it learn beyond byte frequencies?

Trains with `llmarch.train.trainer` (the same as `llmarch train`) and compares the validation
loss with the unigram entropy of the training text, the loss of the best model that ignores
context. Writes experiments/results/02_train_tinyshakespeare.md.

    python experiments/02_train_tinyshakespeare.py [--steps 500] [--out runs/shakespeare]
"""

import argparse
import datetime
import pathlib
import tempfile

from llmarch import logs, machine
from llmarch.demo import unigram_entropy
from llmarch.train import metrics
from llmarch.train.config import TrainConfig
from llmarch.train.optim import OptimizerConfig
from llmarch.train.trainer import train

DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=500)
parser.add_argument("--out", default=None)
args = parser.parse_args()
if not DATA.is_file():
    raise SystemExit(f"{DATA} is absent: this experiment needs the shared tinyshakespeare corpus")

out = args.out or tempfile.mkdtemp(prefix="llmarch-shakespeare-")
cfg = TrainConfig(
    out_dir=out,
    preset="tiny-dense",
    data=str(DATA),
    tokenizer="byte",
    steps=args.steps,
    seq_len=128,
    batch_size=16,
    eval_every=100,
    eval_batches=16,
    log_every=50,
    checkpoint_every=args.steps,
    tensorboard=False,
    optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=25, weight_decay=0.01),
)
logs.configure()  # the trainer's header, progress and summary on stderr, as `llmarch train`
result = train(cfg)
baseline = unigram_entropy(result.train_rows.tokens)
records = metrics.read(pathlib.Path(out) / "metrics.jsonl")
evals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
speed = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]

command = f"python experiments/02_train_tinyshakespeare.py --steps {args.steps}"
equivalent = (
    f"llmarch train --preset tiny-dense --data ../shared/data/tinyshakespeare.txt --steps "
    f"{args.steps} --seq-len 128 --batch-size 16 --lr 3e-3 --warmup-steps 25 --weight-decay 0.01 "
    "--eval-every 100 --eval-batches 16 --out DIR"
)
table = "\n".join(f"| {s} | {v:.3f} | {v / baseline:.2f} |" for s, v in evals)
text = f"""# 02 tiny-dense on tinyshakespeare (byte tokens)

Command: `{command}` (the trainer run is `{equivalent}`)

Machine: {machine.describe()}  \nDate: {datetime.date.today()}

Unigram entropy of the training bytes: **{baseline:.3f} nats/byte** (the best loss without context).
Final validation loss after {result.step} steps: **{result.val_loss:.3f} nats/byte**
({result.val_loss / baseline:.0%} of the unigram entropy). Mean throughput {sum(speed) / len(speed):,.0f}
tokens/s.

| step | validation loss (nats/byte) | / unigram entropy |
|---|---|---|
{table}
"""
path = pathlib.Path(__file__).parent / "results" / "02_train_tinyshakespeare.md"
path.write_text(text)
print(text)
print(f"wrote {path}")
