"""Soak test: does a long run leak memory? Resident memory of the training process, step 200 vs the end.

Runs the real CLI in-process on the smoke config (CPU, tiny assets) for many optimizer steps, the
train stream repeating every 10 batches, checkpoints every 30 steps, and samples the process's
resident set size (VmRSS) as training goes. Usage::

    python benchmarks/soak.py [--steps 2000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

ROOT = Path(__file__).resolve().parents[1]


def resident_mb() -> float:
    """This process's resident set size in MB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class ResidentMemory(Callback):
    """Records (step, RSS MB) every 100 optimizer steps."""

    samples: list[tuple[int, float]] = []  # on the class: the CLI builds the instance from a class path

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % 100 == 0 and (not self.samples or self.samples[-1][0] != trainer.global_step):
            self.samples.append((trainer.global_step, resident_mb()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from tiny_audio_pl.cli import main as cli

    with tempfile.TemporaryDirectory() as workdir:
        os.chdir(workdir)
        Path("assets").symlink_to(ROOT / "assets")
        start = time.time()
        cli(["fit", "-c", str(ROOT / "configs" / "smoke.yaml"), "--trainer.max_steps", str(args.steps),
             "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
             "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=__main__.ResidentMemory"])
        seconds = time.time() - start
    samples = dict(ResidentMemory.samples)
    early, last_step = samples[200], max(samples)
    growth = samples[last_step] / early - 1
    result = {"steps": args.steps, "rss_mb_at_200": round(early, 1),
              f"rss_mb_at_{last_step}": round(samples[last_step], 1),
              "growth": round(growth, 4), "seconds": round(seconds, 1), "machine": f"{platform.machine()}, "
              f"{os.cpu_count()} cores", "samples": ResidentMemory.samples}
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    print("RSS by step:", ", ".join(f"{step}: {mb:.0f} MB" for step, mb in ResidentMemory.samples))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
