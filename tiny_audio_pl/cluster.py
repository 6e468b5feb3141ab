"""Runs under a scheduler: the signals a run stops on, the ranks agreeing to stop, Slurm's requeue.

- **SIGTERM** (cloud providers, Slurm at a time limit, ``scancel``, systemd, ``docker stop``) and
  **SIGINT** (Ctrl-C): stop after the optimizer step in progress, save it, exit 0
  (``checkpoint.Checkpoint`` saves). A second Ctrl-C stops at once, without saving.
- **Slurm's requeue signal** (SIGUSR1, what ``#SBATCH --signal=USR1@120`` sends before the time
  limit, or ``scancel --signal=USR1``): the same, then ``scontrol requeue`` of this job, whose script
  starts again and resumes with ``--ckpt_path auto`` in the same run folder.

Lightning's own handling is replaced (:class:`StopSignals`), for two reasons. Its SLURM handler
saves an ``hpc_ckpt_N.ckpt`` from inside the signal handler, whatever the loop was doing (between
two micro-batches too), into ``default_root_dir``, while the SIGTERM that follows the requeue makes
this package save the step again: two files that disagree, and the requeued run would pick the
first. And its SIGTERM handler broadcasts from inside the handler, a collective each rank enters at
a different point of its own sequence of collectives. Here a handler only notes the signal; at the
end of each optimizer step the ranks agree (one all-reduce of a flag) to stop together, so every
rank stops after the same step, and one file, ``step=N.ckpt`` (``last.ckpt`` links to it), is
written. ``SLURMEnvironment(auto_requeue=False)`` in ``--trainer.plugins`` keeps the save and the
stop but not the requeue, as it does in Lightning.

A Slurm job whose shape does not match the trainer is one line before anything loads: ``slurm_checks.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Trainer

from tiny_audio_pl.lightning_private import SignalConnector, cluster_environment

# Lightning's default for SLURMEnvironment and the job script's --signal; dataloader workers ignore it too
# (stream.ignore_stop_signals).
REQUEUE_SIGNAL = signal.SIGUSR1
_early: set[int] = set()  # signals that came before a trainer took the handlers over


def _note_early(signum: int, frame: FrameType | None) -> None:
    _early.add(signum)


def note_early_signals() -> None:
    """Inside a Slurm job, keep a requeue signal that comes while the models load (its default action kills)."""
    if os.environ.get("SLURM_JOB_ID"):
        signal.signal(REQUEUE_SIGNAL, _note_early)


def slurm_job(trainer: Trainer) -> SLURMEnvironment | None:
    """The trainer's Slurm environment, when it runs as the tasks of a Slurm job."""
    environment = cluster_environment(trainer)
    return environment if isinstance(environment, SLURMEnvironment) else None


class StopSignals(SignalConnector):
    """Lightning's signal connector, replaced: a handler notes the signal; :meth:`agree` stops every rank together."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__(trainer)
        self.signals: tuple[int, ...] = ()  # SIGTERM and the requeue signal, once registered
        self.received: set[int] = set()  # on this rank
        self.agreed: set[int] = set()  # on any rank, as of the last optimizer step

    @property
    def stops(self) -> set[int]:
        """The stop signals this run got: agreed on by the ranks, or this rank's own (a stop outside training)."""
        return self.agreed | self.received

    def register_signal_handlers(self) -> None:
        self.received_sigterm = False  # Lightning's flag: set only once the ranks agreed (see agree)
        self._original_handlers = self._get_current_signal_handlers()
        job = slurm_job(self.trainer)
        self.signals = (signal.SIGTERM, signal.SIGINT, job.requeue_signal if job else REQUEUE_SIGNAL)
        self.received |= _early
        _early.clear()
        for signum in self.signals:
            self._register_signal(signum, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and signum in self.received:  # a second Ctrl-C: stop at once, unsaved
            signal.default_int_handler(signum, frame)
        if signum == signal.SIGINT and self.trainer.is_global_zero:  # a step can take seconds: say it was heard
            # os.write, not print: a handler that prints while the progress bar prints fails on the stream's lock
            os.write(sys.stderr.fileno(), b"\nCtrl-C: stopping after this step, which is saved (Ctrl-C again stops "
                                          b"at once, unsaved)\n")
        self.received.add(signum)
        if not self.trainer.training:  # validation, the sanity check, `validate`: stop at the next batch
            self.received_sigterm = True

    def agree(self) -> bool:
        """Whether any rank got a stop signal; every rank calls this after the same optimizer step. Sets
        Lightning's flag, so that the loop stops once the step's hooks have run. One process: no tensor, no
        device sync; several: one all-reduce of a flag per signal."""
        self.agreed = set(self.received)
        if self.trainer.world_size > 1:
            flags = torch.tensor([float(s in self.received) for s in self.signals],
                                 device=self.trainer.strategy.root_device)
            flags = self.trainer.strategy.reduce(flags, reduce_op="max")
            self.agreed = {s for s, flag in zip(self.signals, flags.tolist()) if flag}
        self.received_sigterm = bool(self.agreed)
        return self.received_sigterm

    def job_to_requeue(self) -> str | None:
        """After a requeue signal, in a Slurm job that allows it (``auto_requeue``), on rank 0: the id to requeue
        (an array task's own); None otherwise."""
        job = slurm_job(self.trainer)
        asked = job is not None and job.auto_requeue and job.requeue_signal in self.stops
        if not asked or not self.trainer.is_global_zero:
            return None
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        return os.environ["SLURM_JOB_ID"]


def requeue(job_id: str) -> str | None:
    """``scontrol requeue JOB``: None, or what went wrong. Slurm then ends this start of the job (SIGTERM to its
    tasks), so whatever this process still has to say must be said before."""
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return f"could not requeue Slurm job {job_id}: {result.stderr.strip()}; submit it again to resume"
    return None
