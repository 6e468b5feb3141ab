"""A Slurm job's shape against the command's, from the variables Slurm sets: one line before anything loads.

A job whose tasks do not match the trainer fails late or never: started without ``srun``, a job of several tasks
runs the command once, and that one rank waits forever for the others; with ``--ntasks`` and no
``--ntasks-per-node``, nodes can get different numbers of ranks; tasks per node against ``trainer.devices`` and
nodes against ``trainer.num_nodes`` Lightning checks too (``SLURMEnvironment.validate_settings``), but only once the
models are loaded, and in its own terms (``Trainer(devices=...)``). Here each is one line that says what to change.

This module imports nothing heavy: the command checks the tasks (:func:`check_tasks`) before it imports Lightning,
so that a job script's mistake is answered in the first second, and the trainer's settings (:func:`check_trainer`)
once its config is parsed.
"""

from __future__ import annotations

import os
from typing import Any

from tiny_audio_pl.errors import UsageError


def _tasks() -> int | None:
    """The job's task count, when this process runs as its tasks (Lightning's rule, ``SLURMEnvironment.detect``:
    not in a job named ``bash`` or ``interactive``, which launches its processes itself); None otherwise."""
    if "SLURM_NTASKS" not in os.environ or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    return int(os.environ["SLURM_NTASKS"])


def check_tasks(command: str) -> None:
    """One line when a job of several tasks was not started by ``srun`` or gives no tasks per node.

    Args:
        command: the ``tiny-audio`` command run (``fit``, ``validate``), named in the fix.
    """
    tasks = _tasks()
    if tasks is None or tasks == 1:
        return
    if "SLURM_STEP_ID" not in os.environ:
        raise UsageError(f"this Slurm job has {tasks} tasks but the command was not started by srun: each rank would "
                         f"wait for the others forever. Start it as `srun tiny-audio {command} ...` in the job script")
    if "SLURM_NTASKS_PER_NODE" not in os.environ:
        raise UsageError(f"this Slurm job asks for --ntasks={tasks}: ask for --ntasks-per-node (one task per device) "
                         "and --nodes instead, so that every node runs the same number of ranks")


def check_trainer(devices: Any, num_nodes: int) -> None:
    """One line when the job's tasks per node are not ``trainer.devices`` or its nodes not ``trainer.num_nodes``.

    Args:
        devices: ``trainer.devices`` as parsed (a count, a list of device indices, or ``auto``).
        num_nodes: ``trainer.num_nodes``.
    """
    if _tasks() is None:
        return
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE")
    count = len(devices) if isinstance(devices, list) else int(devices) if str(devices).isdigit() else None
    if per_node is not None and count is not None and int(per_node) != count:
        raise UsageError(f"this Slurm job runs {per_node} task(s) per node but trainer.devices is {devices}: set "
                         f"--trainer.devices {per_node} (one task per device; the job script passes "
                         "$SLURM_NTASKS_PER_NODE)")
    nodes = os.environ.get("SLURM_NNODES")
    if nodes is not None and int(nodes) != num_nodes:
        raise UsageError(f"this Slurm job has {nodes} node(s) but trainer.num_nodes is {num_nodes}: set "
                         f"--trainer.num_nodes {nodes} (the job script passes $SLURM_NNODES)")
