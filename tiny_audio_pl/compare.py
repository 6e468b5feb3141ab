"""``tiny-audio compare A B [C ...]``: is B better than A, or is the difference noise?

Each system is a per-utterance file of ``tiny-audio validate`` or ``fit`` (``utterances/step=N.tsv``),
a run folder (its newest such file), or a training checkpoint, which is validated first with the
config its run saved (``config.yaml`` of its run folder), from the folder the run was started in (its
relative model and dataset folders are found from there), into a temporary folder.

Every other system is compared with the first on the same utterances, matched by set and id (a set
or an id that is not in both is one line, never a silently smaller sample). Per set, and overall
when there are several:
each system's corpus WER, the difference with its interval from a paired bootstrap (the same
resampled utterances for both systems, the corpus WER of each resample: summed errors over summed
words, not a mean of utterance WERs; overall, each set resampled on its own), the share of
resamples in which the system beats the first, a verdict (better or worse when the interval leaves
out zero, else no significant difference), and the utterances that changed most. A text table,
``--json``, and ``--plot FILE.png`` (each set's WER with its interval).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tiny_audio_pl.errors import UsageError
from tiny_audio_pl.hub import local_folder
from tiny_audio_pl.runs import RunFolder, utterances_step
from tiny_audio_pl.scoring import Utterance, corpus_wer, read_utterances, resample

OVERALL = "overall"


@dataclass
class System:
    """One system's scored utterances, by ``(set, id)``."""

    label: str  # A, B, C ...
    source: str  # the per-utterance file read
    name: str  # what the user named, for tables and legends
    utterances: dict[tuple[str, str], Utterance]


def validate_checkpoint(checkpoint: Path, into: Path) -> Path:
    """Validate ``checkpoint`` with the config its run saved; the per-utterance file it writes in ``into``."""
    config = RunFolder.of_file(checkpoint).config
    if not config.is_file():
        raise UsageError(f"{checkpoint}: no config.yaml in its run folder ({config.parent}) to validate it with: run "
                         "`tiny-audio validate -c CONFIG --ckpt_path CHECKPOINT` and compare its run folder")
    print(f"validating {checkpoint} with {config}", file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "tiny_audio_pl.cli", "validate", "-c", str(config.resolve()), "--ckpt_path",
               str(checkpoint.resolve()), "--trainer.logger", "false", "--trainer.default_root_dir",
               str(into.resolve()), "--trainer.enable_progress_bar", "false"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=_started_in(config, checkpoint))
    found = RunFolder(into).newest_utterances()
    if result.returncode != 0 or found is None:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"validating {checkpoint} failed: {last}")
    return found


def _started_in(config: Path, checkpoint: Path) -> Path:
    """Where the run was started, so that the relative folders its config and checkpoint name (models, dataset) are
    found: the folder from which :func:`~tiny_audio_pl.hub.local_folder` finds the first of them, else this one."""
    settings = yaml.safe_load(config.read_text()) or {}
    for section, key in (("model", "encoder"), ("model", "decoder"), ("data", "dataset")):
        name = (settings.get(section) or {}).get(key)
        found = local_folder(name, checkpoint) if isinstance(name, str) and not Path(name).is_absolute() else None
        if found:
            return found.parents[len(Path(name).parts) - 1]  # found is that folder / name
    return Path.cwd()


def load_system(label: str, path: str, scratch: Path) -> System:
    """A system from a per-utterance file, a run folder or a checkpoint (see module docstring)."""
    given = Path(path)
    if given.is_dir():
        run = RunFolder(given)
        found = run.newest_utterances()
        if found is None and run.checkpoints.is_dir():  # a run whose validation never ran
            raise UsageError(f"{path}: this run has no validation yet (no utterances/step=*.tsv): name its checkpoint "
                             f"instead ({run.last if run.last.exists() else run.checkpoints}), which is validated "
                             "first, or a run that validated")
        if found is None:
            raise UsageError(f"{path}: a folder without utterances/step=*.tsv; name a run folder (lightning_logs/"
                             "version_N), a per-utterance file or a checkpoint")
    elif given.suffix == ".ckpt":
        found = validate_checkpoint(given, scratch / label)
    elif given.is_file():
        found = given
    else:
        raise UsageError(f"{path}: no such file or folder")
    rows = read_utterances(found)
    keyed = {(row.set, row.id): row for row in rows}
    if len(keyed) < len(rows):
        raise UsageError(f"{found}: an utterance id appears twice in one set; ids must be unique to be matched")
    # A checkpoint is named as given, not by the temporary folder its validation went to.
    name = f"{_shown_path(given)} (validated now)" if given.suffix == ".ckpt" else short_name(str(found))
    return System(label, str(found), name, keyed)


