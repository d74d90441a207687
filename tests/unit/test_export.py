"""Checkpoints exported to HuggingFace: transformers loads every weight with none missing or left over and
computes our model's logits; the exported tokenizer encodes as the run's did; sampling is the same from a
checkpoint and from its export; and what cannot be exported is refused, naming it.

Other layouts (tensor and pipeline parallel, DeepSpeed ZeRO) are in tests/distributed/test_export_layouts.py."""

from __future__ import annotations

import argparse
import json
import shutil
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.trainers import BpeTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from orchestrator import export_cli
from trainers.checkpoint import CheckpointError, TrainState, save_checkpoint
from trainers.config import ModelConfig, TrainerConfig
from trainers.export import (BYTE_EOS, MODEL_CARD, byte_level_tokenizer, bytes_to_unicode, export_hf,
                             read_checkpoint_model, read_model_card, resolve_checkpoint, write_model_card)
from trainers.loop import train
from trainers.model import Transformer, build_model, init_weights
from trainers.reporter import LocalReporter
from trainers.run import build
from trainers.sample import sample
from trainers.stn import STNTransformer
from trainers.tokenizer import ByteTokenizer, HFTokenizer

STDLIB_FILES = ("shlex.py", "zipfile.py", "fractions.py")
"""Standard-library sources with non-ASCII bytes in them (124, 45 and 10 in CPython 3.11)."""
ODD_TEXT = "naïve café — 東京 😀 e\u0301\r\n\t\x00 end"


def trainer_config(**model) -> TrainerConfig:
    # init_std 0.2: logits of order 1, so a 1e-5 tolerance tells a wrong mapping from a right one (the default
    # 0.02 gives logits of order 1e-2). vocab_size 300 > the byte tokenizer's 257: the padding ids are exported too.
    return TrainerConfig.model_validate({
        "model": {"vocab_size": 300, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64,
                  "init_std": 0.2, **model},
        "data": {"source": "synthetic", "synthetic_docs": 100, "synthetic_mean_len": 24},
        "train": {"steps": 2, "micro_batch_size": 2, "seq_len": 32, "val_every": 0, "log_every": 1, "seed": 3},
        "optim": {"lr": 1e-2, "warmup_steps": 1},
        "checkpoint": {"every": 1},
    })


def our_model(state: dict[str, torch.Tensor], cfg: ModelConfig) -> Transformer:
    model = build_model(cfg, device="meta")
    model.to_empty(device="cpu")
    model.reset_rope()
    model.load_state_dict(state)
    return model.eval()


