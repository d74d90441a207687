"""`flotilla export` and `flotilla sample`: a run's model as a HuggingFace directory, and text from it.

Both take SOURCE: a run directory (<checkpoint.dir>/<run name>, whose newest complete checkpoint is used), one of
its checkpoint_* directories, or (sample only) a HuggingFace directory such as an export. Neither starts Ray nor
reads a config: a checkpoint describes its model itself (trainers.export.MODEL_CARD).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SOURCE_HELP = ("a run directory (<checkpoint.dir>/<run name>: its newest complete checkpoint) or one of its "
               "checkpoint_* directories")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint's model as a HuggingFace directory (config.json, "
                                      "model.safetensors, tokenizer) that transformers loads alone")
    p.add_argument("source", type=Path, metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("--hf", type=Path, required=True, metavar="OUT",
                   help="directory to write: new, empty, or a previous export (replaced whole)")

    p = sub.add_parser("sample", help="print what a checkpoint's (or a HuggingFace directory's) model writes after "
                                      "a prompt")
    p.add_argument("source", type=Path, metavar="SOURCE", help=SOURCE_HELP + ", or a HuggingFace directory (an export)")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="at most this many tokens (default: 64)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 decodes greedily (default: 0.8)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K likeliest tokens only")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="the same seed writes the same text (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device to generate on (default: cpu)")


def _refused(err: Exception) -> int:
    print(f"flotilla: {err}", file=sys.stderr)
    return 2


def cmd_export(args) -> int:
    from trainers.checkpoint import CheckpointError
    from trainers.export import EXPORTED_FROM, export_hf, read_model_card

    try:
        out = export_hf(args.source, args.hf)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as err:
        return _refused(err)
    step = read_model_card(out)[EXPORTED_FROM]["step"]
    print(f"{out}: exported step {step} of {args.source}; load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def cmd_sample(args) -> int:
    from trainers.checkpoint import CheckpointError
    from trainers.sample import sample

    try:
        text = sample(args.source, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, seed=args.seed, device=args.device)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        return _refused(err)
    print(args.prompt + text)
    return 0


COMMANDS = {"export": cmd_export, "sample": cmd_sample}
