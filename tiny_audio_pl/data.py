"""Streaming speech data: parquet (hub or local) -> decoded clips -> encoder features -> padded batches.

Why it looks like this:

- LoquaciousSet ``large`` is ~3 TB, so everything streams (``datasets.load_dataset(streaming=True)``).
  A local folder of parquet files in the same schema streams through the same code.
- ``datasets`` would decode audio with torchcodec + FFmpeg; we cast the audio column to
  ``Audio(decode=False)`` and decode the stored bytes with soundfile, downmix, and resample with soxr.
- Features come from the encoder's own feature extractor, one clip at a time and unpadded, in the
  dataloader workers. The collate pads each batch only to its longest clip (not to Whisper's 30 s)
  and passes the true lengths, so the model can mask the padding and a clip's encoding does not
  depend on what it was batched with.
- A ``StatefulDataLoader`` saves the stream position (workers included) in every checkpoint, and
  the training shuffle (:class:`WindowShuffled`) is built so that this position is exact: a resumed
  run sees the same clips in the same order as one that never stopped.
- Batches are length-grouped: each shuffle window is cut into batches of clips of similar duration
  (read from the stored audio's header, no decoding), served in random order, so a batch of 3 s
  clips is not padded to the 20 s clip that happened to arrive with them (see :func:`length_grouped`).
- A clip that cannot be used is never fatal and never silent: it travels as a ``skip`` reason to
  the collate, which drops it from the batch; the data module counts the reasons in the main
  process (:class:`SkipLedger`), logs them, and stops a run that is mostly bad data.
"""

from __future__ import annotations

import copy
import io
import itertools
import signal
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.distributed as dist
from datasets import Audio, IterableDataset, interleave_datasets, load_dataset
from datasets.distributed import split_dataset_by_node
from huggingface_hub import constants as hub_constants
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch import LightningDataModule
from torch.utils.data import IterableDataset as TorchIterableDataset
from torch.utils.data import get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import AutoFeatureExtractor, AutoTokenizer

from tiny_audio_pl.errors import UsageError

# The Whisper encoder's position table covers 30 s; longer clips cannot be encoded in one window.
WHISPER_WINDOW_S = 30.0


def _readable(value: dict | bytes | str) -> io.BytesIO | str:
    """What soundfile reads for a stored clip: its bytes (``datasets``' ``{bytes, path}`` or raw) or its path."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    return io.BytesIO(value) if isinstance(value, bytes) else value


def decode_audio(value: dict | bytes | str, sample_rate: int) -> np.ndarray:
    """Decode one stored clip to float32 mono at ``sample_rate``.

    Args:
        value: an undecoded ``datasets`` audio value (``{"bytes": ..., "path": ...}``), raw encoded
            bytes, or a file path. wav, flac, ogg and mp3 are read by libsndfile.
        sample_rate: the rate the encoder expects.

    Returns:
        ``[num_samples]`` float32 waveform.
    """
    audio, rate = sf.read(_readable(value), dtype="float32", always_2d=True)  # [T, C]
    audio = audio.mean(axis=1)
    if rate != sample_rate:
        audio = soxr.resample(audio, rate, sample_rate)
    return np.ascontiguousarray(audio, dtype=np.float32)


def stored_duration(column: str, row: dict[str, Any]) -> float:
    """Duration in seconds of ``row[column]``'s audio, read from its header (0 when unreadable)."""
    try:
        return sf.info(_readable(row.get(column))).duration
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError):
        return 0.0  # the clip is skipped later, when it fails to decode


def length_grouped(durations: list[float], batch_size: int, rng: np.random.Generator) -> list[int]:
    """An order of ``durations``' indices whose consecutive runs of ``batch_size`` have similar durations.

    The indices are sorted by duration times a random factor in [0.9, 1.1] (so batch membership
    changes from epoch to epoch instead of always grouping the same neighbours), cut into batches,
    and the batches are put in random order (so training does not see short clips first, then
    long ones). Randomness lost against a plain shuffle: a batch holds clips within ~10 % of one
    another in duration instead of any clips of the window.
    """
    jittered = np.asarray(durations, dtype=np.float64) * rng.uniform(0.9, 1.1, len(durations))
    ordered = np.argsort(jittered, kind="stable")
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    return [int(i) for b in rng.permutation(len(batches)) for i in batches[b]]


