"""``tiny-audio download -c CONFIG``: the models and data a config names, fetched into the hub cache.

Run where there is internet; on a node without it, with ``HF_HUB_OFFLINE=1``, the same config then reads
everything from that cache (``hub.py``). The config is read as ``fit`` reads it (``-c`` files in turn, then
``--section.key value`` overrides), without a Trainer: only the model's names and the data's splits matter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tiny_audio_pl.errors import UsageError


def download_config(files: list[str], overrides: list[str], max_files: int | None) -> None:
    """``tiny-audio download``: the models and every split a config (``-c`` files, then ``--section.key value``
    overrides, as ``fit`` reads them) names, into the hub cache."""
    config: dict[str, Any] = {}
    for path in files:
        _merge(config, yaml.safe_load(Path(path).read_text()) or {})
    pairs = iter(overrides)
    for option in pairs:
        key, _, value = option.partition("=")
        value = value if "=" in option else next(pairs, None)
        if not key.startswith("--") or "." not in key or value is None:
            raise UsageError(f"download: unrecognized argument {option} (options are --section.key value)")
        *sections, name = key[2:].split(".")
        target = config
        for section in sections:
            target = target.setdefault(section, {})
        target[name] = yaml.safe_load(value)
    # Imported once the arguments are read: a mistake in them is told before transformers and datasets load.
    from huggingface_hub import constants
    from huggingface_hub.utils import logging as hub_logging

    from tiny_audio_pl.configuration import Settings
    from tiny_audio_pl.data import SpeechDataModule
    from tiny_audio_pl.hub import download
    from tiny_audio_pl.network import network_trouble

    model = {"encoder": Settings.encoder, "decoder": Settings.decoder, **(config.get("model") or {})}
    try:
        data = SpeechDataModule(**(config.get("data") or {}))
    except TypeError as error:
        raise UsageError(f"download: the data section: {error}") from error
    splits = [(s.dataset, s.config_name, s.split) for s in data.train_streams() + data.evaluation_sets()]
    names = (model["encoder"], model["decoder"], *(split[0] for split in splits))
    if constants.HF_HUB_OFFLINE and not all(Path(name).is_dir() for name in names):
        raise UsageError("download fetches from the Hub, and HF_HUB_OFFLINE is set: run it where there is a network, "
                         "with HF_HUB_OFFLINE unset (HF_HUB_OFFLINE=0 tiny-audio download ...)")
    hub_logging.set_verbosity_error()  # its retry notices: a failure is told below, in one line
    try:
        lines = download([model["encoder"], model["decoder"]], splits, max_files)
    except Exception as error:
        trouble = network_trouble(error)
        if trouble is None:
            raise
        raise UsageError(f"cannot reach the Hub ({trouble}): check the network, or HF_ENDPOINT for a mirror, "
                         "and run it again (what was fetched is kept)") from error
    for line in lines or ["nothing to fetch: the config names local folders only"]:
        print(line, flush=True)


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    """``new`` into ``into``, section by section (a later config file overrides an earlier one's keys)."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
