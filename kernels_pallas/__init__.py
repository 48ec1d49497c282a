"""Pallas kernels for llmarch's hot paths.

One file per op: ``<op>_reference`` (pure jnp, the specification), the Pallas kernel(s), and
the public wrapper. Layers never call these directly; ``llmarch.ops`` dispatches to them.
"""