def count_batches(durations: list[float], rng: np.random.Generator, batch_size: int, grouped: bool
                  ) -> list[list[int]]:
    """``durations``' indices in batches of ``batch_size``: length-grouped, or a plain shuffle cut in order."""
    order = length_grouped(durations, batch_size, rng) if grouped else rng.permutation(len(durations)).tolist()
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def budget_batches(durations: list[float], rng: np.random.Generator, seconds: float, max_clips: int
                   ) -> list[list[int]]:
    """``durations``' indices packed into batches of at most ``seconds`` of padded audio, in random batch order.

    The clips are taken in order of duration times a random factor in [0.9, 1.1] (as in
    :func:`length_grouped`), and a batch takes the next clip while (clips + 1) x its longest clip
    stays within ``seconds`` and it holds fewer than ``max_clips``: short clips come many to a batch,
    long ones few, and no batch pads to more than ``seconds`` (a single clip longer than that makes a
    batch of its own). That bounds the encoder's and the decoder's work per batch by construction.
    """
    jittered = np.asarray(durations, dtype=np.float64) * rng.uniform(0.9, 1.1, len(durations))
    batches: list[list[int]] = []
    longest = 0.0
    for i in np.argsort(jittered, kind="stable").tolist():
        grown = max(longest, durations[i])
        if batches and len(batches[-1]) < max_clips and (len(batches[-1]) + 1) * grown <= seconds:
            batches[-1].append(i)
            longest = grown
        else:
            batches.append([i])
            longest = durations[i]
    return [batches[b] for b in rng.permutation(len(batches))]


def normalize_target(text: str, mode: Literal["lower", "none"]) -> str:
    """The training target for a transcript: ``lower`` turns LoquaciousSet's upper case to lower case."""
    text = " ".join(text.split())
    return text.lower() if mode == "lower" else text


class Featurizer:
    """The encoder's own feature extractor, applied to one clip without padding."""

    def __init__(self, encoder: str) -> None:
        self.extractor = AutoFeatureExtractor.from_pretrained(encoder)
        self.sample_rate: int = self.extractor.sampling_rate
        self.is_whisper = "WhisperFeatureExtractor" in type(self.extractor).__name__

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """Features of one 16 kHz clip: log-mel ``[n_mels, frames]`` or normalised waveform ``[samples]``."""
        if self.is_whisper:
            out = self.extractor(audio, sampling_rate=self.sample_rate, padding="longest", truncation=False,
                                 return_tensors="np")
            return out["input_features"][0]
        return self.extractor(audio, sampling_rate=self.sample_rate, return_tensors="np")["input_values"][0]


class ClipPreparer:
    """Turns one raw dataset row into encoder features plus target text, or a reason to skip it.

    Runs in the dataloader workers. A row that cannot be used is never fatal: it comes back with
    ``skip`` set to one of ``missing_field``, ``empty_transcript``, ``transcript_too_long``,
    ``undecodable``, ``empty_audio``, ``nan_or_inf``, ``silent``, ``too_short`` or ``too_long``.
    """

    def __init__(self, encoder: str, decoder: str | None, min_duration: float, max_duration: float,
                 max_target_tokens: int, text_normalization: Literal["lower", "none"],
                 keep_audio: bool = False) -> None:
        self.features = Featurizer(encoder)
        self.tokenizer = AutoTokenizer.from_pretrained(decoder) if decoder else None
        self.sample_rate = self.features.sample_rate
        self.min_samples = int(min_duration * self.sample_rate)
        self.max_samples = int(max_duration * self.sample_rate)
        self.max_target_tokens = max_target_tokens
        self.text_normalization = text_normalization
        self.keep_audio = keep_audio  # validation: a few clips are played back in TensorBoard

    def _text_problem(self, text: str) -> str:
        if not text:
            return "empty_transcript"
        if self.tokenizer and len(self.tokenizer(text, add_special_tokens=False).input_ids) > self.max_target_tokens:
            return "transcript_too_long"
        return ""

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
        out["skip"] = self._text_problem(out["text"])
        if out["skip"]:
            return out
        try:
            audio = decode_audio(value, self.sample_rate)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError):
            out["skip"] = "undecodable"
            return out
        out["skip"] = self._audio_problem(audio)
        if not out["skip"]:
            out["features"] = self.features(audio)
            out["duration"] = len(audio) / self.sample_rate
            if self.keep_audio:
                out["audio"], out["sample_rate"] = audio, self.sample_rate
        return out


