"""Any checkpoint, of any layout and either engine, as a HuggingFace directory that transformers loads alone.

Checkpoints describe themselves: beside the engine's files, rank 0 writes a model card (MODEL_CARD: the model
section, the tokenizer, the engine and the compute dtype) and a copy of the run's tokenizer.json, so a checkpoint
directory is all an export needs. The weights come back whole, in float32, in one process without a process group:

  fsdp engine       DCP shards under "model.<our name>" (FSDP's dp_shard pieces, TP's DTensor slices, each pipeline
                    stage's parameters under the whole model's names); DCP reassembles each tensor on load
  deepspeed engine  DeepSpeed's files (ZeRO-1/2/3), whose optimizer partitions hold the float32 master weights
                    (bf16 runs too); deepspeed.utils.zero_to_fp32 stitches them together, one tensor-parallel rank's
                    at a time under AutoTP (parallel.tp), whose slices are then joined

An export holds config.json, model.safetensors (shards and an index past 5 GB), generation_config.json, the
tokenizer (the run's tokenizer.json, or for the built-in byte tokenizer an equivalent byte-level BPE) and the model
card with the checkpoint it came from. transformers, safetensors and DeepSpeed are imported by the functions that
use them: the training loop imports this module for write_model_card, and a trainer process should not pay
transformers' seconds of import time for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from trainers.checkpoint import CheckpointError, newest_complete, verify_checkpoint
from trainers.config import ModelConfig, TrainerConfig
from trainers.tokenizer import ByteTokenizer, HFTokenizer
from trainers.tokenizer import Tokenizer as AnyTokenizer

MODEL_CARD = "flotilla_model.json"
"""In every checkpoint (and every export): what the weights are, as JSON; see write_model_card."""
TOKENIZER_FILE = "tokenizer.json"
"""The copy of the run's HF tokenizer in a checkpoint, and the tokenizer of an export."""
CARD_FORMAT = 1
EXPORTED_FROM = "exported_from"
"""In an export's card, beside the checkpoint's: the checkpoint it came from and its step."""
BYTE_EOS = "<|endoftext|>"
"""The exported byte tokenizer's name for ByteTokenizer's EOS (id 256): GPT-2's, one of trainers.tokenizer's
EOS_CANDIDATES, so HFTokenizer finds it."""
MAX_SHARD_SIZE = "5GB"
"""Safetensors files of an export are cut at this size (huggingface_hub's default): a 7B model's 28 GB of float32
goes into 6 files and an index."""


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def write_model_card(path: str | Path, cfg: TrainerConfig) -> None:
    """Rank 0 writes the card and, when data.tokenizer is a file, a copy of it into this rank's part of a
    checkpoint; other ranks write nothing. The card records the copy's SHA-256: the card and the copy are not in
    the engine's manifests (they are written before the engine's files), and a cut-short copy must not load."""
    if not _is_rank0():
        return
    path = Path(path)
    card = {"format": CARD_FORMAT,
            "model": cfg.model.model_dump(mode="json"),
            "data": {"tokenizer": cfg.data.tokenizer},
            "parallel": {"engine": cfg.parallel.engine, "zero_stage": cfg.parallel.zero_stage},
            "train": {"dtype": cfg.train.dtype},
            "tokenizer_file": None}
    if cfg.data.tokenizer != "byte":
        shutil.copyfile(cfg.data.tokenizer, path / TOKENIZER_FILE)
        card["tokenizer_file"] = {"name": TOKENIZER_FILE, "sha256": _sha256(path / TOKENIZER_FILE)}
    _write_json(path / MODEL_CARD, card)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.rename(path)


