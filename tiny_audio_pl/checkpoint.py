"""Checkpoints that survive crashes: atomic writes, a save on SIGTERM, and plain errors on bad files.

- Lightning writes a checkpoint straight over the old file, so a kill during the write can leave
  ``last.ckpt`` truncated. :class:`AtomicCheckpointIO` writes to a temporary file in the same
  folder, flushes it to disk and renames it over the target: the old file stays whole until the
  new one is complete.
- Cloud GPU providers, Slurm, systemd and ``docker stop`` send SIGTERM (to the whole process
  group: the dataloader workers ignore it, see ``stream.ignore_stop_signals``); Slurm sends its requeue
  signal before a time limit. The run stops at the end of the optimizer step in progress, on every
  rank together (``cluster.StopSignals``: a checkpoint between micro-batches would drop the
  gradients gathered so far, and the resumed run would differ); :class:`Checkpoint` saves that step
  (and ``last``), a Slurm job is requeued after its requeue signal, and the process exits 0. It
  saves only on these signals and when the data host stops answering (``network.DataUnavailable``:
  the loader stops between two optimizer steps, so the step saved is complete); a crash from bad
  numerics must not overwrite the last good checkpoint.
- ``last.ckpt`` is a link to the newest step's file (``checkpoint.save_last: link``), replaced
  atomically, so the newest step is not written twice.
- Checkpoints are read with ``weights_only=True`` (no pickled code runs), and a truncated or
  corrupt file, a folder, or a torch file that is not a Lightning checkpoint gives one line saying
  which file and what to do, before anything is written.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tiny_audio_pl.cluster import StopSignals, requeue
from tiny_audio_pl.configuration import SETTINGS
from tiny_audio_pl.errors import DataUnavailable, UsageError
from tiny_audio_pl.lightning_private import set_signal_connector, should_accumulate, signal_connector
from tiny_audio_pl.modeling import is_projector

_UMASK = os.umask(0)  # read the process umask (there is no getter) ...
os.umask(_UMASK)  # ... and put it back


def give_usual_mode(path: Path) -> None:
    """The mode a plain ``open`` or ``mkdir`` would have given (``mkstemp`` / ``mkdtemp`` make private ones)."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_UMASK)


def read_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``, and an error that says what to do when it fails.

    ``mmap=True`` maps the tensors instead of reading them: a cheap check that the file is whole.
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(path.rglob("last.ckpt")) or sorted(path.rglob("*.ckpt"))
        hint = f", e.g. {inside[0]}" if inside else ""
        raise UsageError(f"checkpoint {path} is a folder: pass a checkpoint file{hint}")
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True, mmap=mmap)
    except Exception as error:
        raise UsageError(f"cannot read checkpoint {path} ({type(error).__name__}). It is truncated, corrupt or "
                         "not a tiny-audio checkpoint: pass another one, e.g. an earlier step=*.ckpt "
                         "from the same folder. Nothing was written.") from error


LEGACY_PREFIX = "model."  # checkpoints before 2026-12-07 kept the trained tensors under the loop's attribute


