"""Tuning quality: PBT and a population of Self-Tuning Networks against random search, same step budget.

    python bench/tuning.py                        # 3 methods x 3 seeds, about 75 minutes on a 2-core CPU machine
    python bench/tuning.py --seeds 0 --methods random pbt   # a subset
    python bench/tuning.py --report               # rebuild the table from what has been run
    python bench/tuning.py --methods stn-frozen   # the STN without its hyperparameter step (ablation)

The task: a byte-level Llama (4 layers, width 128) on the Python standard library's own source files,
validated on held-out files, trained on only the first 64 KiB of the training files (data.train_tokens) for
800 steps of 8 x 128 tokens, about 12 epochs: it overfits, so the regularisers decide the held-out loss
(an unregularised run ends near 2.9 nats, one with dropout 0.3 near 2.66). Every method runs 4 trials of
800 weight steps (3,200 in all), each under the same cosine learning-rate decay:
- random: `flotilla sweep configs/bench-tuning-pbt.yaml -o tune.scheduler=random`: 4 independent draws
  from the space (peak learning rate, weight decay, dropout at embedding, attention and residual), each
  trained to the end;
- pbt:    `flotilla sweep configs/bench-tuning-pbt.yaml`: the same 4 starting draws, exploit/explore every
  160 steps;
- stn:    `flotilla sweep configs/bench-tuning-stn.yaml`: 4 STN trials that learn the three dropout rates
  online, each starting from its own draw of the space, with PBT over the learning rate, weight decay and
  the STN's own settings every 160 steps (weight decay is PBT's: AdamW applies it outside the loss, where the
  STN's hypergradient cannot see it). The STN also takes a hyperparameter step (one forward and backward on
  8 validation rows) every 2 weight steps: 400 more passes, on validation rows that neither val_loss nor
  test_loss is measured on. Its first configuration (all four regularisers learned, every trial starting at
  rates of 0.05) is kept in bench/results/tuning-stn-first.json.
Seed s sets both tune.seed (starting draws, explore decisions) and train.seed (initialisation, data order
and the file split of the corpus), so within a seed every method sees the same data.

Two numbers per sweep:
- val_loss: the sweep's best trial at the last step on the validation rows every method ranks trials by
  (128 rows of 128 tokens), which is what the sweep reports;
- test_loss: that best trial's final checkpoint on 512 other rows of the held-out files, which no method
  ranked on or fitted to: the honest measure, since PBT selects on val_loss at every generation.
Results are kept per sweep in bench/results/tuning.json (a sweep already there is not run again) and the
table is written to bench/results/tuning.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's `kernels` package, not bench/kernels.py next to this script
RESULTS = ROOT / "bench" / "results"
METHODS = {
    "random": ("configs/bench-tuning-pbt.yaml", ["tune.scheduler=random"]),
    "pbt": ("configs/bench-tuning-pbt.yaml", []),
    "stn": ("configs/bench-tuning-stn.yaml", []),
    # the ablation: the same STN sweep with no hyperparameter step, so each trial's rates stay at its starting
    # draw (give or take the sampling around it): what the STN's online learning adds over its drawn starts and PBT
    "stn-frozen": ("configs/bench-tuning-stn.yaml", ["tune.stn.hyper_every=1000000"]),
}
TEST_ROWS = 512


def sweep_name(method: str, seed: int) -> str:
    return f"tuning-{method}-s{seed}"


def command(method: str, seed: int, work: Path) -> list[str]:
    config, extra = METHODS[method]
    overrides = [*extra, f"tune.seed={seed}", f"train.seed={seed}", f"tracking.run_name={sweep_name(method, seed)}",
                 f"checkpoint.dir={work}"]
    return ["flotilla", "sweep", config, *[arg for o in overrides for arg in ("-o", o)]]


def run_sweep(method: str, seed: int, work: Path) -> dict:
    cmd = command(method, seed, work)
    print("$", " ".join(cmd), flush=True)
    began = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT)
    wall = time.monotonic() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {done.returncode}")
    return sweep_record(method, seed, work, wall)


def sweep_record(method: str, seed: int, work: Path, wall: float) -> dict:
    """What the table needs from a finished sweep's lineage.json."""
    cmd = command(method, seed, work)
    lineage = json.loads((work / sweep_name(method, seed) / "lineage.json").read_text())
    best = lineage["best_trial"]
    last = max(s["stop"] for s in lineage["segments"])
    finals = {s["trial"]: s for s in lineage["segments"] if s["stop"] == last}
    return {"method": method, "seed": seed, "command": " ".join(cmd), "wall_s": wall, "best_trial": best,
            "val_loss": finals[best]["score"], "checkpoint": finals[best]["checkpoint"],
            "hparams": finals[best]["hparams"], "final_val_losses": {t: s["score"] for t, s in finals.items()},
            "exploits": len(lineage["exploits"]),
            "weight_steps": sum(s["stop"] - s["start"] for s in lineage["segments"])}


