"""Start from pretrained weights: a local HuggingFace directory, as `save_pretrained` writes it (config.json and
model.safetensors, or shards listed in model.safetensors.index.json), loaded into whatever layout the run has.

The architecture comes from its config.json (orchestrator.init_from, before Ray starts); here the weights go
into the materialised model: plain, FSDP2-sharded, tensor-parallel (DTensors), a pipeline rank's shard, or the
whole model DeepSpeed is about to partition. DCP plans the reads: each rank asks for the parts of each tensor
it holds, and `SliceReader` reads just those bytes from the safetensors files with plain file reads (no memory
map, whose touched pages would count in the rank's resident memory as if it held them), so no rank builds the
whole model unless its layout holds the whole model. Names map by trainers.hf.hf_name; dtypes are cast on copy
(a bfloat16 checkpoint loads into float32 parameters).
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader

from trainers.config import ModelConfig
from trainers.hf import hf_name

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

IGNORED_WEIGHTS = ("rotary_emb.inv_freq",)
"""Buffers some older exports saved beside the weights; ours are computed (trainers.model.rope_tables)."""


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a save_pretrained directory; FileNotFoundError or ValueError naming the file."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a safetensors index (a JSON object with a weight_map): {err}") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: listed in {index} but not there ({len(missing)} shard(s) missing)")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    hint = (f" (it holds {', '.join(others[:3])}: PyTorch pickles, which are not read; save the model again with "
            "save_pretrained(..., safe_serialization=True))") if others else ""
    raise FileNotFoundError(f"{path / SINGLE_FILE}: no such file, and no {INDEX_FILE}{hint}")


def stored_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor in the directory's safetensors files and its shape, read from their headers alone."""
    from safetensors import safe_open

    shapes = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as err:  # safetensors' Rust side raises its own error types for a bad header
            raise ValueError(f"{file}: not a readable safetensors file ({err})") from None
    return shapes


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The HF names and shapes of our Transformer's weights for `cfg` (a tied output projection is not stored)."""
    from trainers.model import build_model

    model = build_model(cfg, device="meta")
    return {hf_name(name): tuple(p.shape) for name, p in model.named_parameters()}


def check_weights(path: str | Path, cfg: ModelConfig) -> None:
    """That the directory holds exactly the weights our Transformer of `cfg` has, with their shapes (headers only,
    before anything starts): ValueError naming the file's problem otherwise."""
    stored = stored_shapes(path)
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise ValueError(f"{Path(path)}: its safetensors lack {len(missing)} weight(s) the model needs, e.g. "
                         f"{', '.join(missing[:3])}")
    wrong = [f"{k} is {list(stored[k])}, the config needs {list(expected[k])}" for k in expected if stored[k] != expected[k]]
    if wrong:
        raise ValueError(f"{Path(path)}: weights of the wrong shape for its config.json: {'; '.join(wrong[:3])}")
    tied_copy = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = sorted(k for k in set(stored) - set(expected) - tied_copy if not k.endswith(IGNORED_WEIGHTS))
    if unexpected:
        raise ValueError(f"{Path(path)}: weights our Llama has no place for, e.g. {', '.join(unexpected[:3])}")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def safetensors_header(file: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data starts: an 8-byte
    little-endian header length, the JSON header, then the tensors' bytes."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), 8 + length


class SliceReader(HuggingFaceStorageReader):
    """DCP's HuggingFace reader (its metadata: names, shapes, files), reading each requested slice's rows with
    pread: the bytes of rows [o, o + n) of a tensor are one contiguous range, read into a buffer that size and
    copied (and cast) into the target; a slice of other dims reads its rows whole and keeps its columns."""

    def read_data(self, plan, planner):
        from torch.futures import Future

        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for file, items in per_file.items():
            header, data_start = safetensors_header(Path(file))
            with open(file, "rb", buffering=0) as f:
                for item in items:
                    entry = header[item.storage_index.fqn]
                    source = _read_rows(f, data_start + entry["data_offsets"][0], SAFETENSORS_DTYPES[entry["dtype"]],
                                        entry["shape"], item.storage_offsets, item.lengths)
                    target = planner.resolve_tensor(item).detach()
                    target.copy_(source)
                    planner.commit_tensor(item, target)
        done: Future = Future()
        done.set_result(None)
        return done


def _read_rows(f, start: int, dtype: torch.dtype, shape: list[int], offsets, lengths) -> torch.Tensor:
    """The slice [offsets, offsets + lengths) of the tensor stored at byte `start` of the open file `f`."""
    if not shape:  # a scalar
        offsets, lengths, shape = [0], [1], [1]
    row_elements = 1
    for size in shape[1:]:
        row_elements *= size
    row_bytes = row_elements * dtype.itemsize
    buffer = torch.empty(lengths[0] * row_bytes, dtype=torch.uint8)
    got = os.preadv(f.fileno(), [buffer.numpy()], start + offsets[0] * row_bytes)
    if got != buffer.numel():
        raise OSError(f"{f.name}: {got} of {buffer.numel()} bytes read (a truncated safetensors file)")
    rows = buffer.view(dtype).view(lengths[0], *shape[1:])
    return rows[(slice(None), *(slice(o, o + n) for o, n in zip(offsets[1:], lengths[1:])))]


@torch.no_grad()
def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Collective when distributed (every rank calls it): overwrite every parameter of the materialised `model`
    (whatever shards it holds) with the directory's weights. Buffers (the rotary tables) are left alone."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    # named_parameters() lists a tied weight once, under tok_embeddings: the HF name HF itself stores
    targets = {hf_name(name): param.detach() for name, param in model.named_parameters()}
    if dist.is_available() and dist.is_initialized():
        dcp.load(targets, storage_reader=SliceReader(str(path)))
        return
    with warnings.catch_warnings():  # one process: DCP warns that it assumes so, which is the point
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(targets, storage_reader=SliceReader(str(path)), no_dist=True)


def initialise(model: nn.Module, cfg: ModelConfig, seed: int, from_pretrained: bool = True) -> None:
    """Fill a materialised model: model.init_from's weights where it is set and `from_pretrained` (False when a
    checkpoint is about to replace every weight: a resumed run never reads the pretrained directory again, which
    may have moved since), the seeded initialisation otherwise. Collective with init_from, as load_pretrained."""
    from trainers.model import init_weights

    if cfg.init_from and from_pretrained:
        load_pretrained(model, cfg.init_from)
        model.reset_rope()
    else:
        init_weights(model, cfg, seed)