@dataclass(frozen=True)
class TrainedCheckpoint:
    """A checkpoint of ``tiny-audio fit``, read once, and what it holds, by name: the one reader of its contents.

    ``SpeechLLM.on_save_checkpoint`` writes them beside Lightning's own (optimizer, schedule, loop and data state):

    - ``state_dict``: the trained tensors only, under the network's own names (``projector.*``, the LoRA adapters'
      ``decoder.*``), as an export's ``model.safetensors`` holds them; before 2026-12-07 with a ``model.`` prefix,
      which :meth:`weights` drops;
    - ``hyper_parameters``: the ``model.*`` options (the network's ``Settings`` and the loop's own) and the prompts'
      token ids (``prompt_ids``);
    - ``validation``: the step and the ``val/*`` scores of the latest validation.

    Args:
        contents: the loaded checkpoint.
        source: what to call it in messages (its path).
    """

    contents: dict[str, Any]
    source: str = "the checkpoint"

    @classmethod
    def read(cls, path: str | Path, mmap: bool = False, what: str = "checkpoint") -> TrainedCheckpoint:
        """The checkpoint at ``path``, or one line saying that it is not one of ``tiny-audio fit`` (``what``: the
        option that named it). ``mmap=True`` maps the tensors instead of reading them."""
        if Path(path).suffix == ".safetensors":
            raise UsageError(f"{what}: {path} holds a model's weights (as `tiny-audio export` writes them), not a "
                             "training checkpoint: pass a lightning_logs/version_N/checkpoints/*.ckpt file (an "
                             "exported folder is used with `tiny-audio transcribe --ckpt FOLDER`)")
        contents = read_checkpoint(path, mmap=mmap)
        if not isinstance(contents, dict) or not {"pytorch-lightning_version", "hyper_parameters",
                                                  "state_dict"} <= contents.keys():
            raise UsageError(f"{what}: {path} is a torch file but not a checkpoint written by `tiny-audio fit`; pass "
                             "a lightning_logs/version_N/checkpoints/*.ckpt file")
        return cls(contents, str(path))

    def weights(self) -> dict[str, torch.Tensor]:
        """The trained tensors under the network's own names: what ``TinyAudioModel.load_trained`` reads."""
        state = self.contents["state_dict"]
        legacy = state and all(name.startswith(LEGACY_PREFIX) for name in state)
        return {name.removeprefix(LEGACY_PREFIX) if legacy else name: value for name, value in state.items()}

    @property
    def step(self) -> int:
        """Optimizer steps behind the weights."""
        return int(self.contents.get("global_step", 0))

    @property
    def hyper_parameters(self) -> dict[str, Any]:
        return self.contents["hyper_parameters"]

    @property
    def validation(self) -> dict[str, Any]:
        """``{"step": N, "metrics": {"val/wer": ...}}`` of the latest validation; empty if none ran."""
        return self.contents.get("validation") or {}

    def settings(self) -> dict[str, Any]:
        """The network's settings it was trained with (as given: local folders not yet resolved)."""
        return {name: value for name, value in self.hyper_parameters.items() if name in SETTINGS}

    def facts(self) -> dict[str, Any]:
        """How the weights were trained, for the model card and the demo (an export's ``config.training``)."""
        weights = self.weights()
        return {"global_step": self.step, "learning_rate": self.hyper_parameters.get("learning_rate"),
                "adapter_learning_rate": self.hyper_parameters.get("adapter_learning_rate"),
                "warmup_steps": self.hyper_parameters.get("warmup_steps"),
                "projector_parameters": sum(v.numel() for k, v in weights.items() if is_projector(k)),
                "adapter_parameters": sum(v.numel() for k, v in weights.items() if not is_projector(k)),
                "data": {k: v for k, v in self.contents.get("datamodule_hyper_parameters", {}).items()
                         if not k.startswith("_")},
                "validation": self.validation}

    def note_unkept_prompt(self) -> None:
        """One line when it keeps no prompt token ids (written before they were kept): its prompt is rendered from
        the decoder's chat template now, which may differ from the one it trained on (a date)."""
        if self.hyper_parameters.get("prompt_ids") is None:
            print(f"{self.source} keeps no prompt token ids (written before they were kept): using the prompt "
                  "rendered from the decoder's chat template today", file=sys.stderr)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write-then-rename saving and safe, explained loading."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            give_usual_mode(Path(temporary))
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        return read_checkpoint(path, map_location)


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint that writes atomically, saves on a stop signal, and keeps the scores of a validation.

    Lightning saves a step's checkpoint before that step's validation runs; the checkpoint is
    written again after it, so the validation scores travel with the weights (``tiny-audio export``
    puts them in the model card).
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the saved paths only for the same folder (Lightning would warn on every ``validate``)."""
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A resumed run's first step is already saved (it resumed from it), and ``last`` is ``last.ckpt``.

        Lightning forgets which step it saved last, and with gradient accumulation it would save the
        resumed step again after the first micro-batch: a checkpoint between micro-batches, which
        overwrites ``last`` with a position that drops the gradients gathered so far.
        """
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step
        # ``last`` keeps its one name. A run's first checkpoint is written before ``last`` links to it, so it holds
        # no last path; resumed from it, Lightning would take the ``last.ckpt`` it finds for another file's and
        # write ``last-v1.ckpt``, leaving ``last.ckpt`` at the older step for the next ``--ckpt_path last``.
        self.last_model_path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Once an optimizer step is complete, the ranks agree whether a signal stops the run after it."""
        if not should_accumulate(trainer):
            self._signals.agree()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not isinstance(signal_connector(trainer), StopSignals):  # before the trainer registers its handlers
            set_signal_connector(trainer, StopSignals(trainer))
        self._signals = signal_connector(trainer)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # keep a user's own CheckpointIO
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def _save_step(self, trainer: Trainer) -> None:
        """Write this step's checkpoint and ``last``."""
        candidates = self._monitor_candidates(trainer)
        self._save_checkpoint(trainer, self.format_checkpoint_name(candidates))
        self._save_last_checkpoint(trainer, candidates)

    @staticmethod
    def _link_checkpoint(trainer: Trainer, filepath: str, linkpath: str) -> None:
        """``last.ckpt`` as a link to the step's own file (no second copy), swapped in atomically: a kill
        leaves the old link or the new one, never none. A copy where the file system has no links."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            temporary = f"{linkpath}.{os.getpid()}.tmp"
            try:
                os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), temporary)
            except OSError:
                shutil.copyfile(filepath, temporary)
            os.replace(temporary, linkpath)
        trainer.strategy.barrier()

    def _save_current_step(self, trainer: Trainer) -> None:
        if self._last_global_step_saved != trainer.global_step and not trainer.sanity_checking:
            self._save_step(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A step saved just before its validation ran is saved again, now holding the scores."""
        super().on_validation_end(trainer, pl_module)
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if fitting and self._last_global_step_saved == trainer.global_step:
            self._save_step(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The final step is saved too, when ``max_steps`` is not a multiple of the save interval."""
        self._save_current_step(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if isinstance(exception, SIGTERMException):
            self._save_current_step(trainer)
            job_id = self._signals.job_to_requeue()
            if trainer.is_global_zero:
                names = "+".join(signal.Signals(s).name for s in sorted(self._signals.stops)) or "stopped"
                if trainer.sanity_checking:
                    done, again = "stopped before training", "auto"
                else:
                    done, again = f"saved step {trainer.global_step}", "last"
                if job_id:
                    way_on = f"requeuing Slurm job {job_id}, which resumes from this step"
                elif os.environ.get("SLURM_JOB_ID"):
                    way_on = "submit the job script again to continue"
                else:
                    way_on = f"continue with --ckpt_path {again}"
                print(f"{names}: {done}; {way_on}", flush=True)  # before the requeue, which ends this start
            if job_id and (failure := requeue(job_id)):
                print(failure, flush=True)
        elif isinstance(exception, DataUnavailable):
            self._save_current_step(trainer)
            print(f"data unavailable: saved step {trainer.global_step}")
