"""Word errors and what they can tell: normalisation, alignment counts, the per-utterance file, intervals.

Used by validation (``evaluation.py``) and by ``tiny-audio compare``; it imports no torch, so a
comparison of result files starts at once.

- Transcripts are normalised with Whisper's English normaliser (the Open ASR Leaderboard convention)
  and aligned as NIST's ``sclite`` aligns them (kaldialign's ``sclite_mode``: substitution 4,
  insertion and deletion 3), so substitutions, deletions and insertions match the field's standard
  scorer, not only their sum (tested against Debian's ``sclite``).
- Every scored utterance is a row of ``utterances/step=N.tsv``; the corpus WER of a set is its
  summed errors over its summed reference words.
- Intervals come from the bootstrap over utterances: resample a set's utterances with replacement,
  take the resample's corpus WER, repeat; a paired bootstrap resamples the same utterances for every
  system, so their difference is judged on the same speech.
"""

from __future__ import annotations

import csv
import re
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
from kaldialign import edit_distance
from whisper_normalizer.english import EnglishTextNormalizer

from tiny_audio_pl.errors import UsageError

_english = EnglishTextNormalizer()


def normalize_for_wer(text: str) -> str:
    """Whisper's English normaliser (the Open ASR Leaderboard convention), British spellings included."""
    return _english(text)


@dataclass(frozen=True)
class Utterance:
    """One scored utterance: a row of the per-utterance file."""

    set: str
    id: str
    reference: str
    hypothesis: str
    errors: int
    reference_words: int
    substitutions: int
    deletions: int
    insertions: int


def score(set_name: str, utterance_id: str, reference: str, hypothesis: str) -> Utterance:
    """The word errors of one hypothesis, counted on the normalised texts as sclite counts them."""
    ref, hyp = normalize_for_wer(reference).split(), normalize_for_wer(hypothesis).split()
    counts = edit_distance(ref, hyp, sclite_mode=True)
    return Utterance(set_name, utterance_id, reference, hypothesis, counts["total"], len(ref), counts["sub"],
                     counts["del"], counts["ins"])


COLUMNS = [f.name for f in fields(Utterance)]


def write_utterances(rows: list[Utterance], path: Path) -> None:
    """Every scored utterance, worst first, as TSV with a header (``COLUMNS``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(rows, key=lambda row: (-row.errors, row.set, row.id))  # most errors first
    with path.open("w", newline="") as file:
        writer = csv.writer(file, delimiter="\t", lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(astuple(row) for row in ordered)


def read_utterances(path: Path) -> list[Utterance]:
    """A per-utterance file written by validation, or one line on why it is not one."""
    try:
        with path.open(newline="") as file:
            reader = csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise UsageError(f"{path} is not a per-utterance file of tiny-audio validate: it lacks the column(s) "
                                 f"{', '.join(missing)} (files of validations before 2026-12-02 lack the "
                                 "substitution counts: validate the checkpoint again)")
            numbers = {"errors", "reference_words", "substitutions", "deletions", "insertions"}
            return [Utterance(**{c: int(row[c]) if c in numbers else row[c] for c in COLUMNS}) for row in reader]
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from error
    except ValueError as error:
        raise UsageError(f"{path}: a row that is not a scored utterance ({error})") from error


def corpus_wer(errors: np.ndarray, words: np.ndarray) -> float:
    """Summed errors over summed reference words (NaN for no words)."""
    total = int(words.sum())
    return float(errors.sum() / total) if total else float("nan")


def resample(count: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``[resamples, count]`` utterance indices drawn with replacement: the bootstrap's resamples of one set."""
    return rng.integers(0, count, size=(resamples, count))


def wer_interval(errors: np.ndarray, words: np.ndarray, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """The bootstrap interval of a set's corpus WER: each resample's summed errors over its summed words."""
    if len(errors) == 0:
        return float("nan"), float("nan")
    picks = resample(len(errors), resamples, np.random.default_rng(seed))
    wers = errors[picks].sum(1) / np.maximum(words[picks].sum(1), 1)  # [resamples]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(wers, [tail, 100 - tail])
    return float(low), float(high)


_UNSAFE = re.compile(r"[\s()]+")


def write_trn(rows: list[Utterance], folder: Path) -> list[Path]:
    """Each set's normalised references and hypotheses as sclite ``trn`` files: ``<set>.ref.trn`` and
    ``<set>.hyp.trn``, one line per utterance ending in ``(<set>_<id>)``. Score with
    ``sclite -r <set>.ref.trn trn -h <set>.hyp.trn trn -i spu_id``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in sorted({row.set for row in rows}):
        chosen = sorted((row for row in rows if row.set == name), key=lambda row: row.id)
        tag = _UNSAFE.sub("-", name)
        for kind, text in (("ref", lambda row: row.reference), ("hyp", lambda row: row.hypothesis)):
            path = folder / f"{tag}.{kind}.trn"
            path.write_text("".join(f"{normalize_for_wer(text(row))} ({tag}_{_UNSAFE.sub('-', row.id)})\n"
                                    for row in chosen))
            written.append(path)
    return written
