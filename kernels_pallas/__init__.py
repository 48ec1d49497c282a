"""Pallas kernels for llmarch's hot paths.

One file per op: ``<op>_reference`` (pure jnp, the specification), the Pallas kernel(s), and
the public wrapper ``<op>(..., *, block_sizes=None, interpret=False)`` with a frozen
``BlockSizes`` whose ``default(target)`` gives per-target tiles. Layers never call these
directly; ``llmarch.ops`` dispatches to them.

==========================  ==========================================  ======================
file                        wrapper(s)                                  backward
==========================  ==========================================  ======================
flash_attention.py          ``flash_attention`` (spec:                  ``custom_vjp``: dq and
                            ``attention_reference``)                    dk/dv kernels
grouped_matmul.py           ``gmm``, ``tgmm`` (``gmm_reference``,       ``custom_vjp``: gmm of
                            ``tgmm_reference``; ``gmm_xla`` for ops)    d out, tgmm
memory_lookup.py            ``memory_lookup``                           ``custom_vjp``: gather-
                                                                        dot, scatter-add
paged_attention.py          ``paged_attention``                         none (decoding)
mla_decode.py               ``mla_decode``                              none (decoding)
cross_entropy.py            ``cross_entropy`` (spec:                    ``custom_vjp``: dx, dW
                            ``cross_entropy_reference``;                kernels (TPU), one
                            ``cross_entropy_xla`` for ops)              atomic kernel (GPU)
quantized_matmul.py         ``quantized_matmul``                        none (inference)
                            (``quantized_matmul_reference``)
fp8_blockwise_matmul.py     ``fp8_blockwise_matmul`` (e4m3, 1x128 /     none yet (forward)
                            128x128 scales, DeepSeek-V3 recipe)
==========================  ==========================================  ======================

Each kernel is built for a *target*, TPU (Mosaic) or GPU (Pallas' Triton backend), which
differ in tiling rules, compiler params and scalar prefetch; ``_common.dispatch`` picks the
build (``jax.lax.platform_dependent`` when the platform is not known at trace time, so one
function exports for ``["tpu"]`` and for ``["cuda"]``). ``interpret=True`` runs the TPU
build in the Pallas interpreter on any backend: the only way kernels run on a CPU.
``_paged.py`` holds the kernel that paged attention and MLA decoding share.

Conventions: every wrapper validates shapes, dtypes and (when concrete) index values and
raises ``ValueError``/``TypeError`` naming the argument before anything compiles; block
sizes that a target cannot tile raise when that target's build is traced. Sizes that are
not multiples of a block are padded and the padding masked. Scores, softmax statistics and
accumulators are float32.
"""
