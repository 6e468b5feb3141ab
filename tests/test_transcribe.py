"""Using a trained model: export, transcribe (long, stereo, odd rates, bad files), the round trip."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from datasets import Audio, load_dataset
from safetensors.torch import load_file, save_file

from conftest import ROOT, SPEECH, cli_env, later_day, on_day, run_here
from tiny_audio_pl.checkpoint import read_checkpoint
from tiny_audio_pl.processing import split_windows


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


# Another day, in one process: export the checkpoint, transcribe the files with the export through the CLI, and
# score a reference with the export loaded by transformers (its loss shows any change of prompt, which a transcript
# of a briefly trained model may not).
ON_ANOTHER_DAY = """
import contextlib, io, json, sys
from transformers import AutoModel
from tiny_audio_pl.cli import main
checkpoint, out, *files = sys.argv[1:]
with contextlib.redirect_stdout(io.StringIO()):
    main(["export", "--ckpt", checkpoint, "--out", out])
transcripts = io.StringIO()
with contextlib.redirect_stdout(transcripts):
    main(["transcribe", *files, "--ckpt", out, "--json"])
model = AutoModel.from_pretrained(out, trust_remote_code=True)
batch = model.processor([files[0]])
loss = model(batch["input_features"], batch["feature_lengths"], model.processor.targets(["the red fox"]))
print(json.dumps({"transcribe": transcripts.getvalue(), "loss": loss.item()}))
"""


def test_an_export_transcribes_on_any_day_as_its_checkpoint_does(trained, clips, tmp_path):
    """The prompt's token ids travel with the export (its config and its processor's file): exported and used on a
    later day, whose date the chat template would write into a new rendering of another length, it transcribes and
    scores as the checkpoint does today."""
    from tiny_audio_pl.export import load_model

    files = [str(clips[name]) for name in ("mono.wav", "long.ogg")]
    today = run_here(tmp_path, "transcribe", *files, "--ckpt", str(trained), "--json")
    assert today.returncode == 0, today.stderr
    model = load_model(str(trained))
    batch = model.processor([files[0]])
    with torch.no_grad():
        loss = model(batch["input_features"], batch["feature_lengths"], model.processor.targets(["the red fox"])).item()

    out = tmp_path / "export"
    command = [sys.executable, "-c", ON_ANOTHER_DAY, str(trained), str(out), *files]
    later = subprocess.run(on_day(later_day(200), command), cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert later.returncode == 0, later.stderr[-3000:]
    result = json.loads(later.stdout.splitlines()[-1])
    assert result["transcribe"] == today.stdout
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    kept = read_checkpoint(trained)["hyper_parameters"]["prompt_ids"]
    assert json.loads((out / "config.json").read_text())["prompt_ids"] == kept
    assert json.loads((out / "processor" / "processor_config.json").read_text())["prompt_ids"] == kept


def test_export_writes_the_trained_weights_the_processor_and_the_code(trained, tmp_path):
    out = tmp_path / "model"
    result = run_here(tmp_path, "export", "--ckpt", str(trained), "--out", str(out))
    assert result.returncode == 0, result.stderr
    files = {str(p.relative_to(out)) for p in out.rglob("*")}
    assert {"config.json", "model.safetensors", "README.md", "processor/preprocessor_config.json",
            "processor/processor_config.json", "processor/tokenizer.json", "modeling.py", "processing.py",
            "configuration.py", "shared_prompt.py", "pipeline.py", "encoder.py", "projector.py"} <= files
    assert not [name for name in files if name.endswith((".ckpt", ".bin"))]
    checkpoint = read_checkpoint(trained)
    weights = load_file(out / "model.safetensors")
    assert set(weights) == set(checkpoint["state_dict"])  # the trained weights, nothing frozen
    for key, value in weights.items():
        assert torch.equal(value, checkpoint["state_dict"][key])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "tiny_audio" and config["auto_map"]["AutoModel"] == "modeling.TinyAudioModel"
    assert Path(config["encoder"]).is_dir() and Path(config["decoder"]).is_dir()  # absolute: usable from anywhere
    assert config["prompt"] == "Transcribe: <audio>" and config["projector_stack"] == 2
    assert config["projector_hidden"] == 256 and config["training"]["global_step"] == 20
    for code in out.glob("*.py"):
        imports = re.findall(r"^\s*(?:from|import)\s+(\S+)", code.read_text(), flags=re.MULTILINE)
        assert not [name for name in imports if name.startswith("tiny_audio_pl")], f"{code.name} imports the package"
    wer = config["training"]["validation"]["metrics"]["val/wer"]
    card = (out / "README.md").read_text()
    assert f"| val/wer | {wer:.4g} |" in card and "step 20" in card
    # The metadata the Hub renders, read back by huggingface_hub's own parser: the WER as model-index.
    from huggingface_hub import ModelCard

    (result,) = ModelCard.load(out / "README.md").data.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_split, result.metric_type) == (
        "automatic-speech-recognition", "assets/tiny-speech", "dev", "wer")
    assert result.metric_value == round(100 * wer, 2)
    assert "# tiny-whisper + tiny-smollm3 speech recognition" in card and "(None)" not in card
    assert str(ROOT) not in card  # no path of this machine
    assert 'pipeline("automatic-speech-recognition", model="THIS_FOLDER", trust_remote_code=True)' in card


HUB_LOAD = """
import json, sys
sys.modules["tiny_audio_pl"] = None  # the exported code must not need the training package
from transformers import AutoModel, pipeline

