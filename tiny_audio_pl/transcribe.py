"""Transcribing audio files with a trained model: ``tiny-audio transcribe AUDIO... --ckpt PATH``.

Files of any format libsndfile reads (wav, flac, ogg, mp3), sample rate and channel count are
decoded, downmixed and resampled as in training, by the model's own processor (the exported
folder's pipeline does the same). A file longer than the encoder's 30 s window is cut into windows
of at most 30 s at pauses (``processing.split_windows``), the windows are transcribed like separate
clips and their texts joined with a space. Windows of many files are batched together, shortest to
longest, so a batch wastes little padding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from tiny_audio_pl.errors import UsageError
from tiny_audio_pl.modeling import TinyAudioModel
from tiny_audio_pl.processing import decode_audio, split_windows


@dataclass
class Transcript:
    file: str
    text: str
    duration_s: float
    windows: int
    error: str = ""


MIN_DURATION_S = 0.1  # shorter than the encoders' first frame (Whisper's STFT, HuBERT's 25 ms conv); data.min_duration


def transcribe_files(model: TinyAudioModel, files: list[str], batch_size: int = 8, progress: bool = True,
                     chunk_batches: int = 16) -> Iterator[Transcript]:
    """Transcribe ``files`` in batches; yields one :class:`Transcript` per file, in the given order.

    Files are read ``chunk_batches`` batches of windows at a time, so memory stays bounded however
    many files there are. A file that cannot be used (unreadable, too short, or failing in the
    model) yields a transcript with ``error`` set, and the other files are transcribed as usual.
    """
    processor = model.processor
    # A bar for a person watching a terminal; none in a log file (disable=None: off when not a TTY).
    shown = None if progress and len(files) > 1 else True
    bar = tqdm(total=len(files), desc="transcribing", unit="file", disable=shown)
    pending: list[Transcript] = []
    windows: list[tuple[int, np.ndarray]] = []  # (index in pending, features), in file then time order
    for path in files:
        result = Transcript(str(path), "", 0.0, 0)
        pending.append(result)
        try:
            audio = decode_audio(str(path), processor.sample_rate)
            result.duration_s = len(audio) / processor.sample_rate
            if result.duration_s < MIN_DURATION_S:
                raise ValueError(f"too short ({result.duration_s:.3f} s; at least {MIN_DURATION_S} s of audio)")
            pieces = [processor.features(p) for p in split_windows(audio, processor.sample_rate)]
        except Exception as error:  # noqa: BLE001 - reported for this file, the others go on
            result.error = f"cannot read: {error}" if isinstance(error, sf.LibsndfileError) else str(error)
        else:
            result.windows = len(pieces)
            windows += [(len(pending) - 1, piece) for piece in pieces]
        if len(windows) >= batch_size * chunk_batches:
            yield from _decode(model, pending, windows, batch_size)
            bar.update(len(pending))
            pending, windows = [], []
    yield from _decode(model, pending, windows, batch_size)
    bar.update(len(pending))
    bar.close()


def _transcribe_batch(model: TinyAudioModel, features: list[np.ndarray]) -> list[str]:
    padded, lengths = model.processor.pad(features)
    return model.transcribe(padded.to(model.device), lengths)


def _decode(model: TinyAudioModel, results: list[Transcript], windows: list[tuple[int, np.ndarray]], batch_size: int
            ) -> Iterator[Transcript]:
    """Transcribe ``windows`` shortest first (little padding per batch), then join each file's texts.

    A batch that fails is retried one window at a time, so only the files whose own windows fail get an error.
    """
    order = sorted(range(len(windows)), key=lambda i: windows[i][1].shape[-1])
    texts: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        try:
            texts.update(zip(batch, _transcribe_batch(model, [windows[i][1] for i in batch])))
        except Exception:  # noqa: BLE001 - find the window(s) at fault
            for i in batch:
                try:
                    texts[i] = _transcribe_batch(model, [windows[i][1]])[0]
                except Exception as error:  # noqa: BLE001 - reported for this file
                    results[windows[i][0]].error = f"transcription failed: {type(error).__name__}: {error}"
    pieces: dict[int, list[str]] = {}
    for i, (index, _) in enumerate(windows):
        pieces.setdefault(index, []).append(texts.get(i, ""))
    for index, result in enumerate(results):
        result.text = "" if result.error else " ".join(t for t in pieces.get(index, []) if t)
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