def collate(examples: list[dict[str, Any]], name: str = "") -> dict[str, Any]:
    """Pad a list of prepared clips to the longest one in the batch.

    Args:
        examples: prepared clips (:class:`ClipPreparer`).
        name: the evaluation set the clips come from (``""``: training, or the only validation set).

    Returns:
        ``features``: ``[B, n_mels, T]`` (Whisper) or ``[B, T]`` (waveform encoders), zero-padded;
        ``feature_lengths``: ``[B]`` valid frames/samples; ``text``, ``id``, ``duration`` (seconds),
        ``prompt`` (a source's own prompt, or None) and, when kept, ``audio`` (waveforms): lists of
        length B; ``set``: ``name``;
        ``skipped``: ``{reason: [ids]}`` for the clips dropped from this batch.
    """
    kept = [e for e in examples if not e["skip"]]
    skipped: dict[str, list[str]] = defaultdict(list)
    for example in examples:
        if example["skip"]:
            skipped[example["skip"]].append(example["id"])
    lengths = torch.tensor([e["features"].shape[-1] for e in kept], dtype=torch.long)
    if kept:
        first = kept[0]["features"]
        features = torch.zeros(len(kept), *first.shape[:-1], int(lengths.max()), dtype=torch.float32)
        for i, example in enumerate(kept):
            features[i, ..., : lengths[i]] = torch.from_numpy(example["features"])
    else:
        features = torch.zeros(0)
    batch = {"features": features, "feature_lengths": lengths, "text": [e["text"] for e in kept],
             "id": [e["id"] for e in kept], "duration": [e.get("duration", 0.0) for e in kept],
             "prompt": [e.get("prompt") for e in kept], "set": name,
             "skipped": dict(skipped)}
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


