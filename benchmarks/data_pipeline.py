"""Input-pipeline throughput on the CPU: decode + resample + features + collate, one worker.

How many dataloader workers keep a GPU fed? This measures what one worker process does per second
with the project's own code (``ClipPreparer`` and ``collate``), on clips whose durations follow a
LoquaciousSet-like distribution: log-normal with a median of 6 s, clipped to 1-30 s (most clips a
few seconds to ~20 s). Clips are real speech (the tiny set's, tiled to length), stored as 16 kHz
FLAC bytes as in LoquaciousSet; ``--rate 48000`` stores them at 48 kHz to include resampling.

``--stream`` measures the real streaming path instead (``SpeechDataModule.open_source``: parquet
shards read by ``datasets`` row group by row group, then prepared and collated), from a folder on
disk and through the tests' Hub server on 127.0.0.1 (``HF_ENDPOINT``), with ``--latency-ms`` added
to every request as a round trip to a distant host would. Usage::

    python benchmarks/data_pipeline.py [--clips 200] [--batch 8] [--rate 16000] [--json PATH]
    python benchmarks/data_pipeline.py --stream [--clips 400] [--latency-ms 0 50] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from datasets import Audio, load_dataset

from tiny_audio_pl.clips import ClipPreparer, collate
from tiny_audio_pl.modeling import TinyAudioConfig, build_processor

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


def make_preparer(encoder: str) -> ClipPreparer:
    """The training data's clip preparation for ``encoder``'s features and the tiny decoder's tokens."""
    processor = build_processor(TinyAudioConfig(encoder=encoder, decoder=str(ROOT / "assets/tiny-smollm3")))
    return ClipPreparer(processor, min_duration=0.1, max_duration=30.0, max_target_tokens=256,
                        text_normalization="lower")


def measure(encoder: str, clips: list[dict], batch: int) -> dict:
    preparer = make_preparer(encoder)
    preparer(clips[0])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(clips), batch):
        collate([preparer(row) for row in clips[i:i + batch]])
    seconds = time.perf_counter() - start
    audio = sum(sf.info(io.BytesIO(c["audio"]["bytes"])).duration for c in clips)
    return {"samples_per_s": round(len(clips) / seconds, 1), "audio_s_per_s": round(audio / seconds, 1)}


def write_repo(clips: list[dict], root: Path, shards: int = 2, row_group: int = 100) -> Path:
    """The clips as a LoquaciousSet-shaped dataset repository (``large/train-*``), under ``root/datasets/``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / "datasets/speechbrain/LoquaciousSet"
    (folder / "large").mkdir(parents=True)
    table = pa.table({"ID": [c["id"] for c in clips], "duration": [0.0] * len(clips),
                      "wav": [c["audio"] for c in clips], "text": [c["text"] for c in clips]})
    size = -(-len(clips) // shards)
    for i in range(shards):
        pq.write_table(table.slice(i * size, size), folder / "large" / f"train-{i:05d}-of-{shards:05d}.parquet",
                       row_group_size=row_group)
    (folder / "README.md").write_text("---\nconfigs:\n  - config_name: large\n    data_files:\n"
                                      "      - split: train\n        path: large/train*\n---\n")
    return folder


def stream_rate(dataset: str, batch: int) -> dict:
    """The streaming path in one process over a whole split (open it, read its rows through the network retries
    as training does, prepare, collate): the seconds to the first batch, then clips per second and MB of stored
    audio per second over the rest."""
    from tiny_audio_pl.data import SpeechDataModule
    from tiny_audio_pl.network import ResilientRows

    data = SpeechDataModule(dataset=dataset, config_name="large")
    preparer = make_preparer(str(ROOT / "assets/tiny-whisper"))
    opened = time.perf_counter()
    rows = iter(ResilientRows(data.open_source(data.train_streams()[0]), data.hparams.network_patience))
    done, megabytes, start = 0, 0.0, None
    while chunk := [row for _, row in zip(range(batch), rows)]:
        collate([preparer(row) for row in chunk])
        if start is None:  # the first batch pays for opening the stream
            start, first = time.perf_counter(), time.perf_counter() - opened
            continue
        megabytes += sum(len(r["audio"]["bytes"]) for r in chunk) / 1e6
        done += len(chunk)
    seconds = time.perf_counter() - start
    return {"first_batch_s": round(first, 2), "samples_per_s": round(done / seconds, 1),
            "mb_per_s": round(megabytes / seconds, 2), "clips": done + batch}


def measure_streams(args: argparse.Namespace) -> dict:
    """The streaming path from disk, then through the Hub server (each in a fresh process, as a worker is)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hub_server import FaultProxy, HubServer

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_repo(make_clips(args.clips, args.rate), Path(tmp))
        results = {"disk": _in_a_process(str(folder), {}, args)}
        with HubServer(Path(tmp)) as hub:
            for latency in args.latency_ms:
                with FaultProxy(hub.url, latency_s=latency / 1000) as proxy:
                    env = {"HF_ENDPOINT": proxy.url, "HF_HUB_OFFLINE": "0", "HF_HOME": f"{tmp}/hf-{latency:g}"}
                    results[f"http_{latency:g}ms"] = _in_a_process("speechbrain/LoquaciousSet", env, args)
    return results


def _in_a_process(dataset: str, env: dict[str, str], args: argparse.Namespace) -> dict:
    code = (f"import json, torch; torch.set_num_threads(1); import data_pipeline as d; "
            f"print(json.dumps(d.stream_rate({dataset!r}, {args.batch})))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "benchmarks"), **env}).stdout
    return json.loads(output.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rate", type=int, default=16_000, help="sample rate the clips are stored at")
    parser.add_argument("--stream", action="store_true", help="the streaming path, from disk and over HTTP")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 50.0],
                        help="with --stream: delays added to every HTTP request")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one dataloader worker = one core
    if args.stream:
        result = {"machine": f"{platform.processor() or platform.machine()}, 1 thread", "clips": args.clips,
                  "whisper_stream_per_worker": measure_streams(args)}
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return
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
