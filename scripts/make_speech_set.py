"""Synthesize a speech set in the LoquaciousSet schema for real-model experiments on a CPU.

``assets/tiny-speech`` is made for models built here; real pretrained models (``configs/laptop.yaml``)
need more and less regular speech. This script speaks English sentences with two Debian text-to-speech
engines and writes them as LoquaciousSet does (``ID``, ``duration``, ``wav`` as {bytes, path},
``spk_id``, ``sex``, ``text`` in upper case without punctuation; no sentence has digits, so numbers
appear as words only)::

    OUT/train/train-0000K.parquet   --train utterances of --sentences distinct sentences, train voices
    OUT/dev/dev-00000.parquet       --dev utterances: sentences and voices that train never has

- Text: the example sentences of WordNet (Debian ``wordnet-base``, Princeton's permissive licence):
  tens of thousands of short, natural English sentences, kept when they are 4 to 16 words of plain
  letters and no digits. Every sentence is used once in dev or up to twice in train (by different voices), never both.
- Voices: espeak-ng's English accents (US, British, Scottish, RP, Lancaster, West Midlands, Caribbean)
  with its male and female variants, and flite's voices (kal, awb, rms, slt); speed varies per clip.
  The dev voices are kept out of train, so dev WER measures speakers the projector never heard.

Needs ``apt-get install espeak-ng flite wordnet-base``. Usage::

    python scripts/make_speech_set.py OUT [--train 3200] [--sentences 2400] [--dev 200] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import random
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import soxr
from datasets import Audio, Features, Value
from tqdm import tqdm

SAMPLE_RATE = 16_000
WORDNET = Path("/usr/share/wordnet")
# (engine, voice, sex). Train and dev voices are disjoint.
TRAIN_VOICES = [("espeak-ng", "en-us", "M"), ("espeak-ng", "en-gb", "M"), ("espeak-ng", "en-us+f2", "F"),
                ("espeak-ng", "en-gb-scotland+m3", "M"), ("espeak-ng", "en-gb-x-rp+f4", "F"),
                ("espeak-ng", "en-029+m5", "M"), ("espeak-ng", "en-gb-x-gbclan+f1", "F"),
                ("flite", "kal", "M"), ("flite", "awb", "M"), ("flite", "rms", "M")]
DEV_VOICES = [("espeak-ng", "en-gb-x-gbcwmd+m2", "M"), ("espeak-ng", "en-us+f3", "F"), ("flite", "slt", "F")]


def transcript(sentence: str) -> str:
    """LoquaciousSet's form: upper case, no punctuation but apostrophes inside words."""
    words = [w.strip("'") for w in re.sub(r"[^A-Za-z']+", " ", sentence.replace("-", " ")).split()]
    return " ".join(w for w in words if w).upper()


def wordnet_sentences() -> list[str]:
    """WordNet's example sentences (the quoted parts of its glosses) that make good clips, deduplicated."""
    found: dict[str, str] = {}
    for part in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{part}").read_text(errors="ignore").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header
            for example in re.findall(r'"([^"]+)"', line.split("|", 1)[1]):
                if re.search(r"[0-9`;:()\[\]/&%$#@*+=<>_]", example):
                    continue  # numbers (which a voice may read in several ways), quoted words, symbols
                text = transcript(example)
                if 4 <= len(text.split()) <= 16:
                    found.setdefault(text, example.strip())
    return [found[key] for key in sorted(found)]  # sorted: the same list on every machine


def synthesize(engine: str, voice: str, text: str, speed: float) -> np.ndarray:
    """Speech for ``text`` as float32 mono at 16 kHz; ``speed`` 1.0 is the engine's normal rate."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        if engine == "espeak-ng":
            command = ["espeak-ng", "-v", voice, "-s", str(round(165 * speed)), "-w", tmp.name, text]
        else:
            command = ["flite", "-voice", voice, "--setf", f"duration_stretch={1 / speed:.3f}", "-t", text,
                       "-o", tmp.name]
        subprocess.run(command, check=True, capture_output=True)
        audio, rate = sf.read(tmp.name, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    return soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32) if rate != SAMPLE_RATE else audio


def make_row(job: tuple[str, str, tuple[str, str, str], float]) -> dict:
    uid, sentence, (engine, voice, sex), speed = job
    audio = synthesize(engine, voice, sentence, speed)
    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return {"ID": uid, "duration": round(len(audio) / SAMPLE_RATE, 3),
            "wav": {"bytes": buffer.getvalue(), "path": f"{uid}.flac"},
            "spk_id": f"{engine}-{voice}", "sex": sex, "text": transcript(sentence)}


def write_split(rows: list[dict], folder: Path, split: str, shards: int) -> None:
    """Rows as ``shards`` parquet files (several, so dataloader workers can share a split)."""
    features = Features({"ID": Value("string"), "duration": Value("float32"),
                         "wav": Audio(sampling_rate=SAMPLE_RATE, decode=False), "spk_id": Value("string"),
                         "sex": Value("string"), "text": Value("string")})
    (folder / split).mkdir(parents=True)
    for shard in range(shards):
        # pyarrow directly (datasets' own Audio encoding needs torchcodec); the schema keeps datasets' metadata.
        table = pa.Table.from_pylist(rows[shard::shards], schema=features.arrow_schema)
        pq.write_table(table, folder / split / f"{split}-{shard:05d}.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to create (must not exist)")
    parser.add_argument("--train", type=int, default=3200, help="train utterances")
    parser.add_argument("--sentences", type=int, default=2400, help="distinct train sentences (each said 1-2 times)")
    parser.add_argument("--dev", type=int, default=200, help="dev utterances, one sentence each")
    parser.add_argument("--shards", type=int, default=8, help="train parquet files")
    parser.add_argument("--workers", type=int, default=2, help="synthesis processes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: name a new folder")
    if not args.sentences <= args.train <= 2 * args.sentences:
        raise SystemExit("--train must be between --sentences and twice --sentences (each sentence said 1-2 times)")
    rng = random.Random(args.seed)
    pool = wordnet_sentences()
    rng.shuffle(pool)
    if len(pool) < args.sentences + args.dev:
        raise SystemExit(f"WordNet gave {len(pool)} usable sentences, fewer than --sentences + --dev")
    dev_sentences, train_sentences = pool[:args.dev], pool[args.dev:args.dev + args.sentences]
    spoken = train_sentences + rng.sample(train_sentences, args.train - args.sentences)  # some said twice
    rng.shuffle(spoken)
    jobs = {"train": [], "dev": []}
    for split, sentences, voices in (("train", spoken, TRAIN_VOICES), ("dev", dev_sentences, DEV_VOICES)):
        used: dict[str, set] = {}
        for i, sentence in enumerate(sentences):
            voice = rng.choice([v for v in voices if v not in used.get(sentence, set())])  # a repeat: another voice
            used.setdefault(sentence, set()).add(voice)
            jobs[split].append((f"{split}-{i:05d}", sentence, voice, rng.uniform(0.85, 1.2)))
    with ProcessPoolExecutor(args.workers) as executor:
        for split, shards in (("train", args.shards), ("dev", 1)):
            rows = list(tqdm(executor.map(make_row, jobs[split], chunksize=16), total=len(jobs[split]),
                             desc=f"speaking {split}", unit="utterance"))
            write_split(rows, args.out, split, shards)
            hours = sum(r["duration"] for r in rows) / 3600
            print(f"{split}: {len(rows)} utterances, {len({r['text'] for r in rows})} sentences, "
                  f"{len({r['spk_id'] for r in rows})} voices, {hours:.2f} h")


if __name__ == "__main__":
    main()
