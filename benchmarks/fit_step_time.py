"""Seconds per optimizer step of ``tiny-audio fit`` at two commits, side by side on the same machine.

Each round runs the same ``tiny-audio fit`` command (the config and overrides given after ``--``) once
in each checkout, one after the other, so both see the same machine; a step's time is the gap
between the wall times TensorBoard recorded for consecutive ``train/loss`` points (logged every
step). The first ``--skip`` steps (model warm-up) are left out. Reported per checkout: the median
step over all rounds, each round's median, and the ratio. No validation runs (its interval is set
past the last step). Usage::

    git worktree add /tmp/before 62be8ad
    python benchmarks/fit_step_time.py /tmp/before . --rounds 2 -- -c configs/laptop.yaml \\
        --model.encoder DIR/whisper-tiny.en --model.decoder DIR/smollm2-135m \\
        --data.dataset SPEECH --data.config_name null
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def step_seconds(checkout: Path, fit_args: list[str], steps: int, skip: int) -> list[float]:
    """``tiny-audio fit`` from ``checkout`` for ``steps`` steps: the seconds of each step after the first ``skip``."""
    with tempfile.TemporaryDirectory() as runs:
        command = [sys.executable, "-m", "tiny_audio_pl.cli", "fit", *fit_args, "--trainer.max_steps", str(steps),
                   "--trainer.val_check_interval", str(steps + 1), "--trainer.num_sanity_val_steps", "0",
                   "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
                   "--trainer.default_root_dir", runs]
        env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
        run = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"tiny-audio fit failed in {checkout}:\n{run.stderr[-3000:]}")
        events = EventAccumulator(str(next(Path(runs).rglob("events.out.tfevents.*")).parent))
        events.Reload()
        times = [event.wall_time for event in events.Scalars("train/loss")]
    return [b - a for a, b in zip(times, times[1:])][skip:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="checkout of the earlier commit")
    parser.add_argument("after", type=Path, help="checkout of the later commit")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--json", type=Path)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)  # after --: the tiny-audio fit arguments
    args, fit_args = parser.parse_args(argv[:split]), argv[split + 1:]
    seconds: dict[str, list[list[float]]] = {"before": [], "after": []}
    for round_ in range(args.rounds):
        for name in ("before", "after"):
            seconds[name].append(step_seconds(getattr(args, name).resolve(), fit_args, args.steps, args.skip))
            print(f"round {round_ + 1} {name}: median {statistics.median(seconds[name][-1]):.3f} s a step", flush=True)
    report = {name: {"median_s": round(statistics.median([s for run in runs for s in run]), 3),
                     "round_medians_s": [round(statistics.median(run), 3) for run in runs]}
              for name, runs in seconds.items()}
    report["speedup"] = round(report["before"]["median_s"] / report["after"]["median_s"], 3)
    report["command"] = ["tiny-audio", "fit", *fit_args]
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
