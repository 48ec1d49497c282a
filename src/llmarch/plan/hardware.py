"""The accelerators the planner knows: peak FLOP/s, HBM, interconnect and rated power, one record
each, every number with its source.

Bandwidths are bytes/s **one way, per device**: what a device can push into its links while it
also receives as much. A ring collective over a mesh axis runs at ``ring_bandwidth`` of the link
that axis sits on (``llmarch.plan.collectives``).

Sources, by tag in the comments:
  [v5p]   cloud.google.com/tpu/docs/v5p (key specifications table): 459 TFLOP/s bf16 (its FP8 row
          is also 459: no faster FP8 path), 95 GiB HBM2e at 2,765 GB/s, ICI 1,200 GB/s
          bidirectional per chip over 6 links of a 3D torus, DCN 50 Gb/s per chip.
  [v5e]   cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16 (394 int8; no FP8), 16 GiB HBM2e at
          819 GB/s, a 2D torus of 4 links per chip.
  [book]  "How to Scale Your Model" (the JAX scaling book), part 2 "All about TPUs", its ICI/DCN
          table: ICI one-way bandwidth per link 4.5e10 B/s (v5e) and 9e10 B/s (v5p); DCN per chip
          3.125e9 B/s (v5e) and 6.25e9 B/s (v5p).
  [h100]  NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: 989 TFLOP/s bf16 and 1,979 FP8
          (dense, i.e. half the "with sparsity" figures), 67 TFLOP/s FP32, 80 GB HBM3 at 3.35 TB/s,
          NVLink 900 GB/s (bidirectional: 450 GB/s each way), TDP up to 700 W; InfiniBand NDR
          400 Gb/s, one ConnectX-7 per GPU in a DGX H100 = 50 GB/s.
  [h800]  The H800 SXM5 is the H100 SXM5 with NVLink cut to 400 GB/s (200 GB/s each way); same
          tensor cores, HBM and 700 W. DeepSeek-V3 technical report (arXiv 2412.19437) §3.1 and §3.2.2: "IB
          (50 GB/s)" across nodes, NVLink within a node of 8 (it quotes 160 GB/s achieved).
  [a100]  NVIDIA A100 datasheet, SXM 80GB column: 312 TFLOP/s bf16 (dense), 19.5 TFLOP/s FP32,
          80 GB HBM2e at 2,039 GB/s, NVLink 600 GB/s (300 GB/s each way), TDP 400 W; DGX A100
          InfiniBand HDR 200 Gb/s per GPU = 25 GB/s. No FP8 tensor cores.
  [mamf]  stas00/ml-engineering, compute/accelerator/README.md, "Maximum Achievable Matmul FLOPS
          comparison table" (bf16, best shape): A100 SXM 267.9 of 312 (85.9%), H100 SXM 792.1 of
          989 (80.1%). No TPU measurement is published there or elsewhere that we found: the TPUs
          keep efficiency 1.0 (the roofline), which ``docs/planner.md`` states.
Google publishes no rated power for TPU v5e/v5p chips, so they have none here (``watts=None``) and
the planner prints no energy for them rather than a guess.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator. FLOP/s are dense (no structured sparsity); bandwidths bytes/s one way per
    device; ``None`` where the vendor publishes no number (then what needs it is refused by name).

    Attributes:
      peak_bf16: dense bf16 matmul FLOP/s: the MFU denominator.
      peak_fp8: dense FP8 matmul FLOP/s (None: no FP8 matmul unit; fp8 policies are refused).
      peak_fp32: float32 FLOP/s without tensor-core shortcuts (None: not published).
      hbm_bytes, hbm_bandwidth: device memory and its bandwidth.
      fast_link: the bandwidth of the fast domain (ICI on a TPU, per link; NVLink on a GPU, per
        GPU), one way.
      fast_links_per_axis: links a ring along one mesh axis uses each way: 2 on a torus (both
        neighbours), 1 through an NVSwitch.
      fast_domain: devices one fast domain spans (a pod slice's ICI; the 8 GPUs of a node).
      slow_link: bandwidth between fast domains, one way per device (DCN; InfiniBand).
      matmul_efficiency: measured fraction of ``peak_bf16`` that large matmuls reach ([mamf]).
      watts: rated power per device (TDP), None where unpublished.
      torus: the fast domain is a torus (TPU) rather than a switch (NVSwitch).
    """

    name: str
    peak_bf16: float
    peak_fp8: float | None
    peak_fp32: float | None
    hbm_bytes: float
    hbm_bandwidth: float
    fast_link: float
    fast_links_per_axis: int
    fast_domain: int
    slow_link: float
    matmul_efficiency: float
    watts: float | None
    torus: bool
    fast_name: str
    slow_name: str


