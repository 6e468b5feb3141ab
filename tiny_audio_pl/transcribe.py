"""Transcribing audio files with a trained model: ``tiny-audio transcribe AUDIO... --ckpt PATH``.

Files of any format libsndfile reads (wav, flac, ogg, mp3), sample rate and channel count are
decoded, downmixed and resampled as in training. A file longer than the encoder's 30 s window is
cut into windows of at most 30 s, each cut placed at the quietest 25 ms within the last
``search_s`` seconds before the limit (so a cut falls between words where there is a pause), the
windows are transcribed like separate clips and their texts joined with a space. Windows of many
files are batched together, shortest to longest, so a batch wastes little padding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from tiny_audio_pl.data import WHISPER_WINDOW_S, Featurizer, collate, decode_audio
from tiny_audio_pl.model import SpeechLLM


def split_windows(audio: np.ndarray, sample_rate: int, window_s: float = WHISPER_WINDOW_S,
                  search_s: float = 3.0) -> list[np.ndarray]:
    """Cut ``audio`` into pieces of at most ``window_s`` seconds, each cut at the quietest 25 ms near the limit."""
    window, search, frame = int(window_s * sample_rate), int(search_s * sample_rate), int(0.025 * sample_rate)
    pieces, start = [], 0
    while len(audio) - start > window:
        lo = start + window - search
        region = audio[lo:start + window]
        energy = np.square(region[: len(region) // frame * frame]).reshape(-1, frame).sum(axis=1)  # [frames]
        cut = lo + int(np.argmin(energy)) * frame + frame // 2
        pieces.append(audio[start:cut])
        start = cut
    pieces.append(audio[start:])
    return pieces


@dataclass
class Transcript:
    file: str
    text: str
    duration_s: float
    windows: int
    error: str = ""


def transcribe_files(model: SpeechLLM, files: list[str], batch_size: int = 8, progress: bool = True,
                     chunk_batches: int = 16) -> Iterator[Transcript]:
    """Transcribe ``files`` in batches; yields one :class:`Transcript` per file, in the given order.

    Files are read ``chunk_batches`` batches of windows at a time, so memory stays bounded however
    many files there are. A file that cannot be read yields a transcript with ``error`` set instead
    of stopping the others.
    """
    featurize = Featurizer(model.hparams.encoder)
    bar = tqdm(total=len(files), desc="transcribing", unit="file", disable=not progress or len(files) < 2)
    pending: list[Transcript] = []
    windows: list[tuple[int, np.ndarray]] = []  # (index in pending, features), in file then time order
    for path in files:
        result = Transcript(str(path), "", 0.0, 0)
        pending.append(result)
        try:
            audio = decode_audio(str(path), featurize.sample_rate)
        except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as error:
            result.error = f"cannot read: {error}"
        else:
            result.duration_s = len(audio) / featurize.sample_rate
            pieces = [p for p in split_windows(audio, featurize.sample_rate) if len(p)]
            result.windows = len(pieces)
            windows += [(len(pending) - 1, featurize(piece)) for piece in pieces]
        if len(windows) >= batch_size * chunk_batches:
            yield from _decode(model, pending, windows, batch_size)
            bar.update(len(pending))
            pending, windows = [], []
    yield from _decode(model, pending, windows, batch_size)
    bar.update(len(pending))
    bar.close()


def _decode(model: SpeechLLM, results: list[Transcript], windows: list[tuple[int, np.ndarray]], batch_size: int
            ) -> Iterator[Transcript]:
    """Transcribe ``windows`` shortest first (little padding per batch), then join each file's texts."""
    order = sorted(range(len(windows)), key=lambda i: windows[i][1].shape[-1])
    texts: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        padded = collate([{"features": windows[i][1], "skip": "", "id": "", "text": ""} for i in batch])
        texts.update(zip(batch, model.transcribe(padded["features"].to(model.device), padded["feature_lengths"])))
    pieces: dict[int, list[str]] = {}
    for i, (index, _) in enumerate(windows):
        pieces.setdefault(index, []).append(texts[i])
    for index, result in enumerate(results):
        result.text = " ".join(t for t in pieces.get(index, []) if t)
        yield result


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def file_list(paths: list[str]) -> list[str]:
    """Expand folders into the audio files they hold (sorted); files are kept as given."""
    out: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            out += sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in {".wav", ".flac", ".ogg", ".mp3"})
        else:
            out.append(str(path))
    return out
