"""Reading optimized HLO text: what the compiler scheduled, and the entry computation's data flow.

Tests and experiments check claims about compiled programs (collectives overlapped with compute,
independent chunks of an exchange) from ``jax.jit(f).lower(...).compile().as_text()``. The text
format is XLA's, not a stable API, so the parsing lives here, in one place, with its patterns.
"""

from __future__ import annotations

import math
import re

# The schedule ------------------------------------------------------------------------------------

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?(\S+) = .*? ([a-z][a-z0-9-]*)\((%?[^,)\s]*)", re.M)
_COMPUTE = ("dot", "convolution", "fusion", "custom-call")
_COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")


def collective_schedule(hlo_text: str) -> dict:
    """What the compiler scheduled, from optimized HLO (``jit(f).lower(...).compile().as_text()``).

    Returns a dict: ``async_pairs`` (collectives issued as ``*-start``/``*-done``, each with the
    number of compute ops, dots, fusions or custom calls, scheduled between its start and done),
    ``overlapped`` (pairs with compute between), ``sync_collectives`` (collectives issued as one
    blocking op), and ``sequence`` (the entry computation's collective and compute ops in order,
    e.g. ``["all-to-all", "fusion", ...]``).
    """
    entry = hlo_text[hlo_text.find("ENTRY") :]
    body = entry[: entry.find("\n}\n")] if "\n}\n" in entry else entry
    sequence, open_, pairs, sync = [], {}, [], 0  # open_: start name -> compute ops seen since
    for name, op, operand in _INSTRUCTION.findall(body):
        base = op.removesuffix("-start").removesuffix("-done")
        if base in _COLLECTIVES:
            sequence.append(op)
            if op.endswith("-start"):
                open_[name] = 0
            elif op.endswith("-done"):  # its operand is the start it completes
                started = operand.lstrip("%")
                if started in open_:
                    pairs.append({"collective": base, "compute_between": open_.pop(started)})
            else:
                sync += 1
        elif op in _COMPUTE:
            sequence.append(op)
            for start in open_:
                open_[start] += 1
    return {
        "async_pairs": pairs,
        "overlapped": sum(p["compute_between"] > 0 for p in pairs),
        "sync_collectives": sync,
        "sequence": sequence,
    }


# The data flow -----------------------------------------------------------------------------------

_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_NAME = re.compile(r"%([\w.\-]+)")
_ARRAY = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")


class Dataflow:
    """The entry computation of optimized HLO text as a graph: each instruction's ``op``, output
    ``shape``, text ``line``, ``operands`` (control predecessors included: they constrain the
    schedule too) and ancestors; GEMMs are dots and fusions/custom calls around a dot."""

    def __init__(self, hlo: str):
        computations, name, entry = {}, None, None
        for line in hlo.splitlines():
            if (head := _HEADER.match(line)) and name is None:
                name, computations[head.group(1)] = head.group(1), []
                entry = name if line.startswith("ENTRY") else entry
            elif line == "}":
                name = None
            elif name is not None:
                computations[name].append(line)
        self.op, self.shape, self.line, self.operands = {}, {}, {}, {}
        for line in computations[entry]:
            if m := _INSTR.match(line):
                self.op[m[1]], self.shape[m[1]], self.line[m[1]] = m[3], m[2], line
        for n, line in self.line.items():
            self.operands[n] = [o for o in _NAME.findall(line.split(" = ", 1)[1]) if o in self.op]
        self._called = {n: "\n".join(body) for n, body in computations.items()}
        self._ancestors = {}

    def ancestors(self, name: str) -> set[str]:
        if name not in self._ancestors:
            self._ancestors[name] = set()
            for o in self.operands[name]:
                self._ancestors[name] |= {o} | self.ancestors(o)
        return self._ancestors[name]

    def is_gemm(self, name: str) -> bool:
        op, line = self.op[name], self.line[name]
        if op in ("dot", "convolution"):
            return True
        if op == "custom-call" and re.search(r"gemm|matmul", line, re.I):
            return True
        called = re.search(r"calls=%([\w.\-]+)", line)
        return bool(
            op == "fusion" and called and re.search(r" (dot|convolution)\(", self._called.get(called[1], ""))
        )

    def elements(self, name: str) -> int:
        """Elements of the output (summed over a tuple's arrays)."""
        arrays = _ARRAY.findall(self.shape[name])
        return sum(math.prod(int(d) for d in dims.split(",") if d) for dims in arrays)
