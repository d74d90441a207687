"""`flotilla train` with DeepSpeed's AutoTP end to end: the real CLI on an embedded Ray, ZeRO-2 with tp=2 x dp=2 on
4 workers, against one worker on the same global batch."""

from __future__ import annotations

import pytest
import yaml

from tests.integration.test_train_ray import CONFIG, finish, flotilla, run_by_name

RUNS = {  # run name: (overrides, layout tag); 8 rows a step either way: 1 worker x 8, or dp=2 x 4 (tp ranks share theirs)
    "one": (["cluster.num_workers=1", "train.micro_batch_size=8"], "single"),
    "autotp": (["parallel.engine=deepspeed", "parallel.zero_stage=2", "parallel.tp=2", "parallel.dp_shard=2",
                "cluster.num_workers=4", "cluster.cpus_per_worker=0.5"], "dp_shard=2,tp=2"),
}


@pytest.mark.slow  # two runs of the CLI, about 40 s each on 2 cores (Ray start, Ray Train start, 8 steps)
def test_autotp_zero2_on_four_workers_ends_at_one_workers_loss(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(CONFIG))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    final = {}
    for name, (overrides, layout) in RUNS.items():
        args = ["train", "run.yaml", "-o", f"tracking.run_name={name}", "-o", "tracking.system_metrics=false"]
        out = finish(flotilla(args + [a for o in overrides for a in ("-o", o)], tmp_path, uri))
        assert "step 8/8" in out
        client, run = run_by_name(uri, name)
        assert run.data.tags["flotilla.layout"] == layout
        losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
        assert len(losses) == 8 and losses[-1] < losses[0]
        final[name] = losses[-1]
    assert final["autotp"] == pytest.approx(final["one"], rel=2e-3)
