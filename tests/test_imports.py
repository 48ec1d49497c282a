"""The package's import graph: no cycles (imports inside functions included), and the layers below
everything that uses them.

Edges come from the source (``ast``), not from running it, so an import inside a function, which
runs late and can hide a cycle, counts like any other. ``from pkg import name`` is an edge to the
submodule ``pkg.name`` when there is one, else to ``pkg`` itself; imports under
``if TYPE_CHECKING:`` are annotations, never executed, and are left out.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {
    "llmarch": ROOT / "src" / "llmarch",
    "kernels_pallas": ROOT / "kernels_pallas",
    "kernels_cpu": ROOT / "kernels_cpu",
}
# The package's layers, top to bottom (docs/architecture.md draws the same picture): a module may
# import modules of its own row and the rows below it, never a row above. Each entry is a module or
# a package prefix; the first that matches a module places it.
LAYERING = [
    (
        "llmarch",
        "llmarch.__main__",
        "llmarch.cli",
        "llmarch.cli_compress",
        "llmarch.cli_train",
        "llmarch.cli_config",
        "llmarch.cli_serve",
        "llmarch.cli_export",
        "llmarch.cli_plot",
        "llmarch.cli_plan",
    ),
    ("llmarch.serve", "llmarch.serve."),  # `llmarch serve`: HTTP over the engine
    ("llmarch.export", "llmarch.export."),  # `llmarch export`: Hugging Face, GGUF, StableHLO
    # `llmarch quantize`/`prune`/`lowrank` and their outputs; fine-tuning and distilling from a
    # checkpoint (sources: loads what the trainer, below Hugging Face and inference, cannot)
    (
        "llmarch.demo",
        "llmarch.demo_config",
        "llmarch.quant.convert",
        "llmarch.prune.convert",
        "llmarch.lowrank.convert",
        "llmarch.sources",
        "llmarch.evaluation",  # `llmarch eval`: any checkpoint, any corpus
        "llmarch.eval_harness",  # lm-evaluation-harness over the same checkpoints
    ),
    ("llmarch.plot",),  # `llmarch plot`: runs' metrics.jsonl curves
    ("llmarch.plan", "llmarch.plan."),  # `llmarch plan`: the cost model and layout search
    ("llmarch.inference",),
    # the vision package exports its Hugging Face loader; LLaVA builds on llmarch.model and llmarch.hf,
    # and its training step on llmarch.train's loss and update guard
    (
        "llmarch.vision",
        "llmarch.vision.hf",
        "llmarch.vision.llava",
        "llmarch.vision.llava_hf",
        "llmarch.vision.train",
        "llmarch.vision.captioning",  # the shapes captioner end to end: writes a Hugging Face checkpoint
    ),
    ("llmarch.hf",),
    ("llmarch.train",),
    ("llmarch.quant.checkpoint",),
    ("llmarch.presets", "llmarch.data", "llmarch.run_format"),
    ("llmarch.prune", "llmarch.prune.model", "llmarch.prune.structured"),  # walks the blocks as GPTQ does
    ("llmarch.lowrank", "llmarch.lowrank.model"),  # so does activation-aware SVD
    ("llmarch.lora", "llmarch.lora.model"),  # adapters on a model's linears (QLoRA: quantize first)
    ("llmarch.quant", "llmarch.quant.model", "llmarch.quant.gptq", "llmarch.quant.awq"),
    ("llmarch.quant.calibrate",),  # walks the model's blocks
    ("llmarch.pipeline", "llmarch.pipeline_schedule"),  # pipeline stages over the model's blocks
    ("llmarch.mtp",),  # runs the model's multi-token-prediction modules (training, drafting)
    ("llmarch.model",),
    ("llmarch.vision.",),  # vision towers (SigLIP): layers assembled like the decoder
    ("llmarch.quant.targets",),  # a model's Einsum/MoE/Embed layers seen as matrices
    ("llmarch.accounting",),
    ("llmarch.config",),
    ("llmarch.layers", "llmarch.layers.kinds"),  # the registry and the curated package __init__
    # every layer module; the quantized and the factorized Einsum (the model builds the latter)
    # (and the FP8 training GEMMs, which Einsum calls under an FP8 precision policy)
    (
        "llmarch.layers.",
        "llmarch.quant.linear",
        "llmarch.quant.fp8_linear",
        "llmarch.quant.fp8_delayed",
        "llmarch.lowrank.layer",
        "llmarch.lora.layer",
    ),
    (
        "llmarch.quant.config",
        "llmarch.prune.config",
        "llmarch.prune.masks",
        "llmarch.lowrank.config",
        "llmarch.lowrank.svd",
        "llmarch.lora.config",
        "llmarch.distill",
        "llmarch.distill.",
    ),
    ("llmarch.ops", "llmarch.hlo", "llmarch.json_config"),
    # context parallelism's ring attention and tensor parallelism's collective matmuls: ops over
    # the ambient mesh, below ops
    ("llmarch.ring_attention", "llmarch.collective_matmul"),
    (
        "llmarch.quant.matmul",
        "llmarch.quant.tensor",
        "llmarch.quant.hessian",
        "llmarch.quant.fp8_blockwise",
    ),  # the quantized formats, below the ops
    ("llmarch.sharding",),
    ("llmarch.axes", "llmarch.checks", "llmarch.machine", "llmarch.hub", "llmarch.logs"),
    ("kernels_pallas", "kernels_cpu"),
]
# The layers are the bottom of the model stack: they may not reach up into what assembles, trains,
# serves or converts models.
LAYERS_MAY_NOT_IMPORT = ("llmarch.model", "llmarch.train", "llmarch.inference", "llmarch.hf")


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool, modules: dict) -> set[str]:
    out: set[str] = set()

    def target(name: str) -> str | None:  # the longest known module that `name` is in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(filter(None, (target(a.name) for a in node.names)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the current package
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                found = target(f"{base}.{alias.name}") if f"{base}.{alias.name}" in modules else target(base)
                if found:
                    out.add(found)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out.discard(module)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", modules)
        for name, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_lazy_imports(graph):
    """The walk must see imports inside functions, or it would miss the cycles they hide."""
    assert "llmarch.layers.kinds" in graph["llmarch.config"]
    assert any(graph.values())


def test_no_import_cycles(graph):
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_is_found_when_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_layers_do_not_import_what_builds_on_them(graph):
    bad = sorted(
        (name, dep)
        for name, deps in graph.items()
        if name.startswith("llmarch.layers")
        for dep in deps
        if dep.startswith(LAYERS_MAY_NOT_IMPORT)
    )
    assert not bad, f"layer modules importing model/train/inference/hf: {bad}"


def _row(module: str) -> int:
    for i, row in enumerate(LAYERING):
        for entry in row:
            exact = module == entry
            inside = entry.endswith(".") and module.startswith(entry)
            package = entry in (
                "llmarch.inference",
                "llmarch.hf",
                "llmarch.train",
                "llmarch.data",
                "kernels_pallas",
                "kernels_cpu",
            ) and module.startswith(entry + ".")
            if exact or inside or package:
                return i
    raise AssertionError(f"{module} has no row in LAYERING: add it")


def test_imports_only_go_down_the_layering(graph):
    upward = sorted((name, dep) for name, deps in graph.items() for dep in deps if _row(dep) < _row(name))
    assert not upward, f"imports of a row above: {upward}"
