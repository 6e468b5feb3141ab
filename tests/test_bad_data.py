"""Bad clips are skipped and counted, never fatal one by one; a run that is mostly bad data stops."""

import io
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import soxr
from datasets import Audio, Features, Value, load_dataset

from conftest import DECODER, SMOKE, SPEECH, WHISPER, run_here
from tiny_audio_pl.clips import ClipPreparer
from tiny_audio_pl.processing import TinyAudioProcessor

REASONS = ["missing_field", "empty_transcript", "transcript_too_long", "undecodable", "empty_audio", "nan_or_inf",
           "silent", "too_short", "too_long"]


def _encode(audio: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    """Six good clips, good clips at other rates and channel counts, and one clip of each bad case."""
    good = list(load_dataset("parquet", data_files=f"{SPEECH}/train/*.parquet", split="train").cast_column(
        "wav", Audio(decode=False)).select(range(6)))
    speech, rate = sf.read(io.BytesIO(good[0]["wav"]["bytes"]), dtype="float32")
    text = good[0]["text"]
    noise = np.random.default_rng(0).uniform(-0.3, 0.3, 16_000 * 6).astype(np.float32)
    rows = [(g["ID"], g["wav"]["bytes"], g["text"]) for g in good] + [
        ("stereo-44k", _encode(np.stack([soxr.resample(speech, rate, 44_100)] * 2, axis=1), 44_100), text),
        ("rate-8k", _encode(soxr.resample(speech, rate, 8_000), 8_000), text),
        ("rate-22k", _encode(soxr.resample(speech, rate, 22_050), 22_050, "FLAC"), text),
        ("rate-48k", _encode(soxr.resample(speech, rate, 48_000), 48_000, "OGG"), text),
        ("missing-audio", None, text),
        ("missing-text", good[1]["wav"]["bytes"], None),
        ("empty-text", good[1]["wav"]["bytes"], "   "),
        ("long-text", good[1]["wav"]["bytes"], "THE RED FOX " * 100),
        ("garbage", b"this is not audio at all", text),
        ("no-samples", _encode(np.zeros(0, np.float32), 16_000), text),
        ("nan", _encode(np.full(16_000, np.nan, np.float32), 16_000, subtype="FLOAT"), text),
        ("zeros", _encode(np.zeros(16_000, np.float32), 16_000), text),
        ("blip", _encode(noise[:800], 16_000), text),
        ("six-seconds", _encode(noise, 16_000), text),
    ]
    features = Features({"ID": Value("string"), "wav": Audio(decode=False), "text": Value("string")})
    table = pa.Table.from_pylist([{"ID": i, "wav": None if b is None else {"bytes": b, "path": None}, "text": t}
                                  for i, b, t in rows], schema=features.arrow_schema)
    root = tmp_path_factory.mktemp("bad") / "dataset"
    (root / "train").mkdir(parents=True)
    pq.write_table(table, root / "train" / "train-00000.parquet")
    return root


def test_each_bad_case_gets_its_reason(bad_dataset):
    preparer = ClipPreparer(TinyAudioProcessor.from_models(WHISPER, DECODER), min_duration=0.1,
                            max_duration=5.0, max_target_tokens=64, text_normalization="lower")
    rows = load_dataset("parquet", data_files=f"{bad_dataset}/train/*.parquet", split="train").cast_column(
        "wav", Audio(decode=False))
    outcome = {row["ID"]: preparer({"id": row["ID"], "audio": row["wav"], "text": row["text"]})["skip"] for row in rows}
    assert outcome == {**{row["ID"]: "" for row in rows.select(range(6))},
                       "stereo-44k": "", "rate-8k": "", "rate-22k": "", "rate-48k": "",
                       "missing-audio": "missing_field", "missing-text": "missing_field",
                       "empty-text": "empty_transcript", "long-text": "transcript_too_long", "garbage": "undecodable",
                       "no-samples": "empty_audio", "nan": "nan_or_inf", "zeros": "silent", "blip": "too_short",
                       "six-seconds": "too_long"}


def _fit(workdir, dataset, *extra: str) -> subprocess.CompletedProcess:
    return run_here(workdir, "fit", "-c", SMOKE, "--data.dataset", str(dataset), "--data.val_split", "train",
                    "--data.max_duration", "5", "--data.max_target_tokens", "64", "--trainer.max_steps", "12",
                    "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                    "--data.num_workers", "1", "--trainer.enable_progress_bar", "false", *extra)


def test_a_run_over_bad_data_finishes_and_reports_every_reason(bad_dataset, workdir):
    result = _fit(workdir, bad_dataset, "--data.max_bad_share", "1.0")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = next(line for line in result.stdout.splitlines() if line.startswith("skipped clips:"))
    for reason in REASONS:
        assert reason in summary, reason
    assert "nan_or_inf" in summary and "(e.g. nan)" in summary
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(workdir / "lightning_logs" / "version_0"))
    events.Reload()
    assert {f"data/skipped/{reason}" for reason in REASONS} <= set(events.Tags()["scalars"])


def test_mostly_bad_data_stops_the_run_with_reasons_and_ids(bad_dataset, workdir):
    # default data.max_bad_share 0.05; 10 of the 24 clips are bad
    result = _fit(workdir, bad_dataset, "--trainer.max_steps", "20")
    assert result.returncode != 0
    assert "clips were unusable, more than data.max_bad_share=0.05" in result.stderr
    assert "(e.g. garbage)" in result.stderr and "(e.g. nan)" in result.stderr
