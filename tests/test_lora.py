"""LoRA on the decoder as a config switch: only adapters and projector are trained, saved and exported, the
adapters at a learning rate of their own when given one."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import NO_WORKERS, SMOKE, SPEECH, run_here
from tiny_audio_pl.checkpoint import read_checkpoint
from tiny_audio_pl.export import load_model


def test_lora_switch_trains_and_saves_only_adapters_and_projector(workdir):
    result = run_here(workdir, "fit", "-c", SMOKE, "--model.lora_rank", "4", "--trainer.max_steps", "6",
                      "--trainer.val_check_interval", "6", "--data.max_eval_samples", "4",
                      "--model.max_new_tokens", "6", "--trainer.enable_progress_bar", "false",
                      "--model.adapter_learning_rate", "0.004", "--trainer.log_every_n_steps", "1", *NO_WORKERS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(frozen; LoRA rank 4 adapters trainable)" in result.stdout + result.stderr  # the run's banner
    events = EventAccumulator(str(workdir / "lightning_logs/version_0")).Reload()
    rates = {group: [e.value for e in events.Scalars(f"train/lr/{group}")] for group in ("projector", "adapters")}
    assert len(rates["adapters"]) == 6 and rates["adapters"][-1] > 0  # logged at every step, still warming up
    assert rates["adapters"] == pytest.approx([r * 0.004 / 0.003 for r in rates["projector"]])  # smoke's lr: 3e-3
    ckpt = workdir / "lightning_logs/version_0/checkpoints/last.ckpt"
    state = read_checkpoint(ckpt)["state_dict"]
    adapters = {k for k in state if k.startswith("decoder.")}
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    assert {k for k in state if k not in adapters} == {k for k in state if k.startswith("projector.")}
    assert any(state[k].abs().sum() > 0 for k in adapters if ".lora_B." in k)  # trained away from zero
    assert all(state[k].dtype == torch.float32 for k in adapters)

    out = workdir / "exported"
    assert run_here(workdir, "export", "--ckpt", str(ckpt), "--out", str(out)).returncode == 0
    exported = load_file(out / "model.safetensors")
    assert set(exported) == set(state)  # adapters and projector, nothing frozen
    config = json.loads((out / "config.json").read_text())
    assert config["lora_rank"] == 4 and config["training"]["adapter_parameters"] == sum(state[k].numel()
                                                                                       for k in adapters)
    card = (out / "README.md").read_text()
    assert "decoder LoRA: rank 4" in card and "learning rate 0.003 (LoRA adapters 0.004)" in card

    from_checkpoint, from_export = load_model(ckpt), load_model(out)
    for name, value in from_export.named_parameters():
        if value.requires_grad:
            assert torch.equal(value, from_checkpoint.state_dict()[name]), name
    row = pq.read_table(next(Path(SPEECH, "dev").glob("*.parquet"))).slice(0, 1).to_pylist()[0]
    clip = workdir / "clip.flac"
    clip.write_bytes(row["wav"]["bytes"])
    transcripts = [run_here(workdir, "transcribe", str(clip), "--ckpt", str(source)) for source in (ckpt, out)]
    assert transcripts[0].returncode == 0 and transcripts[0].stdout.split("\t")[1].strip()
    assert transcripts[0].stdout == transcripts[1].stdout
