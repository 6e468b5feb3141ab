"""Two processes on the CPU (DDP over gloo) through the real ``tiny-audio fit`` on the tiny assets: started by
Lightning, and as the tasks of Slurm jobs on a real one-node Slurm (Debian's ``slurm-wlm`` and ``munge``, started
by ``slurm_cluster.py``).

Lightning's ``ddp`` strategy relaunches the command once per extra rank. The callback in
``tests/ddp_callback.py`` (put on ``PYTHONPATH``) makes every rank write what it trained on and its
own validation numbers, so the tests can check that:

1. the ranks train on disjoint clips of the train split, and keep their gradients in sync;
2. ``val/wer`` and ``val/loss`` are reduced over both ranks, and rank 0 alone logs them;
3. ``--ckpt_path last`` under DDP continues from the saved step, in the same run folder, each rank
   from its own position in its own part of the stream (shards of unequal length make the ranks'
   positions differ), on clips neither rank had trained on yet.

The same run as a Slurm job is the user's own ``scripts/slurm/fit.sbatch`` submitted with ``sbatch``, 2
tasks on 2 CPUs, only the GPU and CPU counts and the run's own settings changed on the command line:

4. a job's ranks are its Slurm tasks; sent Slurm's requeue signal (``scancel --signal=USR1``, what
   ``--signal=USR1@120`` sends before a time limit) mid-run, it saves its step once, requeues itself,
   and the requeued job resumes in the same run folder at that step and data position and runs to
   the end; it trains on the same clips and ends with the same weights, Adam moments and LR schedule
   (1e-6) as the plain run; no ``hpc_ckpt`` anywhere;
5. a job that runs into its time limit without a warning signal (the script without ``--signal``)
   saves on Slurm's SIGTERM: every rank's last complete step, once, at the plain run's data position (the
   next submission starts as the requeued job of 4 does);
6. a job script that starts the command without ``srun`` fails in seconds with one line (the other
   mismatches of a job and the trainer are in ``test_config_errors.py``).

The time-limited job is submitted first and waits for its limit (60-90 s) beside the other tests.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from slurm_cluster import SlurmCluster, missing
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, SMOKE, SPEECH, assert_same_training, cli, cli_env, make_workdir

FIRST, SECOND = 3, 6  # optimizer steps of the first run, and of the resumed one
BATCH = 4  # clips per rank and step: 6 steps x 4 clips stay inside one epoch of a rank's 28 or 36 clips
TRAIN = ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.val_check_interval", str(FIRST),
         "--checkpoint.every_n_train_steps", str(FIRST), "--data.num_workers", "0", "--data.batch_size", str(BATCH),
         "--data.max_eval_samples", "4", "--model.max_new_tokens", "4", "--trainer.enable_progress_bar", "false",
         "--trainer.callbacks+=ddp_callback.RankRecorder"]
RUN = [*TRAIN, "--trainer.devices", "2"]
SCRIPT = ROOT / "scripts" / "slurm" / "fit.sbatch"
JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]  # the test machine's shape
needs_slurm = pytest.mark.skipif(missing() is not None, reason=f"{missing()}; .ci/run installs it")


def _env(**extra: str) -> dict[str, str]:
    """The CLI's test environment with the test callback importable and no Slurm job's variables."""
    python_path = os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    return {k: v for k, v in cli_env(PYTHONPATH=python_path, **extra).items() if not k.startswith("SLURM_")}


def _fit(workdir: Path, record_dir: str, *args: str) -> str:
    """Run a 2-rank ``tiny-audio fit``; on a hang, kill every rank (they share a process group)."""
    process = subprocess.Popen(cli("fit", "-c", SMOKE, *RUN, "--trainer.callbacks.dirpath", record_dir, *args),
                               cwd=workdir, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output = process.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise RuntimeError(f"DDP fit hung (a collective one rank never joined?):\n{process.communicate()[0][-4000:]}"
                           ) from None
    if process.returncode != 0:
        raise RuntimeError(f"DDP fit exited {process.returncode}:\n{output[-4000:]}")
    return output


def _records(record_dir: Path) -> dict[int, list[dict]]:
    """Each rank's records, by rank."""
    files = sorted(record_dir.glob("rank*.jsonl"))
    return {int(f.stem.removeprefix("rank")): [json.loads(line) for line in f.read_text().splitlines()] for f in files}


def _trained(records: list[dict]) -> list[str]:
    return [i for r in records if r["event"] == "train_batch" for i in r["ids"]]


def _steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if r["event"] == "train_batch"]


def _validation(records: list[dict], event: str) -> dict:
    found = [r for r in records if r["event"] == event and not r["sanity"]]
    assert len(found) == 1, found  # one validation in each run, at its last step
    return found[0]


