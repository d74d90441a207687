"""Checkpoints for exact resume.

A checkpoint directory holds:
  DCP shards (`__<rank>_0.distcp`, `.metadata`)  model and optimizer, sharded; DCP reshards on load
  trainer_state.pt                             step and token count (rank 0)
  rng_rank<r>.pt                               each rank's torch RNG states (dropout)
  manifest_rank<r>.json                        written last by each rank: its files and their sizes

Each rank writes into its own directory (under Ray, a temp dir that Ray Train merges into one persisted
checkpoint). A checkpoint is complete only when every rank's manifest is there and every listed file has
its listed size; an incomplete one is refused rather than half-loaded. Sizes, not hashes: hashing GBs of
shards would cost more than the write, and truncation is the failure a killed writer leaves.
Loading uses weights_only=True throughout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)


@dataclass
class TrainState:
    """Progress that is not in the model or optimizer. The data position is `step`: batches are a pure
    function of it (trainers.data.BatchPlan), and so is the learning rate (trainers.schedules)."""

    step: int = 0
    tokens_seen: int = 0


class CheckpointError(RuntimeError):
    pass


log = logging.getLogger("flotilla.checkpoint")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> None:
    """Collective: every rank calls it with its own (or a shared) directory `path`."""

    def write_shards() -> None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))

    write_checkpoint(path, state, write_shards)


def write_checkpoint(path: Path, state: TrainState, write_shards: Callable[[], None]) -> None:
    """A checkpoint around an engine's own weight and optimizer files (`write_shards` writes them into
    `path`): the trainer state, this rank's RNG states, and last this rank's manifest of what it wrote."""
    rank, world = _rank_world()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in path.iterdir()}
    write_shards()
    if rank == 0:
        torch.save(asdict(state), path / "trainer_state.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, path / f"rng_rank{rank}.pt")
    # Only the files this rank added, so ranks sharing one directory don't claim each other's files.
    mine = {p.name: p.stat().st_size for p in path.iterdir() if p.name not in before and p.is_file()}
    mine = {n: s for n, s in mine.items() if not n.startswith("manifest_")}
    manifest = {"rank": rank, "world_size": world, "step": state.step, "files": mine}
    tmp = path / f".manifest_rank{rank}.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.rename(path / f"manifest_rank{rank}.json")


STEPS_FILE = "reported_steps.json"
"""In a checkpoint, beside the engine's files: the metrics of the steps reported with it (rank 0 writes it)."""


def write_reported_steps(path: Path, steps: list[dict]) -> None:
    """Rank 0 keeps the steps reported with a checkpoint in it. The checkpoint can persist while the
    driver that was to log those steps dies (a stopped job, a killed driver); a resumed run starts after
    them, so without this copy they would never reach MLflow."""
    if _rank_world()[0] == 0:
        (Path(path) / STEPS_FILE).write_text(json.dumps(steps))


def read_reported_steps(path: Path) -> list[dict]:
    """The steps reported with the checkpoint at `path` (none for one written before they were kept)."""
    f = Path(path) / STEPS_FILE
    return json.loads(f.read_text()) if f.is_file() else []


def verify_checkpoint(path: Path) -> int:
    """Check that every rank's manifest and file is present and whole; returns the saved step."""
    path = Path(path)
    manifests = sorted(path.glob("manifest_rank*.json"))
    if not manifests:
        raise CheckpointError(f"{path} holds no manifest: not a Flotilla checkpoint, or its writer died")
    first = json.loads(manifests[0].read_text())
    world, step = first["world_size"], first["step"]
    if len(manifests) != world:
        raise CheckpointError(f"{path}: {len(manifests)} rank manifests for a world of {world}: incomplete checkpoint")
    for m in manifests:
        info = json.loads(m.read_text())
        for name, size in info["files"].items():
            f = path / name
            if not f.is_file() or f.stat().st_size != size:
                have = f.stat().st_size if f.is_file() else "missing"
                raise CheckpointError(f"{path}: {name} is {have}, its manifest says {size} bytes: incomplete checkpoint")
    return step


def newest_complete(candidates: Iterable[Path]) -> tuple[Path, int, list[str]]:
    """The first complete checkpoint of `candidates` (newest first), its step, and the warnings that name
    each one skipped (a writer killed mid-write, a truncated copy), also logged here; none complete is an
    error, never a silent start from scratch."""
    warnings = []
    for path in candidates:
        try:
            step = verify_checkpoint(path)
        except CheckpointError as err:
            warnings.append(f"skipping checkpoint {path}: {err}")
            log.warning(warnings[-1])
            continue
        if warnings:
            warnings.append(f"resuming from the previous complete checkpoint {path} (step {step})")
            log.warning(warnings[-1])
        return Path(path), step, warnings
    raise CheckpointError("no complete checkpoint to resume from: " + ("; ".join(warnings) or "none given"))


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Collective: restores model and optimizer (resharded to the current layout), RNG and TrainState."""
    path = Path(path)
    verify_checkpoint(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    _drop_state_never_saved(optim_sd, path)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=str(path))
    set_model_state_dict(model, sd["model"])
    # not strict: the parameters _drop_state_never_saved left out have no state to set (dcp.load above already
    # failed on anything else the checkpoint lacks)
    set_optimizer_state_dict(model, optimizer, sd["optim"], options=StateDictOptions(strict=False))
    return read_rank_state(path)


def _drop_state_never_saved(optim_sd: dict, path: Path) -> None:
    """Forget the optimizer state of parameters the checkpoint holds none for. A fresh optimizer's state dict
    has an entry for every parameter, but one that had never been stepped when the checkpoint was written
    (an STN's hyperparameters before their first step) has no Adam moments in it; it starts without them
    again, as it would have in the uninterrupted run."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    stepped = {key.removeprefix("optim.state.").rsplit(".", 1)[0] for key in saved if key.startswith("optim.state.")}
    for name in [n for n in optim_sd.get("state", {}) if n not in stepped]:
        del optim_sd["state"][name]


def read_rank_state(path: Path) -> TrainState:
    """After an engine restored its weights and optimizer from `path`: this rank's RNG states, and the
    trainer state to continue from."""
    rank, _ = _rank_world()
    state = TrainState(**torch.load(path / "trainer_state.pt", weights_only=True))
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.exists():  # absent when resuming on more ranks than saved: those ranks keep their seeded RNG
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state
