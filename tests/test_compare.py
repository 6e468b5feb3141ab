"""``tiny-audio compare`` and the scores against NIST SCTK (Debian's ``sctk``: ``sclite``, ``sc_stats``)."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_here
from tiny_audio_pl.compare import System, compare
from tiny_audio_pl.scoring import Utterance, read_utterances, score, write_trn, write_utterances

SCTK = shutil.which("sctk")
needs_sctk = pytest.mark.skipif(SCTK is None, reason="NIST SCTK is not installed (apt-get install sctk; .ci/run does)")
WORDS = "the cat sat on a mat and then it ran off to see the old dog by the red barn".split()


def _pair(kind: str, count: int = 200, seed: int = 0) -> tuple[list[Utterance], list[Utterance]]:
    """Two systems on the same ``count`` utterances of 10 words: ``win``: B makes far fewer errors (5 % of words
    against 30 %); ``tie``: both make one error in every other utterance, A in the even ones, B in the odd ones."""
    rng = random.Random(seed)
    a, b = [], []
    for i in range(count):
        reference = [rng.choice(WORDS) for _ in range(10)]
        if kind == "win":
            hyp_a = [w if rng.random() > 0.30 else "xx" for w in reference]
            hyp_b = [w if rng.random() > 0.05 else "yy" for w in reference]
        else:
            hyp_a = reference[:-1] + ["xx"] if i % 2 == 0 else reference
            hyp_b = reference[:-1] + ["yy"] if i % 2 == 1 else reference
        a.append(score("dev", f"utt{i:04d}", " ".join(reference), " ".join(hyp_a)))
        b.append(score("dev", f"utt{i:04d}", " ".join(reference), " ".join(hyp_b)))
    return a, b


def _system(label: str, rows: list[Utterance]) -> System:
    return System(label, label, label, {(row.set, row.id): row for row in rows})


def _sc_stats_verdict(a: list[Utterance], b: list[Utterance], folder: Path) -> str:
    """SCTK's matched-pairs sentence-segment test (MAPSSWE) on the two systems: the better one's label, or ``~``."""
    sgml = []
    for label, rows in (("A", a), ("B", b)):
        write_trn(rows, folder / label)
        aligned = subprocess.run([SCTK, "sclite", "-r", str(folder / label / "dev.ref.trn"), "trn", "-h",
                                  str(folder / label / "dev.hyp.trn"), "trn", label, "-i", "spu_id", "-o", "sgml",
                                  "stdout"], capture_output=True, text=True, check=True, timeout=60)
        sgml.append(aligned.stdout)
    stats = subprocess.run([SCTK, "sc_stats", "-p", "-t", "mapsswe", "-u", "-n", "-"], input="".join(sgml),
                           capture_output=True, text=True, check=True, timeout=60, cwd=folder)  # it writes A.sts, B.sts
    row = next(line for line in stats.stdout.splitlines() if re.search(r"\|\s+MP\s+\|\|\s+A\s+\|", line))
    cell = row.split("|")[5].strip()  # the A-row's B column: "B    <0.001   ***" or "~ ..."
    return cell.split()[0] if cell else "~"


@pytest.mark.parametrize("kind, verdict, sctk", [("win", "better", "B"), ("tie", "no significant difference", "~")])
def test_compare_gives_the_known_verdict(kind, verdict, sctk, tmp_path):
    a, b = _pair(kind)
    result = compare([_system("A", a), _system("B", b)], resamples=2000, seed=1)
    pair = result["sets"]["dev"]["against_first"]["B"]
    assert pair["verdict"] == verdict and set(result["sets"]) == {"dev"}  # one set: no "overall" row
    errors = [sum(row.errors for row in rows) / sum(row.reference_words for row in rows) for rows in (a, b)]
    assert pair["difference"] == pytest.approx(errors[1] - errors[0])
    assert pair["low"] <= pair["difference"] <= pair["high"]
    if kind == "win":
        assert pair["high"] < 0 and pair["better_share"] == 1.0
    else:
        assert pair["difference"] == 0 and pair["low"] < 0 < pair["high"] and 0.3 < pair["better_share"] < 0.7
    if SCTK is not None:  # the standard scorer's matched-pairs test says the same
        assert _sc_stats_verdict(a, b, tmp_path) == sctk


@needs_sctk
def test_word_errors_equal_sclites_on_a_real_validation(trained, tmp_path):
    """A run's validation, written with `validate --sclite DIR` and scored by sclite: the same corpus WER,
    substitutions, deletions and insertions as the per-utterance file (same normalised text, same alignment)."""
    run = trained.parent.parent
    result = run_here(run.parents[1], "validate", "-c", str(run / "config.yaml"), "--ckpt_path", str(trained),
                      "--data.max_eval_samples", "16", "--trainer.logger", "false", "--trainer.default_root_dir",
                      str(tmp_path / "run"), "--sclite", str(tmp_path / "trn"),
                      "--trainer.enable_progress_bar", "false")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_utterances(next((tmp_path / "run" / "utterances").glob("step=*.tsv")))
    assert len(rows) == 16
    sclite = subprocess.run([SCTK, "sclite", "-r", str(tmp_path / "trn/validation.ref.trn"), "trn", "-h",
                             str(tmp_path / "trn/validation.hyp.trn"), "trn", "-i", "spu_id", "-o", "rsum", "stdout"],
                            capture_output=True, text=True, check=True, timeout=60).stdout
    total = next(line for line in sclite.splitlines() if re.match(r"\s*\|\s*Sum\s*\|", line))  # the totals row
    sentences, words, _, subs, dels, ins, errors, _ = (int(n) for n in re.findall(r"\d+", total))
    ours = [sum(getattr(row, k) for row in rows) for k in ("reference_words", "substitutions", "deletions",
                                                            "insertions", "errors")]
    assert (sentences, [words, subs, dels, ins, errors]) == (16, ours)
    assert subs and (dels or ins)  # a test of the split, not only of the total


def test_compare_command_text_json_and_plot(tmp_path):
    a, b = (rows + [Utterance(**{**vars(row), "set": "other"}) for row in rows[:50]] for rows in _pair("win"))
    write_utterances(a, tmp_path / "a" / "utterances" / "step=100.tsv")  # a run folder
    write_utterances(b, tmp_path / "b.tsv")  # a per-utterance file
    text = run_here(tmp_path, "compare", str(tmp_path / "a"), str(tmp_path / "b.tsv"), "--plot",
                    str(tmp_path / "w.png"))
    assert text.returncode == 0, text.stderr
    assert "B better" in text.stdout and "most changed utterances" in text.stdout
    assert "A = a step 100\nB = b.tsv\n" in text.stdout  # the run, then the file, as named from where it ran
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    as_json = run_here(tmp_path, "compare", str(tmp_path / "a"), str(tmp_path / "b.tsv"), "--json")
    figures = json.loads(as_json.stdout)
    assert set(figures["sets"]) == {"dev", "other", "overall"} and figures["resamples"] == 1000
    overall = figures["sets"]["overall"]  # both sets pooled: summed errors over summed words
    assert overall["utterances"] == 250
    assert overall["systems"]["A"]["wer"] == pytest.approx(sum(r.errors for r in a) / sum(r.reference_words for r in a))
    assert overall["against_first"]["B"]["verdict"] == "better"


def test_utterances_that_do_not_match_are_one_line(tmp_path):
    a, b = _pair("tie", count=20)
    write_utterances(a, tmp_path / "a.tsv")
    write_utterances(b[1:], tmp_path / "b.tsv")
    result = run_here(tmp_path, "compare", str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "1 only in A, 0 only in B" in result.stderr and "utt0000" in result.stderr
    write_utterances([Utterance(**{**vars(row), "set": "other"}) for row in b], tmp_path / "c.tsv")
    result = run_here(tmp_path, "compare", str(tmp_path / "a.tsv"), str(tmp_path / "c.tsv"))
    assert result.returncode == 2 and "different sets" in result.stderr and result.stderr.count("\n") == 1


def test_a_checkpoint_is_validated_with_its_runs_config(trained, tmp_path):
    """The same model as a checkpoint and as its run folder's file: validated again, the same utterances and texts."""
    result = run_here(tmp_path, "compare", str(trained.parent.parent), str(trained), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout)
    pair = figures["sets"]["validation"]["against_first"]["B"]
    assert pair["difference"] == 0 and pair["verdict"] == "no significant difference"
    assert figures["systems"][1]["name"] == f"{trained} (validated now)"  # not the temporary folder it was scored in

