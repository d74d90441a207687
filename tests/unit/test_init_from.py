"""model.init_from on the driver: the model section and the tokenizer come from the pretrained directory, and
every way it cannot start the run exits 2 before Ray starts, naming the key or the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config
from trainers.corpus import build_text_dataset
from trainers.pretrained import load_pretrained
from trainers.tokenizer import load_tokenizer

WORDS = ["<unk>", "</s>", *"abcdefghijklmnopqrstuvwxyz", "def", "return", "import", "self"]


def pretrained(path: Path, tied: bool = False, with_tokenizer: bool = True, **config) -> Path:
    hf = LlamaForCausalLM(LlamaConfig(**{
        "vocab_size": 48, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 64, "tie_word_embeddings": tied, "max_position_embeddings": 512, **config}))
    hf.save_pretrained(path)
    if with_tokenizer:
        word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
        word_level.pre_tokenizer = pre_tokenizers.Whitespace()
        word_level.save(str(path / "tokenizer.json"))
    return path


def write_config(tmp_path: Path, sections: dict) -> Path:
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump(sections))
    return file


def test_the_model_section_and_tokenizer_come_from_the_directory(tmp_path):
    path = pretrained(tmp_path / "llama")
    config = load_config(write_config(tmp_path, {"model": {"init_from": str(path), "max_seq_len": 256}}))
    m = config.model
    assert (m.vocab_size, m.dim, m.n_layers, m.n_heads, m.kv_heads, m.hidden_dim) == (48, 32, 2, 4, 2, 64)
    assert m.max_seq_len == 256  # a run may train on a shorter context than the model's 512
    assert config.data.tokenizer == str(path / "tokenizer.json")
    # the YAML may repeat what config.json says
    again = load_config(write_config(tmp_path, {"model": {"init_from": str(path), "n_heads": 4, "n_kv_heads": 2,
                                                          "ffn_dim": 64, "tie_embeddings": False}}))
    assert again.model == m.model_copy(update={"max_seq_len": 512})


def test_a_missing_tokenizer_leaves_data_tokenizer_alone(tmp_path):
    path = pretrained(tmp_path / "llama", with_tokenizer=False, vocab_size=300)
    assert load_config(write_config(tmp_path, {"model": {"init_from": str(path)}})).data.tokenizer == "byte"


def refused(tmp_path: Path, sections: dict, capsys) -> str:
    """`flotilla train` on `sections`: it must exit 2 before starting Ray; its message."""
    code = main(["train", str(write_config(tmp_path, sections))])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "config error" in err
    return err


def test_a_missing_directory(tmp_path, capsys):
    err = refused(tmp_path, {"model": {"init_from": str(tmp_path / "meta-llama/Llama-3-8B")}}, capsys)
    assert "model.init_from" in err and "no such directory" in err and "never downloads" in err


def test_a_directory_without_config_json(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = refused(tmp_path, {"model": {"init_from": str(tmp_path / "empty")}}, capsys)
    assert str(tmp_path / "empty" / "config.json") in err


def test_a_malformed_config_json(tmp_path, capsys):
    path = pretrained(tmp_path / "llama")
    (path / "config.json").write_text('{"model_type": "llama", ')
    err = refused(tmp_path, {"model": {"init_from": str(path)}}, capsys)
    assert str(path / "config.json") in err and "JSON" in err


def test_another_architecture(tmp_path, capsys):
    path = pretrained(tmp_path / "llama")
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    err = refused(tmp_path, {"model": {"init_from": str(path)}}, capsys)
    assert str(path / "config.json") in err and "'gpt2'" in err and "GPT2LMHeadModel" in err


def test_a_llama_our_model_cannot_represent(tmp_path, capsys):
    path = pretrained(tmp_path / "llama", attention_bias=True)
    err = refused(tmp_path, {"model": {"init_from": str(path)}}, capsys)
    assert "attention_bias" in err and str(path / "config.json") in err


@pytest.mark.parametrize("key,value,theirs", [("n_heads", 8, "num_attention_heads = 4"),
                                              ("n_kv_heads", 4, "num_key_value_heads = 2"),
                                              ("dim", 64, "hidden_size = 32"),
                                              ("tie_embeddings", True, "tie_word_embeddings = False")])
def test_a_model_key_that_disagrees(tmp_path, capsys, key, value, theirs):
    path = pretrained(tmp_path / "llama")
    err = refused(tmp_path, {"model": {"init_from": str(path), key: value}}, capsys)
    assert f"model.{key} = {value!r}" in err and theirs in err and str(path / "config.json") in err


def test_missing_weights(tmp_path, capsys):
    path = pretrained(tmp_path / "llama")
    (path / "model.safetensors").unlink()
    err = refused(tmp_path, {"model": {"init_from": str(path)}}, capsys)
    assert str(path / "model.safetensors") in err


def test_weights_that_do_not_fit_the_config(tmp_path, capsys):
    path = pretrained(tmp_path / "llama")
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "intermediate_size": 128}))
    err = refused(tmp_path, {"model": {"init_from": str(path)}}, capsys)
    assert "mlp.gate_proj.weight is [64, 32], the config needs [128, 32]" in err


def test_a_truncated_weights_file(tmp_path, capsys):
    path = pretrained(tmp_path / "llama")
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:5])
    err = refused(tmp_path, {"model": {"init_from": str(path)}}, capsys)
    assert str(path / "model.safetensors") in err


def test_another_tokenizer(tmp_path, capsys):
    path = pretrained(tmp_path / "llama")
    err = refused(tmp_path, {"model": {"init_from": str(path)}, "data": {"tokenizer": "byte"}}, capsys)
    assert "data.tokenizer = 'byte'" in err and str(path / "tokenizer.json") in err


def test_a_dataset_built_with_another_tokenizer(tmp_path, capsys):
    path = pretrained(tmp_path / "llama")
    text = tmp_path / "text"
    text.mkdir()
    for i in range(4):
        (text / f"{i}.txt").write_text("def f ( self ) : return a b c\n" * 20)
    build_text_dataset(sorted(text.iterdir()), tmp_path / "bytes", load_tokenizer("byte"), 0.25)
    err = refused(tmp_path, {"model": {"init_from": str(path)},
                             "data": {"source": "parquet", "path": str(tmp_path / "bytes")}}, capsys)
    assert f"data.path = {str(tmp_path / 'bytes')!r}" in err and "byte" in err and "tokenizer.json" in err
    # the same dataset built with the model's tokenizer is taken
    build_text_dataset(sorted(text.iterdir()), tmp_path / "words", load_tokenizer(str(path / "tokenizer.json")), 0.25)
    config = load_config(write_config(tmp_path, {"model": {"init_from": str(path)},
                                                 "data": {"source": "parquet", "path": str(tmp_path / "words")}}))
    assert config.model.vocab_size == 48


def test_a_bfloat16_checkpoint_loads_into_float32(tmp_path):
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    config = load_config(write_config(tmp_path, {"model": {"init_from": str(tmp_path / "bf16")}}))
    from trainers.model import build_model

    model = build_model(config.model, device="meta").to_empty(device="cpu")
    load_pretrained(model, config.model.init_from)
    assert model.tok_embeddings.weight.dtype == torch.float32
    assert torch.equal(model.tok_embeddings.weight, hf.model.embed_tokens.weight.float())
    assert torch.equal(model.layers[1].feed_forward.w2.weight, hf.model.layers[1].mlp.down_proj.weight.float())
