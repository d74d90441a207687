"""TrainerConfig refuses what the trainer cannot run, whoever builds it (the orchestrator, tune, a direct call of
trainers.run), and the trainer refuses degrees that do not fit the world it runs on."""

from __future__ import annotations

import pytest

from trainers.config import ParallelConfig, TrainerConfig
from trainers.parallel.mesh import checked_dims, tp_groups_across_nodes
from trainers.run import build

MODEL = {"vocab_size": 64, "dim": 32, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64}
DOCUMENTS = {"data": {"batching": "documents"}, "train": {"max_doc_len": 64}}


def config(**sections) -> dict:
    data = {"model": MODEL, "train": {"seq_len": 32, "grad_accum": 2}}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


@pytest.mark.parametrize("data, must_mention", [
    (config(parallel={"sp": 2, "sp_mode": "megatron"}), ["parallel.sp_mode", "'ulysses', 'ring' or 'adaptive'"]),
    (config(parallel={"sp": 4, "sp_mode": "adaptive"}), ["parallel.sp_mode = 'adaptive' plans whole documents",
                                                          "set data.batching = documents"]),
    (config(data={"batching": "documents"}), ["data.batching = documents", "set parallel.sp_mode = adaptive"]),
    (config(**DOCUMENTS, parallel={"sp": 2, "tp": 2, "sp_mode": "adaptive"}),
     ["parallel.tp = 2 with parallel.sp_mode = 'adaptive'", "spans every device"]),
    (config(**DOCUMENTS, parallel={"sp": 2, "pp": 2, "sp_mode": "adaptive"}),
     ["parallel.pp = 2 with parallel.sp_mode = 'adaptive'"]),
    (config(**DOCUMENTS, parallel={"sp": 2, "dp_shard": 2, "sp_mode": "adaptive"}),
     ["parallel.dp_shard = 2 with parallel.sp_mode = 'adaptive'"]),
    (config(**DOCUMENTS, parallel={"sp": 4, "sp_mode": "adaptive", "engine": "deepspeed", "zero_stage": 1}),
     ["parallel.engine = deepspeed with parallel.sp_mode = 'adaptive'"]),
    (config(parallel={"pp": 2}, train={"grad_accum": 3}), ["train.grad_accum = 3", "multiple of parallel.pp = 2"]),
    (config(parallel={"engine": "deepspeed", "zero_stage": 2, "pp": 2}),
     ["parallel.pp = 2: not supported with parallel.engine=deepspeed"]),
    (config(parallel={"tp": 3}), ["parallel.tp = 3: must divide model.n_heads = 4"]),
    (config(parallel={"sp": 2, "sp_mode": "ring"}, model={"dropout_attn": 0.1}),
     ["model.dropout_attn = 0.1", "parallel.sp_mode = 'ring' has no attention dropout"]),
    (config(parallel={"sp": 4}, model={"n_heads": 2, "n_kv_heads": 2}), ["parallel.sp = 4: must divide the 2 query heads"]),
    (config(data={"train_tokens": 20}), ["data.train_tokens = 20", "(33)"]),
    (config(data={"source": "parquet"}), ["data.path: required when data.source = 'parquet'"]),
])
def test_trainer_config_refuses_what_the_trainer_cannot_run(data, must_mention):
    with pytest.raises(ValueError) as err:
        TrainerConfig.model_validate(data)
    for fragment in must_mention:
        assert fragment in str(err.value), f"{fragment!r} missing from: {err.value}"


@pytest.mark.parametrize("data", [
    config(**DOCUMENTS, parallel={"sp": 4, "sp_mode": "adaptive"}),  # dp_shard = -1: 1 on a world of 4
    # an SP domain beyond the heads: 4 heads cap the groups at degree 4 of 8 (6 heads: at 2)
    config(**DOCUMENTS, parallel={"sp": 8, "sp_mode": "adaptive"}),
    config(**DOCUMENTS, parallel={"sp": 8, "sp_mode": "adaptive"}, model={"dim": 48, "n_heads": 6}),
    config(parallel={"pp": 2, "dp_shard": 2}),
    # pp with tp and sp inside each stage, and with a tied embedding (a copy on the first and the last stage)
    config(parallel={"pp": 2, "tp": 2, "sp": 2, "dp_replicate": 2, "pp_schedule": "interleaved_1f1b"}),
    config(parallel={"pp": 2, "sp": 2, "sp_mode": "ring", "pp_schedule": "gpipe"}),
    config(parallel={"pp": 2}, model={"tie_embeddings": True}),
    config(parallel={"sp": 2, "tp": 2}),
    config(parallel={"engine": "deepspeed", "zero_stage": 3, "sp": 2}),
    config(parallel={"engine": "deepspeed", "zero_stage": 2, "tp": 2}),  # AutoTP
])
def test_trainer_config_accepts_what_the_trainer_runs(data):
    TrainerConfig.model_validate(data)


def test_an_unset_cost_model_becomes_the_built_in_made_for_the_model():
    llama_7b = {"vocab_size": 32000, "dim": 4096, "n_layers": 32, "n_heads": 32, "max_seq_len": 4096}
    made_for = TrainerConfig.model_validate({**config(**DOCUMENTS, parallel={"sp": 64, "sp_mode": "adaptive"}),
                                             "model": llama_7b})
    assert made_for.parallel.adaptive.cost_model == "flexsp-7b"
    # no built-in for this model: left unset, for orchestrator.config to refuse (`flotilla profile` makes one)
    small = TrainerConfig.model_validate(config(**DOCUMENTS, parallel={"sp": 4, "sp_mode": "adaptive"}))
    assert small.parallel.adaptive.cost_model is None
    assert TrainerConfig.model_validate(config()).parallel.adaptive.cost_model is None  # not adaptive: untouched


def test_checked_dims_refuses_degrees_that_do_not_fit_the_world():
    assert checked_dims(ParallelConfig(sp=4, sp_mode="adaptive"), 4).sp == 4
    with pytest.raises(ValueError, match="parallel.sp = 2 with parallel.sp_mode = 'adaptive' on 4 ranks"):
        checked_dims(ParallelConfig(sp=2, sp_mode="adaptive"), 4)  # dp_shard = -1 would fill the other 2
    with pytest.raises(ValueError, match="dp_shard=2 \\* sp=1 \\* tp=1 = 2, but the world size is 3"):
        checked_dims(ParallelConfig(dp_shard=2), 3)


def test_the_trainer_refuses_a_layout_bigger_than_its_world():
    # one process (no process group): sp = 2 cannot run, and build must not quietly run sp = 1
    with pytest.raises(ValueError, match="the world size is 1"):
        build(TrainerConfig.model_validate(config(parallel={"sp": 2, "dp_shard": 1})))


def test_tensor_parallel_groups_must_not_span_nodes():
    # tp groups are runs of tp consecutive ranks; ranks are numbered node by node
    assert tp_groups_across_nodes([0, 0, 1, 1], 2) is None
    assert tp_groups_across_nodes([0, 0, 0, 0, 1, 1, 1, 1], 4) is None
    problem = tp_groups_across_nodes([0, 0, 0, 1], 2)
    assert "ranks 2-3 spans nodes 0, 1" in problem and "node 0: 3, node 1: 1" in problem and "multiple of 2" in problem
    assert "2 of 2 groups" in tp_groups_across_nodes([0, 1, 0, 1], 2)
