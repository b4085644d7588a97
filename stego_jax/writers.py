"""The metric writer of a run: console progress (loss, steps/s, ETA), JSON lines and
TensorBoard event files."""

from __future__ import annotations

import json
import os
import time

import numpy as np
from tensorboardX import SummaryWriter


class MetricWriter:
    """Console progress (process 0), JSON lines and TensorBoard event files."""

    def __init__(self, workdir: str, total_steps: int, enabled: bool):
        self.enabled = enabled
        self.total = total_steps
        self.t0 = time.time()
        self.last = (None, None)
        self.writer = None
        self.jsonl = None
        if enabled:
            self.writer = SummaryWriter(os.path.join(workdir, "tb"))
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        if not self.enabled:
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
        eta = (self.total - step) / rate if rate == rate and rate > 0 else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "--:--:--"
        print(f"step {step:>6d}/{self.total} | loss {loss:.4f} | {rate:6.2f} steps/s | ETA {eta_s}",
              flush=True)
        self.scalars(step, {"steps_per_sec": rate} if rate == rate else {}, "perf/")

    def image(self, tag: str, step: int, img: np.ndarray) -> None:
        if self.enabled:
            self.writer.add_image(tag, img, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
