"""A training run's folder: where a run keeps its config, checkpoints and per-utterance files, written down once.

A run's folder is ``save_dir/<name>/<run>/`` of its first logger (TensorBoard's and CSV's ``log_dir``; for W&B
and MLflow the project or experiment and the run id), where Lightning puts the checkpoints, or
``default_root_dir`` without a logger::

    config.yaml               the whole config of the run (``fit -c`` it to train the same way again)
    checkpoints/step=N.ckpt   every saved step; last.ckpt links to the newest
    utterances/step=N.tsv     every utterance the validation of step N scored

Writers (``fit``, ``validate``) and readers (``compare``, ``demo``, ``--ckpt_path last``) all go through
:class:`RunFolder`. Imports no torch: ``compare`` reads run folders without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAST = "last.ckpt"


@dataclass(frozen=True)
class RunFolder:
    """One run's folder (see the module docstring)."""

    path: Path

    @classmethod
    def of_trainer(cls, trainer: Any) -> RunFolder:
        """The folder of the run a Lightning ``Trainer`` is running, whatever the logger, so that a second run never
        overwrites the first's config or per-utterance files."""
        if not trainer.loggers:
            return cls(Path(trainer.default_root_dir))
        logger = trainer.loggers[0]
        if logger.version is None:  # W&B names its run once it has started it
            logger.experiment  # noqa: B018 - starts the run (rank 0)
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return cls(Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version)

    @classmethod
    def of_file(cls, path: str | Path) -> RunFolder:
        """The run a checkpoint (``checkpoints/X.ckpt``, ``last.ckpt`` followed) or a per-utterance file belongs to."""
        path = Path(path)
        return cls((path.resolve() if path.suffix == ".ckpt" else path).parent.parent)

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST

    def utterances(self, step: int) -> Path:
        """The per-utterance file of the validation at ``step``."""
        return self.path / "utterances" / f"step={step}.tsv"

    def newest_utterances(self) -> Path | None:
        """The per-utterance file of the latest validated step, or None."""
        steps = {step: p for p in self.path.glob("utterances/step=*.tsv") if (step := utterances_step(p)) is not None}
        return steps[max(steps)] if steps else None


def utterances_step(path: str | Path) -> int | None:
    """N for a run's ``utterances/step=N.tsv``, else None."""
    path = Path(path)
    step = path.stem.removeprefix("step=")
    return int(step) if path.parent.name == "utterances" and path.stem.startswith("step=") and step.isdigit() else None