class WindowShuffled(TorchIterableDataset):
    """Shuffles a stream window by window into training batches, with a position saved and restored exactly.

    ``datasets``' own buffer shuffle does not save its buffer, so a resumed run would silently skip
    the clips that sat in it. Here the rows are read in windows of ``window``, and each window is cut
    into batches by ``batches`` (a function of the window's durations, read from the audio headers,
    and of a generator seeded by (seed, epoch, worker, window index)): a shuffle cut every
    ``data.batch_size`` clips, length-grouped batches of that size (:func:`length_grouped`), or
    batches filled to a budget of seconds (:func:`budget_batches`). The batches are yielded whole,
    as lists of prepared clips. The saved state is the source's position at the start of the
    current window plus how many of its batches were yielded: on resume the window is read again,
    cut into the same batches, and continues where it stopped, so no clip is repeated or skipped.
    Rows are prepared (decoded, featurized) only when their batch is yielded. Inside dataloader
    workers the ``datasets`` stream splits its shards among them by itself.
    """

    def __init__(self, source: IterableDataset, prepare: Callable[[dict], dict], window: int, seed: int,
                 batches: Callable[[list[float], np.random.Generator], list[list[int]]],
                 duration: Callable[[dict], float]) -> None:
        self.source, self.prepare, self.seed = source, prepare, seed
        self.batches, self.duration, self.window = batches, duration, max(1, window)
        self.epoch = 0
        self._state: dict[str, Any] = {"epoch": 0, "source": None, "window": 0, "yielded": 0}
        self._resume: dict[str, Any] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Start pass ``epoch`` over the stream (its own permutations) from its beginning."""
        self.epoch = epoch
        self._state = {"epoch": epoch, "source": None, "window": 0, "yielded": 0}

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = state

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        resume, self._resume = self._resume, None
        if resume and resume["epoch"] == self.epoch:
            window_start, index, skip = resume["source"], resume["window"], resume["yielded"]
        else:
            window_start, index, skip = None, 0, 0
        source = copy.deepcopy(self.source)  # a fresh position for every pass
        source.set_epoch(self.epoch)
        if window_start is not None:
            source.load_state_dict(window_start)
        worker = get_worker_info()
        rows = iter(source)
        while window := list(itertools.islice(rows, self.window)):
            rng = np.random.default_rng([self.seed, self.epoch, worker.id if worker else 0, index])
            batches = self.batches([self.duration(row) for row in window], rng)
            for position, batch in enumerate(batches):
                if position < skip:
                    continue
                self._state = {"epoch": self.epoch, "source": window_start, "window": index, "yielded": position + 1}
                yield [self.prepare(window[row]) for row in batch]
            window_start, index, skip = source.state_dict(), index + 1, 0


class TrainLoader(StatefulDataLoader):
    """A StatefulDataLoader that streams pass after pass without end, with an exact saved position.

    Lightning's epochs do not fit a stream measured in optimizer steps: on a restart inside an epoch
    it skips ``on_train_epoch_start`` (so a shuffle seeded by the pass would not learn which pass it
    is in), and a checkpoint taken at the last batch of a pass restarts with the pass counted twice.
    So this loader never ends: Lightning sees one endless epoch, and the loader itself starts pass
    ``p + 1`` (reseeding the shuffle through ``WindowShuffled.set_epoch``) when pass ``p`` runs out.
    Its state is the pass and the position inside it.

    Lightning fetches one batch ahead of the one it trains on, so the underlying loader's state at
    checkpoint time already counts a batch that was never trained on, and a resumed run would skip
    it. This loader reports the state from before the latest fetch: that of the batch being trained on.

    Lightning writes the checkpoint from rank 0 alone, so under DDP every rank would resume from rank
    0's position in rank 0's part of the stream. The state therefore gathers every rank's position
    (the checkpoint is built on all ranks), and each rank restores its own.
    """

    dataset: WindowShuffled

    def __init__(self, dataset: WindowShuffled, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.passes = 0  # passes over the stream started so far, minus one
        self._trained_position: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            self.dataset.set_epoch(self.passes)
            iterator = super().__iter__()  # restores a loaded position once, else starts the pass afresh
            fetched = 0
            while True:
                before = {"pass": self.passes, "loader": super().state_dict()}
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                self._trained_position = before
                fetched += 1
                yield batch
            if not fetched:  # an endless loop otherwise
                raise UsageError("the training stream yielded no clips in a whole pass: check data.dataset, "
                                 "data.train_split / data.train_sources and data.max_train_samples")
            self.passes += 1

    def state_dict(self) -> dict[str, Any]:
        own = self._trained_position or {"pass": self.passes, "loader": super().state_dict()}
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return own
        ranks: list[dict[str, Any] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, own)
        return {"per_rank": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "per_rank" in state_dict:
            ranks = state_dict["per_rank"]
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            if len(ranks) != world:
                raise UsageError(f"the checkpoint holds the data positions of {len(ranks)} ranks, this run has "
                                 f"{world}: resume with the same devices x nodes (or start a new run)")
            state_dict = ranks[dist.get_rank() if world > 1 else 0]
        self._trained_position = state_dict  # what state_dict() reports until the first batch is fetched
        self.passes = state_dict["pass"]
        super().load_state_dict(state_dict["loader"])


def _ignore_sigterm(worker_id: int) -> None:
    """Dataloader workers ignore SIGTERM: the main process saves the step, then stops them itself.

    Slurm, systemd and ``docker stop`` signal the whole process group. A worker that died of the
    signal would take the run down with it before the main process could save the current step.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def find_parquet_files(root: Path, config_name: str | None, split: str) -> list[str]:
    """Parquet files of ``split`` in a local folder laid out as ``[config/]split/*.parquet`` or ``split-*.parquet``."""
    bases = [root / config_name, root] if config_name else [root]
    patterns = [f"{split}/**/*.parquet", f"**/{split}-*.parquet", f"**/{split}/**/*.parquet"]
    for base in bases:
        for pattern in patterns:
            files = sorted(str(p) for p in base.glob(pattern))
            if files:
                return files
    raise UsageError(f"no parquet files for split '{split}' under {root} (looked for {patterns} "
                     f"in {[str(b) for b in bases]})")


