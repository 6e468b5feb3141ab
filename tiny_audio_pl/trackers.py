"""Experiment trackers' loggers, the package each needs and how to install it: the one table of them.

The trackers are optional extras. A config naming one whose package is missing gets one line saying what to
install, both when ``fit`` checks the config (``lightning_cli.py``) and when jsonargparse fails on the class path
first (``cli.py``); neither needs the other for it.
"""

from __future__ import annotations

import importlib.util

TRACKERS = {"WandbLogger": ("wandb", 'pip install -e ".[wandb]"'),
            "MLFlowLogger": ("mlflow", 'pip install -e ".[mlflow]"'),
            "CometLogger": ("comet_ml", "pip install comet-ml"),
            "NeptuneLogger": ("neptune", "pip install neptune")}


def missing_tracker(text: str) -> str | None:
    """One line for a tracker's logger named in ``text`` whose package is not installed, else None."""
    for name, (module, install) in TRACKERS.items():
        if name in text and importlib.util.find_spec(module) is None:
            return f"trainer.logger {name} needs the {module} package: {install}"
    return None
