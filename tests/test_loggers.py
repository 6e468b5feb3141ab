"""Experiment trackers the Lightning way: W&B (offline), MLflow (a local file store), CSV, with TensorBoard.

Runs in a row each keep their own folder (config, per-utterance file, checkpoints), every logger
holds the scalars (validation at the step the checkpoint names) and the results table, and
``--ckpt_path last`` resumes the newest into the same run, whichever logger comes first.
"""

from __future__ import annotations

import csv
import glob
import json
import re
import struct
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import NO_WORKERS, SMOKE, run_here

STEPS = 4
RUN = ["fit", "-c", SMOKE, "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", str(STEPS),
       "--data.max_eval_samples", "4", "--model.max_new_tokens", "6", "--trainer.enable_progress_bar", "false",
       "--checkpoint.every_n_train_steps", str(STEPS), "--trainer.log_every_n_steps", "2", *NO_WORKERS]
LOGGERS = {"WandbLogger": {}, "MLFlowLogger": {},  # MLflow's folder: _with_loggers
           "CSVLogger": {"save_dir": "."},
           "TensorBoardLogger": {"save_dir": "."}}


def _with_loggers(order: list[str], workdir: Path) -> list[str]:
    """The loggers in ``order``, the first in place of the default TensorBoard logger, each with its own arguments.
    MLflow's folder is given whole: MLflow keeps one store per tracking URI for the life of a process, made with its
    folder the first time, so a relative ``./mlruns`` would not exist in a later test's folder."""
    arguments = {**LOGGERS, "MLFlowLogger": {"save_dir": str(workdir / "mlruns")}}
    return [f"--trainer.logger{'+=' if i else '='}" + json.dumps({"class_path": name, "init_args": arguments[name]})
            for i, name in enumerate(order)]


def _wandb_history(run: Path) -> dict[str, list]:
    """The logged values of a W&B offline run, by key, read from its ``.wandb`` transaction log: a LevelDB-style
    log (32 KiB blocks of records with a 7-byte header: crc, length, type full/first/middle/last) of protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = next(run.glob("*.wandb")).read_bytes()
    block, position, pending, history = 32768, 7, b"", {}
    while position + 7 <= len(data):
        room = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if room >= 7 else (0, 0, 0)
        if room < 7 or (length == 0 and kind == 0):
            position += room
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a record's last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                for key, value in items.items():
                    history.setdefault(key, []).append((items.get("trainer/global_step"), value))
    return history


def _check_trackers(workdir: Path, output: str, loggers: list[str]) -> None:
    """Every tracker of the run that printed ``output`` holds train/loss, val/wer at step STEPS and the table."""
    csv_dir = Path(workdir, re.search(r"^csv\s+(\S+)/metrics.csv", output, re.M).group(1))
    rows = list(csv.DictReader((csv_dir / "metrics.csv").read_text().splitlines()))
    assert any(r["train/loss"] for r in rows) and [int(r["step"]) for r in rows if r["val/wer"]] == [STEPS]
    assert "WER %" in (csv_dir / f"validation/step={STEPS}/results.txt").read_text()

    run_id = re.search(r"^mlflow\s+run (\w+)", output, re.M).group(1)
    (mlflow_run,) = glob.glob(str(workdir / "mlruns" / "*" / run_id))
    assert (Path(mlflow_run) / "metrics/train/loss").is_file()
    assert (Path(mlflow_run) / "metrics/val/wer").read_text().split()[2] == str(STEPS)  # timestamp value step
    assert "WER %" in (Path(mlflow_run) / f"artifacts/validation/step={STEPS}/results.txt").read_text()

    if "WandbLogger" in loggers:
        wandb_id = re.search(r"^wandb\s+run (\w+)", output, re.M).group(1)
        (wandb_run,) = (workdir / "wandb").glob(f"offline-run-*-{wandb_id}")
        history = _wandb_history(wandb_run)
        assert "train/loss" in history and [step for step, _ in history["val/wer"]] == [STEPS]
        assert list((wandb_run / "files/media/table/val").glob("results_*.table.json"))

    tensorboard = max(glob.glob(str(workdir / "lightning_logs/*/events.out.tfevents.*")), key=lambda p:
                      Path(p).stat().st_mtime)  # this run's: the newest
    accumulator = EventAccumulator(tensorboard, size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    assert [s.step for s in accumulator.Scalars("val/wer")] == [STEPS]
    assert "val/results/text_summary" in accumulator.Tags()["tensors"]


# Each run and the resume run in this process, as the other commands' tests do (W&B starts its service process
# once for this process). The MLflow-first runs leave W&B out (its files are checked in the first), two before the
# resume, which then has to find the newer of two runs named by random ids.
@pytest.mark.parametrize("loggers, runs", [(list(LOGGERS), 1), (["MLFlowLogger", "CSVLogger", "TensorBoardLogger"], 2)],
                         ids=["WandbLogger", "MLFlowLogger"])
def test_runs_keep_their_own_files_in_every_tracker_and_the_newest_resumes(loggers, runs, workdir):
    wandb = loggers[0] == "WandbLogger"
    env = {"WANDB_MODE": "offline"} if wandb else {}
    outputs, folders = [], []
    for _ in range(runs):
        result = run_here(workdir, *RUN, *_with_loggers(loggers, workdir), **env)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout)
        folders.append(re.search(r"^run folder\s+(\S+)", result.stdout, re.M).group(1))  # MLflow's in full
    assert len(set(folders)) == runs
    for folder, output in zip(folders, outputs):
        run = workdir / folder
        assert (run / "config.yaml").is_file() and (run / f"utterances/step={STEPS}.tsv").is_file()
        assert (run / "checkpoints/last.ckpt").is_file()
        assert f"checkpoint   {folder}/checkpoints/last.ckpt" in output
        _check_trackers(workdir, output, loggers)
    # --ckpt_path last finds the newest run's checkpoint, and the run logs into its tracker's run again
    resumed = run_here(workdir, *RUN, *_with_loggers(loggers, workdir), "--trainer.max_steps", str(2 * STEPS),
                       "--ckpt_path", "last", **env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {folders[-1]}/checkpoints/last.ckpt" in resumed.stdout
    assert (workdir / folders[-1] / f"checkpoints/step={2 * STEPS}.ckpt").is_file()
    tracker = "wandb        run" if wandb else "mlflow       run"
    assert f"{tracker} {Path(folders[-1]).name}" in resumed.stdout, resumed.stdout


def test_a_trackers_missing_package_is_one_line(workdir):
    result = run_here(workdir, *RUN, "--trainer.logger", "NeptuneLogger")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "trainer.logger NeptuneLogger needs the neptune package: pip install neptune" in result.stderr
