"""Reading optimized HLO text (llmarch.hlo) on small hand-written programs."""

from llmarch import hlo

TEXT = """HloModule m

%fused (x: f32[8]) -> f32[8] {
  %x = f32[8] parameter(0)
  ROOT %d = f32[8] dot(%x, %x)
}

ENTRY %main {
  %p = f32[8] parameter(0)
  %a2a-start = (f32[8], f32[8]) all-to-all-start(%p)
  %fusion.1 = f32[8] fusion(%p), kind=kLoop, calls=%fused
  %dot.2 = f32[8] dot(%fusion.1, %p)
  %a2a-done = f32[8] all-to-all-done(%a2a-start)
  %ag = f32[2,8] all-gather(%dot.2)
  ROOT %r = f32[8] add(%a2a-done, %dot.2)
}
"""


def test_collective_schedule_reads_async_pairs():
    s = hlo.collective_schedule(TEXT)
    assert s["async_pairs"] == [{"collective": "all-to-all", "compute_between": 2}]
    assert s["overlapped"] == 1 and s["sync_collectives"] == 1
    assert s["sequence"] == ["all-to-all-start", "fusion", "dot", "all-to-all-done", "all-gather"]


def test_dataflow_of_the_entry_computation():
    g = hlo.Dataflow(TEXT)
    assert g.op["a2a-done"] == "all-to-all-done" and g.operands["a2a-done"] == ["a2a-start"]
    assert g.ancestors("r") == {"a2a-done", "a2a-start", "dot.2", "fusion.1", "p"}
    assert g.is_gemm("dot.2") and g.is_gemm("fusion.1")  # a fusion around a dot is a GEMM
    assert not g.is_gemm("a2a-start")
    assert g.elements("ag") == 16 and g.elements("a2a-start") == 16  # a tuple's arrays summed
