"""`flotilla`: the command line. Commands only; the work lives in the modules they call.

Every command that reads a config takes `-o section.key=value` overrides. A bad config exits with
code 2 and one message naming the key, the value and what is allowed, before any Ray resource is taken.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from orchestrator import console, export_cli, jobs
from orchestrator.config import Config, ConfigError, default_run_name, load_config


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. -o train.steps=100 (repeatable)")


def _verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's and MLflow's own log lines (C++ logs, worker start-up warnings, Tune's banner); "
                        "by default only Flotilla's lines and errors")


def _address_arg(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--address", default=None if not required else os.environ.get("RAY_ADDRESS"),
                   required=required and not os.environ.get("RAY_ADDRESS"),
                   help="Ray address (default: RAY_ADDRESS)" + ("" if required else "; none starts an embedded local Ray"))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flotilla", description="Train language models on Ray, tracked in MLflow.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a config on an embedded local Ray, or on --address / RAY_ADDRESS")
    _config_args(p)
    _address_arg(p, required=False)
    _verbose_arg(p)

    p = sub.add_parser("submit", help="submit a config as a Ray job; prints the job id (token: RAY_AUTH_TOKEN)")
    _config_args(p)
    _address_arg(p, required=True)
    p.add_argument("--wait", action="store_true",
                   help="follow the job's logs to its end; exit 0 only if it SUCCEEDED, else 1 with its final status")

    for name, text in (("status", "a submitted job's status"), ("logs", "a submitted job's logs"), ("stop", "stop a submitted job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id")
        _address_arg(p, required=True)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until the job ends")

    p = sub.add_parser("sweep", help="a PBT / PB2 / STN sweep (the config's tune section) through Ray Tune; "
                                     "trials are whole trainers")
    _config_args(p)
    _address_arg(p, required=False)
    _verbose_arg(p)
    p.add_argument("--replay", type=Path, metavar="LINEAGE_JSON",
                   help="instead of sweeping, train one plain run through the best trial's schedule in a lineage.json")

    p = sub.add_parser("plan", help="print a config's mesh, rank groups, parameters, memory per device and step time "
                                    "(no Ray, nothing started); --search ranks every layout, --measure K trains the "
                                    "best K briefly")
    _config_args(p)
    p.add_argument("--lengths", type=Path, metavar="FILE",
                   help="plan adaptive sequence parallelism for these sequence lengths (one per line) over parallel.sp "
                        "devices, against static Ulysses and the best homogeneous degree")
    p.add_argument("--json", action="store_true", help="with --lengths or --search: print the result as JSON")
    p.add_argument("--search", action="store_true",
                   help="every valid layout on cluster.num_workers devices (degrees, sp_mode, pipeline schedule, "
                        "micro-batches, activation checkpointing, engine) that fits a device's memory, ranked by "
                        "estimated tokens/s; the global batch stays the config's")
    p.add_argument("--measure", type=int, default=0, metavar="K",
                   help="with --search: train the K best for a few steps each as trials of one Ray Tune run, and write "
                        "the fastest measured as a config (--out)")
    p.add_argument("--measure-steps", type=int, default=6, metavar="N",
                   help="with --measure: steps each trial trains; the first 2 are warm-up, not timed (default: 6)")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="with --search: the config file to write the winner to (default with --measure: "
                        "<config stem>-best.yaml); without --measure, the best estimate")
    p.add_argument("--top", type=int, default=20, metavar="N", help="with --search: rows printed (0: all; default 20)")
    p.add_argument("--memory-gb", type=float, metavar="GB", help="with --search: one device's memory (default: this machine's GPU, "
                                                   "or its RAM over the workers)")
    p.add_argument("--device-flops", type=float, metavar="FLOPS", help="with --search: FLOP/s one device sustains (default: MFU x "
                                                      "train.peak_flops on GPUs; measured on this machine's CPU)")
    p.add_argument("--link-gbps", type=float, metavar="GBPS", help="with --search: GB/s a device moves in a collective (default: "
                                                   "300 over NVLink, 1 over gloo)")
    _address_arg(p, required=False)
    _verbose_arg(p)

    p = sub.add_parser("profile", help="measure the adaptive SP cost model (packed micro-batches and all-to-alls by "
                                       "group degree) on parallel.sp Ray workers, on an embedded local Ray or on "
                                       "--address / RAY_ADDRESS; writes JSON for parallel.adaptive.cost_model")
    _config_args(p)
    _address_arg(p, required=False)
    _verbose_arg(p)
    p.add_argument("--out", type=Path, required=True, help="cost model JSON to write; the measurements go beside it "
                                                           "as <stem>.profile.json")
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths to time, each alone and packed as many as "
                                                          "fit a micro-batch (default: 32, 64, ... train.max_doc_len)")
    p.add_argument("--memory-cap-gb", type=float,
                   help="memory a device may use (default: 90%% of a GPU's, or a node's RAM / its ranks)")

    p = sub.add_parser("data", help="turn text files into a token dataset (Arrow IPC files read memory-mapped, one "
                                    "document per row); --convert rewrites a dataset of the older Parquet format")
    p.add_argument("out", type=Path, nargs="?", help="dataset directory to write")
    p.add_argument("inputs", nargs="*", type=Path, help="text files or directories (searched for --glob)")
    p.add_argument("--stdlib", action="store_true", help="use the Python standard library's source files")
    p.add_argument("--glob", default="*.py", help="file pattern inside directories (default: *.py)")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a local tokenizer.json")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--convert", type=Path, metavar="OLD_DIR",
                   help="instead: rewrite the Parquet dataset OLD_DIR (train.parquet, val.parquet) in place as Arrow IPC files")

    p = sub.add_parser("ui", help="open the MLflow UI on the tracking store runs use")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=5000)

    p = sub.add_parser("sync", help="send metrics that a tracking outage left in an outbox file")
    p.add_argument("outbox", type=Path)

    export_cli.add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"flotilla: config error: {err}", file=sys.stderr)
        return 2
    except jobs.JobsError as err:
        print(f"flotilla: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nflotilla: interrupted; the run can continue from its latest checkpoint with -o tracking.run_name=...", file=sys.stderr)
        return 130


def _load(args) -> tuple[Config, str]:
    config = load_config(args.config, args.override)
    return config, config.tracking.run_name or default_run_name(args.config)


def cmd_train(args) -> int:
    config, run_name = _load(args)
    if not args.verbose:
        console.quiet()  # before Ray and MLflow are imported

    from orchestrator.launch import run_training
    from orchestrator.mlflow_client import tracking_uri
    from orchestrator.progress import ProgressLine

    print(f"flotilla: run {run_name} ({config.cluster.num_workers} worker(s), {config.train.steps} steps)", flush=True)
    _terminate_as_interrupt()
    try:
        outcome = run_training(config, run_name=run_name, address=args.address, quiet=not args.verbose,
                               on_report=ProgressLine(config.train.steps, sys.stdout.isatty()))
    except Exception as err:
        from ray.train.v2.api.exceptions import TrainingFailedError

        if args.verbose or not isinstance(err, TrainingFailedError):
            raise
        return _training_failed(config, run_name, err)
    final = outcome.metrics
    summary = ", ".join(f"{k} {final[k]:.4f}" for k in ("loss", "val_loss") if k in final)
    print(f"flotilla: finished {run_name}: {summary}")
    if config.tracking.sample_prompt is not None and outcome.checkpoint:
        _print_sample(outcome, config.tracking.sample_prompt)
    if outcome.mlflow_run_id:
        print(f"flotilla: MLflow run {outcome.mlflow_run_id} in {tracking_uri()}; open it with: flotilla ui")
    return 0


def _training_failed(config: Config, run_name: str, err: Exception) -> int:
    """A run whose workers failed past cluster.max_failures: one line (the failures themselves were printed as they
    happened, a worker's own traceback included), Ray's whole report in the run's log. Exit code 1."""
    from orchestrator.relay import RUN_LOG

    log = (Path(config.checkpoint.dir) / run_name / RUN_LOG).resolve()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"run {run_name} failed: {type(err).__name__}\n{err}\n")
    print(f"flotilla: run {run_name} failed: its workers failed more often than cluster.max_failures = "
          f"{config.cluster.max_failures} allows ({type(err).__name__}; Ray's report in {log}). It continues from its "
          f"latest checkpoint with: flotilla train CONFIG -o tracking.run_name={run_name}", file=sys.stderr)
    return 1


