"""The `llmarch demo` run, with its numbers written to experiments/results/00_demo.md.

Trains tiny-dense on the embedded corpus (Python's documentation, byte tokens) and compares
the validation loss with the unigram entropy of the corpus: a model that learned nothing
beyond byte frequencies would sit at the entropy.

    python experiments/00_demo.py [--steps 300]
"""

import argparse
import datetime
import pathlib

from llmarch import demo, machine

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=300)
args = parser.parse_args()

lines: list[str] = []
result = demo.run(demo.DemoConfig(steps=args.steps), log=lambda s: (print(s), lines.append(s)))
out = pathlib.Path(__file__).parent / "results" / "00_demo.md"
out.parent.mkdir(exist_ok=True)
out.write_text(
    f"# 00 demo: tiny-dense on the embedded corpus\n\n"
    f"Command: `python experiments/00_demo.py --steps {args.steps}` "
    f"(the same run as `llmarch demo`)\n\n"
    f"Machine: {machine.describe()}  \nDate: {datetime.date.today()}\n\n"
    "| steps | train loss | validation loss (nats/byte) | unigram entropy | tokens/s |\n"
    "|---|---|---|---|---|\n"
    f"| {args.steps} | {result['train_loss']:.3f} | {result['val_loss']:.3f} | "
    f"{result['unigram_entropy']:.3f} | {result['tokens_per_s']:,.0f} |\n\n"
    "Log:\n\n```\n" + "\n".join(lines) + "\n```\n"
)
print(f"wrote {out}")
