"""Using a trained model: export, transcribe (long, stereo, odd rates, bad files), the round trip."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from datasets import Audio, load_dataset
from safetensors.torch import load_file

from conftest import SPEECH, run_cli
from tiny_audio_pl.checkpoint import read_checkpoint
from tiny_audio_pl.transcribe import split_windows


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Dev clips as files: 16 kHz wav, the same as stereo 44.1 kHz flac and as mp3, a 40 s ogg, a broken file."""
    folder = tmp_path_factory.mktemp("clips")
    rows = load_dataset("parquet", data_files=f"{SPEECH}/dev/*.parquet", split="train").cast_column(
        "wav", Audio(decode=False))
    audio = [sf.read(io.BytesIO(r["wav"]["bytes"]), dtype="float32")[0] for r in rows.select(range(14))]
    paths = {name: folder / name for name in ("mono.wav", "stereo44k.flac", "mono.mp3", "long.ogg", "broken.wav")}
    sf.write(paths["mono.wav"], audio[0], 16_000)
    resampled = soxr.resample(audio[0], 16_000, 44_100)
    sf.write(paths["stereo44k.flac"], np.stack([resampled, resampled], axis=1), 44_100)
    sf.write(paths["mono.mp3"], audio[0], 16_000, format="MP3")
    pause = np.zeros(8_000, dtype=np.float32)
    sf.write(paths["long.ogg"], np.concatenate([x for clip in audio for x in (clip, pause)]), 16_000)
    paths["broken.wav"].write_bytes(b"RIFF not really a wav file")
    return paths


def test_split_windows_cuts_long_audio_at_pauses():
    rate = 16_000
    speech = np.random.default_rng(0).uniform(-0.5, 0.5, 29 * rate).astype(np.float32)
    audio = np.concatenate([speech, np.zeros(rate // 2, np.float32), speech])  # a pause at 29-29.5 s
    pieces = split_windows(audio, rate)
    assert len(pieces) == 2 and all(len(p) <= 30 * rate for p in pieces)
    assert np.array_equal(np.concatenate(pieces), audio)  # nothing lost, nothing repeated
    assert 29 * rate <= len(pieces[0]) <= 29.5 * rate  # cut inside the pause, not at 30 s
    assert len(split_windows(speech, rate)) == 1  # under 30 s: one piece


def test_export_writes_only_the_projector_and_what_rebuilds_the_model(trained, tmp_path):
    out = tmp_path / "model"
    result = run_cli(tmp_path, "export", "--ckpt", str(trained), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "projector.safetensors"]
    checkpoint = read_checkpoint(trained)
    weights = load_file(out / "projector.safetensors")
    assert {f"projector.{k}" for k in weights} == set(checkpoint["state_dict"])
    for key, value in weights.items():
        assert torch.equal(value, checkpoint["state_dict"][f"projector.{key}"])
    config = json.loads((out / "config.json").read_text())
    model = config["model"]
    assert Path(model["encoder"]).is_dir() and Path(model["decoder"]).is_dir()  # absolute: usable from anywhere
    assert model["prompt"] == "Transcribe: <audio>" and model["projector_stack"] == 2
    assert model["projector_hidden"] == 256 and config["training"]["global_step"] == 20
    wer = config["training"]["validation"]["metrics"]["val/wer"]
    card = (out / "README.md").read_text()
    assert f"| val/wer | {wer:.4g} |" in card and "step 20" in card


def test_transcribe_files_and_the_export_round_trip(trained, clips, tmp_path):
    files = [str(clips[name]) for name in ("mono.wav", "stereo44k.flac", "mono.mp3", "long.ogg", "broken.wav")]
    from_checkpoint = run_cli(tmp_path, "transcribe", *files, "--ckpt", str(trained), "--json", "--batch-size", "2")
    assert from_checkpoint.returncode == 1  # one file could not be read ...
    assert "broken.wav: cannot read" in from_checkpoint.stderr
    results = {Path(r["file"]).name: r for r in map(json.loads, from_checkpoint.stdout.splitlines())}
    assert sorted(results) == ["long.ogg", "mono.mp3", "mono.wav", "stereo44k.flac"]  # ... the others were
    assert results["long.ogg"]["windows"] == 2 and results["long.ogg"]["duration_s"] == pytest.approx(40.0, abs=0.1)
    assert results["mono.wav"]["windows"] == 1 and results["mono.wav"]["text"]
    assert results["stereo44k.flac"]["duration_s"] == pytest.approx(results["mono.wav"]["duration_s"], abs=1e-3)
    assert results["stereo44k.flac"]["text"] == results["mono.wav"]["text"]  # downmixed and resampled back

    out = tmp_path / "model"
    assert run_cli(tmp_path, "export", "--ckpt", str(trained), "--out", str(out)).returncode == 0
    from_export = run_cli(tmp_path, "transcribe", *files[:4], "--ckpt", str(out), "--json", "--batch-size", "2")
    assert from_export.returncode == 0, from_export.stderr
    assert [json.loads(line) for line in from_export.stdout.splitlines()] == [results[Path(f).name] for f in files[:4]]

    plain = run_cli(tmp_path, "transcribe", files[0], "--ckpt", str(out))
    assert plain.stdout == f"{files[0]}\t{results['mono.wav']['text']}\n"


def test_push_to_hub_offline_says_so(trained, tmp_path):
    result = run_cli(tmp_path, "export", "--ckpt", str(trained), "--out", str(tmp_path / "m"), "--push-to-hub",
                     "someone/model", HF_TOKEN="hf_secret_token_value")
    assert result.returncode != 0 and "HF_HUB_OFFLINE is set" in result.stderr
    assert "hf_secret_token_value" not in result.stdout + result.stderr
    assert all(b"hf_secret_token_value" not in p.read_bytes() for p in (tmp_path / "m").iterdir())


def test_many_files_are_read_in_bounded_chunks_with_the_same_result(trained, clips):
    """Files are decoded a few batches at a time (bounded memory); chunking does not change any transcript."""
    from tiny_audio_pl.export import load_model
    from tiny_audio_pl.transcribe import transcribe_files

    model = load_model(trained, dtype="float32")
    files = [str(clips[name]) for name in ("mono.wav", "broken.wav", "long.ogg", "stereo44k.flac", "mono.mp3")] * 2
    one_at_a_time = list(transcribe_files(model, files, batch_size=1, chunk_batches=1, progress=False))
    all_at_once = list(transcribe_files(model, files, batch_size=4, chunk_batches=100, progress=False))
    assert [r.file for r in one_at_a_time] == files
    assert one_at_a_time == all_at_once
    assert [bool(r.error) for r in all_at_once] == [False, True, False, False, False] * 2
