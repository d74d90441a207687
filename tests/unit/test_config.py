"""Bad configs stop before Ray starts, with exit code 2 and a message naming the key and the value."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config
from trainers.config import TrainerConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if path.name.startswith(("pbt", "stn")):
            continue  # sweep configs, loaded by tune
        load_config(path)


def test_overrides_are_parsed_as_yaml_and_nested():
    cfg = load_config(TINY, ["train.steps=7", "optim.lr=1e-3", "optim.betas=[0.8, 0.9]", "tracking.run_name=abc"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.tracking.run_name == "abc"


@pytest.mark.parametrize(
    "text, overrides, must_mention",
    [
        ("train:\n  stpes: 5\n", [], ["train.stpes", "unknown key", "steps"]),
        ("bogus:\n  x: 1\n", [], ["bogus", "unknown key", "model"]),
        ("tune:\n  schedular: pbt\n", [], ["tune.schedular", "unknown key", "tune accepts", "scheduler"]),
        ("train:\n  steps: many\n", [], ["train.steps", "'many'", "integer"]),
        ("train:\n  steps: 0\n", [], ["train.steps", "0", "greater than or equal to 1"]),
        ("optim:\n  lr: -1\n", [], ["optim.lr", "-1", "greater than 0"]),
        ("parallel:\n  engine: megatron\n", [], ["parallel.engine", "megatron", "'fsdp' or 'deepspeed'"]),
        ("train: [1, 2\n", [], ["not valid YAML", "line"]),
        ("- a\n- b\n", [], ["top level must be a mapping"]),
        ("{}\n", ["train.steps"], ["malformed", "train.steps"]),
        ("{}\n", ["=5"], ["malformed"]),
        ("train:\n  steps: 3\n", ["train.steps.x=5"], ["train.steps is a value"]),
        ("data:\n  source: parquet\n  path: /no/such/dataset\n", [], ["data.path", "/no/such/dataset", "flotilla data"]),
        ("data:\n  source: parquet\n", [], ["data.path", "required"]),
        ("cluster:\n  num_workers: 3\nparallel:\n  dp_shard: 2\n", [], ["parallel", "world size is 3", "num_workers=3"]),
        ("cluster:\n  num_workers: 3\nparallel:\n  dp_shard: 1\n  tp: 3\nmodel:\n  n_heads: 4\n  dim: 128\n", [],
         ["parallel.tp = 3", "model.n_heads = 4"]),
        ("model:\n  n_heads: 4\n  n_kv_heads: 3\n", [], ["n_kv_heads", "must divide"]),
        ("train:\n  seq_len: 4096\nmodel:\n  max_seq_len: 2048\n", [], ["train.seq_len = 4096", "model.max_seq_len = 2048"]),
        ("data:\n  source: stdlib\nmodel:\n  vocab_size: 100\n", [], ["model.vocab_size = 100", "257"]),
        ("data:\n  source: stdlib\n  tokenizer: /no/tokenizer.json\n", [], ["data.tokenizer", "/no/tokenizer.json"]),
        # the cluster-level half of adaptive SP: its domain is every worker
        ("cluster:\n  num_workers: 4\ndata:\n  batching: documents\nparallel:\n  sp: 2\n  sp_mode: adaptive\n", [],
         ["parallel.sp = 2 with parallel.sp_mode = 'adaptive' on 4 ranks", "set parallel.sp = 4", "num_workers=4"]),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, overrides, must_mention):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), overrides)
    for fragment in must_mention:
        assert fragment in str(err.value), f"{fragment!r} missing from: {err.value}"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")


def test_cli_exits_2_before_ray_starts(tmp_path, capsys):
    import ray

    path = write(tmp_path, "cluster:\n  num_workers: 2\nparallel:\n  dp_shard: 1\n  tp: 2\nmodel:\n  n_heads: 3\n  dim: 96\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "parallel.tp = 2" in err and "model.n_heads = 3" in err
    assert not ray.is_initialized()


def test_console_script_exit_code(tmp_path):
    path = write(tmp_path, "train:\n  steps: -3\n")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "train.steps = -3" in proc.stderr


def test_dataset_errors_exit_2_before_ray_starts(tmp_path, capsys):
    # README: a dataset built for a bigger vocabulary than the model's, and a data.train_tokens shorter than one
    # row, stop at config time (they once failed only inside a worker, after Ray had started)
    import ray

    from trainers.corpus import build_text_dataset
    from trainers.tokenizer import load_tokenizer

    src = tmp_path / "src.txt"
    src.write_text("def f(x):\n    return x + 1\n" * 200)
    build_text_dataset([src, src], tmp_path / "ds", load_tokenizer("byte"), 0.5)
    path = write(tmp_path, f"data:\n  source: parquet\n  path: {tmp_path / 'ds'}\nmodel:\n  vocab_size: 100\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.vocab_size = 100" in err and "257" in err
    path = write(tmp_path, "data:\n  train_tokens: 10\ntrain:\n  seq_len: 32\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "data.train_tokens = 10" in err and "(33)" in err
    assert not ray.is_initialized()


@pytest.mark.parametrize("text", [
    "cluster:\n  num_workers: 4\nparallel:\n  pp: 2\n  sp: 2\n  dp_shard: 1\ntrain:\n  grad_accum: 3\n",
    "cluster:\n  num_workers: 4\nparallel:\n  sp: 4\n  sp_mode: adaptive\n",
    "data:\n  batching: documents\n",
    "cluster:\n  num_workers: 2\nparallel:\n  engine: deepspeed\n  zero_stage: 1\n  pp: 2\n  dp_shard: 1\n",
])
def test_trainer_rules_stop_the_cli_in_the_trainers_words(tmp_path, capsys, text):
    """Each trainer rule lives once, in trainers.config: `flotilla train` exits 2, before Ray starts, with the
    very message a TrainerConfig built directly (as trainers.run and tune do) is refused with."""
    import ray

    sections = {k: v for k, v in yaml.safe_load(text).items() if k != "cluster"}
    with pytest.raises(ValidationError) as refused:
        TrainerConfig.model_validate(sections)
    message = str(refused.value.errors()[0]["ctx"]["error"])
    assert main(["train", str(write(tmp_path, text))]) == 2
    assert message in capsys.readouterr().err
    assert not ray.is_initialized()


def test_absolute_paths_makes_every_path_absolute_for_runs_and_sweeps(tmp_path, monkeypatch):
    """trainers.config.absolute_paths, the one function behind orchestrator.data.prepare_data and the sweep's trials."""
    from orchestrator.config import Config
    from orchestrator.data import prepare_data
    from trainers.config import absolute_paths

    monkeypatch.chdir(tmp_path)
    config = Config.model_validate({
        "data": {"source": "parquet", "path": "data/set", "tokenizer": "tok/tokenizer.json"},
        "parallel": {"adaptive": {"cost_model": "cost.json"}}, "checkpoint": {"dir": "runs"}})
    absolute = absolute_paths(config)
    assert type(absolute) is Config and config.checkpoint.dir == "runs"  # a copy, of the same class
    assert (absolute.data.path, absolute.data.tokenizer, absolute.parallel.adaptive.cost_model, absolute.checkpoint.dir) == (
        str(tmp_path / "data/set"), str(tmp_path / "tok/tokenizer.json"), str(tmp_path / "cost.json"), str(tmp_path / "runs"))
    assert prepare_data(config) == absolute

    builtin = absolute_paths(Config.model_validate({"data": {"source": "stdlib"}}))
    assert builtin.data.path == str(tmp_path / "data/cache") and builtin.data.tokenizer == "byte"
    assert builtin.parallel.adaptive.cost_model is None  # unset stays unset
    named = Config.model_validate({"parallel": {"adaptive": {"cost_model": "flexsp-7b"}}})
    assert absolute_paths(named).parallel.adaptive.cost_model == "flexsp-7b"  # a built-in name is not a path
    assert absolute_paths(TrainerConfig()).data.path is None  # synthetic data has no path