def _scalars(event_file: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _weights_sum(checkpoint: dict) -> float:
    return sum(v.double().sum().item() for v in checkpoint["state_dict"].values())


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """The tiny train clips in shards of 4, 24, 24 and 12: rank 0 streams shards 0 and 2, rank 1 shards 1 and 3,
    so after the first shuffle window of 8 clips the ranks stand at different positions of their streams."""
    clips = pa.concat_tables([pq.read_table(f) for f in sorted(Path(SPEECH, "train").glob("*.parquet"))])
    dataset = tmp_path_factory.mktemp("uneven")
    (dataset / "train").mkdir(parents=True)
    (dataset / "dev").symlink_to(Path(SPEECH, "dev"))
    start = 0
    for index, size in enumerate([4, 24, 24, 12]):
        pq.write_table(clips.slice(start, size), dataset / "train" / f"train-{index:05d}.parquet")
        start += size
    return dataset


def _data(uneven: Path) -> list[str]:
    return ["--data.dataset", str(uneven), "--data.shuffle_buffer", "8"]


@pytest.fixture(scope="module")
def plain(uneven, tmp_path_factory) -> tuple[Path, str]:
    """Lightning's own 2-process run: FIRST steps, then resumed with ``--ckpt_path last`` to SECOND. Its folder
    (records in ``first/`` and ``second/``) and what the resumed run printed."""
    workdir = make_workdir(tmp_path_factory.mktemp("plain"))
    _fit(workdir, "first", *_data(uneven), "--trainer.max_steps", str(FIRST))
    shutil.copytree(workdir / "lightning_logs", workdir / "after-first")  # what the first run left, for the test
    return workdir, _fit(workdir, "second", *_data(uneven), "--trainer.max_steps", str(SECOND), "--ckpt_path", "last")


def test_two_rank_ddp_fit_splits_the_data_reduces_validation_and_resumes(plain):
    workdir, output = plain
    train_ids = {i for f in sorted(Path(SPEECH, "train").glob("*.parquet"))
                 for i in pq.read_table(f, columns=["ID"]).column("ID").to_pylist()}
    assert len(train_ids) == 80
    run = workdir / "after-first" / "version_0"

    # ------------------------------------------------------------------ first run: steps 0 .. FIRST
    first = _records(workdir / "first")
    assert sorted(first) == [0, 1], "both ranks must record"
    assert {r["world"] for records in first.values() for r in records} == {2}
    assert len({r["pid"] for records in first.values() for r in records}) == 2  # two processes

    # 1. disjoint training data, every clip a train clip, none twice on a rank; gradients synced
    seen = {rank: _trained(records) for rank, records in first.items()}
    for rank, ids in seen.items():
        assert _steps(first[rank]) == list(range(FIRST)), rank
        assert len(ids) == FIRST * BATCH and len(set(ids)) == len(ids), (rank, ids)
        assert set(ids) <= train_ids, set(ids) - train_ids
    assert not set(seen[0]) & set(seen[1]), f"both ranks trained on {sorted(set(seen[0]) & set(seen[1]))}"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == FIRST
    assert (run / "checkpoints" / f"step={FIRST}.ckpt").is_file()
    ends = {rank: [r for r in records if r["event"] == "train_end"] for rank, records in first.items()}
    assert all(len(e) == 1 for e in ends.values()), ends
    assert ends[0][0]["weights_sum"] == pytest.approx(ends[1][0]["weights_sum"], abs=1e-6)  # DDP averaged grads
    assert ends[0][0]["weights_sum"] == pytest.approx(_weights_sum(checkpoint), abs=1e-6)
    assert ends[0][0]["weights_moved"] > 0  # the projector did train

    # 2. validation reduced over both ranks, logged once by rank 0
    local = {rank: _validation(records, "val_local") for rank, records in first.items()}
    reduced = {rank: _validation(records, "val_reduced") for rank, records in first.items()}
    for rank in (0, 1):
        assert local[rank]["wer_metrics"] == local[rank]["loss_metrics"] == 1, local[rank]  # one evaluation set
        assert local[rank]["words"] > 0 and local[rank]["loss_count"] > 0, local[rank]
    wer = (local[0]["errors"] + local[1]["errors"]) / (local[0]["words"] + local[1]["words"])
    loss = (local[0]["loss_sum"] + local[1]["loss_sum"]) / (local[0]["loss_count"] + local[1]["loss_count"])
    own_wer, own_loss = local[0]["errors"] / local[0]["words"], local[0]["loss_sum"] / local[0]["loss_count"]
    assert own_wer != pytest.approx(wer) and own_loss != pytest.approx(loss), "the ranks must validate differently"
    for rank in (0, 1):
        assert reduced[rank]["wer"] == pytest.approx(wer, rel=1e-6), (rank, reduced[rank], local)
        assert reduced[rank]["loss"] == pytest.approx(loss, rel=1e-6), (rank, reduced[rank], local)
    event_files = sorted(run.glob("events.out.tfevents.*"))
    assert len(event_files) == 1 and event_files[0].name.split(".")[-2] == str(first[0][0]["pid"])  # rank 0's
    logged = _scalars(event_files[0])
    assert logged.get("val/wer") == [pytest.approx(wer, rel=1e-6)], logged
    assert logged.get("val/loss") == [pytest.approx(loss, rel=1e-6)], logged
    assert sorted(p.name for p in (workdir / "after-first").iterdir()) == ["version_0"]

    # ---------------------------------------------------- resumed run: steps FIRST .. SECOND
    run = workdir / "lightning_logs" / "version_0"
    assert f"resuming from {Path('lightning_logs/version_0/checkpoints/last.ckpt')}" in output
    second = _records(workdir / "second")
    assert sorted(second) == [0, 1]
    for rank in (0, 1):
        assert _steps(second[rank]) == list(range(FIRST, SECOND)), (rank, _steps(second[rank]))
        more = _trained(second[rank])
        assert len(set(more)) == len(more) == (SECOND - FIRST) * BATCH and set(more) <= train_ids
        assert not set(more) & set(seen[rank]), f"rank {rank} trained again on {set(more) & set(seen[rank])}"
    assert not set(_trained(second[0])) & set(_trained(second[1]))
    assert not set(_trained(second[0])) & set(seen[1]) and not set(_trained(second[1])) & set(seen[0])
    assert (run / "checkpoints" / f"step={SECOND}.ckpt").is_file()
    resumed = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == SECOND
    ends = [r for records in second.values() for r in records if r["event"] == "train_end"]
    assert len(ends) == 2 and ends[0]["weights_sum"] == pytest.approx(ends[1]["weights_sum"], abs=1e-6)
    assert sorted(p.name for p in (workdir / "lightning_logs").iterdir()) == ["version_0"]  # same run folder


# ------------------------------------------------------------------------------------------------ Slurm jobs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[SlurmCluster | None]:
    """4 CPUs on the 2-core machine: the time-limited job, which mostly sleeps, runs beside the others. None
    where Slurm is not installed (the Slurm tests skip)."""
    if missing():
        yield None
        return
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=4) as running:
        yield running


