"""Lineage: which hyperparameters each trial trained with over which steps, who copied whom, and the best
trial's full schedule (its own segments plus, before each exploit, the donor's), ready to replay.

Pure functions over plain records, so the sweep, the plots and the tests read the same data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tune.pbt import ExploitRecord, Hparams


@dataclass
class Segment:
    """A trial trained steps (start, stop] with `hparams`; `score` is its metric at `stop`, `checkpoint` the
    checkpoint it wrote there."""

    trial: str
    start: int
    stop: int
    hparams: Hparams
    score: float | None = None
    checkpoint: str | None = None


def full_schedule(trial: str, segments: list[Segment], lineage: list[ExploitRecord], upto: int | None = None) -> list[Segment]:
    """The segments that produced `trial`'s weights at step `upto` (default: its last step), oldest first.

    Following exploits backwards: a trial that copied a donor at step s owes its weights up to s to the
    donor's schedule up to s. Each returned segment keeps the name of the trial that trained it."""
    own = sorted((s for s in segments if s.trial == trial and (upto is None or s.stop <= upto)), key=lambda s: s.start)
    if upto is None and own:
        upto = own[-1].stop
    copies = [r for r in lineage if r.recipient == trial and (upto is None or r.step <= upto)]
    if not copies:
        return own
    last = max(copies, key=lambda r: r.step)
    before = full_schedule(last.donor, segments, lineage, upto=last.step)
    return before + [s for s in own if s.start >= last.step]


def merge_schedule(schedule: list[Segment]) -> list[dict[str, Any]]:
    """Consecutive segments with equal hyperparameters merged: [{start, stop, hparams, trained_by}]."""
    out: list[dict[str, Any]] = []
    for s in schedule:
        if out and out[-1]["hparams"] == s.hparams and out[-1]["stop"] == s.start:
            out[-1]["stop"] = s.stop
            out[-1]["trained_by"] = sorted(set(out[-1]["trained_by"]) | {s.trial})
        else:
            out.append({"start": s.start, "stop": s.stop, "hparams": dict(s.hparams), "trained_by": [s.trial]})
    return out


def best_trial(segments: list[Segment], mode: str = "min") -> str:
    """The trial with the best score at the latest step any trial reached."""
    last = max(s.stop for s in segments)
    final = [s for s in segments if s.stop == last and s.score is not None]
    pick = min if mode == "min" else max
    return pick(final, key=lambda s: s.score).trial


def write_lineage(path: Path, segments: list[Segment], lineage: list[ExploitRecord], best: str) -> None:
    Path(path).write_text(json.dumps({
        "best_trial": best,
        "best_schedule": merge_schedule(full_schedule(best, segments, lineage)),
        "exploits": [asdict(r) for r in lineage],
        "segments": [asdict(s) for s in segments],
    }, indent=1, default=str))


def read_schedule(path: Path) -> list[dict[str, Any]]:
    """The best trial's merged schedule from a lineage.json the sweep wrote."""
    return json.loads(Path(path).read_text())["best_schedule"]


def plot_schedules(segments: list[Segment], keys: list[str], out: Path) -> None:
    """One panel per hyperparameter: each trial's value over steps (steps, as trained, per trial)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.4 * len(keys)), squeeze=False, sharex=True)
    trials = sorted({s.trial for s in segments})
    for ax, key in zip(axes[:, 0], keys):
        for i, trial in enumerate(trials):
            xs, ys = [], []
            for s in sorted((s for s in segments if s.trial == trial), key=lambda s: s.start):
                xs += [s.start, s.stop]
                ys += [s.hparams[key], s.hparams[key]]
            ax.plot(xs, ys, color=f"C{i % 10}", label=trial)
        ax.set_ylabel(key)
        if all(s.hparams[key] > 0 for s in segments if isinstance(s.hparams[key], (int, float))):
            ax.set_yscale("log")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def plot_lineage(segments: list[Segment], lineage: list[ExploitRecord], out: Path) -> None:
    """The population's family tree: one row per trial, its score along steps, an arrow per exploit from
    the donor's row to the recipient's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = sorted({s.trial for s in segments})
    row = {t: i for i, t in enumerate(trials)}
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(trials) + 1.5))
    for t in trials:
        for s in (s for s in segments if s.trial == t):
            ax.plot([s.start, s.stop], [row[t], row[t]], color=f"C{row[t] % 10}", lw=4, solid_capstyle="butt")
            if s.score is not None:
                ax.text(s.stop, row[t] + 0.15, f"{s.score:.3f}", fontsize=6, ha="right")
    for r in lineage:
        ax.annotate("", xy=(r.step, row[r.recipient]), xytext=(r.step, row[r.donor]),
                    arrowprops={"arrowstyle": "->", "color": "k", "lw": 1})
    ax.set_yticks(range(len(trials)), trials)
    ax.set_xlabel("step (arrows: exploit, donor -> recipient)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