# Adaptive SP's cost model, checked with the config: dim 32 is no built-in's model
ADAPTIVE = {
    "model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 512},
    "data": {"source": "synthetic", "batching": "documents"},
    "train": {"max_doc_len": 256, "tokens_per_step": 1024},
    "parallel": {"sp": 8, "dp_shard": 1, "sp_mode": "adaptive"},
    "cluster": {"num_workers": 8},
}
LLAMA_7B = {"vocab_size": 32000, "dim": 4096, "n_layers": 32, "n_heads": 32, "max_seq_len": 4096}


def adaptive(tmp_path: Path, *overrides: str, model: dict | None = None, cost_model: bool = True):
    text = yaml.safe_dump({**ADAPTIVE, "model": model or ADAPTIVE["model"]})
    return load_config(write(tmp_path, text), list(overrides), cost_model=cost_model)


def refusal(tmp_path: Path, *overrides: str, model: dict | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        adaptive(tmp_path, *overrides, model=model)
    return str(err.value)


def test_an_unset_cost_model_is_the_built_in_made_for_the_model(tmp_path):
    assert adaptive(tmp_path, model=LLAMA_7B).parallel.adaptive.cost_model == "flexsp-7b"


def test_an_unset_cost_model_without_a_built_in_for_the_model_is_refused(tmp_path):
    message = refusal(tmp_path)
    for fragment in ["parallel.adaptive.cost_model is unset",
                     "dim=32, n_layers=2, n_heads=4, kv_heads=2, vocab_size=64",
                     "flexsp-7b: dim=4096, n_layers=32, n_heads=32, kv_heads=32, vocab_size=32000",
                     "flotilla profile CONFIG --out cost.json", "parallel.adaptive.cost_model: flexsp-7b"]:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    # `flotilla profile`, which makes the cost model, loads the same config without its checks
    assert adaptive(tmp_path, cost_model=False).parallel.adaptive.cost_model is None


def test_a_named_built_in_simulates_with_its_figures_whatever_the_model(tmp_path):
    assert adaptive(tmp_path, "parallel.adaptive.cost_model=flexsp-7b").parallel.adaptive.cost_model == "flexsp-7b"
    # Llama-7B's shape but grouped-query attention: not flexsp-7b's model, so only by name
    gqa = {**LLAMA_7B, "n_kv_heads": 8}
    assert "kv_heads=8" in refusal(tmp_path, model=gqa)
    assert adaptive(tmp_path, "parallel.adaptive.cost_model=flexsp-7b", model=gqa).model.kv_heads == 8


def test_a_profiled_cost_model_of_another_model_is_refused(tmp_path):
    from dataclasses import replace

    from trainers.parallel.adaptive.cost import load_cost_model

    profiled = tmp_path / "cost.json"
    shape = {"dim": 64, "n_layers": 2, "n_heads": 4, "kv_heads": 2, "vocab_size": 64}
    profiled.write_text(replace(load_cost_model("flexsp-7b"), name="profiled", model_shape=shape).to_json())
    message = refusal(tmp_path, f"parallel.adaptive.cost_model={profiled}")
    for fragment in [f"parallel.adaptive.cost_model = '{profiled}'", "(dim=64, n_layers=2, n_heads=4, kv_heads=2, "
                     "vocab_size=64) than model (dim=32, n_layers=2, n_heads=4, kv_heads=2, vocab_size=64)"]:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    assert adaptive(tmp_path, f"parallel.adaptive.cost_model={profiled}", "model.dim=64").model.dim == 64
    profiled.write_text(replace(load_cost_model("flexsp-7b"), name="profiled", model_shape={}).to_json())
    assert adaptive(tmp_path, f"parallel.adaptive.cost_model={profiled}").model.dim == 32  # shape unknown: taken


def test_a_document_longer_than_the_largest_group_holds_is_refused(tmp_path, capsys):
    import ray

    # 16 tokens a device; 4 heads cap the groups at degree 4 of the 8 devices: 64 tokens
    capped = ["parallel.adaptive.cost_model=flexsp-7b", "parallel.adaptive.max_tokens_per_device=16"]
    message = refusal(tmp_path, *capped, "train.max_doc_len=65")
    for fragment in ["train.max_doc_len = 65", "degree 4 of parallel.sp = 8, model.n_heads = 4", "hold, 64 tokens",
                     "parallel.adaptive.cost_model = 'flexsp-7b'", "parallel.adaptive.max_tokens_per_device = 16",
                     "at most 64"]:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    assert adaptive(tmp_path, *capped, "train.max_doc_len=64").train.max_doc_len == 64
    assert adaptive(tmp_path, *capped, "train.max_doc_len=128", "model.n_heads=8").parallel.sp == 8  # degree 8
    # and the command stops with it, before Ray starts
    path = write(tmp_path, yaml.safe_dump(ADAPTIVE))
    assert main(["plan", str(path), *(arg for o in capped for arg in ("-o", o)), "-o", "train.max_doc_len=65"]) == 2
    assert "train.max_doc_len = 65" in capsys.readouterr().err
    assert not ray.is_initialized()
