"""Mistakes a user can fix, told in one line.

A wrong setting, an unreachable model, an empty dataset folder: each is raised as a
:class:`UsageError` whose message names the setting and the fix. ``tiny-audio`` prints such an
error as one line and exits with status 2 (``TINY_AUDIO_TRACEBACK=1`` shows the traceback, for
bug reports); any other exception is a bug and keeps its traceback. A data host that stopped
answering (:class:`DataUnavailable`) is told the same way, with status 75: try again later.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import constants as hub_constants


class UsageError(Exception):
    """A mistake in the command, config or data that the message tells how to fix."""


class DataUnavailable(UsageError):
    """The data host stopped answering for longer than ``data.network_patience``: one line, not a traceback."""


@contextmanager
def explained_loading(name: str, what: str) -> Iterator[None]:
    """Turn transformers' errors for a model that cannot be loaded into one line that says what to change."""
    try:
        yield
    except OSError as error:
        if Path(name).is_dir():
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UsageError(f"cannot load the {what} from the folder {name}: {first}") from error
        why = ("HF_HUB_OFFLINE is set, so only local directories and models in the hub cache can be used "
               "(`tiny-audio download -c CONFIG` fetches a config's models where there is internet)"
               if hub_constants.HF_HUB_OFFLINE else
               "the hub could not be reached or has no such repository (gated models also need HF_TOKEN)")
        raise UsageError(f"cannot load the {what} '{name}': it is not a folder under {Path.cwd()} (a config's paths "
                         f"are read from the folder you run in), and {why}. Pass a local directory (e.g. "
                         "assets/tiny-whisper) or a reachable hub id.") from error
