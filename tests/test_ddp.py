"""Two-process DDP on CPU (gloo) through the real ``tiny-audio fit`` on the tiny assets.

Lightning's ``ddp`` strategy relaunches the command once per extra rank. The callback in
``tests/ddp_callback.py`` (put on ``PYTHONPATH``) makes every rank write what it trained on and its
own validation numbers, so the test can check that:

1. the ranks train on disjoint clips of the train split, and keep their gradients in sync;
2. ``val/wer`` and ``val/loss`` are reduced over both ranks, and rank 0 alone logs them;
3. ``--ckpt_path last`` under DDP continues from the saved step, in the same run folder, each rank
   from its own position in its own part of the stream (shards of unequal length make the ranks'
   positions differ), on clips neither rank had trained on yet.
"""

import json
import os
import signal
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, SMOKE, SPEECH, cli, cli_env

FIRST, SECOND = 3, 6  # optimizer steps of the first run, and of the resumed one
BATCH = 4  # clips per rank and step: 6 steps x 4 clips stay inside one epoch of a rank's 28 or 36 clips
RUN = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
       "--trainer.val_check_interval", str(FIRST), "--checkpoint.every_n_train_steps", str(FIRST),
       "--data.num_workers", "0", "--data.batch_size", str(BATCH), "--data.max_eval_samples", "4",
       "--model.max_new_tokens", "4", "--trainer.enable_progress_bar", "false",
       "--trainer.callbacks+=ddp_callback.RankRecorder"]


def _fit(workdir: Path, record_dir: str, *args: str) -> str:
    """Run a 2-rank ``tiny-audio fit``; on a hang, kill every rank (they share a process group)."""
    env = cli_env(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen(cli("fit", "-c", SMOKE, *RUN, "--trainer.callbacks.dirpath", record_dir, *args),
                               cwd=workdir, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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


def _uneven_copy(workdir: Path) -> Path:
    """The tiny train clips in shards of 4, 24, 24 and 12: rank 0 streams shards 0 and 2, rank 1 shards 1 and 3,
    so after the first shuffle window of 8 clips the ranks stand at different positions of their streams."""
    clips = pa.concat_tables([pq.read_table(f) for f in sorted(Path(SPEECH, "train").glob("*.parquet"))])
    dataset = workdir / "uneven"
    (dataset / "train").mkdir(parents=True)
    (dataset / "dev").symlink_to(Path(SPEECH, "dev"))
    start = 0
    for index, size in enumerate([4, 24, 24, 12]):
        pq.write_table(clips.slice(start, size), dataset / "train" / f"train-{index:05d}.parquet")
        start += size
    return dataset


def test_two_rank_ddp_fit_splits_the_data_reduces_validation_and_resumes(workdir):
    train_ids = {i for f in sorted(Path(SPEECH, "train").glob("*.parquet"))
                 for i in pq.read_table(f, columns=["ID"]).column("ID").to_pylist()}
    assert len(train_ids) == 80
    run = workdir / "lightning_logs" / "version_0"
    data = ["--data.dataset", str(_uneven_copy(workdir)), "--data.shuffle_buffer", "8"]

    # ------------------------------------------------------------------ first run: steps 0 .. FIRST
    _fit(workdir, "first", *data, "--trainer.max_steps", str(FIRST))
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
    assert sorted(p.name for p in (workdir / "lightning_logs").iterdir()) == ["version_0"]

    # ---------------------------------------------------- resumed run: steps FIRST .. SECOND
    output = _fit(workdir, "second", *data, "--trainer.max_steps", str(SECOND), "--ckpt_path", "last")
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
