"""tiny-pkm and tiny-ultramem train through the trainer on tinyshakespeare (loss decreases)."""

import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch import presets
from llmarch.layers.memory_search import leading_singular_vectors
from llmarch.train.config import TrainConfig
from llmarch.train.optim import OptimizerConfig
from llmarch.train.trainer import train


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-pkm", "tiny-ultramem"])
def test_memory_presets_train_on_tinyshakespeare(tmp_path, shared_data, preset):
    cfg = presets.get(preset)
    optimizer = OptimizerConfig(learning_rate=3e-3, warmup_steps=5)  # the value LR group comes from cfg
    run = TrainConfig(
        out_dir=str(tmp_path / preset),
        preset=preset,
        data=str(shared_data / "tinyshakespeare.txt"),
        seq_len=64,
        batch_size=8,
        steps=30,
        eval_every=30,
        eval_batches=2,
        log_every=10,
        checkpoint_every=30,
        progress=False,
        tensorboard=False,
        optimizer=optimizer,
    )
    result = train(run, log=lambda s: None)
    first = np.mean([result.losses[s] for s in (1, 2, 3)])
    last = np.mean([result.losses[s] for s in (28, 29, 30)])
    assert last < first - 1.0, (first, last)  # from ~5.8 nats/byte (uniform over 320) towards the unigram
    assert result.val_loss is not None and np.isfinite(result.val_loss)
    assert result.skipped_steps == 0
    if preset == "tiny-ultramem":  # the TDQKR sign reference in rest followed the cores each step
        layer = result.model().skips[0]
        ref, cores = layer.tucker_ref[...], layer.cores_xnzy[...]
        np.testing.assert_allclose(np.stack(leading_singular_vectors(cores, ref), 1), ref, atol=1e-5)
        initial = llmarch.Transformer(cfg, rngs=nnx.Rngs(0)).skips[0].tucker_ref[...]  # the trainer's seed
        assert not np.allclose(ref, initial, atol=1e-4)
