"""Serving on a mesh (``EngineConfig.mesh``): greedy outputs equal one device's, on the simulated
CPU devices, for GQA, MLA and MoE models split over ``tensor`` (and ``expert``)."""

import jax
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch.inference import Engine, EngineConfig, SamplingParams

ENGINE = dict(
    max_len=64,
    page_size=8,
    max_num_seqs=4,
    max_num_batched_tokens=32,
    max_prefill_chunk=16,
    fixed_shapes=True,
)
PARAMS = SamplingParams(max_tokens=10, temperature=0.0)


def _prompts(vocab: int) -> list[list[int]]:
    return [np.random.default_rng(i).integers(0, vocab, n).tolist() for i, n in enumerate((3, 17, 29))]


@pytest.mark.parametrize(
    "name,mesh",
    [
        ("tiny-gqa", "tensor=2"),
        ("tiny-mla", "tensor=4"),
        ("tiny-moe", "tensor=2,expert=4"),
    ],
)
def test_mesh_serving_equals_one_device(name, mesh):
    assert len(jax.devices()) >= 8, "tests/conftest.py simulates 8 CPU devices"
    model = llmarch.Transformer(llmarch.presets.get(name), rngs=nnx.Rngs(0))
    prompts = _prompts(model.cfg.vocab_size)
    want = [o.token_ids for o in Engine(model, **ENGINE).generate(prompts, PARAMS)]
    engine = Engine(model, **ENGINE, mesh=mesh)
    assert [o.token_ids for o in engine.generate(prompts, PARAMS)] == want
    # The weights and the KV pages are split: each device holds a share.
    assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated for x in engine._leaves)
    if name != "tiny-mla":  # MLA's latent cache has no head axis and stays replicated
        assert not engine.pools[0][0].sharding.is_fully_replicated
    # The caller's model was not moved.
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(nnx.state(model)))


def test_mesh_errors():
    with pytest.raises(ValueError, match=r"EngineConfig.mesh='data=2' is invalid: .*\('tensor', 'expert'\)"):
        EngineConfig(mesh="data=2")
    with pytest.raises(ValueError, match="EngineConfig.mesh='tensor=x' is invalid: mesh spec item"):
        EngineConfig(mesh="tensor=x")
    with pytest.raises(ValueError, match="EngineConfig.mesh=2 is invalid"):
        EngineConfig(mesh=2)
    model = llmarch.Transformer(llmarch.presets.get("tiny-gqa"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"needs 16 devices but 8 exist .*xla_force_host_platform"):
        Engine(model, **ENGINE, mesh="tensor=16")
    with pytest.raises(ValueError, match=r"size 2, which the mesh axes \('tensor',\) \(x4\) do not divide"):
        Engine(model, **ENGINE, mesh="tensor=4")  # 2 KV heads over 4 devices
