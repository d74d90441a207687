"""The terminal's progress line for `flotilla train`."""

from __future__ import annotations

import time
from typing import Any


class ProgressLine:
    """Terminal progress: 'step 40/300 | loss 2.91 | val 2.95 | 5.2k tok/s | ETA 1m02s'.

    On a terminal it redraws one line; elsewhere (CI logs, Ray job logs) it prints a line every 5% of steps.
    """

    def __init__(self, total_steps: int, interactive: bool):
        self.total, self.interactive = total_steps, interactive
        self.started: float | None = None
        self.first_step = 0
        self.val: float | None = None
        self.printed_at = -1

    def __call__(self, steps: list[dict[str, Any]]) -> None:
        """One report: the metrics of each step since the previous report, oldest first."""
        now = time.monotonic()
        last = int(steps[-1]["step"])
        if self.started is None:  # speed counts from the first report (a resumed run: from where it resumed)
            self.started, self.first_step = now, last
        rate = (now - self.started) / (last - self.first_step) if last > self.first_step else None
        for report in steps:
            if "val_loss" in report:
                self.val = report["val_loss"]
            if "loss" in report:
                self._show(report, None if rate is None else rate * (self.total - last))

    def _show(self, report: dict[str, Any], eta: float | None) -> None:
        step = int(report["step"])
        parts = [f"step {step}/{self.total}", f"loss {report['loss']:.3f}"]
        if self.val is not None:
            parts.append(f"val {self.val:.3f}")
        parts.append(f"{report.get('tokens_per_s', 0) / 1000:.1f}k tok/s")
        if eta is not None:
            parts.append(f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
        line = " | ".join(parts)
        if self.interactive:
            print("\r" + line.ljust(100), end="\n" if step == self.total else "", flush=True)
        elif step == self.total or step - self.printed_at >= max(1, self.total // 20):
            print(line, flush=True)
            self.printed_at = step
