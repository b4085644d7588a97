"""The metric writer of a run: console progress (loss, steps/s, ETA), JSON lines and
TensorBoard event files."""

from __future__ import annotations

import json
import os
import time

import numpy as np
from tensorboardX import SummaryWriter


class MetricWriter:
    """Console progress (process 0), JSON lines and TensorBoard event files.

    Each step is logged once: a run resumed at `start_step` drops the records of later steps
    (written before it stopped, and about to be re-run) from `metrics.jsonl`, and TensorBoard
    is told to purge its events from `start_step + 1` on.
    """

    def __init__(self, workdir: str, total_steps: int, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.total = total_steps
        self.t0 = time.time()
        self.last = (None, None)
        self.writer = None
        self.jsonl = None
        if enabled:
            path = os.path.join(workdir, "metrics.jsonl")
            keep_steps_up_to(path, start_step)
            self.writer = SummaryWriter(os.path.join(workdir, "tb"),
                                        purge_step=start_step + 1 if start_step else None)
            self.jsonl = open(path, "a")

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        if not self.enabled or not values:
            return
        for k, v in values.items():
            self.writer.add_scalar(prefix + k, float(v), step)
        self.jsonl.write(json.dumps({"step": step, **{prefix + k: float(v) for k, v in values.items()}}) + "\n")
        self.jsonl.flush()

    def progress(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        now = time.time()
        lstep, ltime = self.last
        rate = (step - lstep) / (now - ltime) if lstep is not None and now > ltime else float("nan")
        self.last = (step, now)
        print(f"step {step:>6d}/{self.total} | loss {loss:.4f} | {rate:6.2f} steps/s | "
              f"ETA {eta(self.total - step, rate)}", flush=True)
        self.scalars(step, {"steps_per_sec": rate} if rate == rate else {}, "perf/")

    def image(self, tag: str, step: int, img: np.ndarray) -> None:
        if self.enabled:
            self.writer.add_image(tag, img, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def eta(steps_left: int, rate: float) -> str:
    """HH:MM:SS for `steps_left` steps at `rate` steps/s ("--:--:--" without a rate yet)."""
    if not (rate == rate and rate > 0):
        return "--:--:--"
    return time.strftime("%H:%M:%S", time.gmtime(steps_left / rate))


def keep_steps_up_to(path: str, step: int) -> None:
    """Rewrite the JSON-lines file at `path` without the records of steps after `step` (and
    without a line a kill cut short)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and int(record.get("step", 0)) <= step:
                kept.append(json.dumps(record) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