@dataclass
class Source:
    """A dataset split and how to read it: for mixed training (``data.train_sources``) or scoring (``data.eval_sets``).

    Args:
        name: shown in results and metric names (``val/<name>/wer``).
        dataset: hub dataset id or local folder of parquet files.
        split: the split, e.g. ``train``, ``test`` or ``test.clean``.
        config_name: the dataset configuration, if it has several.
        audio_column: column holding the audio.
        text_column: column holding the target text (a transcript, or another task's answer).
        id_column: column holding the utterance id.
        prompt: the user message for this source, with ``<audio>`` (default: ``model.prompt``).
        weight: share of training clips drawn from this source (normalised over the sources).
        max_samples: use only the first N rows.
    """

    name: str
    dataset: str
    split: str
    config_name: str | None = None
    audio_column: str = "audio"
    text_column: str = "text"
    id_column: str = "id"
    prompt: str | None = None
    weight: float = 1.0
    max_samples: int | None = None


def _canonical_row(row: dict[str, Any], source: Source) -> dict[str, Any]:
    """One source's row under the names the clip preparation reads: ``id``, ``audio``, ``text``, ``prompt``."""
    return {"id": str(row.get(source.id_column) or ""), "audio": row.get(source.audio_column),
            "text": row.get(source.text_column), "prompt": source.prompt}


def _sources(value: list[Source | dict] | None, what: str) -> list[Source]:
    """Dataclasses, or the dicts a config file gives, checked."""
    try:
        sources = [s if isinstance(s, Source) else Source(**s) for s in value or []]
    except TypeError as error:
        raise UsageError(f"data.{what}: {error}; each entry takes the fields of Source "
                         f"({', '.join(Source.__dataclass_fields__)})") from error
    if len({s.name for s in sources}) < len(sources):
        raise UsageError(f"data.{what}: names must differ, got {[s.name for s in sources]}")
    return sources


