"""CPU kernels for llmarch's hot paths: C++ handlers called through XLA's FFI.

Pallas compiles no CPU kernels (on CPU it runs in interpret mode, for tests), so where XLA:CPU's
own code is far from the machine's roofline, the kernel is written in C++ against XLA's FFI
headers (which jaxlib ships), compiled once per machine on first use and registered with
``jax.ffi``. ``llmarch.ops`` dispatches to them on the CPU backend, beside the XLA path each is
checked against, and falls back to that path when no compiler is present.

=====================  ==========================================================
file                   op
=====================  ==========================================================
quantized_matmul.cc    ``quantized_matmul``: integer and FP8 weights, few rows (decoding)
dense_matmul.cc        ``weight_matmul``: float32 weights, 2 to 8 rows (small-batch decoding)
                       and one row of an LM head-sized weight
paged_attention.cc     ``paged_attention`` and ``mla_decode``: a float32 paged cache, up to 16
                       query positions per row (decode steps, speculative verification)
top_k.cc               ``top_k``: float32 rows (memory-layer searches, MoE routing, sampling)
memory_read.cc         the memory layers' value read (``layers.memory_lookup.read_values``):
                       PKM, UltraMem's IVE blocks and MCS cores, a float32 table
pool.h                 the parallel loop every kernel runs its tasks with
=====================  ==========================================================

``build.py`` compiles and loads the library.
"""
