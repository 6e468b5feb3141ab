"""tiny-audio (Lightning): train a projector between a frozen speech encoder and a frozen LLM.

The names below are imported when first used, so that ``tiny-audio --help`` and the command line's
usage errors need neither torch nor transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {"Projector": "projector", "Source": "data", "SpeechDataModule": "data", "SpeechLLM": "training",
          "TinyAudioConfig": "modeling", "TinyAudioModel": "modeling", "TinyAudioProcessor": "processing"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'tiny_audio_pl' has no attribute {name!r}")
    return getattr(import_module(f"tiny_audio_pl.{_WHERE[name]}"), name)
