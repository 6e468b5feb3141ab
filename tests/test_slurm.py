"""Training as a Slurm job, on a real one-node Slurm (Debian's ``slurm-wlm`` and ``munge``: ``slurm_cluster.py``).

Every job is the user's own ``scripts/slurm/fit.sbatch`` submitted with ``sbatch``, as 2 tasks on 2
CPUs (DDP over gloo, ranks from Slurm) on the smoke config; only the GPU and CPU counts and the
run's length are changed on the command line. ``tests/ddp_callback.py`` records what each rank
trained on. The tests check that:

1. a job's ranks are its Slurm tasks and train on disjoint data; sent Slurm's requeue signal
   (``scancel --signal=USR1``, what ``--signal=USR1@120`` sends before a time limit) mid-run, it saves
   its step once, requeues itself, and the requeued job resumes in the same run folder at that step
   and data position and runs to the end; it trains on the same clips and ends with the same weights,
   Adam moments and LR schedule (1e-6) as a plain 2-process run (Lightning's own launcher, no
   scheduler); no ``hpc_ckpt`` anywhere;
2. a job that runs into its time limit without a warning signal (the script without ``--signal``)
   saves on Slurm's SIGTERM, and the next submission continues to the same end;
3. a job script that starts the command without ``srun`` fails in seconds with one line (the other
   mismatches of a job and the trainer are in ``test_config_errors.py``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from slurm_cluster import SlurmCluster, missing

from conftest import ROOT, SMOKE, assert_same_training, cli, cli_env, make_workdir

pytestmark = pytest.mark.skipif(missing() is not None, reason=f"{missing()}; .ci/run installs it")
SCRIPT = ROOT / "scripts" / "slurm" / "fit.sbatch"
STEPS = 6
# Each rank: 4 clips a step, 24 in all, inside one pass over its 40; a checkpoint every 2 steps; no validation.
FIT = ["--trainer.accelerator", "cpu", "--trainer.max_steps", str(STEPS), "--checkpoint.every_n_train_steps", "2",
       "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.limit_val_batches", "0",
       "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
       "--trainer.callbacks+=ddp_callback.RankRecorder", "--trainer.callbacks.dirpath"]
JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]  # the test machine's shape


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """4 CPUs on the 2-core machine: the time-limited job, which mostly sleeps, runs beside the others."""
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=4) as running:
        yield running


@pytest.fixture(scope="module", autouse=True)
def time_limited(cluster, tmp_path_factory) -> tuple[str, Path, Path]:
    """Submitted before the other tests, as it waits for its time limit (60-90 s: Slurm checks every 30 s): the
    job script without --signal, so that Slurm's SIGTERM at the limit is the only warning (SIGKILL 30 s later).
    20 s a step: the job would need 2 minutes. Its id, folder and script."""
    workdir = make_workdir(tmp_path_factory.mktemp("time-limited"))
    script = workdir / "no-signal.sbatch"
    script.write_text(re.sub(r"(?m)^#SBATCH --(signal|requeue).*\n", "", SCRIPT.read_text()))
    job = _submit(cluster, workdir, "records", "--time=1", script=script, fit=("--trainer.callbacks.pause", "20"))
    return job, workdir, script


def _env(**extra: str) -> dict[str, str]:
    """The CLI's test environment with the test callback importable and no Slurm job's variables."""
    python_path = os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    return {k: v for k, v in cli_env(PYTHONPATH=python_path, **extra).items() if not k.startswith("SLURM_")}


def _job_env(cluster: SlurmCluster) -> dict[str, str]:
    """A job's environment (sbatch passes it on): this Python first on PATH, the job script's two settings."""
    return cluster.env(**_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", CONFIG=SMOKE,
                              RUNS="runs/exp"))


def _submit(cluster: SlurmCluster, workdir: Path, records: str, *args: str, script: Path = SCRIPT,
            fit: tuple[str, ...] = ()) -> str:
    """``sbatch [args] SCRIPT FIT...`` in ``workdir``: the job id."""
    result = subprocess.run(["sbatch", "--parsable", *JOB, *args, str(script), *FIT, records, *fit], cwd=workdir,
                            env=_job_env(cluster), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def _finish(cluster: SlurmCluster, job: str, workdir: Path, timeout: float = 240) -> tuple[dict[str, str], str]:
    """Wait for the job to end; its fields and its output file (every start of it)."""
    try:
        fields = cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout)
    finally:
        outputs = sorted(workdir.glob(f"*-{job}.out"))
        output = outputs[0].read_text() if outputs else ""
    return fields, output


def _run(workdir: Path) -> Path:
    return workdir / "runs" / "exp" / "lightning_logs" / "version_0"


def _records(folder: Path) -> dict[int, list[dict]]:
    return {int(f.stem.removeprefix("rank")): [json.loads(line) for line in f.read_text().splitlines()]
            for f in sorted(folder.glob("rank*.jsonl"))}


def _trained(records: list[dict]) -> list[str]:
    return [i for r in records if r["event"] == "train_batch" for i in r["ids"]]


def _last(workdir: Path) -> dict:
    return torch.load(_run(workdir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _only_our_checkpoints(workdir: Path, steps: set[int]) -> None:
    """One mechanism saved: the run's own step files and ``last``, no Lightning ``hpc_ckpt`` anywhere."""
    assert not list(workdir.rglob("hpc_ckpt*")), list(workdir.rglob("hpc_ckpt*"))
    names = sorted(p.name for p in (_run(workdir) / "checkpoints").iterdir())
    assert names == sorted(["last.ckpt", *(f"step={n}.ckpt" for n in steps)]), names
    assert sorted(p.name for p in (workdir / "runs" / "exp" / "lightning_logs").iterdir()) == ["version_0"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """The same run started by Lightning's own launcher, no scheduler: what every job must end with."""
    workdir = make_workdir(tmp_path_factory.mktemp("plain"))
    result = subprocess.run(cli("fit", "-c", SMOKE, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                                "--trainer.default_root_dir", "runs/exp", *FIT, "records"), cwd=workdir, env=_env(),
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    _only_our_checkpoints(workdir, {2, 4, 6})
    return workdir


def _wait_for(path: Path, cluster: SlurmCluster, job: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        state = cluster.job(job).get("JobState")
        assert time.monotonic() < deadline and state in ("PENDING", "RUNNING"), f"{path.name} never came ({state})"
        time.sleep(0.1)


def test_a_job_requeued_by_its_signal_resumes_exactly_and_ends_as_a_plain_two_process_run(cluster, plain, tmp_path):
    workdir = make_workdir(tmp_path)
    job = _submit(cluster, workdir, "records", fit=("--trainer.callbacks.pause", "0.5"))
    _wait_for(_run(workdir) / "checkpoints" / "step=2.ckpt", cluster, job)
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster.env(), check=True, timeout=30)
    cluster.wait_for(job, {"PENDING"}, 60)  # requeued by the job itself
    cluster.release(job)
    fields, output = _finish(cluster, job, workdir)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", f"{fields}\n{output[-3000:]}"

    saved = int(re.search(r"SIGUSR1: saved step (\d+); requeued Slurm job (\d+)", output).group(1))
    assert 2 <= saved < STEPS, output[-3000:]
    assert output.count("saved step") == 1  # rank 0 says it, once
    assert f"resuming from {Path('runs/exp/lightning_logs/version_0/checkpoints/last.ckpt')}" in output
    records = _records(workdir / "records")
    assert sorted(records) == [0, 1]
    for rank, rows in records.items():  # two starts of two processes, each the Slurm task of its rank
        assert {(r["world"], r["slurm_procid"]) for r in rows} == {(2, str(rank))}
        assert len({r["pid"] for r in rows}) == 2
        steps = [r["step"] for r in rows if r["event"] == "train_batch"]
        assert steps == list(range(STEPS)), (rank, steps)  # the requeued start went on from the saved step
    seen = {rank: _trained(rows) for rank, rows in records.items()}
    assert all(len(ids) == len(set(ids)) == STEPS * 4 for ids in seen.values()), seen
    assert not set(seen[0]) & set(seen[1])
    assert seen == {rank: _trained(rows) for rank, rows in _records(plain / "records").items()}  # data position
    _only_our_checkpoints(workdir, {2, 4, 6} | {saved})
    assert_same_training(_last(workdir), _last(plain))


def test_a_job_at_its_time_limit_saves_and_the_next_submission_continues(cluster, plain, time_limited):
    job, workdir, script = time_limited
    fields, output = _finish(cluster, job, workdir, timeout=180)
    assert fields["JobState"] == "TIMEOUT", f"{fields}\n{output[-3000:]}"
    saved = int(re.search(r"SIGTERM: saved step (\d+); continue with --ckpt_path last", output).group(1))
    assert 1 <= saved < STEPS and _last(workdir)["global_step"] == saved

    again = _submit(cluster, workdir, "records", script=script)  # the same script again: --ckpt_path auto
    fields, output = _finish(cluster, again, workdir)
    assert fields["JobState"] == "COMPLETED", f"{fields}\n{output[-3000:]}"
    assert f"resuming from {Path('runs/exp/lightning_logs/version_0/checkpoints/last.ckpt')}" in output
    for rank, rows in _records(workdir / "records").items():
        assert [r["step"] for r in rows if r["event"] == "train_batch"] == list(range(STEPS)), rank
    assert_same_training(_last(workdir), _last(plain))


def test_a_job_script_without_srun_fails_in_seconds_with_one_line(cluster, tmp_path):
    """2 tasks but the command started once, by the batch shell: Lightning would wait forever for rank 1. (Every
    other mismatch of a job and the trainer: test_config_errors.py, with the variables Slurm sets.)"""
    workdir = make_workdir(tmp_path)
    script = workdir / "no-srun.sbatch"
    script.write_text(SCRIPT.read_text().replace('srun --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" ', ""))
    start = time.monotonic()
    fields, output = _finish(cluster, _submit(cluster, workdir, "records", script=script), workdir, timeout=60)
    assert fields["JobState"] == "FAILED" and time.monotonic() - start < 60
    errors = [line for line in output.splitlines() if line.startswith("tiny-audio fit: error:")]
    assert errors == ["tiny-audio fit: error: this Slurm job has 2 tasks but the command was not started by srun: "
                      "each rank would wait for the others forever. Start it as `srun tiny-audio fit ...` in the job "
                      "script"], output[-2000:]
    assert "Traceback" not in output