def check_matching(systems: list[System]) -> list[str]:
    """The sets, in order, once every system holds the same utterances; otherwise one line on what differs."""
    first = systems[0]
    sets = sorted({name for name, _ in first.utterances})
    for other in systems[1:]:
        theirs = sorted({name for name, _ in other.utterances})
        if theirs != sets:
            raise UsageError(f"{first.label} and {other.label} scored different sets: {first.label} {sets}, "
                             f"{other.label} {theirs}")
        only_first = sorted(first.utterances.keys() - other.utterances.keys())
        only_other = sorted(other.utterances.keys() - first.utterances.keys())
        if only_first or only_other:
            example = (only_first or only_other)[0]
            raise UsageError(f"{first.label} and {other.label} scored different utterances: {len(only_first)} only in "
                             f"{first.label}, {len(only_other)} only in {other.label} (e.g. set '{example[0]}', id "
                             f"'{example[1]}'); compare validations of the same sets with the same max_samples")
    return sets


def compare(systems: list[System], resamples: int = 1000, seed: int = 0, level: float = 0.95,
            changed: int = 5) -> dict[str, Any]:
    """Each system's WER and each other system against the first, per set and overall (see module docstring)."""
    if len(systems) < 2:
        raise UsageError("compare needs at least two systems")
    if resamples < 100:
        raise UsageError(f"--resamples {resamples}: use at least 100 (1,000 or more for a 95 % interval)")
    sets = check_matching(systems)
    rng = np.random.default_rng(seed)
    tail = (1 - level) / 2 * 100
    keys = {name: sorted(k for k in systems[0].utterances if k[0] == name) for name in sets}
    # per set: [systems, utterances] errors, [utterances] reference words, [resamples, utterances] picks
    errors = {name: np.array([[s.utterances[k].errors for k in keys[name]] for s in systems]) for name in sets}
    words = {name: np.array([systems[0].utterances[k].reference_words for k in keys[name]]) for name in sets}
    picks = {name: resample(len(keys[name]), resamples, rng) for name in sets}
    resampled = {name: (errors[name][:, picks[name]].sum(-1), words[name][picks[name]].sum(-1)) for name in sets}
    if len(sets) > 1:  # all sets together, each resampled on its own
        resampled[OVERALL] = (sum(e for e, _ in resampled.values()), sum(w for _, w in resampled.values()))
    result: dict[str, Any] = {"systems": [{"label": s.label, "name": s.name, "source": s.source} for s in systems],
                              "resamples": resamples, "seed": seed, "level": level, "sets": {}}
    for name in resampled:
        chosen = sets if name == OVERALL else [name]
        set_errors = np.concatenate([errors[n] for n in chosen], axis=1)  # [systems, utterances]
        set_words = np.concatenate([words[n] for n in chosen])
        boot_errors, boot_words = resampled[name]  # [systems, resamples], [resamples]
        wers = boot_errors / np.maximum(boot_words, 1)
        entry = {"utterances": int(set_words.size), "reference_words": int(set_words.sum()), "systems": {}}
        for i, system in enumerate(systems):
            low, high = (float(v) for v in np.percentile(wers[i], [tail, 100 - tail]))
            entry["systems"][system.label] = {"wer": corpus_wer(set_errors[i], set_words), "low": low, "high": high}
        entry["against_first"] = {}
        for i, system in enumerate(systems[1:], start=1):
            difference = wers[i] - wers[0]  # [resamples]
            low, high = (float(v) for v in np.percentile(difference, [tail, 100 - tail]))
            verdict = "better" if high < 0 else "worse" if low > 0 else "no significant difference"
            entry["against_first"][system.label] = {
                "difference": corpus_wer(set_errors[i], set_words) - corpus_wer(set_errors[0], set_words),
                "low": low, "high": high, "better_share": float((difference < 0).mean()), "verdict": verdict}
        result["sets"][name] = entry
    result["changed"] = {system.label: _most_changed(systems[0], system, changed) for system in systems[1:]}
    return result


def _most_changed(first: System, other: System, count: int) -> list[dict[str, Any]]:
    """The utterances whose errors moved most between ``first`` and ``other``."""
    moved = sorted(first.utterances, key=lambda k: (-abs(other.utterances[k].errors - first.utterances[k].errors), k))
    return [{"set": k[0], "id": k[1], "errors": [first.utterances[k].errors, other.utterances[k].errors],
             "reference": first.utterances[k].reference, "hypotheses": [first.utterances[k].hypothesis,
                                                                        other.utterances[k].hypothesis]}
            for k in moved[:count] if other.utterances[k].errors != first.utterances[k].errors]


