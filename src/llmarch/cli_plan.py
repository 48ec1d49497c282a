"""``llmarch plan``: what a training layout costs before a run (``llmarch.plan``), or, with
``--search``, the layouts of N devices that fit ranked by predicted step time."""

from __future__ import annotations

import argparse
import math

from llmarch import presets
from llmarch.config import REMAT_POLICIES
from llmarch.plan.hardware import HARDWARE
from llmarch.plan.layout import OPTIMIZER_STATES, SCHEDULES
from llmarch.train.precision import POLICIES


def _plan(args: argparse.Namespace) -> int:
    from llmarch import plan as planner
    from llmarch.plan.report import describe, describe_search
    from llmarch.sharding import parse_mesh_spec

    cfg = presets.get(args.preset)
    hw = planner.get(args.hardware)
    options = dict(
        remat=args.remat,
        precision=args.precision,
        optimizer=args.optimizer,
        schedule=args.schedule,
        virtual_stages=args.virtual_stages,
    )
    if args.search:
        if args.devices is None:
            raise ValueError("--search needs --devices N: the device count whose layouts to rank")
        if args.mesh is not None:
            raise ValueError("--search ranks meshes itself; give --devices N instead of --mesh")
        if args.microbatches is not None:  # refused rather than ignored
            raise ValueError(
                "--microbatches does not apply to --search: each pipelined layout is priced with one "
                "sequence per microbatch (the fewest bubbles); price a chosen --mesh with it instead"
            )
        if args.top < 1:
            raise ValueError(f"--top {args.top} is invalid: must be >= 1")
        found = planner.search(cfg, hw, args.devices, batch=args.batch, seq_len=args.seq_len, **options)
        print(describe_search(found, args.top))
        return 0
    if args.mesh is None:
        raise ValueError("give --mesh SPEC (e.g. fsdp=8,tensor=2), or --devices N --search")
    mesh = parse_mesh_spec(args.mesh)
    devices = math.prod(mesh.values())
    if args.devices is not None and devices != args.devices:
        raise ValueError(
            f"--mesh {args.mesh} uses {devices} devices but --devices is {args.devices}: the product of "
            "the axis sizes must equal the device count"
        )
    layout = planner.Layout(
        mesh=mesh, batch=args.batch, seq_len=args.seq_len, microbatches=args.microbatches, **options
    )
    print(describe(planner.plan(cfg, layout, hw)))
    return 0


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    plan = sub.add_parser(
        "plan",
        parents=[common],
        help="price a training layout (memory, step time, MFU, energy) or search the layouts that fit",
        description="A cost model: per-device memory (parameters, gradients, optimizer state, "
        "activations, serving KV cache), a step-time roofline of FLOPs, HBM traffic and each "
        "collective over its link, the pipeline bubble, predicted MFU and energy. Nothing runs.",
    )
    plan.add_argument(
        "--preset", required=True, choices=presets.names(), metavar="PRESET", help="a model preset"
    )
    plan.add_argument("--hardware", required=True, metavar="HW", help=f"one of {', '.join(HARDWARE)}")
    plan.add_argument(
        "--mesh", help="axis sizes, e.g. fsdp=32,tensor=4 (axes: data fsdp tensor expert stage context)"
    )
    plan.add_argument("--batch", type=int, required=True, help="sequences per optimizer step (global)")
    plan.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    plan.add_argument("--remat", default="full", choices=REMAT_POLICIES, help="default: %(default)s")
    plan.add_argument("--precision", default="bf16", choices=sorted(POLICIES), help="default: %(default)s")
    plan.add_argument(
        "--optimizer", default="adamw", choices=sorted(OPTIMIZER_STATES), help="default: %(default)s"
    )
    plan.add_argument(
        "--schedule", default="1f1b", choices=SCHEDULES, help="pipeline schedule (with stage > 1)"
    )
    plan.add_argument(
        "--microbatches", type=int, help="pipeline microbatches per step (default: one sequence each)"
    )
    plan.add_argument("--virtual-stages", type=int, default=1, help="interleaved: model chunks per device")
    plan.add_argument("--devices", type=int, help="the device count (--search: the one to factor)")
    plan.add_argument("--search", action="store_true", help="rank every mesh of --devices that fits")
    plan.add_argument("--top", type=int, default=10, help="--search: layouts to show (default: %(default)s)")
    plan.set_defaults(func=_plan)
