import dataclasses

import pytest

import llmarch
from llmarch import accounting
from llmarch.config import AttentionConfig, BlockConfig, ModelConfig, RopeScaling


def _cfg(**changes):
    return dataclasses.replace(llmarch.presets.get("tiny-gqa"), **changes)


@pytest.mark.parametrize("name", llmarch.presets.names())
def test_json_round_trip(name):
    cfg = llmarch.presets.get(name)
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_json_round_trip_nested_blocks_and_scaling():
    cfg = _cfg(
        blocks=(BlockConfig(), BlockConfig()),
        attention=AttentionConfig(4, 2, 16, rope_scaling=RopeScaling(factor=4.0), sliding_window=8),
    )
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg and isinstance(again.blocks[0], BlockConfig)
    assert isinstance(again.attention.rope_scaling, RopeScaling)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: AttentionConfig(num_heads=6, num_kv_heads=4, head_dim=16), "num_kv_heads=4.*divide"),
        (lambda: AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=15), "head_dim=15.*even"),
        (lambda: AttentionConfig(num_heads=0, num_kv_heads=1, head_dim=16), "num_heads=0"),
        (lambda: AttentionConfig(4, 2, 16, sliding_window=0), "sliding_window=0"),
        (lambda: AttentionConfig(4, 2, 16, rope_theta=-1.0), "rope_theta"),
        (lambda: BlockConfig(attention="linear"), "attention='linear'.*one of"),
        (lambda: BlockConfig(ffn="gelu"), "ffn='gelu'.*one of"),
        (lambda: RopeScaling(factor=0.5), "factor=0.5"),
        (lambda: RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0), "low_freq_factor"),
        (lambda: _cfg(vocab_size=-3), "vocab_size=-3"),
        (lambda: _cfg(d_model=2.5), "d_model=2.5"),
        (lambda: _cfg(dtype="int8"), "dtype='int8'"),
        (lambda: _cfg(remat="some"), "remat='some'"),
        (lambda: _cfg(impl="cuda"), "impl='cuda'"),
        (lambda: _cfg(blocks=(BlockConfig(),)), "blocks.*num_layers=2"),
        (lambda: _cfg(norm_eps=0.0), "norm_eps"),
    ],
)
def test_bad_configs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_from_dict_rejects_unknown_fields():
    data = llmarch.presets.get("tiny-dense").to_dict()
    data["attention"]["num_query_groups"] = 3
    with pytest.raises(ValueError, match="num_query_groups"):
        ModelConfig.from_dict(data)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset='gpt5'"):
        llmarch.presets.get("gpt5")


@pytest.mark.parametrize(
    "name, published",
    [
        ("llama3-8b", 8_030_261_248),  # the safetensors total of Meta-Llama-3-8B
        ("llama3-70b", 70_553_706_496),
        ("llama3.2-1b", 1_235_814_400),  # tied embeddings
    ],
)
def test_real_preset_param_counts(name, published):
    assert accounting.param_count(llmarch.presets.get(name)) == published


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: RopeScaling(factor=float("nan")), r"RopeScaling.factor=nan is invalid: must be >= 1"),
        (
            lambda: RopeScaling(factor="8"),
            r"RopeScaling.factor='8' is invalid: must be a Python int or float",
        ),
        (
            lambda: AttentionConfig(4, 4, 16, rope_theta=float("inf")),
            r"rope_theta=inf is invalid: must be > 0",
        ),
        (
            lambda: AttentionConfig(4, 4, 16, rope_scaling={"factor": 8.0}),
            r"AttentionConfig.rope_scaling=\{'factor': 8.0\} is invalid: must be a RopeScaling or None",
        ),
    ],
)
def test_float_fields_are_finite_numbers_of_the_right_type(build, match):
    with pytest.raises(ValueError, match=match):
        build()
