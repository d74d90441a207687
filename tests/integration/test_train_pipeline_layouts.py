"""`flotilla train` with pipeline parallelism combined with tensor, sequence and data parallelism, tied embeddings
in all of them: the real CLI on an embedded Ray with 4 workers, each run tagged with its layout in MLflow and
ending at the loss of one worker on the same global batch (8 rows a step: 2 micro-batches of 4, or of 2 on each
of 2 data-parallel ranks)."""

from __future__ import annotations

import pytest
import yaml

from tests.integration.test_train_ray import CONFIG, finish, flotilla, run_by_name

TIED = {**CONFIG, "model": {**CONFIG["model"], "tie_embeddings": True},
        "train": {**CONFIG["train"], "grad_accum": 2}}
FOUR = ["cluster.num_workers=4", "cluster.cpus_per_worker=0.5", "parallel.pp=2", "parallel.dp_shard=1"]
LAYOUTS = {  # run name: (overrides, layout tag)
    "pp-tp": ([*FOUR, "parallel.tp=2"], "pp=2,tp=2"),
    "pp-sp": ([*FOUR, "parallel.sp=2", "parallel.pp_schedule=gpipe"], "pp=2,sp=2"),
    "pp-dp": ([*FOUR, "parallel.dp_shard=2", "train.micro_batch_size=2"], "pp=2,dp_shard=2"),
}


@pytest.mark.slow  # 6-8 min on 2 cores shared with other work (load 5-25): four Ray Train runs, three of 4 workers
def test_pipeline_layouts_with_tied_embeddings_end_at_one_workers_loss(tmp_path):
    (tmp_path / "tied.yaml").write_text(yaml.safe_dump(TIED))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = {"one": (["cluster.num_workers=1"], "single"), **LAYOUTS}
    for name, (overrides, _) in runs.items():
        args = ["train", "tied.yaml", "-o", f"tracking.run_name={name}", "-o", "tracking.system_metrics=false"]
        assert "step 8/8" in finish(flotilla(args + [a for o in overrides for a in ("-o", o)], tmp_path, uri))
    client, one = run_by_name(uri, "one")
    final = lambda run: client.get_metric_history(run.info.run_id, "loss")[-1].value  # noqa: E731
    for name, (_, layout) in runs.items():
        _, run = run_by_name(uri, name)
        assert run.data.tags["flotilla.layout"] == layout, name
        assert final(run) == pytest.approx(final(one), rel=2e-3), name