def text_report(result: dict[str, Any]) -> str:
    """The comparison as tables a person reads: each system's WER with its interval, then each difference."""
    labels = [s["label"] for s in result["systems"]]
    first, level = labels[0], f"{100 * result['level']:g} %"
    lines = [f"{label} = {s['name']}" for label, s in zip(labels, result["systems"])]
    def score(cell: dict[str, float]) -> str:
        return f"{100 * cell['wer']:.2f} ({100 * cell['low']:.1f}-{100 * cell['high']:.1f})"

    heading = [f"{label} WER % ({level} interval)" for label in labels]
    lines += ["", f"{'set':<16} {'utts':>6}" + "".join(f"  {h:>26}" for h in heading)]
    for name, entry in result["sets"].items():
        lines.append(f"{name:<16} {entry['utterances']:>6}" + "".join(
            f"  {score(entry['systems'][label]):>26}" for label in labels))
    for label in labels[1:]:
        heading = f"{label} - {first} ({level} interval)"
        lines += ["", f"{'set':<16} {heading:>30}  {label + ' better in':>12}  verdict"]
        for name, entry in result["sets"].items():
            pair = entry["against_first"][label]
            difference = f"{100 * pair['difference']:+.2f} ({100 * pair['low']:+.2f} to {100 * pair['high']:+.2f})"
            lines.append(f"{name:<16} {difference:>30}  {100 * pair['better_share']:>10.1f} %  "
                         f"{label} {pair['verdict']}")
    lines.append(f"(paired bootstrap over utterances: {result['resamples']} resamples, seed {result['seed']})")
    for label, changes in result["changed"].items():
        if changes:
            lines += ["", f"most changed utterances, {first} -> {label} (word errors):"]
            lines += [f"  {c['set']}/{c['id']}  {c['errors'][0]} -> {c['errors'][1]}  reference: {c['reference']} | "
                      f"{first}: {c['hypotheses'][0]} | {label}: {c['hypotheses'][1]}" for c in changes]
    return "\n".join(lines)


def _shown_path(path: Path) -> str:
    """``path`` relative to the current folder when it is under it, else absolute: two runs' ``version_0`` folders
    under different roots stay apart."""
    relative = os.path.relpath(path.absolute())
    return str(path.absolute()) if relative.startswith("..") else relative


def short_name(source: str) -> str:
    """A system's name: ``RUN_FOLDER step N`` for a run's ``utterances/step=N.tsv``, else the file's path."""
    step = utterances_step(source)
    return _shown_path(Path(source)) if step is None else f"{_shown_path(RunFolder.of_file(source).path)} step {step}"


def plot_format(path: Path) -> None:
    """One line when ``--plot`` names a format matplotlib cannot write, or matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError as error:
        raise UsageError("--plot needs matplotlib: pip install -e \".[plot]\"") from error
    formats = FigureCanvasAgg.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise UsageError(f"--plot {path}: matplotlib cannot write '{path.suffix or 'no suffix'}' files; name a file "
                         f"ending in one of {', '.join(sorted(formats))} (e.g. wer.png)")


def plot(result: dict[str, Any], path: Path) -> None:
    """Each set's WER per system with its interval, side by side, into a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise UsageError("--plot needs matplotlib: pip install -e \".[plot]\"") from error
    labels = [s["label"] for s in result["systems"]]
    names = list(result["sets"])
    width = 0.7 / len(labels)
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(9.0, 2.4 * len(names) + 5), 3.8))

    def draw(axes: Any, i: int, cells: list[dict[str, float]], value: str, label: str) -> None:
        x = np.arange(len(names)) + (i - (len(labels) - 1) / 2) * width
        y = np.array([100 * c[value] for c in cells])
        spread = np.array([[100 * c[value] - 100 * c["low"] for c in cells],
                           [100 * c["high"] - 100 * c[value] for c in cells]])  # [2, sets]: below and above
        axes.errorbar(x, y, yerr=spread, fmt="o", capsize=5, color=f"C{i}", label=label)

    for i, (label, system) in enumerate(zip(labels, result["systems"])):
        draw(left, i, [result["sets"][n]["systems"][label] for n in names], "wer",
             f"{label}: {system['name']}")
        if i:
            draw(right, i, [result["sets"][n]["against_first"][label] for n in names], "difference", label)
    right.axhline(0, color="black", linewidth=0.8)
    for axes, title in ((left, "WER %"), (right, f"WER difference with {labels[0]}, points")):
        axes.set_xticks(np.arange(len(names)), names)
        axes.set_xlim(-0.6, len(names) - 0.4)
        axes.set_title(f"{title} ({100 * result['level']:g} % interval)", fontsize="medium")
        axes.grid(axis="y", alpha=0.3)
    left.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(paths: list[str], resamples: int, seed: int, as_json: bool, plot_path: str | None) -> None:
    """``tiny-audio compare``: load the systems, compare them, print the table (or JSON), draw the plot."""
    if plot_path:
        plot_format(Path(plot_path))  # before any work
    labels = [chr(ord("A") + i) if i < 26 else f"S{i}" for i in range(len(paths))]
    with tempfile.TemporaryDirectory(prefix="tiny-audio-compare-") as scratch:
        systems = [load_system(label, path, Path(scratch)) for label, path in zip(labels, paths)]
        result = compare(systems, resamples, seed)
    print(json.dumps(result, indent=2) if as_json else text_report(result))
    if plot_path:
        plot(result, Path(plot_path))
