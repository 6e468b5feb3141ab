"""The checks ``fit`` and ``validate`` make of a parsed config before anything loads: one line for each mistake.

Each reads only the config (and the machine: cores, GPUs, the file system), so a wrong setting fails in the first
second with a message that says what to change, not after the models have loaded or at step 1,000.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from jsonargparse import Namespace

from tiny_audio_pl.errors import UsageError


def check_writable(folder: Path, what: str) -> None:
    """One line if ``folder`` cannot be created or written; writes nothing that stays."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        tempfile.TemporaryFile(dir=existing).close()  # the real test: root ignores permission bits
    except OSError as error:
        raise UsageError(f"cannot write {folder}: {error.strerror or error}; {what}") from error


def check_steps(trainer: Namespace, align_steps: int = 0) -> None:
    """``trainer.max_steps`` set and positive, or one line; a note when no validation will run, and when the decoder
    will not train (``model.align_steps`` covers the run)."""
    steps = trainer.max_steps
    if steps is None or steps == -1:  # Lightning's "unset"
        raise UsageError("set --trainer.max_steps (e.g. 10000): the data is a stream with no length, so the run and "
                         "its learning-rate schedule are measured in optimizer steps")
    if steps <= 0:
        raise UsageError(f"trainer.max_steps must be a positive number of optimizer steps, got {steps}")
    batches = steps * (trainer.accumulate_grad_batches or 1)
    interval = trainer.val_check_interval
    if isinstance(interval, int) and trainer.check_val_every_n_epoch is None and interval > batches:
        print(f"no validation in this run: trainer.val_check_interval is {interval} batches and the run has {batches}"
              f"; set --trainer.val_check_interval {batches} to score it at the end")
    if align_steps >= steps:
        print(f"the whole run is the alignment stage (model.align_steps {align_steps}, trainer.max_steps {steps}): the "
              "decoder's loss never trains; raise trainer.max_steps to train with it after")


def note_cpu_processes(trainer: Namespace) -> None:
    """A line when ``trainer.devices`` asks a CPU for more processes than it has cores: each is a DDP rank with its
    own batches (so the optimizer step sees that many times the clips, and the result changes), all on too few
    cores."""
    devices, cores = int(trainer.devices) if str(trainer.devices).isdigit() else 0, os.cpu_count() or 1
    on_cpu = trainer.accelerator == "cpu" or (trainer.accelerator == "auto" and not torch.cuda.is_available()
                                             and not torch.backends.mps.is_available())
    if on_cpu and devices > cores:
        print(f"trainer.devices {devices} on a CPU of {cores} cores: {devices} DDP processes, each training on its own "
              f"batches ({devices} times the clips per optimizer step) and sharing the cores")


def check_strategy(trainer: Namespace, model: Namespace) -> None:
    """One line for a strategy that shards the weights (checkpoints hold the trained weights as one whole copy), and
    for DDP without unused parameters around an alignment stage, in which the LoRA adapters get no gradient."""
    strategy = trainer.strategy
    name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", type(strategy).__name__)
    if any(word in str(name).lower() for word in ("fsdp", "deepspeed")):
        raise UsageError(f"trainer.strategy {name} is not supported: the checkpoints hold the trained weights "
                         "whole, and this strategy shards them. Use ddp: only the projector (and LoRA adapters) "
                         "train, which every rank holds whole (36.7 M parameters in the recipe)")
    devices = trainer.devices
    several = (len(devices) if isinstance(devices, list) else torch.cuda.device_count() if devices in ("auto", -1)
               else int(devices)) > 1 or (trainer.num_nodes or 1) > 1
    if several and model.align_steps and model.lora_rank and "find_unused_parameters_true" not in str(name):
        raise UsageError("model.align_steps with LoRA adapters on several devices: the adapters get no gradient in the "
                         "alignment stage, which DDP refuses unless told; pass --trainer.strategy "
                         "ddp_find_unused_parameters_true")
