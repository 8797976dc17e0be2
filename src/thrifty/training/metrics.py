"""What a training run reports: metrics.jsonl, a live progress bar, a loss plot, memory.

metrics.jsonl holds one JSON object per line and step that logged something
({"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_sec", "rss_mb", "eval_loss"...}),
easy to read back with pandas or `jq`. A resumed run first drops the lines after its
checkpoint, so the file ends up as if the run had never stopped.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from thrifty.errors import ThriftyError


def rss_bytes() -> int:
    """Current resident memory of this process (Linux /proc; else the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


class MetricsLog:
    """Appends records to a JSONL file, flushing each line so a crash loses nothing; with
    `tensorboard_dir` (report_to: tensorboard) also to TensorBoard event files there.
    With `writes=False` (every rank but 0 under torchrun) it only reads."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, writes: bool = True) -> None:
        self.path = Path(path)
        self.writes = writes
        self.tensorboard_dir = tensorboard_dir if writes else None
        self._writer: Any = None
        self._purge_step: int | None = None
        if tensorboard_dir is not None:
            try:
                import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
            except ImportError as err:
                raise ThriftyError("report_to = tensorboard needs the tensorboard package: pip install tensorboard "
                                   "(or report_to: none).") from err

    def start_fresh(self) -> None:
        if not self.writes:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def keep_until(self, step: int) -> None:
        """Drop records after `step` (those of a run that went on past its last checkpoint)."""
        if not self.writes:
            return
        records = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, self.path)
        self._purge_step = step + 1  # TensorBoard drops the events after the checkpoint too

    def write(self, record: dict[str, Any]) -> None:
        if not self.writes:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard_dir is not None:
            self._write_tensorboard(record)

    def _write_tensorboard(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=self._purge_step)
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        return records


class ProgressBar:
    """tqdm over optimizer steps, with the live loss, throughput, lr and memory."""

    def __init__(self, total: int, initial: int, disable: bool, desc: str = "train", shown: bool = True) -> None:
        """shown=False (every torchrun rank but 0): no bar and no lines at all."""
        self.shown = shown
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", disable=disable or not shown,
                        dynamic_ncols=True, file=sys.stderr)

    def update(self, loss: float, tokens_per_sec: float, lr: float) -> None:
        self.bar.set_postfix_str(f"loss={loss:.4f} tok/s={tokens_per_sec:.0f} lr={lr:.2e} "
                                 f"rss={rss_bytes() / 2**20:.0f}MB", refresh=False)
        self.bar.update(1)

    def advance(self, postfix: str, steps: int = 1) -> None:
        """Steps done, with a free-form live status (e.g. GRPO's reward and timings)."""
        self.bar.set_postfix_str(f"{postfix} rss={rss_bytes() / 2**20:.0f}MB", refresh=False)
        self.bar.update(steps)

    def write(self, text: str) -> None:
        if self.shown:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plot_metrics(records: list[dict[str, Any]], path: Path, keys: list[str], title: str,
                 ylabel: str = "value") -> Path | None:
    """Any metrics.jsonl keys against the step, one line each (markers for sparse series
    such as evaluations), as a PNG (matplotlib's Agg canvas: no display, no global pyplot
    state). Returns None if none of the keys was ever logged."""
    series = {key: [(r["step"], r[key]) for r in records if r.get(key) is not None] for key in keys}
    series = {key: points for key, points in series.items() if points}
    if not series:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key, points in series.items():
        axes.plot(*zip(*points), label=key, marker="o" if len(points) <= 12 else None)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return path