def evaluate(method: str, seed: int, checkpoint: str, hparams: dict) -> dict:
    """test_loss: a checkpoint's loss on the last TEST_ROWS rows of the validation split, regularisation off;
    for an STN also `learned`, the hyperparameters it had learned by then."""
    import torch

    from orchestrator.config import load_config
    from trainers.data import validation_rows
    from trainers.loop import token_loss_sum
    from tune.sweep import with_hparams

    config_path, extra = METHODS[method]
    config = load_config(ROOT / config_path, [*extra, f"tune.seed={seed}", f"train.seed={seed}"])
    cfg = with_hparams(config, hparams)
    if cfg.tune.scheduler == "stn":
        from trainers import stn

        trainee = stn.build(cfg, settings=cfg.tune.stn)
        trainee.engine.load(Path(checkpoint))
        trainee.model.condition(trainee.model.hyper.detach())
        fitted = {r for k in range(cfg.train.steps // cfg.tune.stn.hyper_every + 1) for r in stn.hyper_rows(trainee, k)}
        learned = {f"stn/{name}": trainee.model.value(name) for name in trainee.model.tuned}
    else:
        from trainers.run import build

        trainee = build(cfg)
        trainee.engine.load(Path(checkpoint))
        fitted, learned = set(), {}
    n, mbs = len(trainee.val_rows), cfg.train.micro_batch_size
    ranked = {r for b in validation_rows(n, mbs, cfg.train.val_batches, 0, 1) for r in b}
    rows = list(range(n - TEST_ROWS, n))
    if set(rows) & (ranked | fitted):
        raise SystemExit(f"the validation split has {n} rows: too few to keep {TEST_ROWS} test rows apart")
    trainee.model.eval()
    total, targets = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), mbs):
            batch = trainee.val_rows.batch(rows[i:i + mbs])
            total += float(token_loss_sum(trainee, batch))
            targets += int(batch.num_targets)
    return {"test_loss": total / targets, "learned": learned}


