"""The README's shell commands run as written, on one device.

Each ```bash block of README.md runs as one bash script (``set -e``), in order, from a scratch
directory beside a link to ``../shared/data``, with one CPU device (no simulated ones) and a fresh
compilation cache. Installing (``pip install ...``) is CI's job and is left out; a block marked
``<!-- readme-test: skip REASON -->`` on the line before it is not run (it needs the network, or
it serves forever), and the reasons are listed when the test runs with ``-rs``.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
_BLOCK = re.compile(r"(?:<!-- readme-test: skip (?P<skip>[^>]*?) -->\n)?```bash\n(?P<body>.*?)```", re.S)
_INSTALL = re.compile(r"^\s*pip install [^&\n]*(&&\s*)?", re.M)


def readme_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, script, skip reason or None)`` of each ```bash block, installs taken out."""
    blocks = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("body"))
        script = _INSTALL.sub("", match["body"]).strip()
        blocks.append((line, script, match["skip"]))
    return blocks


def test_blocks_are_found_and_installs_left_out():
    text = (
        "x\n```bash\npip install -e . && llmarch demo\n```\n"
        "<!-- readme-test: skip serves -->\n```bash\nllmarch serve\n```\n"
    )
    assert readme_blocks(text) == [(2, "llmarch demo", None), (6, "llmarch serve", "serves")]


BLOCKS = readme_blocks((ROOT / "README.md").read_text())


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A directory whose ``../shared`` is the repository's, as the README's paths expect."""
    base = tmp_path_factory.mktemp("readme")
    (base / "work").mkdir()
    if SHARED.is_dir():
        (base / "shared").symlink_to(SHARED)
    return base / "work"


@pytest.mark.slow
@pytest.mark.parametrize("line, script, skip", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_block_runs_as_written(scratch, line, script, skip):
    if skip:
        pytest.skip(f"README.md:{line} is marked: {skip}")
    if not script:
        pytest.skip(f"README.md:{line} only installs")
    if "../shared/data" in script and not SHARED.is_dir():
        pytest.skip(f"README.md:{line} reads {SHARED / 'data'}, which is absent")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "LLMARCH_", "PYTEST_"))}
    env.update(
        JAX_PLATFORMS="cpu",
        XDG_CACHE_HOME=str(scratch.parent / "cache"),
        PATH=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    done = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{script}"],
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = (done.stdout[-2000:] + done.stderr[-3000:]).strip()
    assert done.returncode == 0, f"README.md:{line} failed (exit {done.returncode}):\n{script}\n---\n{tail}"
