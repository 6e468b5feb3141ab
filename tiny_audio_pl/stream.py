"""The training stream: shuffled in windows, cut into batches, resumable exactly, pass after pass.

- ``datasets``' own buffer shuffle does not save its buffer, so a resumed run would silently skip
  the clips that sat in it: :class:`WindowShuffled` shuffles in windows whose position is saved.
- Batches are formed from each window by length (:func:`length_grouped`) or by a budget of padded
  seconds (:func:`budget_batches`), so a batch of 3 s clips is not padded to the 20 s clip that
  happened to arrive with them, and no batch exceeds what the budget allows.
- :class:`TrainLoader` streams pass after pass itself (Lightning sees one endless epoch) and saves
  the position of the batch being trained on, on every rank.
- Rows are read through :class:`~tiny_audio_pl.network.ResilientRows`, so a network fault costs a
  wait, not the run or the exact position; validation sets are read the same way (:class:`PreparedRows`).
"""

from __future__ import annotations

import copy
import itertools
import signal
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch.distributed as dist
from datasets import IterableDataset
from torch.utils.data import IterableDataset as TorchIterableDataset
from torch.utils.data import get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from tiny_audio_pl.errors import DataUnavailable, UsageError
from tiny_audio_pl.network import ResilientRows


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
                 duration: Callable[[dict], float], patience: float) -> None:
        self.source, self.prepare, self.seed, self.patience = source, prepare, seed, patience
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
        reader = ResilientRows(source, self.patience)
        rows = iter(reader)
        while window := list(itertools.islice(rows, self.window)):
            rng = np.random.default_rng([self.seed, self.epoch, worker.id if worker else 0, index])
            batches = self.batches([self.duration(row) for row in window], rng)
            for position, batch in enumerate(batches):
                if position < skip:
                    continue
                self._state = {"epoch": self.epoch, "source": window_start, "window": index, "yielded": position + 1}
                yield [self.prepare(window[row]) for row in batch]
            window_start, index, skip = reader.state_dict(), index + 1, 0


class PreparedRows(TorchIterableDataset):
    """A validation set: the rows of a stream, read through network faults, each prepared by ``prepare``."""

    def __init__(self, source: IterableDataset, prepare: Callable[[dict], dict], patience: float) -> None:
        self.source, self.prepare, self.patience = source, prepare, patience
        self.num_shards = source.num_shards  # what the dataloader's workers split

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return map(self.prepare, ResilientRows(self.source, self.patience))


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

    Batches are fetched a whole optimizer step (``step_batches`` micro-batches) at a time, so that
    when the data host stops answering (:class:`~tiny_audio_pl.network.DataUnavailable`) the run
    stops between two optimizer steps, never inside one: the loader first hands Lightning a
    placeholder (``None``, never trained on, since Lightning asks for the next batch before training
    it), so the step in progress completes, then raises. The position saved then is that step's end.

    Lightning writes the checkpoint from rank 0 alone, so under DDP every rank would resume from rank
    0's position in rank 0's part of the stream. The state therefore gathers every rank's position
    (the checkpoint is built on all ranks), and each rank restores its own.
    """

    dataset: WindowShuffled

    def __init__(self, dataset: WindowShuffled, step_batches: int = 1, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.step_batches = step_batches
        self.passes = 0  # passes over the stream started so far, minus one
        self._trained_position: dict[str, Any] | None = None
        self._fetching: dict[str, Any] | None = None  # the position before the batch being fetched

    def _positioned_batches(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """``(position before the batch, batch)``, pass after pass."""
        while True:
            self.dataset.set_epoch(self.passes)
            iterator = super().__iter__()  # restores a loaded position once, else starts the pass afresh
            fetched = 0
            while True:
                before = self._fetching = {"pass": self.passes, "loader": super().state_dict()}
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                fetched += 1
                yield before, batch
            if not fetched:  # an endless loop otherwise
                raise UsageError("the training stream yielded no clips in a whole pass: check data.dataset, "
                                 "data.train_split / data.train_sources and data.max_train_samples")
            self.passes += 1

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        batches = self._positioned_batches()
        while True:
            step: list[tuple[dict[str, Any], dict[str, Any]]] = []
            try:
                while len(step) < self.step_batches:
                    step.append(next(batches))
            except DataUnavailable:
                self._trained_position = step[0][0] if step else self._fetching  # the end of the last full step
                yield None  # Lightning asks for it before training the step's last batch, and trains it never
                raise
            for before, batch in step:
                self._trained_position = before
                yield batch

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


def ignore_stop_signals(worker_id: int) -> None:
    """Dataloader workers ignore SIGTERM, SIGINT and Slurm's requeue signal (SIGUSR1, ``cluster.REQUEUE_SIGNAL``):
    the main process saves the step, then stops them itself.

    Slurm, systemd and ``docker stop`` signal every process of the job or the group, and a terminal's Ctrl-C
    every process in the foreground. A worker that died of the signal would take the run down with it
    before the main process could save the current step.
    """
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
