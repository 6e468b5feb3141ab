"""The parts of Lightning's private API that tiny-audio builds on, named in one place and checked.

Exact resume, a save on a stop signal, an optimizer-step progress bar and run-aware ``--ckpt_path last`` need
hooks Lightning does not make public: the checkpoint callback's save steps, the trainer's signal connector, the
epoch loop's accumulation test, the progress bar's task updates, the CLI's parser and checkpoint-path steps.
Every use is listed in :data:`USED` and the ones read from outside a subclass go through the functions here, so
a Lightning release that renames one fails :func:`missing` (``tests/test_lightning_private.py``) in one line
naming it, instead of a resumed run that silently differs.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector as SignalConnector

# What each class must have: methods tiny-audio's subclasses call or override, and attributes they read.
USED: dict[type, tuple[str, ...]] = {
    ModelCheckpoint: ("_monitor_candidates", "_save_checkpoint", "_save_last_checkpoint", "_link_checkpoint",
                      "_last_global_step_saved"),
    SignalConnector: ("_register_signal", "_get_current_signal_handlers", "received_sigterm"),
    RichProgressBar: ("_initialize_train_progress_bar_id", "_update", "_update_metrics", "_get_train_description",
                      "train_progress_bar_id"),
    LightningCLI: ("_prepare_subcommand_parser", "_get", "_parse_ckpt_path"),
    Trainer: ("_signal_connector", "_accelerator_connector"),
}


def should_accumulate(trainer: Trainer) -> bool:
    """Whether the batch just run is a micro-batch whose optimizer step is still to come."""
    return trainer.fit_loop.epoch_loop._should_accumulate()


def signal_connector(trainer: Trainer) -> SignalConnector:
    """The object that installs the trainer's signal handlers and holds its stop flag."""
    return trainer._signal_connector


def set_signal_connector(trainer: Trainer, connector: SignalConnector) -> None:
    """Replace it (before the trainer installs its handlers, which it does when fitting starts)."""
    trainer._signal_connector = connector


def cluster_environment(trainer: Trainer) -> ClusterEnvironment:
    """The cluster the trainer detected (Slurm, torchrun, none)."""
    return trainer._accelerator_connector.cluster_environment


def missing() -> list[str]:
    """``Class.name`` of every name in :data:`USED` this Lightning lacks (on the class or a fresh instance)."""
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    instances: dict[type, Any] = {ModelCheckpoint: ModelCheckpoint(), RichProgressBar: RichProgressBar(),
                                  SignalConnector: SignalConnector(trainer), Trainer: trainer}
    gone = [f"{owner.__name__}.{name}" for owner, names in USED.items() for name in names
            if not hasattr(owner, name) and not hasattr(instances.get(owner), name)]
    if not hasattr(trainer.fit_loop.epoch_loop, "_should_accumulate"):
        gone.append("_TrainingEpochLoop._should_accumulate")
    return gone

