"""A callback for tests/test_ddp.py: what each DDP rank trained on and validated, one JSON line per event.

Added to a real ``tiny-audio fit`` with ``--trainer.callbacks+=ddp_callback.RankRecorder
--trainer.callbacks.dirpath DIR`` (``tests/`` on ``PYTHONPATH``). Every rank appends to its own
``DIR/rank{R}.jsonl``:

- ``{"event": "train_batch", "step": ..., "ids": [...]}`` for every training batch (the clip ids);
- ``{"event": "val_local", ...}`` at the end of each validation, before Lightning reduces the
  logged values: this rank's own WER counts (``errors``, ``words``, summed over its tallies' scored
  utterances) and its own ``val/loss`` sum and target-token count;
- ``{"event": "val_reduced", ...}``: the ``val/wer`` and ``val/loss`` logged from the merged tallies;
- ``{"event": "train_end", "weights_sum": ..., "weights_moved": ...}``: the sum of the trained
  weights (equal on every rank when DDP averages the gradients) and how far they moved in this run.

Every record names the process and, inside a Slurm job, the task it is (``slurm_procid``), and its ``time``.
``--trainer.callbacks.pause S`` sleeps S seconds after each training batch, or until the rank gets a
stop signal: a job that outlasts its time limit without keeping the CPUs busy.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from tiny_audio_pl.lightning_private import signal_connector


class RankRecorder(Callback):
    """Appends what this rank trains on and its validation numbers to ``dirpath/rank{R}.jsonl``."""

    def __init__(self, dirpath: str, pause: float = 0.0) -> None:
        self.dirpath = Path(dirpath)
        self.pause = pause
        self._start: list[torch.Tensor] = []

    def _write(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "world": trainer.world_size, "pid": os.getpid(),
                  "slurm_procid": os.environ.get("SLURM_PROCID"), "time": time.time(), **record}
        with open(self.dirpath / f"rank{trainer.global_rank}.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")

    @staticmethod
    def _trained(pl_module: LightningModule) -> list[torch.Tensor]:
        return [p.detach().double().clone() for p in pl_module.parameters() if p.requires_grad]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = self._trained(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        weights = self._trained(pl_module)
        moved = sum((w - s).abs().sum().item() for w, s in zip(weights, self._start))
        self._write(trainer, {"event": "train_end", "step": trainer.global_step,
                              "weights_sum": sum(w.sum().item() for w in weights), "weights_moved": moved})

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: dict[str, Any],
                             batch_idx: int) -> None:
        self._write(trainer, {"event": "train_batch", "step": trainer.global_step, "epoch": trainer.current_epoch,
                              "ids": list(batch["id"])})

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        end = time.monotonic() + self.pause
        while time.monotonic() < end and not getattr(signal_connector(trainer), "received", None):
            time.sleep(0.05)  # cut short by a stop signal, as a real step would end

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Runs before the module's own hook merges the ranks' tallies: they are still this rank's own.
        tallies = pl_module.evaluation.tallies  # per set: token-summed losses, word errors of this rank's clips
        counts = [t.word_counts() for t in tallies.values()]
        self._write(trainer, {"event": "val_local", "step": trainer.global_step, "sanity": trainer.sanity_checking,
                              "errors": sum(e for e, _ in counts), "words": sum(w for _, w in counts),
                              "loss_sum": sum(t.loss_sum for t in tallies.values()),
                              "loss_count": sum(t.tokens for t in tallies.values()),
                              "wer_metrics": sum(1 for t in tallies.values() if t.rows), "loss_metrics": len(tallies)})

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = trainer.callback_metrics
        self._write(trainer, {"event": "val_reduced", "step": trainer.global_step, "sanity": trainer.sanity_checking,
                              "wer": float(metrics["val/wer"]), "loss": float(metrics["val/loss"])})