folder, files = sys.argv[1], sys.argv[2:]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
print(json.dumps({"class": f"{type(model).__module__}.{type(model).__name__}",
                  "pipeline": type(asr).__name__, "texts": [asr(f)["text"] for f in files]}))
"""
# What the stock ASR pipeline accepts, on the same files (mono.wav, long.ogg, stereo44k.flac): a list in batches,
# datasets' {"array", "sampling_rate"}, a 2-D stereo {"raw", "sampling_rate"}, generate_kwargs; the rest refused.
PIPELINE_FORMS = HUB_LOAD + """
import soundfile as sf
mono, rate = sf.read(files[0], dtype="float32")
stereo, stereo_rate = sf.read(files[2], dtype="float32")  # [T, 2] at 44.1 kHz
refused = []
for options in ({"return_timestamps": True}, {"generate_kwargs": {"do_sample": True}}):
    try:
        asr(files[0], **options)
    except ValueError as error:
        refused.append(str(error))
print(json.dumps({"batched": [r["text"] for r in asr(files, batch_size=2)],
                  "array": asr({"array": mono, "sampling_rate": rate})["text"],
                  "stereo": asr({"raw": stereo, "sampling_rate": stereo_rate})["text"],
                  "two_tokens": asr(files[0], generate_kwargs={"max_new_tokens": 2})["text"], "refused": refused,
                  "beams": asr(files[0], generate_kwargs={"num_beams": 3, "no_repeat_ngram_size": 2})["text"],
                  "greedy_again": asr(files[0])["text"],
                  "processor_call": model.transcribe(**model.processor([files[0], files[2]]))}))
"""


def test_the_exported_folder_loads_in_transformers_alone_and_transcribes_as_tiny_audio_does(trained, clips,
                                                                                            tmp_path):
    """AutoModel and pipeline(trust_remote_code=True) on the folder, in a Python that cannot import tiny_audio_pl,
    give the transcripts `tiny-audio transcribe` prints (a 40 s file cut into windows, a 44.1 kHz stereo one),
    also for a list in batches, datasets' array dicts and 2-D stereo; options it cannot honour are refused."""
    out = tmp_path / "model"
    assert run_here(tmp_path, "export", "--ckpt", str(trained), "--out", str(out)).returncode == 0
    files = [str(clips[name]) for name in ("mono.wav", "long.ogg", "stereo44k.flac")]
    ours = run_here(tmp_path, "transcribe", *files, "--ckpt", str(out), "--json")
    assert ours.returncode == 0, ours.stderr
    expected = [json.loads(line)["text"] for line in ours.stdout.splitlines()]
    (tmp_path / "load.py").write_text(PIPELINE_FORMS)
    theirs = subprocess.run([sys.executable, "load.py", str(out), *files], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=cli_env(HF_HOME=str(tmp_path / "hf-home")))
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    loaded, forms = (json.loads(line) for line in theirs.stdout.splitlines()[-2:])
    assert loaded["class"].startswith("transformers_modules.") and loaded["class"].endswith(".TinyAudioModel")
    assert loaded["pipeline"] == "TinyAudioPipeline"
    assert loaded["texts"] == expected and all(expected)
    assert forms["batched"] == expected  # a list in batches of 2 (3 files, one of 40 s in windows)
    assert forms["array"] == expected[0] and forms["stereo"] == expected[2]
    assert forms["processor_call"] == [expected[0], expected[2]]  # processor(files) -> inputs in one call
    assert len(forms["two_tokens"].split()) <= 2 and expected[0].startswith(forms["two_tokens"])  # greedy: a prefix
    assert len(forms["refused"]) == 2 and "return_timestamps" in forms["refused"][0]
    assert "do_sample" in forms["refused"][1]
    assert forms["beams"] and forms["greedy_again"] == expected[0]  # a call's decoding options end with the call