@pytest.fixture(scope="module", autouse=True)
def time_limited(cluster, uneven, tmp_path_factory) -> tuple[str, Path] | None:
    """Submitted before the module's tests, as it waits for its time limit (60-90 s: Slurm checks every 30 s): the
    job script without --signal, so that Slurm's SIGTERM at the limit is the only warning (SIGKILL 30 s later).
    20 s a step (the pause ends at a signal): the job would need 2 minutes. Its id and folder."""
    if cluster is None:
        return None
    workdir = make_workdir(tmp_path_factory.mktemp("time-limited"))
    script = workdir / "no-signal.sbatch"
    script.write_text(re.sub(r"(?m)^#SBATCH --(signal|requeue).*\n", "", SCRIPT.read_text()))
    return _submit(cluster, workdir, uneven, "--time=1", script=script, pause=20), workdir


def _submit(cluster: SlurmCluster, workdir: Path, uneven: Path, *args: str, script: Path = SCRIPT,
            pause: float = 0) -> str:
    """``sbatch [args] SCRIPT`` in ``workdir`` for the plain run's training (to SECOND, records in ``records/``):
    the job id."""
    env = cluster.env(**_env(CONFIG=SMOKE, RUNS="runs/exp"))
    fit = [*TRAIN, *_data(uneven), "--trainer.max_steps", str(SECOND), "--trainer.callbacks.dirpath", "records",
           "--trainer.callbacks.pause", str(pause)]
    result = subprocess.run(["sbatch", "--parsable", *JOB, *args, str(script), *fit], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=30)
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


def _job_run(workdir: Path) -> Path:
    return workdir / "runs" / "exp" / "lightning_logs" / "version_0"


def _last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _plain_trained(plain: tuple[Path, str]) -> dict[int, list[str]]:
    first, second = _records(plain[0] / "first"), _records(plain[0] / "second")
    return {rank: _trained(first[rank]) + _trained(second[rank]) for rank in first}


