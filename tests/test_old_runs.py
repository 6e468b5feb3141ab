"""A checkpoint and an export written by an earlier tiny-audio (tests/fixtures/run-2026-12-06) load, export,
transcribe and resume with today's code."""

import shutil

import torch

from conftest import ROOT, SMOKE, make_workdir
from tiny_audio_pl.checkpoint import TrainedCheckpoint
from tiny_audio_pl.cli import main
from tiny_audio_pl.export import load_model

OLD = ROOT / "tests" / "fixtures" / "run-2026-12-06"


def test_an_old_checkpoint_and_its_export_load_to_the_same_model_and_transcript(monkeypatch, dev_batch):
    monkeypatch.chdir(ROOT)  # the export names its models assets/...
    from_checkpoint, from_export = load_model(OLD / "step=4.ckpt"), load_model(OLD / "export")
    trained = from_checkpoint.trainable_state_dict()
    assert any(".lora_A." in name for name in trained) and any(name.startswith("projector.") for name in trained)
    assert trained.keys() == from_export.trainable_state_dict().keys()
    assert all(torch.equal(value, from_export.trainable_state_dict()[name]) for name, value in trained.items())
    assert from_checkpoint.config.training["global_step"] == 4  # the checkpoint's facts, read with its weights
    features, lengths = dev_batch["features"][:2], dev_batch["feature_lengths"][:2]
    assert from_checkpoint.transcribe(features, lengths) == from_export.transcribe(features, lengths)


def test_an_old_checkpoint_exports_and_resumes(tmp_path, monkeypatch):
    workdir = make_workdir(tmp_path / "run")
    checkpoint = workdir / "lightning_logs/version_0/checkpoints/step=4.ckpt"
    checkpoint.parent.mkdir(parents=True)
    shutil.copy(OLD / "step=4.ckpt", checkpoint)
    (checkpoint.parent / "last.ckpt").symlink_to(checkpoint.name)  # as the run left it
    monkeypatch.chdir(workdir)
    main(["export", "--ckpt", str(checkpoint), "--out", "exported"])
    assert TrainedCheckpoint.read(checkpoint).weights().keys() == load_model("exported").trainable_state_dict().keys()
    main(["fit", "-c", SMOKE, "--ckpt_path", "last", "--trainer.max_steps", "6",
          "--trainer.val_check_interval", "6", "--checkpoint.every_n_train_steps", "2", "--data.max_eval_samples", "4",
          "--trainer.enable_progress_bar", "false", "--data.num_workers", "0"])
    resumed = TrainedCheckpoint.read(checkpoint.parent / "last.ckpt")
    assert resumed.step == 6 and resumed.weights().keys() == TrainedCheckpoint.read(checkpoint).weights().keys()
