"""Scoring evaluation sets: WER after Whisper's normaliser, grounding losses, and the reports.

The LightningModule runs the model on each validation batch and hands the results to a
:class:`SetTally` per evaluation set; at the end of a pass the tallies of all ranks are merged and
reported here: one row per set printed, every utterance worst first in a TSV file, a few clips with
reference and hypothesis in TensorBoard. The corpus WER is the merged per-utterance word errors over
the merged reference words, so each clip is normalised and scored once.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.text import word_error_rate
from whisper_normalizer.english import EnglishTextNormalizer

_english = EnglishTextNormalizer()


def normalize_for_wer(text: str) -> str:
    """Whisper's English normaliser (the Open ASR Leaderboard convention), British spellings included."""
    return _english(text)


def set_prefix(name: str) -> str:
    """Metric prefix of an evaluation set: ``val/`` for the only set, ``val/<name>/`` for several."""
    return f"val/{name}/" if name else "val/"


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
    rows: list[tuple[str, str, str, int, int]] = field(default_factory=list)  # id, ref, hyp, errors, words
    examples: list[tuple[str, str, str, Any, int]] = field(default_factory=list)  # id, ref, hyp, audio, rate

    @staticmethod
    def merge(parts: list[SetTally]) -> SetTally:
        """Totals of all ranks (compute time: the slowest rank's, as they run in parallel; examples: rank 0's)."""
        summed = {f.name: sum(getattr(p, f.name) for p in parts) for f in fields(SetTally)
                  if f.name not in ("compute_s", "rows", "examples")}
        return SetTally(**summed, compute_s=max(p.compute_s for p in parts), rows=[r for p in parts for r in p.rows],
                        examples=parts[0].examples)

    def add_scores(self, ids: list[str], references: list[str], hypotheses: list[str]) -> None:
        """Per-utterance word errors: the worst-first file, and summed, the corpus WER."""
        for i, reference, hypothesis in zip(ids, references, hypotheses):
            ref, hyp = normalize_for_wer(reference), normalize_for_wer(hypothesis)
            words = len(ref.split())
            errors = round(word_error_rate(hyp, ref).item() * words) if words else len(hyp.split())
            self.rows.append((i, reference, hypothesis, errors, words))

    def word_counts(self) -> tuple[int, int]:
        """Word errors and reference words summed over the scored utterances."""
        return sum(row[3] for row in self.rows), sum(row[4] for row in self.rows)

    def metrics(self) -> dict[str, float]:
        """Corpus WER, per-token losses and the audio gain (NaN where there was nothing to average)."""
        def mean(total: float, count: int) -> float:
            return total / count if count else math.nan

        return {"wer": mean(*self.word_counts()), "loss": mean(self.loss_sum, self.tokens),
                "loss_no_audio": mean(self.no_audio_sum, self.tokens),
                "loss_wrong_audio": mean(self.wrong_audio_sum, self.paired_tokens),
                "audio_gain": mean(self.wrong_audio_sum - self.paired_loss_sum, self.paired_tokens),
                "hours": self.audio_s / 3600, "rtf": self.compute_s / max(self.audio_s, 1e-9)}


def results_table(tallies: dict[str, SetTally]) -> str:
    """One row per set: utterances, hours, WER, loss, audio gain, real-time factor."""
    lines = [f"{'set':<20} {'utterances':>10} {'hours':>7} {'WER %':>7} {'loss':>7} {'gain':>7} {'RTF':>6}"]
    for name, tally in tallies.items():
        m = tally.metrics()
        lines.append(f"{name or 'validation':<20} {tally.utterances:>10} {m['hours']:>7.3f} {100 * m['wer']:>7.2f} "
                     f"{m['loss']:>7.3f} {m['audio_gain']:>7.3f} {m['rtf']:>6.3f}")
    return "\n".join(lines)


def write_utterances(tallies: dict[str, SetTally], path: Path) -> None:
    """Every scored utterance, worst first, as TSV: set, id, reference, hypothesis, errors, reference words."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [(name or "validation", *row) for name, tally in tallies.items() for row in tally.rows]
    rows.sort(key=lambda row: (-row[4], row[0], row[1]))  # most errors first
    with path.open("w", newline="") as file:
        writer = csv.writer(file, delimiter="\t", lineterminator="\n")
        writer.writerow(["set", "id", "reference", "hypothesis", "errors", "reference_words"])
        writer.writerows(rows)


def log_examples(experiment: Any, tallies: dict[str, SetTally], step: int) -> None:
    """A few clips per set to TensorBoard (a ``SummaryWriter``): the audio, and reference vs hypothesis."""
    for name, tally in tallies.items():
        tag = f"{set_prefix(name)}examples"
        table = "\n".join(f"| {i} | {r} | {h} |" for i, r, h, _, _ in tally.examples)
        experiment.add_text(tag, "| id | reference | hypothesis |\n|---|---|---|\n" + table, step)
        for i, _, _, audio, rate in tally.examples:
            if audio is not None:
                experiment.add_audio(f"{tag}/{i}", torch.from_numpy(audio), step, sample_rate=rate)