GiB = 2**30

HARDWARE: dict[str, Hardware] = {
    "tpu-v5p": Hardware(
        name="tpu-v5p",
        peak_bf16=459e12,  # [v5p]
        peak_fp8=459e12,  # [v5p]: its FP8 row equals the bf16 row (no speed-up)
        peak_fp32=None,  # not published
        hbm_bytes=95 * GiB,  # [v5p]
        hbm_bandwidth=2765e9,  # [v5p]
        fast_link=9e10,  # [book] one way per link (1,200 GB/s bidirectional / 6 links ~ 1e11: [v5p])
        fast_links_per_axis=2,  # a torus axis: a bidirectional ring
        fast_domain=8960,  # [v5p] chips per pod (one ICI domain; slices up to 6,144)
        slow_link=6.25e9,  # [v5p] 50 Gb/s DCN per chip = [book]
        matmul_efficiency=1.0,  # no published pure-matmul measurement ([mamf] note)
        watts=None,  # not published by Google
        torus=True,
        fast_name="ICI",
        slow_name="DCN",
    ),
    "tpu-v5e": Hardware(
        name="tpu-v5e",
        peak_bf16=197e12,  # [v5e]
        peak_fp8=None,  # [v5e]: int8 only
        peak_fp32=None,
        hbm_bytes=16 * GiB,  # [v5e]
        hbm_bandwidth=819e9,  # [v5e]
        fast_link=4.5e10,  # [book]
        fast_links_per_axis=2,
        fast_domain=256,  # [v5e] a v5e pod: 16x16
        slow_link=3.125e9,  # [book]
        matmul_efficiency=1.0,
        watts=None,
        torus=True,
        fast_name="ICI",
        slow_name="DCN",
    ),
    "h100": Hardware(
        name="h100",
        peak_bf16=989e12,  # [h100]
        peak_fp8=1979e12,  # [h100]
        peak_fp32=67e12,  # [h100]
        hbm_bytes=80e9,  # [h100]
        hbm_bandwidth=3.35e12,  # [h100]
        fast_link=450e9,  # [h100] NVLink 900 GB/s bidirectional
        fast_links_per_axis=1,
        fast_domain=8,  # one HGX/DGX node
        slow_link=50e9,  # [h100] IB NDR 400 Gb/s per GPU
        matmul_efficiency=792.1 / 989,  # [mamf]
        watts=700.0,  # [h100]
        torus=False,
        fast_name="NVLink",
        slow_name="InfiniBand",
    ),
    "h800": Hardware(
        name="h800",
        peak_bf16=989e12,  # [h800] = [h100]
        peak_fp8=1979e12,
        peak_fp32=67e12,
        hbm_bytes=80e9,
        hbm_bandwidth=3.35e12,
        fast_link=200e9,  # [h800] NVLink 400 GB/s bidirectional
        fast_links_per_axis=1,
        fast_domain=8,
        slow_link=50e9,  # [h800] DeepSeek-V3 §3.2.2
        matmul_efficiency=792.1 / 989,  # [mamf], the H100's (same tensor cores)
        watts=700.0,
        torus=False,
        fast_name="NVLink",
        slow_name="InfiniBand",
    ),
    "a100": Hardware(
        name="a100",
        peak_bf16=312e12,  # [a100]
        peak_fp8=None,  # [a100]
        peak_fp32=19.5e12,  # [a100]
        hbm_bytes=80e9,  # [a100]
        hbm_bandwidth=2.039e12,  # [a100]
        fast_link=300e9,  # [a100] NVLink 600 GB/s bidirectional
        fast_links_per_axis=1,
        fast_domain=8,
        slow_link=25e9,  # [a100] IB HDR 200 Gb/s per GPU
        matmul_efficiency=267.9 / 312,  # [mamf]
        watts=400.0,  # [a100]
        torus=False,
        fast_name="NVLink",
        slow_name="InfiniBand",
    ),
}


def get(name: str) -> Hardware:
    """The record of accelerator ``name`` (one of ``HARDWARE``)."""
    if name not in HARDWARE:
        raise ValueError(f"hardware={name!r} is unknown; allowed: {sorted(HARDWARE)}")
    return HARDWARE[name]
