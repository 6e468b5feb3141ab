"""Checkpoints written before 2026-12-07 load, export, transcribe and resume with today's code.

They differ from today's in one thing: the trained tensors were kept under the training loop's attribute of the
time, ``model.`` (``model.projector.*``, ``model.decoder.*lora*``), where today's keep the network's own names. The
fixture writes a run with today's code and puts its checkpoint back in that layout, as the older code wrote it.
"""

import shutil
from pathlib import Path

import pytest
import torch

from conftest import SMOKE, make_workdir, run_here
from tiny_audio_pl.checkpoint import TrainedCheckpoint
from tiny_audio_pl.export import load_model


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> Path:
    """A run folder whose ``step=4.ckpt`` (``last.ckpt`` links to it) is in the older layout, with LoRA adapters."""
    workdir = make_workdir(tmp_path_factory.mktemp("old") / "run")
    result = run_here(workdir, "fit", "-c", SMOKE, "--model.projector_hidden", "32", "--model.lora_rank", "2",
                      "--model.lora_targets", "[q_proj]", "--trainer.max_steps", "4", "--trainer.val_check_interval",
                      "4", "--checkpoint.every_n_train_steps", "4", "--data.max_eval_samples", "4",
                      "--model.max_new_tokens", "4", "--trainer.enable_progress_bar", "false",
                      "--data.num_workers", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    path = workdir / "lightning_logs/version_0/checkpoints/step=4.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"] = {f"model.{name}": value for name, value in checkpoint["state_dict"].items()}
    del checkpoint["hyper_parameters"]["align_steps"]  # not an option yet
    torch.save(checkpoint, path)
    return workdir


def test_an_old_checkpoint_and_its_export_load_to_the_same_model_and_transcript(old_run, monkeypatch, dev_batch):
    monkeypatch.chdir(old_run)
    checkpoint = old_run / "lightning_logs/version_0/checkpoints/step=4.ckpt"
    assert run_here(old_run, "export", "--ckpt", str(checkpoint), "--out", "exported").returncode == 0
    from_checkpoint, from_export = load_model(checkpoint), load_model("exported")
    trained = from_checkpoint.trainable_state_dict()
    assert any(".lora_A." in name for name in trained) and any(name.startswith("projector.") for name in trained)
    assert trained.keys() == from_export.trainable_state_dict().keys()
    assert all(torch.equal(value, from_export.trainable_state_dict()[name]) for name, value in trained.items())
    assert from_checkpoint.config.training["global_step"] == 4  # the checkpoint's facts, read with its weights
    features, lengths = dev_batch["features"][:2], dev_batch["feature_lengths"][:2]
    assert from_checkpoint.transcribe(features, lengths) == from_export.transcribe(features, lengths)


def test_an_old_checkpoint_resumes(old_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(old_run, workdir, symlinks=True)
    checkpoints = workdir / "lightning_logs/version_0/checkpoints"
    before = TrainedCheckpoint.read(checkpoints / "step=4.ckpt").weights()
    result = run_here(workdir, "fit", "-c", SMOKE, "--ckpt_path", "last", "--trainer.max_steps", "6",
                      "--trainer.val_check_interval", "6", "--checkpoint.every_n_train_steps", "2",
                      "--data.max_eval_samples", "4", "--trainer.enable_progress_bar", "false",
                      "--data.num_workers", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = TrainedCheckpoint.read(checkpoints / "last.ckpt")
    assert resumed.step == 6 and resumed.weights().keys() == before.keys()
