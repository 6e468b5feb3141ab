"""Nothing lost: SIGKILL and SIGTERM mid-run, then ``--ckpt_path last``, on the real CLI and tiny assets."""

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import SMOKE, cli, cli_env, make_workdir

# 2 batches per optimizer step, a checkpoint every 4 steps (mid-epoch: an epoch is 10 batches)
RUN = ["--trainer.accumulate_grad_batches", "2", "--checkpoint.every_n_train_steps", "4",
       "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--data.batch_size", "8",
       "--data.shuffle_buffer", "16", "--trainer.enable_progress_bar", "false"]
ENV = cli_env()


def _command(*args: str) -> list[str]:
    return cli("fit", "-c", SMOKE, *RUN, *args)


def _last(workdir: Path) -> dict:
    return torch.load(workdir / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)


def _wait_for_step(workdir: Path, process: subprocess.Popen, step: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (workdir / f"lightning_logs/version_0/checkpoints/epoch=0-step={step}.ckpt").exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"no step-{step} checkpoint appeared: {process.communicate()[0][-2000:]}")


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight = make_workdir(tmp_path / "straight")
    subprocess.run(_command("--trainer.max_steps", "14"), cwd=straight, env=ENV, check=True, capture_output=True)

    crashed = make_workdir(tmp_path / "crashed")
    process = subprocess.Popen(_command("--trainer.max_steps", "14"), cwd=crashed, env=ENV, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for_step(crashed, process, 4)
    time.sleep(random.Random(0).uniform(0.0, 0.5))  # somewhere between step 4 and step 8
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert _last(crashed)["global_step"] < 14
    subprocess.run(_command("--trainer.max_steps", "14", "--ckpt_path", "last"), cwd=crashed, env=ENV, check=True,
                   capture_output=True)

    expected, resumed = _last(straight), _last(crashed)
    assert resumed["global_step"] == expected["global_step"] == 14
    for key, value in expected["state_dict"].items():
        assert (resumed["state_dict"][key] - value).abs().max() <= 1e-6, key
    assert resumed["lr_schedulers"] == expected["lr_schedulers"]


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    workdir = make_workdir(tmp_path / "preempted")
    process = subprocess.Popen(_command("--trainer.max_steps", "500"), cwd=workdir, env=ENV, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for_step(workdir, process, 4)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output[-2000:]
    saved = _last(workdir)["global_step"]
    assert f"SIGTERM: saved step {saved}" in output
    assert list((workdir / "lightning_logs/version_0/checkpoints").glob(f"epoch=*-step={saved}.ckpt"))

    subprocess.run(_command("--trainer.max_steps", str(saved + 2), "--ckpt_path", "last"), cwd=workdir, env=ENV,
                   check=True, capture_output=True)
    assert _last(workdir)["global_step"] == saved + 2


def test_corrupt_checkpoint_is_refused_clearly_and_nothing_is_overwritten(tmp_path):
    workdir = make_workdir(tmp_path / "corrupt")
    broken = workdir / "broken.ckpt"
    broken.write_bytes(b"\x80\x04not a checkpoint")
    result = subprocess.run(_command("--trainer.max_steps", "2", "--ckpt_path", str(broken)), cwd=workdir, env=ENV,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "cannot read checkpoint" in result.stderr and "broken.ckpt" in result.stderr
    assert broken.read_bytes() == b"\x80\x04not a checkpoint"
    assert not list(workdir.glob("lightning_logs/*/checkpoints/*.ckpt"))


def test_diverging_run_skips_nonfinite_steps_then_stops_with_a_clear_error(tmp_path):
    workdir = make_workdir(tmp_path / "diverging")
    result = subprocess.run(_command("--trainer.max_steps", "40", "--model.learning_rate", "1e30",
                                     "--model.warmup_steps", "0"), cwd=workdir, env=ENV, capture_output=True, text=True)
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

    whole = tmp_path / "whole.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 3, "weights": torch.ones(100_000)}, whole)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert read_checkpoint(whole, mmap=mmap)["global_step"] == 3
    with pytest.raises(RuntimeError, match="truncated.ckpt.*truncated, corrupt"):
        read_checkpoint(truncated, mmap=mmap)
