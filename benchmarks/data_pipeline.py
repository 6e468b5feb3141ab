"""Input-pipeline throughput on the CPU: decode + resample + features + collate, one worker.

How many dataloader workers keep a GPU fed? This measures what one worker process does per second
with the project's own code (``ClipPreparer`` and ``collate``), on clips whose durations follow a
LoquaciousSet-like distribution: log-normal with a median of 6 s, clipped to 1-30 s (most clips a
few seconds to ~20 s). Clips are real speech (the tiny set's, tiled to length), stored as 16 kHz
FLAC bytes as in LoquaciousSet; ``--rate 48000`` stores them at 48 kHz to include resampling.
Usage::

    python benchmarks/data_pipeline.py [--clips 200] [--batch 8] [--rate 16000] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from datasets import Audio, load_dataset

from tiny_audio_pl.clips import ClipPreparer, collate
from tiny_audio_pl.processing import TinyAudioProcessor

ROOT = Path(__file__).resolve().parents[1]


def make_clips(count: int, rate: int = 16_000, seed: int = 0, durations: list[float] | None = None) -> list[dict]:
    """``count`` rows (``id``, ``audio`` as FLAC bytes, ``text``) with log-normal durations (median 6 s, 1-30 s),
    or the ``durations`` given.

    Each clip is a random stretch of the tiny set's speech laid end to end; its transcript is the
    words spoken in that stretch (each word placed evenly within its utterance), so transcript
    length follows duration as in real speech.
    """
    rng = np.random.default_rng(seed)
    rows = load_dataset("parquet", data_files=str(ROOT / "assets/tiny-speech/train/*.parquet"),
                        split="train").cast_column("wav", Audio(decode=False))
    pieces, words, word_times, offset = [], [], [], 0.0
    for row in rows:
        audio = sf.read(io.BytesIO(row["wav"]["bytes"]), dtype="float32")[0]
        spoken = row["text"].split()
        words += spoken
        word_times += list(offset + (np.arange(len(spoken)) + 0.5) * len(audio) / 16_000 / len(spoken))
        pieces.append(audio)
        offset += len(audio) / 16_000
    speech, word_times = np.concatenate(pieces), np.array(word_times)
    if rate != 16_000:
        speech = soxr.resample(speech, 16_000, rate)
    clips = []
    lengths = np.clip(rng.lognormal(np.log(6.0), 0.6, count), 1.0, 30.0) if durations is None else durations
    for i, seconds in enumerate(lengths):
        start = int(rng.integers(0, len(speech) - int(30 * rate)))
        buffer = io.BytesIO()
        sf.write(buffer, speech[start:start + int(seconds * rate)], rate, format="FLAC")
        spoken = (word_times >= start / rate) & (word_times < start / rate + seconds)
        text = " ".join(w for w, keep in zip(words, spoken) if keep) or words[0]
        clips.append({"id": f"clip-{i}", "audio": {"bytes": buffer.getvalue(), "path": None}, "text": text})
    return clips


def measure(encoder: str, clips: list[dict], batch: int) -> dict:
    processor = TinyAudioProcessor.from_models(encoder, str(ROOT / "assets/tiny-smollm3"))
    preparer = ClipPreparer(processor, min_duration=0.1, max_duration=30.0, max_target_tokens=256,
                            text_normalization="lower")
    preparer(clips[0])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(clips), batch):
        collate([preparer(row) for row in clips[i:i + batch]])
    seconds = time.perf_counter() - start
    audio = sum(sf.info(io.BytesIO(c["audio"]["bytes"])).duration for c in clips)
    return {"samples_per_s": round(len(clips) / seconds, 1), "audio_s_per_s": round(audio / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rate", type=int, default=16_000, help="sample rate the clips are stored at")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one dataloader worker = one core
    clips = make_clips(args.clips, args.rate)
    durations = [sf.info(io.BytesIO(c["audio"]["bytes"])).duration for c in clips]
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread",
              "clips": len(clips), "stored_rate": args.rate,
              "duration_s": {name: round(float(fn(durations)), 2)
                             for name, fn in (("mean", np.mean), ("median", np.median), ("max", np.max))},
              "whisper_per_worker": measure(str(ROOT / "assets/tiny-whisper"), clips, args.batch),
              "hubert_per_worker": measure(str(ROOT / "assets/tiny-hubert"), clips, args.batch)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
