"""Ray Tune sweeps over whole Flotilla trainers: PBT, PB2 and Self-Tuning Networks, with lineage."""

from tune.config import Mutation, STNSettings, TuneConfig, check_tune
from tune.lineage import Segment, full_schedule, merge_schedule, read_schedule
from tune.pbt import Decision, ExploitRecord, Member, Population, decide, explore, initial_population, pb2_explore
from tune.sweep import SweepOutcome, replay, run_sweep, with_hparams

__all__ = ["Mutation", "STNSettings", "TuneConfig", "check_tune", "Segment", "full_schedule", "merge_schedule",
           "read_schedule", "Decision", "ExploitRecord", "Member", "Population", "decide", "explore",
           "initial_population", "pb2_explore", "SweepOutcome", "replay", "run_sweep", "with_hparams"]
