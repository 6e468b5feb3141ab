"""Transcribing audio files with a trained model: ``tiny-audio transcribe AUDIO... --ckpt PATH``.

Files of any format libsndfile reads (wav, flac, ogg, mp3), sample rate and channel count are read
and cut into windows of at most 30 s at pauses by the model's own processor, and decoded by the
model's :meth:`~tiny_audio_pl.modeling.TinyAudioModel.transcribe_windows`: the windows of many files
batched together, shortest to longest, each file's texts joined. The exported folder's pipeline
reads and decodes the same way, so both give the same transcript.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from tiny_audio_pl.decoding import Decoding
from tiny_audio_pl.errors import UsageError
from tiny_audio_pl.modeling import TinyAudioModel


@dataclass
class Transcript:
    file: str
    text: str
    duration_s: float
    windows: int
    error: str = ""


def transcribe_files(model: TinyAudioModel, files: list[str], batch_size: int = 8, progress: bool = True,
                     chunk_batches: int = 16, decoding: Decoding | None = None) -> Iterator[Transcript]:
    """Transcribe ``files`` in batches; yields one :class:`Transcript` per file, in the given order.

    Files are read ``chunk_batches`` batches of windows at a time, so memory stays bounded however
    many files there are. A file that cannot be used (unreadable, too short, or failing in the
    model) yields a transcript with ``error`` set, and the other files are transcribed as usual. ``decoding``:
    the model's own settings by default.
    """
    processor = model.processor
    # A bar for a person watching a terminal; none in a log file (disable=None: off when not a TTY).
    shown = None if progress and len(files) > 1 else True
    bar = tqdm(total=len(files), desc="transcribing", unit="file", disable=shown)
    pending: list[tuple[Transcript, list[np.ndarray]]] = []  # each file's result and its windows' features
    for path in files:
        result, windows = Transcript(str(path), "", 0.0, 0), []
        try:
            audio = processor.load(str(path))
            result.duration_s = len(audio) / processor.sample_rate
            windows = processor.windows(audio)
        except Exception as error:  # noqa: BLE001 - reported for this file, the others go on
            result.error = f"cannot read: {error}" if isinstance(error, sf.LibsndfileError) else str(error)
        result.windows = len(windows)
        pending.append((result, windows))
        if sum(r.windows for r, _ in pending) >= batch_size * chunk_batches:  # a few dozen entries at most
            yield from _decode(model, pending, batch_size, decoding)
            bar.update(len(pending))
            pending = []
    yield from _decode(model, pending, batch_size, decoding)
    bar.update(len(pending))
    bar.close()


def _decode(model: TinyAudioModel, pending: list[tuple[Transcript, list[np.ndarray]]], batch_size: int,
            decoding: Decoding | None) -> Iterator[Transcript]:
    """Transcribe the readable files of ``pending`` together; if that fails, each file on its own, so
    that only the files whose own windows fail get an error."""
    readable = [(result, windows) for result, windows in pending if windows]
    try:
        texts = model.transcribe_windows([windows for _, windows in readable], batch_size, decoding)
    except Exception:  # noqa: BLE001 - find the file(s) at fault
        texts = []
        for result, windows in readable:
            try:
                texts += model.transcribe_windows([windows], batch_size, decoding)
            except Exception as error:  # noqa: BLE001 - reported for this file
                result.error = f"transcription failed: {type(error).__name__}: {error}"
                texts.append("")
    for (result, _), text in zip(readable, texts):
        result.text = text
    for result, _ in pending:
        yield result


def pick_device(name: str | None) -> torch.device:
    """The device asked for, checked before anything loads; by default CUDA, else MPS, else the CPU."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"--device {name}: not a device name (use cuda, cuda:1, cpu or mps)") from error
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} usable CUDA GPU(s); "
                         "use --device cpu, or leave --device out to take the best available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu or leave --device out")
    return device