def read_model_card(checkpoint: str | Path) -> dict:
    """The card of a checkpoint (or an export); CheckpointError saying what to do when it has none."""
    file = Path(checkpoint) / MODEL_CARD
    if not file.is_file():
        raise CheckpointError(f"{checkpoint} has no {MODEL_CARD}: it was written before checkpoints described their "
                              "model, so its config is unknown here. Resume the run (same config, one more step: "
                              "-o train.steps=...) with this version of Flotilla; its next checkpoint can be exported")
    try:
        card = json.loads(file.read_text())
        ModelConfig.model_validate(card["model"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{file}: not a readable model card ({err})") from None
    if card.get("format") != CARD_FORMAT:
        raise CheckpointError(f"{file}: model card format {card.get('format')!r}; this version reads {CARD_FORMAT}")
    return card


def card_tokenizer(directory: str | Path, card: dict) -> AnyTokenizer:
    """The run's tokenizer, from a checkpoint's (or an export's) card and the tokenizer.json copy beside it."""
    if card["tokenizer_file"] is None:
        return ByteTokenizer()
    file = Path(directory) / card["tokenizer_file"]["name"]
    if not file.is_file() or _sha256(file) != card["tokenizer_file"]["sha256"]:
        state = "missing" if not file.is_file() else "not the file its card names (SHA-256 differs)"
        raise CheckpointError(f"{file}: {state}; the run's tokenizer was {card['data']['tokenizer']}")
    return HFTokenizer(file)


def _checkpoint_age(path: Path) -> tuple[int, str]:
    """Sort key, oldest first: LocalReporter names checkpoints by step (checkpoint_12), Ray Train by time
    (checkpoint_2025-06-01_12-00-00.000123), which sorts by name."""
    suffix = path.name.removeprefix("checkpoint_")
    return (int(suffix), "") if suffix.isdigit() else (-1, path.name)


def resolve_checkpoint(source: str | Path) -> Path:
    """A checkpoint directory, verified complete; or for a run directory (<checkpoint.dir>/<run name>) its newest
    complete checkpoint. FileNotFoundError or CheckpointError naming `source` otherwise."""
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory; give a run directory (<checkpoint.dir>/<run name>) or "
                                "one of the checkpoint_* directories in it")
    if any(path.glob("manifest_rank*.json")):
        verify_checkpoint(path)
        return path
    found = sorted((p for p in path.glob("checkpoint_*") if p.is_dir()), key=_checkpoint_age, reverse=True)
    if not found:
        raise CheckpointError(f"{path}: neither a checkpoint (no manifest_rank*.json in it) nor a run directory "
                              "(no checkpoint_* directories in it)")
    try:
        return newest_complete(found)[0]
    except CheckpointError as err:
        raise CheckpointError(f"{path}: none of its {len(found)} checkpoints is complete ({err})") from None


def read_checkpoint_model(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """The whole model of a complete checkpoint: its float32 state dict under our names (trainers.model; with tied
    embeddings one tensor under both tok_embeddings.weight and output.weight), its ModelConfig and its card."""
    checkpoint = Path(checkpoint)
    verify_checkpoint(checkpoint)
    card = read_model_card(checkpoint)
    cfg = ModelConfig.model_validate(card["model"])
    stored = _read_deepspeed(checkpoint) if card["parallel"]["engine"] == "deepspeed" else _read_dcp(checkpoint)
    return _as_ours(stored, cfg, checkpoint), cfg, card


def _read_dcp(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every "model." tensor of a DCP checkpoint, whole: DCP copies each rank's pieces into full-size tensors."""
    stored = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    model = {key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in stored.items() if key.startswith("model.") and hasattr(meta, "size")}
    if not model:
        raise CheckpointError(f"{checkpoint}: its DCP metadata lists no model.* tensors: not an fsdp-engine checkpoint")
    with warnings.catch_warnings():  # DCP warns that no process group is up: the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": model}, checkpoint_id=str(checkpoint), no_dist=True)
    return model


def _read_deepspeed(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The float32 master weights of a DeepSpeed checkpoint (tag '.': its files flat in `checkpoint`). Under AutoTP
    (parallel.tp > 1) it holds one ZeRO checkpoint per tensor-parallel rank t (files *mp_rank_<t>_*), which
    zero_to_fp32 cannot tell apart: each is read alone, from a directory of links to its files, and the slices
    joined."""
    from trainers.engines.deepspeed import join_tp_slices, tp_ranks

    ranks = tp_ranks(checkpoint)
    if len(ranks) <= 1:
        return _read_zero(checkpoint)
    slices = []
    with tempfile.TemporaryDirectory() as links:
        for rank in ranks:
            part = Path(links, rank)
            part.mkdir()
            for file in checkpoint.glob(f"*mp_rank_{rank}_*.pt"):
                (part / file.name).symlink_to(file.resolve())
            slices.append(_read_zero(part))
    return join_tp_slices(slices)


def _read_zero(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The float32 master weights of the ZeRO checkpoint of one tensor-parallel rank, its files in `checkpoint`."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a file read: no GPU needed, whatever the host has
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # it prints a progress line per stage and a tqdm bar: noise on a command line, kept unless it fails
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=".")
    except (FileNotFoundError, ValueError) as err:
        raise CheckpointError(f"{checkpoint}: not a readable DeepSpeed ZeRO checkpoint ({err}); "
                              f"DeepSpeed said:\n{chatter.getvalue()}") from None
    # ZeRO-1/2 tensors are views into one flat partition; safetensors stores only tensors that own their memory
    return {name: tensor.clone() for name, tensor in state.items()}


STN_OWN = ("hyper", "log_scale", "gates.")
"""What a Self-Tuning Network (trainers.stn) keeps beside its base Transformer ("base."): its hyperparameters and
the gates on them. At its current hyperparameters each gate multiplies by 1, so the base alone is the model."""


def _as_ours(stored: dict[str, torch.Tensor], cfg: ModelConfig, checkpoint: Path) -> dict[str, torch.Tensor]:
    """`stored` under our parameter names, checked against the model of `cfg`: names and shapes, float32."""
    from trainers.model import build_model

    expected = {name: tuple(t.shape) for name, t in build_model(cfg, device="meta").state_dict().items()}
    state, unexpected = {}, []
    for key, tensor in stored.items():
        name = key.removeprefix("module.")  # DeepSpeed's wrapper, where a version keeps it
        if name.startswith(STN_OWN):
            continue
        name = name.removeprefix("base.")
        if name in expected:
            state[name] = tensor.float()
        else:
            unexpected.append(key)
    if cfg.tie_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]  # one tensor, as in the model (stored once or twice)
    missing = sorted(set(expected) - set(state))
    problems = [f"missing {', '.join(missing[:3])}"] if missing else []
    problems += [f"unexpected {', '.join(sorted(unexpected)[:3])}"] if unexpected else []
    problems += [f"{n} is {list(t.shape)}, its model section says {list(expected[n])}" for n, t in state.items()
                 if tuple(t.shape) != expected[n]]
    if problems:
        raise CheckpointError(f"{checkpoint}: its weights do not match its model card: {'; '.join(problems[:4])}")
    return state


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters (Radford et al. 2019, encoder.py), which the
    `tokenizers` ByteLevel pre-tokenizer and decoder apply: printable Latin-1 bytes map to themselves, the other
    68 to U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def byte_level_tokenizer() -> Tokenizer:
    """A `tokenizers` tokenizer with ByteTokenizer's ids: a BPE without merges over the 256 byte characters (the
    ByteLevel pre-tokenizer without its regex, so the whole text is one word, split into its bytes), id 256 the
    special token BYTE_EOS. One difference: text holding the literal string BYTE_EOS encodes it as id 256, as
    every HF tokenizer does its special tokens, where ByteTokenizer gives its 13 bytes."""
    chars = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BYTE_EOS, special=True, normalized=False)])
    return tok


def _write_tokenizer(out: Path, checkpoint: Path, card: dict, max_seq_len: int) -> AnyTokenizer:
    """tokenizer.json and a tokenizer_config.json AutoTokenizer reads it with; returns the run's tokenizer."""
    tokenizer = card_tokenizer(checkpoint, card)
    if card["tokenizer_file"] is None:
        byte_level_tokenizer().save(str(out / TOKENIZER_FILE))
        eos = BYTE_EOS
    else:
        shutil.copyfile(checkpoint / card["tokenizer_file"]["name"], out / TOKENIZER_FILE)
        eos = Tokenizer.from_file(str(out / TOKENIZER_FILE)).id_to_token(tokenizer.eos_id)
    # the generic class: a model-specific one (LlamaTokenizerFast) would rebuild parts of the pipeline its own way
    _write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
                                                "bos_token": eos, "model_max_length": max_seq_len,
                                                "clean_up_tokenization_spaces": False})
    return tokenizer


def _write_export(out: Path, checkpoint: Path) -> None:
    import huggingface_hub.serialization._torch as hf_serialization
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    # Its logger is named by its file path, outside huggingface_hub's own level: it would print "Model weights
    # successfully saved to <a temporary directory>" on every export under a CLI logging at INFO
    hf_serialization.logger.setLevel(logging.WARNING)

    from trainers.hf import hf_name, to_hf_config

    state, cfg, card = read_checkpoint_model(checkpoint)
    tokenizer = _write_tokenizer(out, checkpoint, card, cfg.max_seq_len)
    # A model whose vocabulary is smaller than its tokenizer's (synthetic-data runs: tokens below model.vocab_size,
    # the byte tokenizer's EOS 256 past it) has no EOS id: left unset rather than an id transformers refuses.
    eos = tokenizer.eos_id if tokenizer.eos_id < cfg.vocab_size else None
    hf_config = to_hf_config(cfg)
    # EOS separates the documents the model was trained on, so it also stands before the first one (GPT-2's usage)
    hf_config.bos_token_id = hf_config.eos_token_id = eos
    hf_config.architectures = ["LlamaForCausalLM"]
    hf_config.dtype = "float32"
    hf_config.save_pretrained(out)
    # Ids past the tokenizer's (a model.vocab_size rounded up) were never targets: never sample them.
    padding = list(range(tokenizer.vocab_size, cfg.vocab_size)) or None
    GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, suppress_tokens=padding).save_pretrained(out)
    # HF stores a tied embedding once, as model.embed_tokens.weight (lm_head.weight is tied to it on load)
    weights = {hf_name(n): t for n, t in state.items() if not (cfg.tie_embeddings and n == "output.weight")}
    save_torch_state_dict(weights, out, max_shard_size=MAX_SHARD_SIZE)
    source = {"checkpoint": str(checkpoint.resolve()), "step": verify_checkpoint(checkpoint)}
    _write_json(out / MODEL_CARD, {**card, EXPORTED_FROM: source})