def write_report(results: list[dict], out: Path) -> None:
    import torch

    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    seeds = sorted({r["seed"] for r in results})
    by = {(r["method"], r["seed"]): r for r in results}

    def median(method, key):
        values = [by[(method, s)][key] for s in seeds if (method, s) in by]
        return statistics.median(values) if values else float("nan")

    lines = [
        "# Tuning quality: PBT and STN against random search",
        "",
        f"Measured {datetime.date.today().isoformat()} on {platform.node() or 'this machine'} "
        f"({platform.processor() or platform.machine()}, CPU only), Python {platform.python_version()}, "
        f"torch {torch.__version__}. Produced by `python bench/tuning.py` (see its docstring for the setup).",
        "The first run of this benchmark, on a budget too small to tell the methods apart (2 layers, 120",
        "steps, ranked on 16 rows), is kept in [tuning-tiny-budget.md](tuning-tiny-budget.md).",
        "",
        "Task: byte-level Llama (4 layers, width 128) on the Python standard library's source files, trained on",
        "the first 64 KiB of the training files (data.train_tokens) and validated on held-out files: 800 steps of",
        "8 x 128 tokens, about 12 epochs, so it overfits and the regularisers matter. Budget per sweep: 4 trials x",
        "800 weight steps = 3,200 weight steps, every method under the same cosine decay (STN adds a",
        "hyperparameter step on 8 validation rows every 2 weight steps). Space: peak learning rate, weight decay,",
        "dropout at embedding, attention and residual. The STN learns the three dropouts online, each trial",
        "starting from its own draw of the space; PBT tunes its learning rate, weight decay (AdamW applies it",
        "outside the loss, where the hypergradient cannot see it), hyper learning rate and perturbation scale.",
        "",
        "val_loss: the best trial's loss at step 800 on the 128 validation rows the sweep ranks trials by.",
        f"test_loss: the same checkpoint on {TEST_ROWS} other held-out rows, never ranked on or fitted to.",
        "",
        "| method | " + " | ".join(f"seed {s} val / test" for s in seeds) + " | median val | median test |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for m in methods:
        cells = []
        for s in seeds:
            r = by.get((m, s))
            cells.append(f"{r['val_loss']:.4f} / {r['test_loss']:.4f}" if r else "not run")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {median(m, 'val_loss'):.4f} | {median(m, 'test_loss'):.4f} |")
    if "stn-frozen" in methods:
        lines += ["", "stn-frozen is the ablation: the stn sweep with no hyperparameter step (tune.stn.hyper_every =",
                  "1000000), so each trial's dropout rates stay at its starting draw; the same PBT over the rest."]
    first_stn = RESULTS / "tuning-stn-first.json"
    if first_stn.exists():
        earlier = json.loads(first_stn.read_text())
        per_seed = ", ".join(f"seed {r['seed']} {r['val_loss']:.4f} / {r['test_loss']:.4f}" for r in sorted(earlier, key=lambda r: r["seed"]))
        lines += ["", "The STN's first configuration (it learned weight decay too, every trial starting at rates of 0.05;",
                  f"{first_stn.name}): median val / test {statistics.median(r['val_loss'] for r in earlier):.4f} / "
                  f"{statistics.median(r['test_loss'] for r in earlier):.4f} ({per_seed})."]
    lines += ["", "Per sweep: weight steps trained, exploits, wall time, best trial and its final hyperparameters",
              "(for an STN, stn/* are the rates it had learned by its last step).", "",
              "| method | seed | weight steps | exploits | wall (s) | best trial's hyperparameters |", "|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (list(METHODS).index(r["method"]), r["seed"])):
        hp = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in (r["hparams"] | r.get("learned", {})).items())
        lines.append(f"| {r['method']} | {r['seed']} | {r['weight_steps']} | {r['exploits']} | {r['wall_s']:.0f} | {hp} |")
    notes = [f"- {r['method']} seed {r['seed']}: {r['note']}" for r in results if r.get("note")]
    if notes:
        lines += ["", "Notes on individual sweeps:", "", *notes]
    if "random" in methods:
        lines += ["", "Against random search (median over seeds, lower is better):", ""]
        for m in methods:
            if m == "random":
                continue
            for key in ("val_loss", "test_loss"):
                diff = median(m, key) - median("random", key)
                verdict = "lower" if diff < 0 else "not lower"
                lines.append(f"- {m} {key}: {median(m, key):.4f} vs {median('random', key):.4f} ({diff:+.4f}, {verdict})")
    lines += ["", "Caveats: PBT selects on val_loss at every generation and random search once, so val_loss flatters",
              "PBT a little; test_loss is the fairer comparison. Seed s also moves the file split, so rows compare",
              "within a seed. Wall times are on a 2-core machine that other work shared part of the time.",
              "", "Commands (one per sweep):", "", "```"] + [r["command"] for r in results] + ["```", ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=["random", "pbt", "stn"])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "tuning-bench", help="where the sweeps write")
    ap.add_argument("--report", action="store_true", help="only rebuild the table from bench/results/tuning.json")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "tuning.json"
    results = json.loads(store.read_text()) if store.exists() else []
    if not args.report:
        for seed in args.seeds:
            for method in args.methods:
                if any(r["method"] == method and r["seed"] == seed for r in results):
                    continue
                record = run_sweep(method, seed, args.work.resolve())
                record |= evaluate(method, seed, record["checkpoint"], record["hparams"])
                print(f"{method} seed {seed}: val_loss {record['val_loss']:.4f}, test_loss {record['test_loss']:.4f}", flush=True)
                results.append(record)
                store.write_text(json.dumps(results, indent=1))  # kept after each sweep: a later failure loses nothing
    write_report(results, RESULTS / "tuning.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
