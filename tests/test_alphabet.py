"""Every einsum string and weight name in the library speaks the axis alphabet (``llmarch.axes``).

The project fixes one alphabet (``llmarch.axes``, docs/architecture.md) for einsum strings, shape
comments and weight names; this test reads the source of ``src/llmarch`` and ``kernels_pallas``
with ``ast`` (nothing is imported or run) and checks the letters of

- every einsum equation: the first argument of a call to ``einsum`` (``jnp.einsum``,
  ``jax.numpy.einsum``, ``np.einsum``, ...) or of an ``Einsum`` weight called through its
  attribute (``self.w_q_dnh("BTD,DNH->BTNH", x)``), and any other string constant that has the
  form of an equation (``self.lm_head("BTD,DV->BTV", x)``, an equation kept in a variable);
- every weight name ``w_<role>_<axes>``: an attribute or string constant (the HF tensor tables)
  whose last ``_`` part is its axes, one uppercase axis per letter (``w_uq_qnh`` is ``[Q,N,H]``).
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

from llmarch import axes

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "src" / "llmarch").rglob("*.py"), *(ROOT / "kernels_pallas").rglob("*.py")])

# An einsum equation: operands of letters and ellipses, "->", the output (spaces allowed).
EQUATION = re.compile(r"[A-Za-z.]+(,[A-Za-z.]+)*->[A-Za-z.]*")
# A weight name: w_, a role of one or more parts, and the axes suffix.
WEIGHT = re.compile(r"w_[a-z][a-z0-9]*(?:_[a-z0-9]+)*_([a-z]+)")

# (file relative to the repository root, equation) -> why it may use letters outside the alphabet.
EXCEPTIONS = {
    (
        "kernels_pallas/grouped_matmul.py",
        "MK,EKN->EMN",
    ): "generic grouped GEMM: M, K, N are the GEMM dims of BlockSizes(block_m, block_k, block_n), "
    "mapped to the MoE's axes in the module doc (K, N = D, F or F, D)",
    ("kernels_pallas/grouped_matmul.py", "ME,EMN->MN"): "the same GEMM dims (gmm_reference)",
    ("kernels_pallas/grouped_matmul.py", "ME,MK,MN->EKN"): "the same GEMM dims (tgmm_reference)",
}


def _einsum_target(func: ast.expr) -> bool:
    """A call whose first argument is an einsum equation: ``einsum``, ``<x>.einsum``, ``<x>.w_*``."""
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    return name == "einsum" or name.startswith("w_")


def find_equations(tree: ast.AST) -> tuple[list[tuple[int, str]], list[int]]:
    """``(equations with their lines, lines of einsum calls whose equation is not a literal)``."""
    found, dynamic, seen = [], [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _einsum_target(node.func) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.append((node.lineno, first.value))
                seen.add(id(first))
            elif not isinstance(first, ast.Name):  # a name is a pass-through (Einsum.__call__)
                dynamic.append(node.lineno)
    for node in ast.walk(tree):  # equations outside those calls (a variable, another wrapper)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in seen
            and EQUATION.fullmatch(node.value.replace(" ", ""))
        ):
            found.append((node.lineno, node.value))
    return found, dynamic


def find_weight_names(tree: ast.AST) -> list[tuple[int, str]]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.append((node.lineno, node.attr))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.append((node.lineno, node.value))
    return [(line, name) for line, name in names if WEIGHT.fullmatch(name)]


def bad_letters(equation: str) -> set[str]:
    return {c for c in equation if c.isalpha() and c not in axes.ALPHABET}


def _parsed():
    for path in SOURCES:
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), filename=str(path))


def test_alphabet_is_one_letter_per_axis():
    for letter, meaning in axes.ALPHABET.items():
        assert len(letter) == 1 and letter.isalpha() and meaning.strip(), (letter, meaning)


def test_einsum_equations_use_the_alphabet():
    leaks, dynamic, used, count = [], [], set(), 0
    for rel, tree in _parsed():
        equations, lines = find_equations(tree)
        dynamic += [f"{rel}:{line}" for line in lines]
        for line, eqn in equations:
            count += 1
            if (rel, eqn) in EXCEPTIONS:
                used.add((rel, eqn))
            elif bad := bad_letters(eqn):
                leaks.append(f"{rel}:{line}: {eqn!r} uses {''.join(sorted(bad))}, not in axes.ALPHABET")
    assert count > 40, f"found only {count} einsum equations: the finder is broken"
    assert not leaks, "letters outside the axis alphabet (fix, or extend axes.ALPHABET):\n" + "\n".join(leaks)
    assert not dynamic, f"einsum calls whose equation cannot be checked: {dynamic}"
    assert not set(EXCEPTIONS) - used, f"stale exceptions: {sorted(set(EXCEPTIONS) - used)}"


def test_weight_names_use_the_alphabet():
    leaks, count = [], 0
    lower = {letter.lower() for letter in axes.ALPHABET if letter.isupper()}  # weights: A-Z axes
    for rel, tree in _parsed():
        for line, name in find_weight_names(tree):
            count += 1
            suffix = WEIGHT.fullmatch(name).group(1)
            if bad := {c for c in suffix if c not in lower}:
                leaks.append(f"{rel}:{line}: {name!r} axes {suffix!r} use {''.join(sorted(bad))}")
    assert count > 20, f"found only {count} weight names: the finder is broken"
    assert not leaks, "weight axes outside the alphabet:\n" + "\n".join(leaks)


@pytest.mark.parametrize(
    "source, leak",
    [
        ('import jax.numpy as jnp\njnp.einsum("MK,EKo->EMo", a, b)', "EKo"),
        ('import jax\njax.numpy.einsum("BTo,Do->BTD", a, b)', "BTo"),
        ('class M:\n    def f(self, x):\n        return self.w_q_dnh("BTD,DNo->BTNo", x)', "DNo"),
        ('EQN = "ab,bc->ac"\n', "ab"),
    ],
)
def test_the_finder_catches_a_leak(source, leak):
    equations, _ = find_equations(ast.parse(source))
    assert any(leak in eqn and bad_letters(eqn) for _, eqn in equations), equations


def test_the_finder_reads_weight_names():
    source = "class M:\n    def __init__(self):\n        self.w_gate_dof = 1\n        self.w_up_df = 2\n"
    assert [name for _, name in find_weight_names(ast.parse(source))] == ["w_gate_dof", "w_up_df"]
