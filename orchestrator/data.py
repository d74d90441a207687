"""The driver's side of a run's data: paths made absolute for the workers, and the stdlib dataset built once."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import Config
from trainers.config import absolute_paths
from trainers.corpus import ensure_stdlib_dataset


def prepare_data(config: Config) -> Config:
    """Make every path absolute (Ray workers do not run in the driver's working directory) and build the
    stdlib dataset here, once, rather than racing to build it in every worker."""
    config = absolute_paths(config)
    data = config.data
    if data.source == "stdlib":
        built = ensure_stdlib_dataset(Path(data.path), data.tokenizer, data.val_fraction, config.train.seed)
        config = config.model_copy(update={"data": data.model_copy(update={"path": str(built.path), "source": "parquet"})})
    return config
