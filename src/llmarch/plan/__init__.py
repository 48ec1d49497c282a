"""The cost model and layout planner behind ``llmarch plan``: per-device memory, a step-time
roofline with each collective over its link, the pipeline bubble, predicted MFU and energy, and a
search over mesh factorizations (``docs/planner.md``)."""

from llmarch.plan.hardware import HARDWARE, Hardware, get
from llmarch.plan.layout import Layout
from llmarch.plan.memory import Memory, memory
from llmarch.plan.planner import Plan, plan
from llmarch.plan.search import search

__all__ = ["HARDWARE", "Hardware", "Layout", "Memory", "Plan", "get", "memory", "plan", "search"]
