"""What a preemption costs a Slurm job: ``scripts/slurm/fit.sbatch`` on a real one-node Slurm, signalled mid-run.

Starts the tests' cluster (``tests/slurm_cluster.py``: Debian's slurm-wlm and munge, every file in a
temporary folder), then runs the smoke config as a job of 2 tasks (DDP over gloo on the CPU), twice:

1. uninterrupted: submission to the end;
2. sent Slurm's requeue signal (``scancel --signal=USR1``, what ``--signal=USR1@120`` sends before a
   time limit) once step ``--signal-after`` is saved: how long until the step in progress is saved,
   until the job is pending again (requeued by itself), Slurm's own wait before a requeued job may
   start (its ``BeginTime``; skipped here with ``scontrol update StartTime=now``), how long the
   requeued job takes from its start to its first trained step, and how far its final weights and
   Adam moments are from the uninterrupted job's.

Usage::

    python benchmarks/slurm_preemption.py [--steps 12] [--signal-after 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from slurm_cluster import SlurmCluster, missing  # noqa: E402

JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]


def _job(cluster: SlurmCluster, workdir: Path, steps: int, pause: float) -> str:
    (workdir / "assets").symlink_to(ROOT / "assets")
    env = cluster.env(PYTHONPATH=str(ROOT / "tests"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                      CONFIG=str(ROOT / "configs" / "smoke.yaml"), RUNS="runs/exp")
    fit = ["--trainer.accelerator", "cpu", "--trainer.max_steps", str(steps), "--checkpoint.every_n_train_steps", "2",
           "--data.batch_size", "4", "--data.num_workers", "1", "--trainer.limit_val_batches", "0",
           "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
           "--trainer.callbacks+=ddp_callback.RankRecorder", "--trainer.callbacks.dirpath", "records",
           "--trainer.callbacks.pause", str(pause)]
    result = subprocess.run(["sbatch", "--parsable", *JOB, str(ROOT / "scripts" / "slurm" / "fit.sbatch"), *fit],
                            cwd=workdir, env=env, capture_output=True, text=True, check=True, timeout=30)
    return result.stdout.strip()


def _rank0(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "records" / "rank0.jsonl").read_text().splitlines()]


def _last(workdir: Path) -> dict:
    return torch.load(workdir / "runs/exp/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)


def _largest_difference(a: dict, b: dict) -> float:
    weights = [(a["state_dict"][k] - v).abs().max().item() for k, v in b["state_dict"].items()]
    moments = [(a["optimizer_states"][0]["state"][i][n] - v).abs().max().item()
               for i, state in b["optimizer_states"][0]["state"].items() for n, v in state.items()]
    return max(weights + moments)


def measure(steps: int, signal_after: int, pause: float) -> dict:
    with tempfile.TemporaryDirectory() as folder, SlurmCluster(Path(folder) / "slurm") as cluster:
        straight = Path(folder) / "straight"
        straight.mkdir()
        start = time.time()
        job = _job(cluster, straight, steps, pause)
        assert cluster.wait_for(job, {"COMPLETED", "FAILED"}, 600)["JobState"] == "COMPLETED"
        uninterrupted_s = time.time() - start

        preempted = Path(folder) / "preempted"
        preempted.mkdir()
        job = _job(cluster, preempted, steps, pause)
        saved_file = preempted / f"runs/exp/lightning_logs/version_0/checkpoints/step={signal_after}.ckpt"
        while not saved_file.exists():
            time.sleep(0.05)
        signalled = time.time()
        subprocess.run(["scancel", "--signal=USR1", job], env=cluster.env(), check=True, timeout=30)
        fields = cluster.wait_for(job, {"PENDING"}, 120)
        pending = time.time()
        begin = time.mktime(time.strptime(fields["StartTime"], "%Y-%m-%dT%H:%M:%S"))
        cluster.release(job)
        restarted = time.time()
        assert cluster.wait_for(job, {"COMPLETED", "FAILED"}, 600)["JobState"] == "COMPLETED"
        output = next(preempted.glob(f"*-{job}.out")).read_text()
        step = int(re.search(r"SIGUSR1: saved step (\d+); requeuing", output).group(1))
        saved = (preempted / f"runs/exp/lightning_logs/version_0/checkpoints/step={step}.ckpt").stat().st_mtime
        resumed = next(r["time"] for r in _rank0(preempted) if r["event"] == "train_batch" and r["time"] > restarted)
        return {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "slurm": subprocess.run(["sbatch", "--version"], env=cluster.env(), capture_output=True,
                                        text=True).stdout.strip(),
                "steps": steps, "pause_s": pause, "uninterrupted_job_s": round(uninterrupted_s, 1),
                "signalled_after_step": signal_after, "saved_step": step,
                "signal_to_saved_s": round(saved - signalled, 2),
                "signal_to_requeued_s": round(pending - signalled, 2), "slurm_requeue_delay_s": round(begin - pending),
                "restart_to_first_step_s": round(resumed - restarted, 1),
                "largest_difference_from_uninterrupted": _largest_difference(_last(preempted), _last(straight))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--signal-after", type=int, default=4, help="signal once this step's checkpoint exists")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds each rank waits after a batch, so that "
                        "the signal finds the job mid-run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if missing():
        raise SystemExit(missing())
    result = measure(args.steps, args.signal_after, args.pause)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
