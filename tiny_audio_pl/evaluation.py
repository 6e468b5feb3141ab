"""Scoring evaluation sets: WER after Whisper's normaliser, grounding losses, and the reports.

The training loop hands each validation batch to :class:`Evaluation`, which runs the model on it
(losses with the clip's own audio, a neighbour's and none; transcripts) and adds the results
to a :class:`SetTally` per evaluation set. At the end of a pass the tallies of all ranks are merged
and reported here: metrics per set, one row per set printed, every utterance worst first in a TSV
file, a few clips with reference and hypothesis in TensorBoard. The corpus WER is the merged
per-utterance word errors over the merged reference words, so each clip is normalised and scored once.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from tiny_audio_pl.alignment import TokenAlignment
from tiny_audio_pl.data import DEFAULT_SET
from tiny_audio_pl.modeling import TinyAudioModel
from tiny_audio_pl.runs import RunFolder
from tiny_audio_pl.scoring import Utterance, score, wer_interval, write_utterances


def metric_prefix(name: str) -> str:
    """Metric prefix of an evaluation set: ``val/`` for the default set, ``val/<name>/`` for a named one."""
    return "val/" if name == DEFAULT_SET else f"val/{name}/"


@dataclass
class SetTally:
    """One evaluation set's totals over a validation pass (merged across ranks).

    Losses are summed over target tokens, so the set's loss is a mean per token whatever the batch
    sizes and however the clips were spread over ranks. The grounding losses: each clip's transcript
    scored with another clip's audio (its neighbour in the batch; batches of one clip have none) and
    with no audio at all. ``audio_gain`` is the wrong-audio loss minus the right-audio loss over the
    same tokens: zero while the decoder ignores the audio, growing once the projector carries it.
    """

    utterances: int = 0
    audio_s: float = 0.0
    compute_s: float = 0.0
    tokens: int = 0
    loss_sum: float = 0.0  # with each clip's own audio
    no_audio_sum: float = 0.0
    paired_tokens: int = 0  # tokens of clips that had a neighbour to swap audio with
    paired_loss_sum: float = 0.0  # ... their loss with their own audio
    wrong_audio_sum: float = 0.0  # ... and with the neighbour's
    rows: list[Utterance] = field(default_factory=list)  # every scored utterance
    examples: list[tuple[str, str, str, Any, int]] = field(default_factory=list)  # id, ref, hyp, audio, rate

    @staticmethod
    def merge(parts: list[SetTally]) -> SetTally:
        """Totals of all ranks (compute time: the slowest rank's, as they run in parallel; examples: rank 0's)."""
        summed = {f.name: sum(getattr(p, f.name) for p in parts) for f in fields(SetTally)
                  if f.name not in ("compute_s", "rows", "examples")}
        return SetTally(**summed, compute_s=max(p.compute_s for p in parts), rows=[r for p in parts for r in p.rows],
                        examples=parts[0].examples)

    def add_scores(self, name: str, ids: list[str], references: list[str], hypotheses: list[str]) -> None:
        """Per-utterance word errors (``scoring.score``): the worst-first file, and summed, the corpus WER."""
        self.rows += [score(name, i, reference, hypothesis) for i, reference, hypothesis in zip(ids, references,
                                                                                                 hypotheses)]

    def word_counts(self) -> tuple[int, int]:
        """Word errors and reference words summed over the scored utterances."""
        return sum(row.errors for row in self.rows), sum(row.reference_words for row in self.rows)

    def metrics(self) -> dict[str, float]:
        """Corpus WER with its bootstrap interval and its substitution, deletion and insertion shares, per-token
        losses and the audio gain (NaN where there was nothing to average)."""
        def mean(total: float, count: int) -> float:
            return total / count if count else math.nan

        errors, words = (np.array([getattr(row, key) for row in self.rows], dtype=np.int64)
                         for key in ("errors", "reference_words"))
        low, high = wer_interval(errors, words)
        kinds = {f"{kind}_rate": mean(sum(getattr(row, kind) for row in self.rows), int(words.sum()))
                 for kind in ("substitutions", "deletions", "insertions")}
        return {"wer": mean(*self.word_counts()), "wer_low": low, "wer_high": high, **kinds,
                "loss": mean(self.loss_sum, self.tokens),
                "loss_no_audio": mean(self.no_audio_sum, self.tokens),
                "loss_wrong_audio": mean(self.wrong_audio_sum, self.paired_tokens),
                "audio_gain": mean(self.wrong_audio_sum - self.paired_loss_sum, self.paired_tokens),
                "hours": self.audio_s / 3600, "rtf": self.compute_s / max(self.audio_s, 1e-9)}


class Evaluation:
    """A validation pass: each batch of each evaluation set scored and tallied, then merged over the ranks."""

    def __init__(self, logged_examples: int) -> None:
        """Args:
            logged_examples: clips per set kept for TensorBoard (audio, reference, hypothesis).
        """
        self.logged_examples = logged_examples
        self.tallies: dict[str, SetTally] = {}

    def start(self) -> None:
        self.tallies = {}

    @torch.no_grad()
    def score(self, model: TinyAudioModel, batch: dict[str, Any], targets: list[list[int]],
              alignment: TokenAlignment | None = None) -> None:
        """Losses (grounding included), transcripts (the model's decoding settings) and WER of one batch of the set
        ``batch["set"]``. With ``alignment`` (a run still in its alignment stage, whose decoder has learnt nothing
        yet), the projector is scored alone: its CTC loss and its best-path transcripts, no grounding losses."""
        start = time.perf_counter()
        size, prompts = len(batch["text"]), batch.get("prompt")
        audio, audio_lengths = model.embed_audio(batch["features"], batch["feature_lengths"])  # once for all
        tally = self.tallies.setdefault(batch["set"], SetTally())
        if alignment is not None:
            targets = [t[:-1] for t in targets]  # no end-of-turn token
            tally.tokens += sum(len(t) for t in targets)
            tally.loss_sum += alignment(audio, audio_lengths, targets).item()
            hypotheses = model.processor.decode(alignment.best_path(audio, audio_lengths))
        else:
            hypotheses = self._decoded(model, tally, audio, audio_lengths, targets, prompts)
        tally.utterances += size
        tally.audio_s += sum(batch["duration"])
        tally.compute_s += time.perf_counter() - start
        tally.add_scores(batch["set"], batch["id"], batch["text"], hypotheses)
        room = max(0, self.logged_examples - len(tally.examples))
        clips = batch.get("audio") or [None] * size
        rate = batch.get("sample_rate")
        tally.examples += [(i, r, h, a, rate) for i, r, h, a in zip(batch["id"], batch["text"], hypotheses, clips)
                           ][:room]

    @staticmethod
    def _decoded(model: TinyAudioModel, tally: SetTally, audio: torch.Tensor, audio_lengths: list[int],
                 targets: list[list[int]], prompts: list[str] | None) -> list[str]:
        """The decoder's losses (own audio, a neighbour's, none) into ``tally``, and its transcripts."""
        size, tokens = len(targets), sum(len(t) for t in targets)
        tally.tokens += tokens
        right = model.loss(audio, audio_lengths, targets, prompts, reduction="sum").item()
        tally.loss_sum += right
        tally.no_audio_sum += model.loss(audio, [0] * size, targets, prompts, reduction="sum").item()
        if size > 1:  # each clip's transcript with its neighbour's audio
            neighbours = audio_lengths[-1:] + audio_lengths[:-1]
            tally.wrong_audio_sum += model.loss(audio.roll(1, 0), neighbours, targets, prompts, reduction="sum").item()
            tally.paired_loss_sum += right
            tally.paired_tokens += tokens
        return model.processor.decode(model.generate_from_audio(audio, audio_lengths, prompts))

    def merged(self) -> dict[str, SetTally]:
        """The pass's tallies of all ranks (the same on every rank; a collective under DDP)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.tallies
        gathered: list[dict[str, SetTally]] = [{} for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(gathered, self.tallies)
        return {name: SetTally.merge([g[name] for g in gathered if name in g]) for name in self.tallies}


def metrics(per_set: dict[str, dict[str, float]]) -> dict[str, float]:
    """Every set's metrics (``SetTally.metrics``) by name: ``val/wer`` (the default set), ``val/<name>/wer`` ..."""
    return {f"{metric_prefix(name)}{key}": value for name, scores in per_set.items() for key, value in scores.items()}


def report(tallies: dict[str, SetTally], per_set: dict[str, dict[str, float]], run: RunFolder, step: int,
           loggers: list[Logger]) -> Path:
    """The results table (``per_set``: each tally's metrics) printed and sent to every logger with each set's
    examples, every utterance into the run's per-utterance file of ``step`` (returned)."""
    table = results_table(tallies, per_set)
    print(table)
    path = run.utterances(step)
    write_utterances([row for tally in tallies.values() for row in tally.rows], path)
    print(f"per-utterance results: {path}")
    for logger in loggers:
        send_report(logger, table, tallies, step)
    return path


def results_table(tallies: dict[str, SetTally], per_set: dict[str, dict[str, float]]) -> str:
    """One row per set: utterances, hours, WER with its 95 % bootstrap interval, its substitution / deletion /
    insertion shares, loss, audio gain, real-time factor (``per_set``: each tally's metrics)."""
    lines = [f"{'set':<20} {'utterances':>10} {'hours':>7} {'WER %':>7} {'95 % interval':>15} {'sub':>5} {'del':>5} "
             f"{'ins':>5} {'loss':>7} {'gain':>7} {'RTF':>6}"]
    for name, tally in tallies.items():
        m = per_set[name]
        interval = f"{100 * m['wer_low']:.1f}-{100 * m['wer_high']:.1f}"
        lines.append(f"{name:<20} {tally.utterances:>10} {m['hours']:>7.3f} {100 * m['wer']:>7.2f} {interval:>15} "
                     f"{100 * m['substitutions_rate']:>5.1f} {100 * m['deletions_rate']:>5.1f} "
                     f"{100 * m['insertions_rate']:>5.1f} {m['loss']:>7.3f} {m['audio_gain']:>7.3f} {m['rtf']:>6.3f}")
    return "\n".join(lines)


def send_report(logger: Logger, table: str, tallies: dict[str, SetTally], step: int) -> None:
    """The results table and a few clips per set (reference, hypothesis, audio) in the form each logger keeps:
    TensorBoard text and audio, W&B tables and audio, MLflow text and table artifacts, CSV files beside its metrics."""
    examples = {f"{metric_prefix(name)}examples": tally.examples for name, tally in tallies.items()}
    columns = ["id", "reference", "hypothesis"]
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text("val/results", f"```\n{table}\n```", step)
        for tag, rows in examples.items():
            lines = "\n".join(f"| {i} | {r} | {h} |" for i, r, h, _, _ in rows)
            logger.experiment.add_text(tag, "| id | reference | hypothesis |\n|---|---|---|\n" + lines, step)
            for i, _, _, audio, rate in rows:
                if audio is not None:
                    logger.experiment.add_audio(f"{tag}/{i}", torch.from_numpy(audio), step, sample_rate=rate)
    elif isinstance(logger, WandbLogger):
        import wandb

        logger.log_text("val/results", columns=["table"], data=[[table]], step=step)
        for tag, rows in examples.items():
            logger.log_table(tag, columns=[*columns, "audio"], step=step, data=[
                [i, r, h, None if a is None else wandb.Audio(a, sample_rate=rate)] for i, r, h, a, rate in rows])
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_text(logger.run_id, table, f"validation/step={step}/results.txt")
        for tag, rows in examples.items():
            logger.experiment.log_table(logger.run_id, {c: [row[k] for row in rows] for k, c in enumerate(columns)},
                                        f"validation/step={step}/{tag.replace('/', '_')}.json")
    elif isinstance(logger, CSVLogger):
        folder = Path(logger.log_dir) / "validation" / f"step={step}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.txt").write_text(table + "\n")
        for tag, rows in examples.items():
            with (folder / f"{tag.replace('/', '_')}.tsv").open("w", newline="") as file:
                writer = csv.writer(file, delimiter="\t", lineterminator="\n")
                writer.writerow(columns)
                writer.writerows(row[:3] for row in rows)
