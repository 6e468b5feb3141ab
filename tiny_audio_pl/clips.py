"""One dataset row -> a prepared clip (features, target tokens) or a reason to skip it; clips -> a padded batch.

Runs in the dataloader workers. A clip that cannot be used is never fatal and never silent: it
travels as a ``skip`` reason to the collate, which drops it from the batch; the data module counts
the reasons in the main process (:class:`SkipLedger`), logs them, and stops a run that is mostly
bad data. Features and tokens come from the model's own processor, as in transcription.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from typing import Any, Literal

import numpy as np
import soundfile as sf

from tiny_audio_pl.errors import UsageError
from tiny_audio_pl.network import NETWORK
from tiny_audio_pl.processing import TinyAudioProcessor


def normalize_target(text: str, mode: Literal["lower", "none"]) -> str:
    """The training target for a transcript: ``lower`` turns LoquaciousSet's upper case to lower case."""
    text = " ".join(text.split())
    return text.lower() if mode == "lower" else text


class ClipPreparer:
    """Turns one raw dataset row into encoder features plus target tokens, or a reason to skip it.

    Runs in the dataloader workers. A row that cannot be used is never fatal: it comes back with
    ``skip`` set to one of ``missing_field``, ``empty_transcript``, ``transcript_too_long``,
    ``undecodable``, ``empty_audio``, ``nan_or_inf``, ``silent``, ``too_short`` or ``too_long``.
    """

    def __init__(self, processor: TinyAudioProcessor, min_duration: float, max_duration: float,
                 max_target_tokens: int, text_normalization: Literal["lower", "none"],
                 keep_audio: bool = False) -> None:
        self.processor = processor
        self.sample_rate = processor.sample_rate
        self.min_samples = int(min_duration * self.sample_rate)
        self.max_samples = int(max_duration * self.sample_rate)
        self.max_target_tokens = max_target_tokens
        self.text_normalization = text_normalization
        self.keep_audio = keep_audio  # validation: a few clips are played back in TensorBoard

    def _audio_problem(self, audio: np.ndarray) -> str:
        if len(audio) == 0:
            return "empty_audio"
        if not np.isfinite(audio).all():
            return "nan_or_inf"
        if not audio.any():
            return "silent"
        if len(audio) < self.min_samples:
            return "too_short"
        return "too_long" if len(audio) > self.max_samples else ""

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {"id": str(row.get("id") or ""), "text": "", "features": None, "skip": "", "prompt": row.get("prompt")}
        value, text = row.get("audio"), row.get("text")
        if value is None or text is None or (isinstance(value, dict) and not (value.get("bytes") or value.get("path"))):
            out["skip"] = "missing_field"
            return out
        out["text"] = normalize_target(str(text), self.text_normalization)
        if not out["text"]:
            out["skip"] = "empty_transcript"
            return out
        out["targets"] = self.processor.targets([out["text"]])[0]  # the one tokenization of the transcript
        if len(out["targets"]) - 1 > self.max_target_tokens:  # the end-of-turn token not counted
            out["skip"] = "transcript_too_long"
            return out
        try:
            audio = self.processor.load(value)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError):
            out["skip"] = "undecodable"
            return out
        out["skip"] = self._audio_problem(audio)
        if not out["skip"]:
            out["features"] = self.processor.features(audio)
            out["duration"] = len(audio) / self.sample_rate
            if self.keep_audio:
                out["audio"], out["sample_rate"] = audio, self.sample_rate
        return out


def collate(examples: list[dict[str, Any]], name: str = "train") -> dict[str, Any]:
    """Pad a list of prepared clips to the longest one in the batch.

    Args:
        examples: prepared clips (:class:`ClipPreparer`).
        name: what the clips come from: ``train``, or the evaluation set's name.

    Returns:
        ``features``: ``[B, n_mels, T]`` (Whisper) or ``[B, T]`` (waveform encoders), zero-padded;
        ``feature_lengths``: ``[B]`` valid frames/samples; ``text``, ``targets`` (token ids), ``id``,
        ``duration`` (seconds), ``prompt`` (a source's own prompt, or None) and, when kept, ``audio``
        (waveforms): lists of length B; ``set``: ``name``; ``skipped``: ``{reason: [ids]}`` for the
        clips dropped from this batch; ``retries``: network retries in this process since its last batch.
    """
    kept = [e for e in examples if not e["skip"]]
    skipped: dict[str, list[str]] = defaultdict(list)
    for example in examples:
        if example["skip"]:
            skipped[example["skip"]].append(example["id"])
    features, lengths = TinyAudioProcessor.pad([e["features"] for e in kept])
    batch = {"features": features, "feature_lengths": lengths, "text": [e["text"] for e in kept],
             "targets": [e["targets"] for e in kept], "id": [e["id"] for e in kept],
             "duration": [e.get("duration", 0.0) for e in kept], "prompt": [e.get("prompt") for e in kept],
             "set": name, "skipped": dict(skipped), "retries": NETWORK.drain()}
    if any("audio" in e for e in kept):
        batch["audio"] = [e.get("audio") for e in kept]
        batch["sample_rate"] = kept[0]["sample_rate"]
    return batch


class SkipLedger:
    """Counts skipped clips by reason with example ids, and stops a run that is mostly bad data."""

    def __init__(self, max_share: float, window: int) -> None:
        self.max_share = max_share
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.recent: deque[bool] = deque(maxlen=window)  # True for a skipped clip
        self.judge_after = min(window, 100)

    def record(self, skipped: dict[str, list[str]], kept: int) -> None:
        for reason, ids in skipped.items():
            self.counts[reason] += len(ids)
            self.examples[reason] = list(dict.fromkeys(self.examples[reason] + ids))[:5]  # distinct ids
        bad = sum(len(ids) for ids in skipped.values())
        self.recent.extend([True] * bad + [False] * kept)
        share = sum(self.recent) / max(1, len(self.recent))
        if len(self.recent) >= self.judge_after and share > self.max_share:
            raise UsageError(f"{share:.0%} of the last {len(self.recent)} clips were unusable, more than "
                             f"data.max_bad_share={self.max_share:g}: {self.summary()}. Check the dataset and "
                             "data.audio_column / data.text_column, or raise data.max_bad_share.")

    def summary(self) -> str:
        return "; ".join(f"{reason} {count} (e.g. {', '.join(self.examples[reason])})"
                         for reason, count in self.counts.most_common())