class SpeechDataModule(LightningDataModule):
    """Streams a speech dataset in the LoquaciousSet schema and batches it with dynamic padding."""

    def __init__(
        self,
        dataset: str = "speechbrain/LoquaciousSet",
        config_name: str | None = "large",
        train_split: str = "train",
        val_split: str = "dev",
        audio_column: str = "wav",
        text_column: str = "text",
        id_column: str = "ID",
        batch_size: PositiveInt = 8,
        batch_seconds: PositiveFloat | None = None,
        max_batch_clips: PositiveInt = 64,
        max_train_samples: PositiveInt | None = None,
        max_eval_samples: PositiveInt | None = None,
        num_workers: NonNegativeInt = 4,
        shuffle_buffer: NonNegativeInt = 1000,
        group_by_length: bool = True,
        max_duration: PositiveFloat = WHISPER_WINDOW_S,
        min_duration: NonNegativeFloat = 0.1,
        max_target_tokens: PositiveInt = 256,
        max_bad_share: ClosedUnitInterval = 0.05,
        text_normalization: Literal["lower", "none"] = "lower",
        seed: int = 0,
        train_sources: list[Source] | None = None,
        eval_sets: list[Source] | None = None,
        encoder: str = "openai/whisper-large-v3-turbo",
        decoder: str | None = None,
    ) -> None:
        """Configure the data.

        Args:
            dataset: a hub dataset id, or a local folder of parquet files (``[config/]split/*.parquet``).
            config_name: dataset configuration (LoquaciousSet: small, medium, large, clean); for a local
                folder, a subfolder used when it exists.
            train_split: split streamed for training.
            val_split: split decoded for validation WER.
            audio_column: column holding the audio ({bytes, path}, raw bytes, or a path).
            text_column: column holding the transcript.
            id_column: column holding a clip id, shown in logs and skip reports.
            batch_size: clips per batch (per device): every validation batch, and training batches
                unless ``batch_seconds`` is set.
            batch_seconds: fill each training batch (per device) with clips up to this many seconds of
                padded audio (clips x the batch's longest clip) instead of a number of clips: short
                clips come many to a batch, long ones few, and no batch exceeds the budget (see
                ``budget_batches``; implies length grouping). Must be at least ``max_duration``.
            max_batch_clips: with ``batch_seconds``, at most this many clips in a batch (bounds the
                prompt tokens a batch of very short clips would add).
            max_train_samples: use only the first N clips of the train stream (the stream repeats
                each epoch).
            max_eval_samples: use only the first N clips of the validation split.
            num_workers: dataloader worker processes; the stream's shards are split among them.
            shuffle_buffer: training clips are shuffled within windows of this many (0 or 1: stream order).
            group_by_length: form each window's training batches from clips of similar duration, in
                random batch order, to cut padding (read from the audio headers; see ``length_grouped``).
            max_duration: clips longer than this many seconds are skipped and counted (Whisper's
                window is 30 s).
            min_duration: clips shorter than this many seconds are skipped and counted.
            max_target_tokens: transcripts longer than this many decoder tokens are skipped and counted.
            max_bad_share: stop the run when more than this share of the last 1000 clips was skipped
                (judged once 100 clips were seen): a run that is mostly bad data is a config mistake.
            text_normalization: how transcripts become training targets: ``lower`` lower-cases
                (LoquaciousSet is upper case), ``none`` keeps them as they are.
            seed: seed of the shuffle (each epoch, worker and window gets its own permutation).
            train_sources: train on a weighted mix of these instead of ``dataset``/``train_split``
                (``datasets.interleave_datasets``), each with its own columns and prompt, e.g.
                transcription plus other instructions (``configs/multi_task.yaml``).
            eval_sets: score these sets, each on its own row and metrics, instead of ``val_split``
                (each with its own columns; see ``configs/eval.yaml``).
            encoder: the encoder whose feature extractor makes the features; linked to
                ``model.encoder`` by the CLI.
            decoder: the decoder whose tokenizer measures transcripts; linked to ``model.decoder``.
        """
        super().__init__()
        if batch_size < 1:
            raise UsageError(f"data.batch_size must be >= 1, got {batch_size}")
        if batch_seconds is not None and batch_seconds < max_duration:
            raise UsageError(f"data.batch_seconds ({batch_seconds:g}) must be at least data.max_duration "
                             f"({max_duration:g}): a clip longer than the budget would make a batch over it")
        self.save_hyperparameters()
        self.train_sources = _sources(train_sources, "train_sources")
        self.eval_sets = _sources(eval_sets, "eval_sets")
        if any(s.weight <= 0 for s in self.train_sources):
            raise UsageError("data.train_sources: weights must be positive, got "
                             f"{[s.weight for s in self.train_sources]}")
        self.train_dataset: WindowShuffled | None = None
        self.val_datasets: dict[str, IterableDataset] = {}  # "" when there is only val_split
        self.skips = SkipLedger(max_bad_share, window=1000)

    def own_source(self, split: str, max_samples: int | None) -> Source:
        """This module's ``dataset`` and columns as a :class:`Source` (used without mixes or eval sets)."""
        hp = self.hparams
        return Source("", hp.dataset, split, hp.config_name, hp.audio_column, hp.text_column, hp.id_column,
                      max_samples=max_samples)

    def train_streams(self) -> list[Source]:
        """What training reads: ``data.train_sources``, or ``data.dataset``'s ``train_split``."""
        return self.train_sources or [self.own_source(self.hparams.train_split, None)]

    def evaluation_sets(self) -> list[Source]:
        """What validation scores: ``data.eval_sets``, or ``data.dataset``'s ``val_split``."""
        return self.eval_sets or [self.own_source(self.hparams.val_split, self.hparams.max_eval_samples)]

    def check(self, stage: str) -> None:
        """Open every source ``stage`` reads (files and schema only, no audio), so that a missing folder,
        split or column fails in the first second, before any model loads."""
        for source in (self.train_streams() if stage == "fit" else []) + self.evaluation_sets():
            self.open_source(source)

    def open_source(self, source: Source) -> IterableDataset:
        """Stream a source's split as rows of ``id``, ``audio`` (undecoded), ``text`` and ``prompt``."""
        root = Path(source.dataset)
        if root.is_dir():
            files = find_parquet_files(root, source.config_name, source.split)
            stream = load_dataset("parquet", data_files={source.split: files}, split=source.split, streaming=True)
        else:
            try:
                stream = load_dataset(source.dataset, source.config_name, split=source.split, streaming=True)
            except Exception as error:  # datasets raises many kinds for a dataset it cannot reach
                why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                offline = (" (HF_HUB_OFFLINE is set: only local folders and cached datasets)"
                           if hub_constants.HF_HUB_OFFLINE else "")
                raise UsageError(f"cannot open the dataset '{source.dataset}' (config {source.config_name}, split "
                                 f"'{source.split}'): it is not a local folder, and the hub said: {why}{offline}. "
                                 "Pass a local folder of parquet files or a reachable dataset id.") from error
        columns = list(stream.features or {})
        missing = [c for c in (source.audio_column, source.text_column) if columns and c not in columns]
        if missing:
            where = (f"audio_column / text_column of the data.train_sources or data.eval_sets entry '{source.name}'"
                     if source.name else "data.audio_column / data.text_column")
            raise UsageError(f"column(s) {missing} not in {source.dataset} split '{source.split}'; it has {columns}. "
                             f"Set {where}.")
        if isinstance((stream.features or {}).get(source.audio_column), Audio):
            stream = stream.cast_column(source.audio_column, Audio(decode=False))
        if source.max_samples is not None:
            stream = stream.take(source.max_samples)
        return stream.map(partial(_canonical_row, source=source), remove_columns=columns or None)

    def setup(self, stage: str) -> None:
        """Open the streams for this rank, mix, shuffle and truncate them, and attach the clip preparation."""
        hp = self.hparams
        prepare = partial(ClipPreparer, hp.encoder, hp.decoder, hp.min_duration, hp.max_duration,
                          hp.max_target_tokens, hp.text_normalization)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if stage == "fit":
            sources = self.train_streams()
            streams = [self.open_source(s) for s in sources]
            total = sum(s.weight for s in sources)
            train = streams[0] if len(streams) == 1 else interleave_datasets(
                streams, probabilities=[s.weight / total for s in sources], seed=hp.seed,
                stopping_strategy="all_exhausted")
            if hp.max_train_samples is not None:
                train = train.take(hp.max_train_samples)
            train = split_dataset_by_node(train, rank, world)
            if hp.batch_seconds:
                batches, window = partial(budget_batches, seconds=hp.batch_seconds, max_clips=hp.max_batch_clips), \
                    hp.shuffle_buffer
            else:  # a window of whole batches
                batches = partial(count_batches, batch_size=hp.batch_size, grouped=hp.group_by_length)
                window = -(-max(1, hp.shuffle_buffer) // hp.batch_size) * hp.batch_size
            self.train_dataset = WindowShuffled(train, prepare(), window=window, seed=hp.seed, batches=batches,
                                                duration=partial(stored_duration, "audio"))
        if stage in ("fit", "validate"):
            self.val_datasets = {}
            for source in self.evaluation_sets():
                val = split_dataset_by_node(self.open_source(source), rank, world)
                self.val_datasets[source.name] = val.map(prepare(keep_audio=True))

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Count the clips the collate dropped (main process), log the totals, stop if too many."""
        skipped = batch.pop("skipped")
        self.skips.record(skipped, len(batch["text"]))
        if skipped and self.trainer is not None and self.trainer.logger is not None:
            totals = {f"data/skipped/{reason}": float(count) for reason, count in self.skips.counts.items()}
            self.trainer.logger.log_metrics(totals, step=self.trainer.global_step)
        return batch

    def teardown(self, stage: str) -> None:
        if self.skips.counts:
            print(f"skipped clips: {self.skips.summary()}")

    def _loader(self, dataset: TorchIterableDataset | IterableDataset, kind: type[StatefulDataLoader],
                name: str = "") -> StatefulDataLoader:
        # A stream is split among workers by its shards (files): more workers than shards would idle.
        shards = (dataset.source if isinstance(dataset, WindowShuffled) else dataset).num_shards
        batch_size = None if kind is TrainLoader else self.hparams.batch_size  # training batches come whole
        return kind(dataset, batch_size=batch_size, collate_fn=partial(collate, name=name),
                    num_workers=min(self.hparams.num_workers, shards), pin_memory=torch.cuda.is_available(),
                    worker_init_fn=_ignore_sigterm)

    def train_dataloader(self) -> TrainLoader:
        return self._loader(self.train_dataset, TrainLoader)

    def val_dataloader(self) -> list[StatefulDataLoader]:
        """One loader per evaluation set; batches carry the set's name (``""`` for ``val_split`` alone)."""
        return [self._loader(dataset, StatefulDataLoader, name) for name, dataset in self.val_datasets.items()]