def _print_sample(outcome, prompt: str) -> None:
    """What the run's final model writes after `prompt`, on the console and in its MLflow run (sample.txt). A
    sample that fails (a checkpoint on storage this machine cannot read) is a warning: the run itself is done."""
    from trainers.sample import sample

    try:
        text = sample(outcome.checkpoint, prompt, max_new_tokens=64, temperature=0.8, seed=0)
    except Exception as err:  # noqa: BLE001 - any failure here must not turn a finished run into an error
        print(f"flotilla: warning: no sample from {outcome.checkpoint}: {err}", file=sys.stderr)
        return
    print(f"flotilla: sample (flotilla sample {outcome.checkpoint} --prompt ...):\n{prompt}{text}")
    if outcome.mlflow_run_id:
        from orchestrator.mlflow_client import TrackingClient

        client = TrackingClient("the sample stays on the console")
        client.attempt("log the sample", lambda: client.client.log_text(outcome.mlflow_run_id, prompt + text, "sample.txt"))


def _terminate_as_interrupt() -> None:
    """SIGTERM (what `ray job stop`, Kubernetes and systemd send) ends a run as Ctrl-C does: the MLflow run
    gets what was still queued and is marked KILLED, instead of the process vanishing mid-flush."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def cmd_sweep(args) -> int:
    import functools

    config, name = _load(args)
    if config.tune is None:
        raise ConfigError(f"{args.config}: no tune section; a sweep needs tune.scheduler, tune.num_samples, tune.mutations, ...")
    if not args.verbose:
        console.quiet()  # before Ray and MLflow are imported

    from orchestrator.launch import run_training
    from orchestrator.mlflow_client import tracking_uri
    from orchestrator.ray_connect import connect_ray
    from orchestrator.sweep_tracking import SweepRun
    from tune import read_schedule, replay, run_sweep

    quiet = not args.verbose
    launch = functools.partial(run_training, address=args.address, quiet=quiet)
    if args.replay:
        outcome = replay(config, read_schedule(args.replay), launch=launch, run_name=name)
        print(f"flotilla: replayed {args.replay} as run {name}: val_loss {outcome.metrics.get('val_loss', float('nan')):.4f}")
        return 0
    t = config.tune
    print(f"flotilla: sweep {name}: {t.scheduler}, {t.num_samples} trials x {config.train.steps} steps, "
          f"decisions every {t.perturbation_interval} steps", flush=True)
    outcome = run_sweep(config, launch=launch, name=name, connect=lambda: connect_ray(args.address, quiet=quiet),
                        track=SweepRun)
    timings = outcome.timings
    for trial, score in sorted(outcome.final_scores.items(), key=lambda kv: kv[1]):
        print(f"  {trial}: {t.metric} {score:.4f}")
    print(f"flotilla: best {outcome.best_trial} ({t.metric} {outcome.best_score:.4f}); {len(outcome.lineage)} exploits; "
          f"wall {timings.wall_s:.0f}s, exploiting {timings.exploit_s:.1f}s ({100 * timings.exploit_fraction:.1f}%)")
    print(f"flotilla: time over {timings.segments} segments (trial-s): training {timings.train_s:.1f}, start-up "
          f"{timings.startup_s:.1f}, waiting for generations {timings.wait_s:.1f}, overhead "
          f"{timings.overhead_per_segment_s:.2f} s per segment; "
          + ("persistent workers" if outcome.reuse_workers else "segment restarts"))
    print(f"flotilla: best checkpoint {outcome.best_checkpoint}")
    print(f"flotilla: lineage and best schedule in {outcome.out_dir / 'lineage.json'} "
          f"(replay: flotilla sweep {args.config} --replay {outcome.out_dir / 'lineage.json'})")
    if outcome.parent_run_id:
        print(f"flotilla: MLflow parent run {outcome.parent_run_id} in {tracking_uri()}; open it with: flotilla ui")
    if outcome.crashed:
        print(f"flotilla: {len(outcome.crashed)} trial(s) failed: {', '.join(sorted(outcome.crashed))}", file=sys.stderr)
        return 1
    return 0


def cmd_submit(args) -> int:
    config, run_name = _load(args)
    job_id = jobs.submit(config, run_name, args.address)
    print(job_id, flush=True)
    if not args.wait:
        return 0
    try:
        outcome = jobs.wait(job_id, args.address, out=lambda chunk: print(chunk, end="", flush=True))
    except KeyboardInterrupt:
        print(f"\nflotilla: job {job_id} goes on; `flotilla stop {job_id} --address {args.address}` stops it", file=sys.stderr)
        return 130
    if outcome.status == "SUCCEEDED":
        print(f"flotilla: job {job_id} SUCCEEDED")
        return 0
    print(f"flotilla: job {job_id} {outcome.status}" + (f": {outcome.message}" if outcome.message else ""), file=sys.stderr)
    return 1


def cmd_status(args) -> int:
    outcome = jobs.status(args.job_id, args.address)
    print(outcome.status)
    if outcome.status in ("FAILED", "STOPPED") and outcome.message:
        print(outcome.message, file=sys.stderr)
    return 0


def cmd_logs(args) -> int:
    for chunk in jobs.logs(args.job_id, args.address, follow=args.follow):
        print(chunk, end="", flush=True)
    return 0


def cmd_stop(args) -> int:
    print("stopped" if jobs.stop(args.job_id, args.address) else "not running")
    return 0


def cmd_plan(args) -> int:
    from orchestrator.plan import format_plan, make_plan

    config = load_config(args.config, args.override)
    if args.search:
        return _plan_search(args, config)
    if args.measure or args.out:
        raise ConfigError("--measure and --out go with --search")
    if args.lengths is None:
        if args.json:
            raise ConfigError("--json goes with --lengths FILE (the adaptive SP plan of those lengths) or --search")
        print(format_plan(make_plan(config)))
        return 0
    import json

    from orchestrator.adaptive_plan import adaptive_report, format_adaptive, read_lengths

    lengths = read_lengths(args.lengths)
    report = adaptive_report(config, lengths)
    print(json.dumps(report, indent=1) if args.json else format_adaptive(report, lengths))
    return 0


def _plan_search(args, config: Config) -> int:
    """`flotilla plan --search [--measure K]`: the ranked layouts; the best K measured, the winner written."""
    import json

    from orchestrator import layout_search

    if args.lengths is not None:
        raise ConfigError("--lengths and --search are separate questions: give one of them")
    if args.measure < 0 or args.measure_steps < 3:
        raise ConfigError(f"--measure {args.measure}, --measure-steps {args.measure_steps}: K must be at least 0, and "
                          "each trial needs at least 3 steps (2 warm-up, 1 timed)")
    found = layout_search.search_config(config, args.device_flops, args.link_gbps, args.memory_gb)
    measured = {}
    if args.measure:
        if not args.verbose:
            console.quiet()  # before Ray and MLflow are imported
        from orchestrator.layout_trials import measure_top

        measured = measure_top(found, args.measure, f"{default_run_name(args.config)}-search", steps=args.measure_steps,
                               address=args.address, quiet=not args.verbose)
    out = args.out or (Path(f"{Path(args.config).stem}-best.yaml") if args.measure else None)
    winner = layout_search.write_best(found, measured, out, f"flotilla plan {args.config} --search") if out else None
    if args.json:
        print(json.dumps(layout_search.search_json(found, measured, out), indent=1))
    else:
        print(layout_search.format_search(found, args.top or None, measured))
        if winner is not None:
            print(f"flotilla: wrote {winner} to {out} (flotilla train {out})")
    if measured and all(m.tokens_per_s is None for m in measured.values()):
        print(f"flotilla: none of the {len(measured)} measured layouts ran; {out} holds the best estimate",
              file=sys.stderr)
        return 1
    return 0


def cmd_profile(args) -> int:
    from orchestrator.profile_sp import format_profile, profile

    config = load_config(args.config, args.override, cost_model=False)  # the profile makes the cost model
    if config.parallel.sp_mode != "adaptive":
        raise ConfigError(f"parallel.sp_mode = {config.parallel.sp_mode!r}: profiling is for the adaptive SP cost model; "
                          "set parallel.sp_mode = adaptive (and data.batching = documents)")
    if args.lengths and min(args.lengths) < 1:
        raise ConfigError(f"--lengths {args.lengths}: every length must be at least 1")
    if args.lengths and max(args.lengths) > config.model.max_seq_len:
        raise ConfigError(f"--lengths: {max(args.lengths)} is longer than model.max_seq_len = {config.model.max_seq_len}")
    if not args.verbose:
        console.quiet()  # before Ray is imported
    result = profile(config, args.out, args.lengths, args.memory_cap_gb, address=args.address, quiet=not args.verbose)
    print(format_profile(result, args.out))
    return 0


def cmd_data(args) -> int:
    from trainers.corpus import BuildProgress, build_text_dataset, convert_parquet_dataset, stdlib_source_files
    from trainers.tokenizer import load_tokenizer

    if args.convert is not None:
        if args.out is not None or args.inputs or args.stdlib:
            raise ConfigError(f"--convert {args.convert}: converts that dataset in place; give no other directory, "
                              "input files or --stdlib with it")
        try:
            info = convert_parquet_dataset(args.convert, BuildProgress())
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(str(err)) from None
        print(f"{info.path}: converted to Arrow IPC: {info.train_docs} train documents ({info.train_tokens} tokens), "
              f"{info.val_docs} validation documents ({info.val_tokens} tokens)")
        return 0
    if args.out is None:
        raise ConfigError("flotilla data: give the dataset directory to write (or --convert OLD_DIR)")
    files = list(stdlib_source_files()) if args.stdlib else []
    for item in args.inputs:
        if item.is_dir():
            files += sorted(item.rglob(args.glob))
        elif item.is_file():
            files.append(item)
        else:
            raise ConfigError(f"input {str(item)!r}: no such file or directory")
    if not files:
        raise ConfigError("no input files: give files or directories, or --stdlib")
    if not 0 < args.val_fraction < 1:
        raise ConfigError(f"--val-fraction = {args.val_fraction}: must be between 0 and 1")
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"--tokenizer = {args.tokenizer!r}: {err}") from None
    info = build_text_dataset(files, args.out, tokenizer, args.val_fraction, progress=BuildProgress())
    print(f"{info.path}: {info.train_docs} train documents ({info.train_tokens} tokens), "
          f"{info.val_docs} validation documents ({info.val_tokens} tokens)")
    return 0


def cmd_ui(args) -> int:
    from orchestrator.mlflow_client import tracking_uri

    uri = tracking_uri()
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port}", flush=True)
    return subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                            "--host", args.host, "--port", str(args.port)])


def cmd_sync(args) -> int:
    from orchestrator.tracking import sync_outbox

    print(f"sent {sync_outbox(args.outbox)} run(s) to MLflow")
    return 0


COMMANDS = {**export_cli.COMMANDS, "train": cmd_train, "sweep": cmd_sweep, "submit": cmd_submit, "status": cmd_status, "logs": cmd_logs, "stop": cmd_stop,
            "plan": cmd_plan, "profile": cmd_profile, "data": cmd_data, "ui": cmd_ui, "sync": cmd_sync}


if __name__ == "__main__":
    sys.exit(main())