def _only_our_checkpoints(workdir: Path, steps: set[int]) -> None:
    """One mechanism saved: the run's own step files and ``last``, no Lightning ``hpc_ckpt`` anywhere."""
    assert not list(workdir.rglob("hpc_ckpt*")), list(workdir.rglob("hpc_ckpt*"))
    names = sorted(p.name for p in (_job_run(workdir) / "checkpoints").iterdir())
    assert names == sorted(["last.ckpt", *(f"step={n}.ckpt" for n in steps)]), names
    assert sorted(p.name for p in _job_run(workdir).parent.iterdir()) == ["version_0"]


@needs_slurm
def test_a_job_requeued_by_its_signal_resumes_exactly_and_ends_as_the_plain_run(cluster, uneven, plain, tmp_path):
    workdir = make_workdir(tmp_path)
    job = _submit(cluster, workdir, uneven, pause=0.5)
    deadline = time.monotonic() + 120
    while not (_job_run(workdir) / "checkpoints" / f"step={FIRST}.ckpt").exists():
        assert time.monotonic() < deadline and cluster.job(job).get("JobState") in ("PENDING", "RUNNING")
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster.env(), check=True, timeout=30)
    cluster.wait_for(job, {"PENDING"}, 60)  # requeued by the job itself
    cluster.release(job)
    fields, output = _finish(cluster, job, workdir)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", f"{fields}\n{output[-3000:]}"

    saved = int(re.search(r"SIGUSR1: saved step (\d+); requeuing Slurm job (\d+)", output).group(1))
    assert FIRST <= saved < SECOND, output[-3000:]
    assert output.count("saved step") == 1  # rank 0 says it, once
    assert f"resuming from {Path('runs/exp/lightning_logs/version_0/checkpoints/last.ckpt')}" in output
    records = _records(workdir / "records")
    assert sorted(records) == [0, 1]
    for rank, rows in records.items():  # two starts of two processes, each the Slurm task of its rank
        assert {(r["world"], r["slurm_procid"]) for r in rows} == {(2, str(rank))}
        assert len({r["pid"] for r in rows}) == 2
        assert _steps(rows) == list(range(SECOND)), (rank, _steps(rows))  # the requeued start went on from there
    assert {rank: _trained(rows) for rank, rows in records.items()} == _plain_trained(plain)  # the data position
    _only_our_checkpoints(workdir, {FIRST, SECOND, saved})
    assert_same_training(_last(_job_run(workdir)), _last(plain[0] / "lightning_logs" / "version_0"))


@needs_slurm
def test_a_job_at_its_time_limit_saves_its_last_complete_step(cluster, plain, time_limited):
    """Slurm's SIGTERM at the limit is the only warning: every rank stops after the same step, saved once, whole, at
    the plain run's data position. (A start that resumes from such a step is the requeued job's, test 4: the same
    script, ``--ckpt_path auto``, the same run folder.)"""
    job, workdir = time_limited
    fields, output = _finish(cluster, job, workdir, timeout=180)
    assert fields["JobState"] == "TIMEOUT", f"{fields}\n{output[-3000:]}"
    saved = int(re.search(r"SIGTERM: saved step (\d+); submit the job script again to continue", output).group(1))
    assert 1 <= saved < SECOND and _last(_job_run(workdir))["global_step"] == saved
    _only_our_checkpoints(workdir, {saved} | ({FIRST} if saved >= FIRST else set()))
    records = _records(workdir / "records")
    assert all(_steps(rows) == list(range(saved)) for rows in records.values()), records  # every rank, every step
    plain_trained = _plain_trained(plain)
    assert {rank: _trained(rows) for rank, rows in records.items()} == {
        rank: ids[:saved * BATCH] for rank, ids in plain_trained.items()}


@needs_slurm
def test_a_job_script_without_srun_fails_in_seconds_with_one_line(cluster, uneven, tmp_path):
    """2 tasks but the command started once, by the batch shell: Lightning would wait forever for rank 1. (Every
    other mismatch of a job and the trainer: test_config_errors.py, with the variables Slurm sets.)"""
    workdir = make_workdir(tmp_path)
    script = workdir / "no-srun.sbatch"
    script.write_text(SCRIPT.read_text().replace('srun --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" ', ""))
    start = time.monotonic()
    fields, output = _finish(cluster, _submit(cluster, workdir, uneven, script=script), workdir, timeout=60)
    assert fields["JobState"] == "FAILED" and time.monotonic() - start < 30  # seconds, not a hang
    errors = [line for line in output.splitlines() if line.startswith("tiny-audio fit: error:")]
    assert errors == ["tiny-audio fit: error: this Slurm job has 2 tasks but the command was not started by srun: "
                      "each rank would wait for the others forever. Start it as `srun tiny-audio fit ...` in the job "
                      "script"], output[-2000:]
    assert "Traceback" not in output

