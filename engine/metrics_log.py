"""Per-step metrics to JSONL, TensorBoard and (when asked for and installed) Weights & Biases, with a
progress bar on the console.

metrics.jsonl holds one object per step, {"step": s, "reward/mean": ..., ...}; a resumed run drops
the lines past its checkpoint's step and appends, so the file reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fusedrl.engine.config import RunConfig
from fusedrl.engine.errors import UsageError


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated since the last reset on a GPU; the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


class MetricLogger:
    def __init__(self, cfg: RunConfig, output_dir: Path, start_step: int, config: dict):
        self.path = output_dir / "metrics.jsonl"
        self.console = Console()
        self._keep_until(start_step)
        self.tensorboard = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
        self.wandb = None
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise UsageError("run.wandb is true but the wandb package is not installed") from None
            self.wandb = wandb.init(project=cfg.wandb_project, config=config, dir=str(output_dir),
                                    resume="allow")
        self.progress = None
        if cfg.progress:
            self.progress = Progress(TextColumn("[bold]RL"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.description}"),
                                     console=self.console, transient=False)
            self.task = self.progress.add_task("", total=cfg.steps, completed=start_step)
            # Started by the first log line (step 0: held-out accuracy before RL), so that its clock
            # does not run through the warm start, which prints its own lines.

    def _keep_until(self, step: int) -> None:
        kept = []
        if step > 0 and self.path.is_file():
            kept = [line for line, record in self._records() if record["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def _records(self) -> list[tuple[str, dict]]:
        """metrics.jsonl's lines and records. A run killed while writing a line leaves it cut short (no
        newline at the end of the file): that line is dropped, and said so (the resumed run writes its
        step again); any other line that is not a record is an error naming the file and line."""
        text = self.path.read_text(errors="replace")
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            self.print(f"{self.path}: dropped its last line, cut short by an interrupted write: {lines[-1][:60]!r}")
            lines.pop()
        out = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                int(record["step"])
            except (ValueError, KeyError, TypeError):
                raise UsageError(f"{self.path}, line {number}: not a metrics record: {line[:60]!r}") from None
            out.append((line, record))
        return out

    def log(self, step: int, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.progress is not None:
            if not self.progress.live.is_started:
                self.progress.start()
                self.progress.reset(self.task, start=True, completed=self.progress.tasks[0].completed)
            parts = [f"{label} {metrics[key]:.3f}" for key, label in
                     (("reward/mean", "reward"), ("eval/accuracy", "held-out acc")) if key in metrics]
            summary = "  ".join(parts)
            self.progress.update(self.task, completed=step, description=summary)

    def print(self, message: str) -> None:
        # soft_wrap: a long line (a path, a summary) is printed whole, never broken at the console width
        # (80 columns when the output is not a terminal, as in CI logs), so that it can be copied.
        self.console.print(message, highlight=False, soft_wrap=True)

    def history(self) -> list[dict]:
        return [record for _, record in self._records()]

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
