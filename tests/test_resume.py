"""Nothing lost: SIGKILL and SIGTERM mid-run, then ``--ckpt_path last``, on the real CLI and tiny assets.

One uninterrupted run is the reference for every interrupted one. An epoch of the smoke data is 80
clips = 20 batches of 4 = 10 optimizer steps at 2 batches per step, so 14 steps run into a second pass.
"""

import datetime
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from conftest import (
    DECODER,
    NO_WORKERS,
    SMOKE,
    assert_same_training,
    cli,
    cli_env,
    last_checkpoint,
    later_day,
    make_workdir,
    on_day,
    run_here,
)

STEPS = 14
# 2 batches per optimizer step, a checkpoint every 2 steps, 2 dataloader workers (smoke.yaml), window shuffle
RUN = ["--trainer.accumulate_grad_batches", "2", "--checkpoint.every_n_train_steps", "2",
       "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--data.batch_size", "4",
       "--data.shuffle_buffer", "16", "--trainer.enable_progress_bar", "false", "--trainer.max_steps", str(STEPS)]
ENV = cli_env()


def _command(*args: str) -> list[str]:
    """The run in a process of its own: for a signal sent to it, or a moved clock."""
    return cli("fit", "-c", SMOKE, *RUN, *args)


def _fit(workdir: Path, *args: str) -> str:
    """The run in this process (``run_here``); its output."""
    result = run_here(workdir, "fit", "-c", SMOKE, *RUN, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _checkpoints(workdir: Path) -> Path:
    return workdir / "lightning_logs/version_0/checkpoints"


def _wait_for_step(workdir: Path, process: subprocess.Popen, step: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (_checkpoints(workdir) / f"step={step}.ckpt").exists():
            return
        time.sleep(0.02)
    raise AssertionError(f"no step-{step} checkpoint appeared: {process.communicate()[0][-2000:]}")


def _assert_same_training(resumed: dict, expected: dict) -> None:
    """The uninterrupted run's end: step STEPS, and the same weights, Adam moments and LR schedule."""
    assert resumed["global_step"] == STEPS
    assert_same_training(resumed, expected)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run: a checkpoint every 2 steps, in its own folder."""
    workdir = make_workdir(tmp_path_factory.mktemp("straight"))
    _fit(workdir)
    return workdir


def test_last_is_a_link_to_the_newest_step_not_a_second_copy(straight):
    last = _checkpoints(straight) / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == f"step={STEPS}.ckpt"
    assert sorted(p.name for p in _checkpoints(straight).iterdir()) == sorted(
        ["last.ckpt"] + [f"step={n}.ckpt" for n in range(2, STEPS + 1, 2)])  # no temporary link left behind


@pytest.mark.parametrize("step", [12, 10], ids=["inside-the-second-pass", "at-a-pass-boundary"])
def test_resume_in_a_later_pass_equals_an_uninterrupted_run(straight, tmp_path, step):
    """Resumed from step 12 (4 batches into the second pass) or 10 (the end of the first pass)."""
    resumed = make_workdir(tmp_path / "resumed")
    start = resumed / "start.ckpt"
    shutil.copy(_checkpoints(straight) / f"step={step}.ckpt", start)
    _fit(resumed, "--ckpt_path", str(start))
    _assert_same_training(last_checkpoint(resumed), last_checkpoint(straight))
    later = sorted(p.name for p in _checkpoints(straight).glob("step=*.ckpt") if int(p.stem[5:]) > step)
    assert sorted(p.name for p in _checkpoints(resumed).glob("step=*.ckpt")) == later


def test_a_resume_on_another_day_trains_on_the_prompt_the_run_started_with(straight, tmp_path):
    """The tiny SmolLM3's chat template, like SmolLM3's, writes the day's date into every prompt. Resumed on a later
    day, whose date is longer or shorter, the run still trains on the token ids of the day it started."""
    day = later_day(40)
    resumed = make_workdir(tmp_path / "resumed")
    start = resumed / "start.ckpt"
    shutil.copy(_checkpoints(straight) / "step=10.ckpt", start)
    subprocess.run(on_day(day, _command("--ckpt_path", str(start))), cwd=resumed, env=ENV, check=True,
                   capture_output=True)
    _assert_same_training(last_checkpoint(resumed), last_checkpoint(straight))
    kept = last_checkpoint(straight)["hyper_parameters"]["prompt_ids"]
    assert last_checkpoint(resumed)["hyper_parameters"]["prompt_ids"] == kept
    config = yaml.safe_load((resumed / "lightning_logs/version_0/config.yaml").read_text())
    assert config["model"]["prompt_ids"] == kept
    # The resumed run's clock was on that day (its event file is named by the time it was made), and the prompt it
    # kept holds the start day's date, as the template wrote it: that day's own rendering (a date of another length,
    # later_day) would be another prompt.
    day_of = {run: datetime.date.fromtimestamp(int(next((run / "lightning_logs/version_0").glob(
        "events.out.tfevents.*")).name.split(".")[3])) for run in (straight, resumed)}
    assert day_of[resumed] == day
    prefix = AutoTokenizer.from_pretrained(DECODER).decode(kept["prompts"]["Transcribe: <audio>"][0])
    assert f"{day_of[straight]:%d %B %Y}" in prefix


def _assert_last_names_the_newest_step(workdir: Path) -> None:
    """``last.ckpt`` links to the final step, and no versioned ``last-v1.ckpt`` or ``step=N-v1.ckpt`` was written."""
    assert os.readlink(_checkpoints(workdir) / "last.ckpt") == f"step={STEPS}.ckpt"
    assert not [p.name for p in _checkpoints(workdir).iterdir() if "-v" in p.name]


def test_sigkill_after_the_first_checkpoint_then_resume_twice_never_goes_back(straight, tmp_path):
    """The run's first checkpoint holds no ``last`` path yet: resumed from it, ``last.ckpt`` must still move on, so
    that a second ``--ckpt_path last`` finds the final step and trains nothing again."""
    crashed = make_workdir(tmp_path / "crashed")
    process = subprocess.Popen(_command(), cwd=crashed, env=ENV, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    _wait_for_step(crashed, process, 2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert max(int(p.stem[5:]) for p in _checkpoints(crashed).glob("step=*.ckpt")) < STEPS  # linked as last or not
    _fit(crashed, "--ckpt_path", "last")
    _assert_same_training(last_checkpoint(crashed), last_checkpoint(straight))
    _assert_last_names_the_newest_step(crashed)
    files = sorted(p.name for p in _checkpoints(crashed).iterdir())
    assert "resuming from lightning_logs/version_0/checkpoints/last.ckpt" in _fit(crashed, "--ckpt_path", "last")
    assert sorted(p.name for p in _checkpoints(crashed).iterdir()) == files  # nothing retrained
    _assert_same_training(last_checkpoint(crashed), last_checkpoint(straight))


def test_ckpt_path_auto_resumes_a_step_never_linked_as_last(straight, tmp_path):
    """A kill between the run's first step file and its ``last.ckpt`` link leaves that step alone: ``--ckpt_path
    auto`` resumes from it instead of starting a new run beside it (``last`` finds it the same way)."""
    workdir = make_workdir(tmp_path / "unlinked")
    _checkpoints(workdir).mkdir(parents=True)
    shutil.copy(_checkpoints(straight) / "step=2.ckpt", _checkpoints(workdir))
    assert "resuming from lightning_logs/version_0/checkpoints/step=2.ckpt" in _fit(workdir, "--ckpt_path", "auto")
    _assert_same_training(last_checkpoint(workdir), last_checkpoint(straight))


def test_ckpt_path_last_passes_over_a_last_behind_a_newer_step(straight, tmp_path):
    """A ``last.ckpt`` left at an older step (a folder from an older version, a kill between a step and its link)."""
    workdir = make_workdir(tmp_path / "behind")
    shutil.copytree(_checkpoints(straight), _checkpoints(workdir), symlinks=True)
    (_checkpoints(workdir) / "last.ckpt").unlink()
    (_checkpoints(workdir) / "last.ckpt").symlink_to("step=6.ckpt")
    output = _fit(workdir, "--ckpt_path", "last")
    assert f"last.ckpt is behind step={STEPS}.ckpt, the newest step saved beside it" in output
    assert f"resuming from lightning_logs/version_0/checkpoints/step={STEPS}.ckpt" in output
    assert sorted(p.name for p in _checkpoints(workdir).iterdir()) == sorted(
        p.name for p in _checkpoints(straight).iterdir())  # nothing retrained


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_to_the_process_group_saves_the_step_exits_0_and_resumes_exactly(straight, tmp_path, stop):
    """What Slurm, systemd and `docker stop` do (SIGTERM), and a terminal's Ctrl-C (SIGINT): the signal reaches the
    dataloader workers too."""
    workdir = make_workdir(tmp_path / "stopped")
    process = subprocess.Popen(_command(), cwd=workdir, env=ENV, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)  # its own process group
    _wait_for_step(workdir, process, 4)
    time.sleep(random.Random(1).uniform(0.0, 0.2))
    os.killpg(process.pid, stop)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output[-2000:]
    assert "Traceback" not in output
    saved = last_checkpoint(workdir)["global_step"]
    assert saved < STEPS and f"{stop.name}: saved step {saved}; continue with --ckpt_path last" in output
    assert (_checkpoints(workdir) / f"step={saved}.ckpt").is_file()
    assert os.readlink(_checkpoints(workdir) / "last.ckpt") == f"step={saved}.ckpt"

    _fit(workdir, "--ckpt_path", "last")
    _assert_same_training(last_checkpoint(workdir), last_checkpoint(straight))
    _assert_last_names_the_newest_step(workdir)


def test_a_second_ctrl_c_stops_at_once():
    """The first Ctrl-C is noted (the step in progress ends and is saved); a second one interrupts at once."""
    from lightning.pytorch import Trainer

    from tiny_audio_pl.cluster import StopSignals

    signals = StopSignals(Trainer(accelerator="cpu", logger=False, enable_progress_bar=False))
    signals._note(signal.SIGINT, None)
    assert signals.received == {signal.SIGINT} and signals.received_sigterm  # not training: stop at the next batch
    with pytest.raises(KeyboardInterrupt):
        signals._note(signal.SIGINT, None)


def test_diverging_run_skips_nonfinite_steps_then_stops_with_a_clear_error(tmp_path):
    workdir = make_workdir(tmp_path / "diverging")
    result = run_here(workdir, "fit", "-c", SMOKE, *RUN, "--trainer.max_steps", "40", "--model.learning_rate", "1e30",
                      "--model.warmup_steps", "0", *NO_WORKERS)
    assert result.returncode != 0
    assert "5 times in a row" in result.stderr and "lower model.learning_rate" in result.stderr


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path):
    from tiny_audio_pl.checkpoint import AtomicCheckpointIO, read_checkpoint

    class Unpicklable:
        def __reduce__(self):
            raise KeyboardInterrupt("killed mid-save")

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 3, "weights": torch.ones(1000)}, target)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 4, "weights": torch.zeros(1000), "boom": Unpicklable()}, target)
    assert read_checkpoint(target)["global_step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


@pytest.mark.parametrize("mmap", [False, True])
def test_a_truncated_checkpoint_is_refused(tmp_path, mmap):
    from tiny_audio_pl.checkpoint import AtomicCheckpointIO, read_checkpoint
    from tiny_audio_pl.errors import UsageError

    whole = tmp_path / "whole.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 3, "weights": torch.ones(100_000)}, whole)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert read_checkpoint(whole, mmap=mmap)["global_step"] == 3
    with pytest.raises(UsageError, match="truncated.ckpt.*truncated, corrupt"):
        read_checkpoint(truncated, mmap=mmap)
