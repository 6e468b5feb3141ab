"""The data module: sources (hub or local parquet) -> prepared clips -> padded batches, and what went wrong.

Why it looks like this:

- LoquaciousSet ``large`` is ~3 TB, so everything streams (``datasets.load_dataset(streaming=True)``).
  A local folder of parquet files in the same schema streams through the same code. Every split
  read, for training or scoring, is a :class:`Source` (a dataset, its split and its columns).
- ``datasets`` would decode audio with torchcodec + FFmpeg; the audio column is read undecoded and
  turned into features by the model's own :class:`~tiny_audio_pl.processing.TinyAudioProcessor`,
  handed over with :meth:`SpeechDataModule.connect` (the CLI does it), the same as in ``tiny-audio
  transcribe`` and the exported model's pipeline. Transcripts are tokenized once, in the
  dataloader workers. The collate pads each batch only to its longest clip and passes the true
  lengths, so a clip's encoding does not depend on what it was batched with.
- The training stream (``stream.py``) is shuffled in windows, cut into length-grouped or budget
  batches, and resumes exactly, pass after pass.
- A clip that cannot be used is never fatal and never silent (``clips.py``): it is skipped with a
  reason, counted in the main process, logged, and a run that is mostly bad data stops.
- A network fault costs a wait, not the run (``network.py``); on a node without internet, hub ids
  read what ``tiny-audio download`` fetched (``hub.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Audio, IterableDataset, interleave_datasets, load_dataset
from datasets.distributed import split_dataset_by_node
from huggingface_hub import constants as hub_constants
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch import LightningDataModule
from torchdata.stateful_dataloader import StatefulDataLoader

from tiny_audio_pl.clips import ClipPreparer, SkipLedger, collate
from tiny_audio_pl.errors import DataUnavailable, UsageError
from tiny_audio_pl.hub import FETCH_HINT, cached_dataset, find_parquet_files, hub_parquet_files
from tiny_audio_pl.network import NETWORK, with_retries
from tiny_audio_pl.processing import MIN_DURATION_S, WHISPER_WINDOW_S, TinyAudioProcessor, stored_duration
from tiny_audio_pl.stream import (
    PreparedRows,
    TrainLoader,
    WindowShuffled,
    budget_batches,
    count_batches,
    ignore_stop_signals,
)

MAX_BATCH_CLIPS = 64  # the default; another value is a choice of the user's
DEFAULT_SET = "validation"  # the evaluation set data.val_split makes when data.eval_sets is unset (metrics val/*)


@dataclass
class Source:
    """A dataset split and how to read it: an entry of ``data.train_sources`` (mixed training) or
    ``data.eval_sets`` (each scored on its own).

    Every field left out takes the data module's own setting, so an entry says only what differs
    and no ``data.*`` setting is ever ignored: ``dataset``, ``config_name`` and the columns from
    ``data.*``; ``split`` from ``data.train_split`` (training) or ``data.val_split`` (scoring);
    ``max_samples`` from ``data.max_eval_samples`` (scoring).

    Args:
        name: shown in results and metric names (``val/<name>/wer``; the set named ``validation``,
            which ``data.val_split`` makes when ``data.eval_sets`` is unset, logs as ``val/wer``).
        dataset: hub dataset id or local folder of parquet files.
        split: the split, e.g. ``train``, ``test`` or ``test.clean``.
        config_name: the dataset configuration, if it has several ("" for none).
        audio_column: column holding the audio.
        text_column: column holding the target text (a transcript, or another task's answer).
        id_column: column holding the utterance id.
        prompt: the user message for this source, with ``<audio>`` (default: ``model.prompt``).
        weight: share of training clips drawn from this source (normalised over the sources).
        max_samples: use only the first N rows.
    """

    name: str
    dataset: str | None = None
    split: str | None = None
    config_name: str | None = None
    audio_column: str | None = None
    text_column: str | None = None
    id_column: str | None = None
    prompt: str | None = None
    weight: float = 1.0
    max_samples: int | None = None

    def filled(self, **defaults: Any) -> Source:
        """This entry with each field left out taken from ``defaults``."""
        given = {name: value for name, value in vars(self).items() if value is not None}
        filled = Source(**{**defaults, **given})
        filled.config_name = filled.config_name or None  # "" asks for no configuration
        return filled


def _row_duration(row: dict[str, Any]) -> float:
    """Duration of a canonical row's audio, from its header (for length grouping; 0 when unreadable)."""
    return stored_duration(row.get("audio"))


def _canonical_row(row: dict[str, Any], source: Source) -> dict[str, Any]:
    """One source's row under the names the clip preparation reads: ``id``, ``audio``, ``text``, ``prompt``."""
    return {"id": str(row.get(source.id_column) or ""), "audio": row.get(source.audio_column),
            "text": row.get(source.text_column), "prompt": source.prompt}


def _parquet_stream(files: list[str], split: str) -> IterableDataset:
    """A stream of parquet files (local paths or ``hf://`` URLs) as one split."""
    return load_dataset("parquet", data_files={split: files}, split=split, streaming=True)


def _cached_files(source: Source) -> list[str]:
    """A hub dataset's split's parquet files in the hub cache (``HF_HUB_OFFLINE``), or one line on what to fetch."""
    cached = cached_dataset(source.dataset)
    if cached is None:
        raise UsageError(f"the dataset '{source.dataset}' is neither a folder under {Path.cwd()} (a config's paths "
                         "are read from the folder you run in) nor in the hub cache, and HF_HUB_OFFLINE is set: run "
                         f"from the folder it is in, or {FETCH_HINT}")
    try:
        return find_parquet_files(cached, source.config_name, source.split)
    except UsageError as error:
        raise UsageError(f"the hub cache's copy of '{source.dataset}' ({cached}) has no files for config "
                         f"{source.config_name}, split '{source.split}': {FETCH_HINT}") from error


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
        max_batch_clips: PositiveInt = MAX_BATCH_CLIPS,
        max_train_samples: PositiveInt | None = None,
        max_eval_samples: PositiveInt | None = None,
        num_workers: NonNegativeInt = 4,
        shuffle_buffer: NonNegativeInt = 1000,
        group_by_length: bool = True,
        max_duration: PositiveFloat = WHISPER_WINDOW_S,
        min_duration: NonNegativeFloat = MIN_DURATION_S,
        max_target_tokens: PositiveInt = 256,
        max_bad_share: ClosedUnitInterval = 0.05,
        network_patience: PositiveFloat = 300.0,
        text_normalization: Literal["lower", "none"] = "lower",
        seed: int = 0,
        train_sources: list[Source] | None = None,
        eval_sets: list[Source] | None = None,
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
            network_patience: how many seconds a stream keeps retrying a data host that does not answer
                (connection refused or dropped, 5xx, stalled reads) before the run stops, saving its last
                complete optimizer step; shorter faults cost a wait, counted in ``data/retries``.
            text_normalization: how transcripts become training targets: ``lower`` lower-cases
                (LoquaciousSet is upper case), ``none`` keeps them as they are.
            seed: seed of the shuffle (each epoch, worker and window gets its own permutation).
            train_sources: train on a weighted mix of these (``datasets.interleave_datasets``), each
                with its own dataset, columns and prompt where they differ from the ``data.*`` ones,
                e.g. transcription plus other instructions (``configs/multi_task.yaml``).
            eval_sets: score these sets, each on its own row and metrics (``val/<name>/*``), each with
                its own dataset, split and columns where they differ (``configs/eval.yaml``).
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
        weighted = [s.name for s in self.eval_sets if s.weight != 1.0]
        if weighted:  # a setting that would do nothing is a mistake, not a silent no-op
            raise UsageError(f"data.eval_sets {weighted}: weight mixes data.train_sources only; each evaluation "
                             "set is scored on its own (drop the weight)")
        if batch_seconds is None and max_batch_clips != MAX_BATCH_CLIPS:
            raise UsageError("data.max_batch_clips bounds the batches of data.batch_seconds, which is not set (batches "
                             "are data.batch_size clips): set data.batch_seconds, or drop data.max_batch_clips")
        if batch_seconds is not None and not group_by_length:
            raise UsageError("data.group_by_length false has no effect with data.batch_seconds: budget batches are "
                             "always formed from clips of similar length. Drop one of the two settings")
        self.train_dataset: WindowShuffled | None = None
        self.val_datasets: dict[str, PreparedRows] = {}  # by evaluation set
        self.processor: TinyAudioProcessor | None = None  # the model's, from connect()
        self.skips = SkipLedger(max_bad_share, window=1000)
        self.retries = 0  # network retries so far, all processes together

    def connect(self, processor: TinyAudioProcessor) -> None:
        """Prepare clips with the model's own processor (its feature extractor and tokenizer), and have it render
        every source's own prompt now, so that the run keeps their token ids from its start (``model.prompt_ids``)."""
        self.processor = processor
        for source in self.train_sources + self.eval_sets:
            processor.chat(source.prompt)

    def _defaults(self, split: str, max_samples: int | None) -> dict[str, Any]:
        hp = self.hparams
        return {"dataset": hp.dataset, "split": split, "config_name": hp.config_name, "audio_column": hp.audio_column,
                "text_column": hp.text_column, "id_column": hp.id_column, "max_samples": max_samples}

    def train_streams(self) -> list[Source]:
        """What training reads: ``data.train_sources``, or ``data.dataset``'s ``train_split``."""
        defaults = self._defaults(self.hparams.train_split, None)
        return [s.filled(**defaults) for s in self.train_sources] or [Source("train").filled(**defaults)]

    def evaluation_sets(self) -> list[Source]:
        """What validation scores: ``data.eval_sets``, or ``data.dataset``'s ``val_split`` (named ``validation``)."""
        defaults = self._defaults(self.hparams.val_split, self.hparams.max_eval_samples)
        return [s.filled(**defaults) for s in self.eval_sets] or [Source(DEFAULT_SET).filled(**defaults)]

    def check(self, stage: str) -> None:
        """Open every source ``stage`` reads (files and schema only, no audio), so that a missing folder,
        split or column fails in the first second, before any model loads."""
        for source in (self.train_streams() if stage == "fit" else []) + self.evaluation_sets():
            self.open_source(source)

    def open_source(self, source: Source) -> IterableDataset:
        """Stream a source's split as rows of ``id``, ``audio`` (undecoded), ``text`` and ``prompt``.

        From a local folder, from the hub, or, on a node without internet (``HF_HUB_OFFLINE=1``), from
        what ``tiny-audio download`` put in the hub cache (``hub.py``).
        """
        if Path(source.dataset).is_dir():
            stream = _parquet_stream(find_parquet_files(Path(source.dataset), source.config_name, source.split),
                                     source.split)
        elif hub_constants.HF_HUB_OFFLINE:
            stream = _parquet_stream(_cached_files(source), source.split)
        else:
            stream = self._open_hub(source)
        columns = list(stream.features or {})
        missing = [c for c in (source.audio_column, source.text_column) if columns and c not in columns]
        if missing:
            entry = source.name in {s.name for s in self.train_sources + self.eval_sets}
            where = (f"audio_column / text_column of the data.train_sources or data.eval_sets entry '{source.name}'"
                     if entry else "data.audio_column / data.text_column")
            raise UsageError(f"column(s) {missing} not in {source.dataset} split '{source.split}'; it has {columns}. "
                             f"Set {where}.")
        if isinstance((stream.features or {}).get(source.audio_column), Audio):
            stream = stream.cast_column(source.audio_column, Audio(decode=False))
        if source.max_samples is not None:
            stream = stream.take(source.max_samples)
        return stream.map(partial(_canonical_row, source=source), remove_columns=columns or None)

    def _open_hub(self, source: Source) -> IterableDataset:
        """A hub dataset's split, as its card's configs say; retried while the hub does not answer."""
        def open_split() -> IterableDataset:
            return load_dataset(source.dataset, source.config_name, split=source.split, streaming=True)

        try:
            return with_retries(open_split, self.hparams.network_patience)
        except DataUnavailable:
            raise
        except Exception as error:  # datasets raises many kinds for a dataset it cannot reach
            why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if "scripts are no longer supported" in why:  # read its parquet files by their layout instead
                return _parquet_stream(hub_parquet_files(source.dataset, source.config_name, source.split),
                                       source.split)
            raise UsageError(f"cannot open the dataset '{source.dataset}' (config {source.config_name}, split "
                             f"'{source.split}'): it is not a local folder, and the hub said: {why}. Pass a local "
                             "folder of parquet files or a reachable dataset id.") from error

    def setup(self, stage: str) -> None:
        """Open the streams for this rank, mix, shuffle and truncate them, and attach the clip preparation."""
        hp = self.hparams
        if self.processor is None:
            raise UsageError("SpeechDataModule.connect(model.processor) first: clips are prepared by the model's "
                             "own processor (the tiny-audio CLI connects them)")
        prepare = partial(ClipPreparer, self.processor, hp.min_duration, hp.max_duration,
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
                                                duration=_row_duration, patience=hp.network_patience)
        if stage in ("fit", "validate"):
            self.val_datasets = {}
            for source in self.evaluation_sets():
                val = split_dataset_by_node(self.open_source(source), rank, world)
                self.val_datasets[source.name] = PreparedRows(val, prepare(keep_audio=True), hp.network_patience)

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Count the clips the collate dropped and the network retries (main process), log the totals,
        stop if too many clips were bad."""
        skipped = batch.pop("skipped")
        self.skips.record(skipped, len(batch["text"]))
        retries = batch.pop("retries") + NETWORK.drain()  # the worker's, and this process's own
        self.retries += retries
        totals = {f"data/skipped/{reason}": float(count) for reason, count in self.skips.counts.items()
                  } if skipped else {}
        totals |= {"data/retries": float(self.retries)} if retries else {}
        if totals and self.trainer is not None and self.trainer.logger is not None:
            self.trainer.logger.log_metrics(totals, step=self.trainer.global_step)
        return batch

    def teardown(self, stage: str) -> None:
        if self.skips.counts:
            print(f"skipped clips: {self.skips.summary()}")

    def _loader(self, dataset: WindowShuffled | PreparedRows, kind: type[StatefulDataLoader], name: str,
                **kwargs: Any) -> StatefulDataLoader:
        # A stream is split among workers by its shards (files): more workers than shards would idle.
        shards = (dataset.source if isinstance(dataset, WindowShuffled) else dataset).num_shards
        batch_size = None if kind is TrainLoader else self.hparams.batch_size  # training batches come whole
        return kind(dataset, batch_size=batch_size, collate_fn=partial(collate, name=name),
                    num_workers=min(self.hparams.num_workers, shards), pin_memory=torch.cuda.is_available(),
                    worker_init_fn=ignore_stop_signals, **kwargs)

    def train_dataloader(self) -> TrainLoader:
        """The training batches, fetched a whole optimizer step at a time (see :class:`TrainLoader`)."""
        step_batches = self.trainer.accumulate_grad_batches if self.trainer else 1
        return self._loader(self.train_dataset, TrainLoader, "train", step_batches=step_batches)

    def val_dataloader(self) -> list[StatefulDataLoader]:
        """One loader per evaluation set; batches carry the set's name."""
        return [self._loader(dataset, StatefulDataLoader, name) for name, dataset in self.val_datasets.items()]