def assert_export_matches(source: Path, out: Path, reference: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Export `source`; its weights are `reference` (a whole state dict under our names) exactly, and transformers
    loads the export with no weight missing or unexpected and computes the logits of our model holding them."""
    state, read_cfg, _ = read_checkpoint_model(resolve_checkpoint(source))
    assert read_cfg == cfg and state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert tensor.dtype == torch.float32 and torch.equal(state[name], tensor), name
    export_hf(source, out)
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert {k: list(v) for k, v in info.items()} == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [],
                                                     "error_msgs": []}
    assert hf.dtype == torch.float32 and hf.config.tie_word_embeddings == cfg.tie_embeddings
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = our_model(reference, cfg)(tokens)
        assert expected.std() > 0.3  # not two near-zero tensors
        torch.testing.assert_close(hf.eval()(tokens).logits, expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], TrainerConfig]:
    """A real single-process run (tied embeddings, GQA, byte tokenizer) checkpointed at steps 1 and 2: its run
    directory, its weights at the end and its config."""
    root = tmp_path_factory.mktemp("run") / "my-run"
    cfg = trainer_config(tie_embeddings=True)
    trainee = build(cfg)
    train(trainee, LocalReporter(root))
    return root, {name: t.detach().clone() for name, t in trainee.model.state_dict().items()}, cfg


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "hf"
    assert_export_matches(run[0], out, run[1], run[2].model)
    return out


def hand_checkpoint(path: Path, cfg: TrainerConfig, seed: int = 0,
                    edit: Callable[[Transformer], None] | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint as the fsdp engine writes one in one process, of freshly initialised weights (returned),
    changed by `edit` if given."""
    model = build_model(cfg.model, device="meta").to_empty(device="cpu")
    init_weights(model, cfg.model, seed)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    path.mkdir(parents=True)
    write_model_card(path, cfg)
    save_checkpoint(path, model, torch.optim.AdamW(model.parameters()), TrainState(step=7))
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def test_a_run_writes_a_model_card_into_every_checkpoint(run):
    root, _, cfg = run
    assert sorted(p.name for p in root.glob("checkpoint_*")) == ["checkpoint_1", "checkpoint_2"]
    for checkpoint in root.glob("checkpoint_*"):
        card = read_model_card(checkpoint)
        assert ModelConfig.model_validate(card["model"]) == cfg.model
        assert card["data"] == {"tokenizer": "byte"} and card["tokenizer_file"] is None
        assert card["parallel"]["engine"] == "fsdp" and card["train"] == {"dtype": "float32"}
    assert resolve_checkpoint(root) == root / "checkpoint_2"


def test_export_of_a_single_process_run_loads_in_transformers_with_the_same_logits(exported):
    assert sorted(p.name for p in exported.iterdir()) == sorted([
        MODEL_CARD, "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"])
    config = json.loads((exported / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == ByteTokenizer.eos_id
    assert config["architectures"] == ["LlamaForCausalLM"]
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == list(range(257, 300))  # ids the byte tokenizer never produces
    assert read_model_card(exported)["exported_from"]["step"] == 2
    assert not list(exported.parent.glob(".hf.*"))  # nothing left beside it


def test_export_is_a_pretrained_directory_a_run_can_start_from(run, exported):
    from trainers.pretrained import check_weights

    check_weights(exported, run[2].model)


def test_untied_export_with_the_runs_hf_tokenizer(tmp_path):
    tokenizer_file = tmp_path / "tok" / "tokenizer.json"
    tokenizer_file.parent.mkdir()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train([str(Path(sysconfig.get_paths()["stdlib"], name)) for name in STDLIB_FILES],
              BpeTrainer(vocab_size=400, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(tokenizer_file))
    cfg = trainer_config(tie_embeddings=False, vocab_size=448, n_kv_heads=1)
    cfg.data.tokenizer = str(tokenizer_file)
    reference = hand_checkpoint(tmp_path / "checkpoint_7", cfg)
    assert (tmp_path / "checkpoint_7" / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    out = tmp_path / "hf"
    assert_export_matches(tmp_path / "checkpoint_7", out, reference, cfg.model)

    ours, auto = HFTokenizer(tokenizer_file), AutoTokenizer.from_pretrained(out)
    assert auto.eos_token == "</s>" and auto.eos_token_id == ours.eos_id == 0
    for text in (ODD_TEXT, Path(sysconfig.get_paths()["stdlib"], "shlex.py").read_text()):
        assert auto(text).input_ids == ours.encode(text).tolist()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == list(range(ours.vocab_size, 448))
    text = sample(out, "def ", max_new_tokens=12, seed=4)
    assert text == sample(tmp_path / "checkpoint_7", "def ", max_new_tokens=12, seed=4) and text


def test_stn_checkpoint_exports_its_base_model_at_its_hyperparameters(tmp_path):
    cfg = trainer_config()
    base = build_model(cfg.model, device="meta").to_empty(device="cpu")
    init_weights(base, cfg.model, seed=1)
    stn = STNTransformer(base, ["dropout_resid"], {"dropout_resid": 0.1}, perturb_scale=0.5)
    with torch.no_grad():
        for gate in stn.gates.values():
            gate.weight.normal_()  # trained gates: they still multiply by 1 at h = hyper
    path = tmp_path / "checkpoint_3"
    path.mkdir()
    write_model_card(path, cfg)
    save_checkpoint(path, stn, torch.optim.AdamW(stn.parameters()), TrainState(step=3))

    export_hf(path, tmp_path / "hf")
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    stn.eval().condition(stn.hyper.detach())
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(tokens).logits, stn(tokens),
                                   atol=1e-5, rtol=0)


def test_exported_byte_tokenizer_encodes_and_decodes_as_the_byte_tokenizer(exported):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [ODD_TEXT, *((stdlib / name).read_text(encoding="utf-8") for name in STDLIB_FILES)]
    assert sum(ord(c) > 127 for c in "".join(texts)) > 80
    byte, raw = ByteTokenizer(), Tokenizer.from_file(str(exported / "tokenizer.json"))
    through_ours, auto = HFTokenizer(exported / "tokenizer.json"), AutoTokenizer.from_pretrained(exported)
    assert (through_ours.eos_id, through_ours.vocab_size) == (byte.eos_id, byte.vocab_size)
    assert auto.eos_token == BYTE_EOS and auto.eos_token_id == byte.eos_id
    for text in texts:
        ids = byte.encode(text).tolist()
        assert raw.encode(text, add_special_tokens=False).ids == ids
        assert through_ours.encode(text).tolist() == ids
        assert auto(text).input_ids == ids  # no BOS or EOS added either
        assert raw.decode(ids) == through_ours.decode(ids) == auto.decode(ids) == byte.decode(ids) == text
    cut = byte.encode("é东")[:-1].tolist()  # a character cut short decodes to U+FFFD in both
    assert raw.decode(cut) == byte.decode(cut) == "é\ufffd"
    assert raw.decode([*byte.encode("a").tolist(), byte.eos_id], skip_special_tokens=True) == "a"


def test_the_byte_tokenizers_one_difference_is_its_eos_spelled_out_in_text():
    # Every HF tokenizer matches its special tokens in text; ByteTokenizer has no text for EOS.
    text = f"a{BYTE_EOS}b"
    assert byte_level_tokenizer().encode(text, add_special_tokens=False).ids == [97, 256, 98]
    assert ByteTokenizer().encode(text).tolist() == list(text.encode())


def test_bytes_to_unicode_is_the_byte_level_alphabet():
    chars = bytes_to_unicode()
    assert sorted(chars) == list(range(256)) and set(chars.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert chars[ord("a")] == "a" and chars[ord(" ")] == "Ġ" and chars[ord("\n")] == "Ċ"


def test_resolve_checkpoint_finds_the_newest_complete_one_and_names_what_is_wrong(run, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(run[0], root)
    assert resolve_checkpoint(root / "checkpoint_1") == root / "checkpoint_1"
    shard = root / "checkpoint_2" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # a writer killed mid-write
    assert resolve_checkpoint(root) == root / "checkpoint_1"
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        resolve_checkpoint(root / "checkpoint_2")
    shutil.rmtree(root / "checkpoint_1")
    with pytest.raises(CheckpointError, match=f"{root}: none of its 1 checkpoints is complete"):
        resolve_checkpoint(root)
    with pytest.raises(CheckpointError, match="neither a checkpoint .* nor a run directory"):
        resolve_checkpoint(tmp_path)
    ray = tmp_path / "ray-run"  # Ray Train names checkpoints by the time they were reported
    for name, step in (("checkpoint_2026-01-02_09-00-00.000001", "checkpoint_1"),
                       ("checkpoint_2026-01-02_10-00-00.000002", "checkpoint_2"),
                       ("checkpoint_2026-01-01_23-59-59.999999", "checkpoint_2")):
        shutil.copytree(run[0] / step, ray / name)
    assert resolve_checkpoint(ray) == ray / "checkpoint_2026-01-02_10-00-00.000002"
    with pytest.raises(FileNotFoundError, match="no-such-run: no such directory"):
        resolve_checkpoint(tmp_path / "no-such-run")


def test_a_checkpoint_without_a_model_card_is_refused(run, tmp_path):
    old = tmp_path / "checkpoint_2"
    shutil.copytree(run[0] / "checkpoint_2", old)
    (old / MODEL_CARD).unlink()
    with pytest.raises(CheckpointError, match=f"{old} has no {MODEL_CARD}: it was written before"):
        export_hf(old, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_2"]  # no export, no partial one


def test_a_changed_tokenizer_copy_is_refused(tmp_path):
    tokenizer_file = tmp_path / "tokenizer.json"
    byte_level_tokenizer().save(str(tokenizer_file))
    cfg = trainer_config()
    cfg.data.tokenizer = str(tokenizer_file)
    hand_checkpoint(tmp_path / "checkpoint_7", cfg)
    (tmp_path / "checkpoint_7" / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        export_hf(tmp_path / "checkpoint_7", tmp_path / "hf")


def test_export_replaces_a_previous_export_and_refuses_other_directories(run, exported, tmp_path):
    out = tmp_path / "hf"
    shutil.copytree(exported, out)
    (out / "stale.txt").write_text("from an older export")
    export_hf(run[0] / "checkpoint_1", out)
    assert not (out / "stale.txt").exists() and read_model_card(out)["exported_from"]["step"] == 1
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=f"{other}: exists and is neither an empty directory nor a previous"):
        export_hf(run[0], other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    checkpoint = tmp_path / "checkpoint_2"  # a card, but not an export's
    shutil.copytree(run[0] / "checkpoint_2", checkpoint)
    with pytest.raises(FileExistsError, match=f"{checkpoint}: exists and is neither"):
        export_hf(run[0], checkpoint)
    shutil.rmtree(checkpoint)
    (tmp_path / "empty").mkdir()
    export_hf(run[0], tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "hf", "mine"]


def test_sampling_is_seeded_and_the_same_from_a_checkpoint_and_its_export(run, exported):
    root = run[0]
    text = sample(root, "def ", max_new_tokens=24, seed=1)
    assert text == sample(exported, "def ", max_new_tokens=24, seed=1)
    assert text == sample(root / "checkpoint_2", "def ", max_new_tokens=24, seed=1)
    assert len({sample(exported, "def ", max_new_tokens=24, seed=seed) for seed in range(4)}) > 1
    greedy = sample(exported, "def ", max_new_tokens=24, temperature=0)
    assert greedy == sample(root, "def ", max_new_tokens=24, temperature=0, seed=5)
    assert sample(exported, "def ", max_new_tokens=24, top_k=1, seed=2) == greedy
    state = torch.random.get_rng_state()
    sample(exported, "x", max_new_tokens=2)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_sampling_refuses_what_it_cannot_do(exported):
    with pytest.raises(ValueError, match="exceed the model's 64 positions"):
        sample(exported, "x" * 60, max_new_tokens=8)
    with pytest.raises(ValueError, match="temperature = -1"):
        sample(exported, "x", temperature=-1)


def test_sampling_never_picks_ids_past_the_tokenizer(tmp_path):
    cfg = trainer_config(tie_embeddings=False)
    hand_checkpoint(tmp_path / "checkpoint_7", cfg, edit=lambda m: m.output.weight[257:].mul_(1000))  # padding ids win
    export_hf(tmp_path / "checkpoint_7", tmp_path / "hf")
    for source in (tmp_path / "checkpoint_7", tmp_path / "hf"):
        assert len(sample(source, "a", max_new_tokens=6, temperature=0).encode("utf-8", "replace")) >= 2


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="flotilla")
    export_cli.add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return export_cli.COMMANDS[args.command](args)


def test_cli_exports_samples_and_names_a_bad_source(run, tmp_path, capsys):
    assert _cli("export", str(run[0]), "--hf", str(tmp_path / "hf")) == 0
    assert f"{tmp_path / 'hf'}: exported step 2 of {run[0]}" in capsys.readouterr().out
    assert _cli("sample", str(tmp_path / "hf"), "--prompt", "def ", "--max-new-tokens", "8", "--seed", "3") == 0
    assert capsys.readouterr().out == "def " + sample(run[0], "def ", max_new_tokens=8, seed=3) + "\n"
    for command in (("export", str(tmp_path / "nope"), "--hf", str(tmp_path / "x")),
                    ("sample", str(tmp_path / "nope"), "--prompt", "a")):
        assert _cli(*command) == 2
        assert f"flotilla: {tmp_path / 'nope'}: no such directory" in capsys.readouterr().err
