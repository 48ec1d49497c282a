"""The `llmarch demo` run, with its table written to experiments/results/00_demo.md and its loss
curves to experiments/results/00_demo.png.

Trains tiny-dense, tiny-moe, tiny-ultramem and tiny-mla side by side on the embedded corpus
(Python's documentation, byte tokens), with the same data, steps and settings, and tabulates their
parameters, activated parameters and KV-cache bytes per token, validation loss and batch-1 decode
tokens/s through the Engine (``llmarch.demo.compare``).

    python experiments/00_demo.py [--steps 300]
"""

import argparse
import datetime
import pathlib
import shutil
import tempfile

from llmarch import demo

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=demo.DemoConfig.steps)
args = parser.parse_args()

results = pathlib.Path(__file__).parent / "results"
results.mkdir(exist_ok=True)
with tempfile.TemporaryDirectory() as tmp:
    comparison = demo.compare(demo.DemoConfig(steps=args.steps, out_dir=tmp), log=print)
    print(comparison.text())
    body = comparison.markdown.read_text().split("\n", 2)[2]  # demo.md without its title
    if comparison.plot is not None:
        shutil.copy(comparison.plot, results / "00_demo.png")
        body = body.replace("](demo.png)", "](00_demo.png)")
out = results / "00_demo.md"
out.write_text(
    "# 00 demo: four tiny architectures side by side on the embedded corpus\n\n"
    f"Command: `python experiments/00_demo.py --steps {args.steps}` (the same run as `llmarch demo`)  \n"
    f"Date: {datetime.date.today()}\n\n" + body
)
print(f"wrote {out}")
