"""Using a trained model: export, transcribe (long, stereo, odd rates, bad files), the round trip."""

import io
import json
import os
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
    names = ("mono.wav", "stereo44k.flac", "mono.mp3", "long.ogg", "broken.wav", "10ms.wav")
    paths = {name: folder / name for name in names}
    sf.write(paths["mono.wav"], audio[0], 16_000)
    resampled = soxr.resample(audio[0], 16_000, 44_100)
    sf.write(paths["stereo44k.flac"], np.stack([resampled, resampled], axis=1), 44_100)
    sf.write(paths["mono.mp3"], audio[0], 16_000, format="MP3")
    pause = np.zeros(8_000, dtype=np.float32)
    sf.write(paths["long.ogg"], np.concatenate([x for clip in audio for x in (clip, pause)]), 16_000)
    paths["broken.wav"].write_bytes(b"RIFF not really a wav file")
    sf.write(paths["10ms.wav"], audio[1][:160], 16_000)  # too short for the encoder's first frame
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
    unusable = [str(clips["10ms.wav"]), str(tmp_path / "missing.wav")]
    from_checkpoint = run_cli(tmp_path, "transcribe", *files, *unusable, "--ckpt", str(trained), "--json",
                              "--batch-size", "2")
    assert from_checkpoint.returncode == 1  # three files could not be used ...
    problems = from_checkpoint.stderr.splitlines()
    assert problems[0] == f"{tmp_path / 'missing.wav'}: no such file or folder"  # reported before loading
    assert any(line.startswith(f"{files[4]}: cannot read") for line in problems), problems
    assert f"{unusable[0]}: too short (0.010 s; at least 0.1 s of audio)" in problems
    assert problems[-1] == "3 of 7 file(s) could not be transcribed"
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


def test_paths_that_do_not_exist_are_reported_before_any_model_loads(tmp_path, capfd, monkeypatch):
    from tiny_audio_pl.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="2 of 2 file"):
        main(["transcribe", "gone.wav", "nowhere/", "--ckpt", "no-such.ckpt"])  # the checkpoint is never opened
    assert capfd.readouterr().err.splitlines() == ["gone.wav: no such file or folder",
                                                   "nowhere: no such file or folder"]


def _export(capfd, *args: str) -> tuple[int, str]:
    from tiny_audio_pl.cli import main

    try:
        main(["export", *args])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capfd.readouterr()
    return code, out + err


def test_export_replaces_nothing_of_a_users_unasked(trained, tmp_path, capfd, monkeypatch):
    umask = os.umask(0o022)
    monkeypatch.chdir(tmp_path)
    try:
        mine = tmp_path / "mine"
        mine.mkdir()
        (mine / "README.md").write_text("my notes")
        (mine / "config.json").write_text("{}")
        code, output = _export(capfd, "--ckpt", str(trained), "--out", str(mine))
        assert code == 2 and output.count("\n") == 1 and "--overwrite" in output
        assert sorted(p.name for p in mine.iterdir()) == ["README.md", "config.json"]
        assert (mine / "README.md").read_text() == "my notes"

        (tmp_path / "README.md").write_text("a repository's readme")
        code, output = _export(capfd, "--ckpt", str(trained), "--out", ".")
        assert code == 2 and (tmp_path / "README.md").read_text() == "a repository's readme"

        (mine / "notes.txt").write_text("keep me")
        assert _export(capfd, "--ckpt", str(trained), "--out", str(mine), "--overwrite")[0] == 0
        assert sorted(p.name for p in mine.iterdir()) == ["README.md", "config.json", "notes.txt",
                                                           "projector.safetensors"]
        assert (mine / "notes.txt").read_text() == "keep me"

        fresh = tmp_path / "new" / "model"
        assert _export(capfd, "--ckpt", str(trained), "--out", str(fresh))[0] == 0
        assert _export(capfd, "--ckpt", str(trained), "--out", str(fresh))[0] == 0  # an earlier export: replaced
        assert sorted(p.name for p in fresh.iterdir()) == ["README.md", "config.json", "projector.safetensors"]
        assert {oct(p.stat().st_mode & 0o777) for p in fresh.iterdir()} == {"0o644"}
        assert oct(fresh.stat().st_mode & 0o777) == "0o755"

        (tmp_path / "a-file").write_text("x")
        code, output = _export(capfd, "--ckpt", str(trained), "--out", str(tmp_path / "a-file" / "model"))
        assert code == 2 and output.startswith("tiny-audio export: error: cannot write to --out")
        assert (tmp_path / "a-file").read_text() == "x"
    finally:
        os.umask(umask)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_export_into_a_read_only_earlier_export_is_one_line(trained, tmp_path, capfd):
    out = tmp_path / "model"
    assert _export(capfd, "--ckpt", str(trained), "--out", str(out))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    out.chmod(0o555)
    code, output = _export(capfd, "--ckpt", str(trained), "--out", str(out))
    assert code == 2 and output.count("\n") == 1 and "Permission denied" in output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