def test_an_export_of_an_older_tiny_audio_says_to_export_again(tmp_path, capfd):
    from tiny_audio_pl.cli import main

    old = tmp_path / "old-export"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"format": "tiny-audio-projector", "model": {}}))
    (old / "projector.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["transcribe", str(clips_file(tmp_path)), "--ckpt", str(old)])
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "export it again" in err


def clips_file(folder: Path) -> Path:
    path = folder / "tone.wav"
    sf.write(path, np.sin(np.arange(16_000) / 16_000 * 2 * np.pi * 220).astype(np.float32), 16_000)
    return path


def test_transcribe_files_and_the_export_round_trip(trained, clips, tmp_path):
    files = [str(clips[name]) for name in ("mono.wav", "stereo44k.flac", "mono.mp3", "long.ogg", "broken.wav")]
    unusable = [str(clips["10ms.wav"]), str(tmp_path / "missing.wav")]
    from_checkpoint = run_here(tmp_path, "transcribe", *files, *unusable, "--ckpt", str(trained), "--json",
                               "--batch-size", "2")
    assert from_checkpoint.returncode == 1  # three files could not be used ...
    problems = from_checkpoint.stderr.splitlines()
    assert problems[0] == f"{tmp_path / 'missing.wav'}: no such file or folder"  # reported before loading
    assert any(line.startswith(f"{files[4]}: cannot read") for line in problems), problems
    assert f"{unusable[0]}: too short (0.010 s; at least 0.1 s of audio)" in problems
    assert problems[-1] == "3 of 7 file(s) could not be transcribed"
    lines = [json.loads(line) for line in from_checkpoint.stdout.splitlines()]
    failures = {Path(r["file"]).name: r["error"] for r in lines if "error" in r}  # in the JSON too, with why
    assert failures["missing.wav"] == "no such file or folder" and failures["broken.wav"].startswith("cannot read")
    assert failures["10ms.wav"] == "too short (0.010 s; at least 0.1 s of audio)"
    results = {Path(r["file"]).name: r for r in lines if "error" not in r}
    assert sorted(results) == ["long.ogg", "mono.mp3", "mono.wav", "stereo44k.flac"]  # ... the others were
    assert results["long.ogg"]["windows"] == 2 and results["long.ogg"]["duration_s"] == pytest.approx(40.0, abs=0.1)
    assert results["mono.wav"]["windows"] == 1 and results["mono.wav"]["text"]
    assert results["stereo44k.flac"]["duration_s"] == pytest.approx(results["mono.wav"]["duration_s"], abs=1e-3)
    assert results["stereo44k.flac"]["text"] == results["mono.wav"]["text"]  # downmixed and resampled back

    out = tmp_path / "model"
    assert run_here(tmp_path, "export", "--ckpt", str(trained), "--out", str(out)).returncode == 0
    from_export = run_here(tmp_path, "transcribe", *files[:4], "--ckpt", str(out), "--json", "--batch-size", "2")
    assert from_export.returncode == 0, from_export.stderr
    assert [json.loads(line) for line in from_export.stdout.splitlines()] == [results[Path(f).name] for f in files[:4]]

    plain = run_here(tmp_path, "transcribe", files[0], "--ckpt", str(out))
    assert plain.stdout == f"{files[0]}\t{results['mono.wav']['text']}\n"

    weights = load_file(out / "model.safetensors")
    save_file(dict(sorted(weights.items())[1:]), out / "model.safetensors")  # a tensor short
    damaged = run_here(tmp_path, "transcribe", files[0], "--ckpt", str(out))
    assert damaged.returncode == 2 and damaged.stdout == ""
    assert f"{out} does not match its settings: missing ['{min(weights)}']" in damaged.stderr


def test_push_to_hub_offline_says_so(trained, tmp_path):
    result = run_here(tmp_path, "export", "--ckpt", str(trained), "--out", str(tmp_path / "m"), "--push-to-hub",
                      "someone/model", HF_TOKEN="hf_secret_token_value")
    assert result.returncode != 0 and "HF_HUB_OFFLINE is set" in result.stderr
    assert "hf_secret_token_value" not in result.stdout + result.stderr
    assert all(b"hf_secret_token_value" not in p.read_bytes() for p in (tmp_path / "m").rglob("*") if p.is_file())


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


def test_paths_that_give_no_audio_are_reported_before_any_model_loads(tmp_path, capfd, monkeypatch):
    from tiny_audio_pl.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/notes.txt").write_text("no audio here")
    with pytest.raises(SystemExit, match="3 of 3 file"):  # the checkpoint is never opened
        main(["transcribe", "gone.wav", "nowhere/", "empty", "--ckpt", "no-such.ckpt"])
    assert capfd.readouterr().err.splitlines() == ["gone.wav: no such file or folder",
                                                   "nowhere: no such file or folder",
                                                   "empty: no audio files (.flac, .mp3, .ogg, .wav) in this folder"]


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
        assert {"notes.txt", "model.safetensors", "processor"} <= {p.name for p in mine.iterdir()}
        assert (mine / "notes.txt").read_text() == "keep me" and (mine / "README.md").read_text() != "my notes"

        fresh = tmp_path / "new" / "model"
        assert _export(capfd, "--ckpt", str(trained), "--out", str(fresh))[0] == 0
        assert _export(capfd, "--ckpt", str(trained), "--out", str(fresh))[0] == 0  # an earlier export: replaced
        assert not [p for p in fresh.iterdir() if p.name.startswith(".export-")]  # no staging folder left
        assert {oct(p.stat().st_mode & 0o777) for p in fresh.rglob("*") if p.is_file()} == {"0o644"}
        assert {oct(p.stat().st_mode & 0o777) for p in [fresh, *fresh.rglob("*")] if p.is_dir()} == {"0o755"}

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
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    out.chmod(0o555)
    code, output = _export(capfd, "--ckpt", str(trained), "--out", str(out))
    assert code == 2 and output.count("\n") == 1 and "Permission denied" in output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_the_model_card_names_hub_models_data_and_each_sets_wer_for_the_hub():
    """A run of the recipe's models on hub data with two evaluation sets: what the card's metadata says."""
    from huggingface_hub import ModelCard

    from tiny_audio_pl.export import model_card
    from tiny_audio_pl.modeling import TinyAudioConfig

    config = TinyAudioConfig(encoder="openai/whisper-large-v3-turbo", decoder="HuggingFaceTB/SmolLM3-3B", beam_size=4)
    config.training = {
        "global_step": 10000, "learning_rate": 1e-4, "warmup_steps": 500, "projector_parameters": 36_700_000,
        "adapter_parameters": 0,
        "data": {"dataset": "speechbrain/LoquaciousSet", "config_name": "large", "train_split": "train",
                 "val_split": "dev", "text_normalization": "lower",
                 "eval_sets": [{"name": "loquacious", "split": "test"},
                               {"name": "librispeech", "dataset": "openslr/librispeech_asr", "config_name": "clean",
                                "split": "test"}]},
        "validation": {"step": 10000, "metrics": {"val/loquacious/wer": 0.1214, "val/librispeech/wer": 0.0412}}}
    card = ModelCard(model_card(config))
    assert card.data.base_model == ["openai/whisper-large-v3-turbo", "HuggingFaceTB/SmolLM3-3B"]
    assert card.data.datasets == ["speechbrain/LoquaciousSet"]
    assert [(r.dataset_type, r.dataset_config, r.dataset_split, r.metric_value) for r in card.data.eval_results] == [
        ("speechbrain/LoquaciousSet", "large", "test", 12.14), ("openslr/librispeech_asr", "clean", "test", 4.12)]
    assert "beam search, 4 beams" in card.text and "10000 optimizer steps" in card.text
