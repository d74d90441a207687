"""model.init_from on the driver, before anything starts: the model section from the directory's config.json,
checked against what the YAML sets; its weights' names and shapes (safetensors headers only); its tokenizer as
data.tokenizer's default, and a dataset tokenized otherwise refused. The trainer loads the weights
(trainers.pretrained)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trainers.config import ModelConfig

ARCHITECTURE_KEYS = {  # ours -> the config.json key it comes from
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "ffn_dim": "intermediate_size",
    "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
}
"""What the weights were trained as: set by config.json; the YAML may repeat a value, not change it."""

DEFAULTED_KEYS = ("max_seq_len", "init_std", "dropout_attn")
"""Taken from config.json unless the YAML sets them: a run may train on a shorter (or longer) context."""

_EFFECTIVE = {"n_kv_heads": "kv_heads", "ffn_dim": "hidden_dim"}
"""Keys whose unset value means a rule (n_heads; Llama's 8/3 rule): compared by what they amount to."""


class InitFromError(ValueError):
    """The directory cannot start this run; the message names the key or the file."""


def apply_init_from(data: dict[str, Any]) -> dict[str, Any]:
    """The config's plain data with the model section (and data.tokenizer's default) filled in from
    model.init_from, if it is set; InitFromError otherwise names what is wrong."""
    model = data.get("model") or {}
    spec = model.get("init_from") if isinstance(model, dict) else None
    if spec is None:
        return data
    path = Path(str(spec))
    where = f"model.init_from = {str(spec)!r}"
    if not path.is_dir():
        raise InitFromError(f"{where}: no such directory (a local directory written by save_pretrained: config.json "
                            "and safetensors; Flotilla never downloads)")
    pretrained = read_model_config(path)
    merged = dict(model)
    for key, theirs_key in ARCHITECTURE_KEYS.items():
        if key in model and not _agrees(pretrained, key, model[key]):
            theirs = getattr(pretrained, _EFFECTIVE.get(key, key))
            raise InitFromError(f"model.{key} = {model[key]!r} disagrees with {path / 'config.json'} ({theirs_key} = "
                                f"{theirs!r}), which the weights of model.init_from were trained with: leave model.{key} "
                                "out (it comes from config.json)")
        merged[key] = getattr(pretrained, key)
    for key in DEFAULTED_KEYS:
        merged.setdefault(key, getattr(pretrained, key))
    try:
        from trainers.pretrained import check_weights

        check_weights(path, pretrained)
    except (OSError, ValueError) as err:
        raise InitFromError(f"{where}: {err}") from None
    out = {**data, "model": merged}
    tokenizer = path / "tokenizer.json"
    if tokenizer.is_file():
        section = dict(data.get("data") or {})
        chosen = section.get("tokenizer")
        if chosen is None:
            section["tokenizer"] = str(tokenizer)
        elif chosen == "byte" or not _same_file(Path(str(chosen)), tokenizer):
            raise InitFromError(f"data.tokenizer = {chosen!r}: not the tokenizer of model.init_from ({tokenizer}), whose "
                                f"ids the pretrained embeddings are indexed by: leave data.tokenizer out (it defaults "
                                "to that file) or name it")
        out["data"] = section
    return out


def read_model_config(path: Path) -> ModelConfig:
    """Our ModelConfig of the Llama in `path`/config.json; InitFromError naming the file otherwise."""
    from transformers import LlamaConfig

    from trainers.hf import from_hf_config

    file = path / "config.json"
    if not file.is_file():
        raise InitFromError(f"model.init_from = {str(path)!r}: {file} is missing (a save_pretrained directory has one)")
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise InitFromError(f"model.init_from: {file} is not readable JSON ({err})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "llama":
        kind = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        architectures = raw.get("architectures") if isinstance(raw, dict) else None
        raise InitFromError(f"model.init_from: {file} describes a {kind!r} model{f' ({architectures})' if architectures else ''}; "
                            "Flotilla trains Llama-architecture models (model_type 'llama', LlamaForCausalLM)")
    try:
        return from_hf_config(LlamaConfig.from_dict(raw))
    except (ValueError, TypeError, KeyError, ValidationError) as err:
        raise InitFromError(f"model.init_from: {file}: {err}") from None


def check_dataset_tokenizer(init_from: str, dataset_tokenizer: str, dataset: str) -> None:
    """A prebuilt dataset (data.source = parquet) must be tokenized by the pretrained model's tokenizer.json;
    `dataset_tokenizer` is the name its meta.json records (trainers.tokenizer: 'byte' or 'hf-<dir>-<sha256[:8]>')."""
    tokenizer = Path(init_from) / "tokenizer.json"
    if not tokenizer.is_file():
        return
    digest = hashlib.sha256(tokenizer.read_bytes()).hexdigest()[:8]
    if dataset_tokenizer == "byte" or not dataset_tokenizer.endswith(f"-{digest}"):
        raise InitFromError(f"data.path = {dataset!r}: built with the {dataset_tokenizer} tokenizer, not model.init_from's "
                            f"{tokenizer} (hf-...-{digest}); rebuild it with `flotilla data ... --tokenizer {tokenizer}`")


def _agrees(pretrained: ModelConfig, key: str, value: Any) -> bool:
    try:
        mine = ModelConfig.model_validate({**pretrained.model_dump(), key: value})
    except ValidationError:
        return False  # a value the model cannot even have (e.g. heads that do not divide dim) is another model
    attribute = _EFFECTIVE.get(key, key)
    return getattr(mine, attribute) == getattr(pretrained, attribute)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or a.read_bytes() == b.read_bytes()
    except OSError:
        return False