def _is_export(path: Path) -> bool:
    try:
        return EXPORTED_FROM in json.loads((path / MODEL_CARD).read_text())
    except (OSError, ValueError):
        return False


def export_hf(source: str | Path, out: str | Path) -> Path:
    """Write the model of `source` (a run directory: its newest complete checkpoint; or a checkpoint directory) to
    the directory `out` as transformers' LlamaForCausalLM and its tokenizer; returns `out`. The export is written
    beside `out` and renamed into place when whole. `out` may be missing, empty or a previous export (replaced);
    anything else is refused (FileExistsError) rather than mixed with the export's files."""
    checkpoint = resolve_checkpoint(source)
    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_export(out))):
        raise FileExistsError(f"{out}: exists and is neither an empty directory nor a previous export (whose "
                              f"{MODEL_CARD} says what it was exported from); give a new directory")
    # siblings of `out`, so the renames stay on one file system; mkdir, not mkdtemp, for the usual permissions
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    part, old = out.with_name(f".{out.name}.partial-{token}"), out.with_name(f".{out.name}.old-{token}")
    part.mkdir(parents=True)
    try:
        _write_export(part, checkpoint)
        if out.exists():
            out.rename(old)
        part.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(part, ignore_errors=True)  # gone already unless the export failed
    return out
