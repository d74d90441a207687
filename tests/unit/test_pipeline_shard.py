"""A pipeline rank's shard of the model (trainers.parallel.pipeline.build_shard), on the meta device: which stages,
parts and parameter names it holds, with and without tied embeddings."""

from __future__ import annotations

import pytest

from trainers.config import ModelConfig
from trainers.model import build_model
from trainers.parallel.pipeline import build_shard

CFG = {"vocab_size": 64, "dim": 32, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64}


@pytest.mark.parametrize("schedule, stages, layers", [
    ("1f1b", [[0], [1]], [[0, 1], [2, 3]]),
    ("interleaved_1f1b", [[0, 2], [1, 3]], [[0, 2], [1, 3]]),  # 4 stages of 1 block, two a rank
])
def test_each_rank_holds_its_stages_under_the_whole_models_names(schedule, stages, layers):
    for rank in range(2):
        shard = build_shard(build_model(ModelConfig(**CFG)), rank, 2, schedule)
        assert shard.stage_ids == stages[rank] and shard.n_stages == 2 * len(stages[rank])
        assert sorted(int(i) for i in shard.layers) == layers[rank]
        assert shard.parts == (("tok_embeddings",) if rank == 0 else ("norm", "output"))
        assert shard.tied_weight() is None
        names = {name.split(".")[0] for name, _ in shard.named_parameters()}
        assert names == ({"tok_embeddings", "layers"} if rank == 0 else {"layers", "norm", "output"})


def test_a_tied_last_stage_holds_its_output_projection_as_the_tied_embedding():
    """The last stage's output projection is the tied weight's copy there: named tok_embeddings.weight, as the tied
    whole model names its one weight (initialisation, pretrained loading, checkpoints and optimizer state go by
    that name), with output.weight in its state dict as in the whole model's."""
    model = build_model(ModelConfig(**CFG, tie_embeddings=True))
    whole = {name for name, _ in model.named_parameters()}
    first, last = (build_shard(build_model(ModelConfig(**CFG, tie_embeddings=True)), r, 2, "1f1b") for r in (0, 1))
    assert first.tied_weight() is first.tok_embeddings.weight
    assert last.tied_weight() is last.output.weight and last.tok_embeddings is last.output
    assert last.parts == ("norm", "output")  # parallelised once, as the output projection
    last_names = [name for name, _ in last.named_parameters()]
    assert "tok_embeddings.weight" in last_names and "output.weight" not in last_names
    assert {"tok_embeddings.weight", "output.weight"} <= set(last.state_dict())
    assert {name for name, _ in first.named_parameters()} | set(last_names) == whole
