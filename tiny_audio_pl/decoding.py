"""How one call decodes, as a value, and the names it goes by: the CLI's flags and transformers' options.

Defined once here: ``Settings`` holds a model's own decoding under the same names, ``tiny-audio transcribe``
makes a flag of each option (``--beam-size``) and the exported pipeline maps transformers' ``generate_kwargs``
names (``num_beams``) onto them. Imports nothing heavy: the command line reads it before torch is loaded.
Copied into exported model folders.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import UsageError


def option(default: Any, help: str, transformers: str | None = None) -> Any:  # noqa: A002 - argparse's word
    """A decoding option: its default, what it does (the CLI's help) and transformers' name for it, if another."""
    return field(default=default, metadata={"help": help, "transformers": transformers})


@dataclass(frozen=True)
class Decoding:
    """How one call decodes: a model's settings (:meth:`of`) with the call's own changes (:meth:`but`).

    Passed to each call, never set on the model, so that two callers at once (two visitors of the demo, two
    threads of a pipeline) cannot change each other's decoding. Named as the model's settings, not as
    transformers' generation options (``num_beams``): transformers refuses those in a model's ``config.json``.

    Args:
        max_new_tokens: the most tokens a transcript (of one 30 s window) may have.
        beam_size: beams of the search (1: greedy).
        no_repeat_ngram: above 0, no n-gram of this many tokens twice in a transcript.
        max_tokens_per_second: above 0, each transcript ends after this many tokens per second of its audio (+1).
    """

    max_new_tokens: int = option(128, "the most tokens a transcript of one 30 s window may have")
    beam_size: int = option(1, "beam search with this many beams (1: greedy)", transformers="num_beams")
    no_repeat_ngram: int = option(0, "never repeat an n-gram of this many tokens in a transcript",
                                  transformers="no_repeat_ngram_size")
    max_tokens_per_second: float = option(0.0, "end a transcript after this many tokens per second of its audio")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.beam_size < 1:
            raise UsageError(f"max_new_tokens and beam_size must be >= 1, got {self.max_new_tokens} and "
                             f"{self.beam_size}")
        if self.no_repeat_ngram < 0 or self.max_tokens_per_second < 0:
            raise UsageError(f"no_repeat_ngram and max_tokens_per_second must be >= 0, got {self.no_repeat_ngram} and "
                             f"{self.max_tokens_per_second}")

    @classmethod
    def of(cls, settings: Any) -> Decoding:
        """The decoding a model's settings (or config) say."""
        return cls(**{name: getattr(settings, name) for name in DECODING})

    def but(self, **options: Any) -> Decoding:
        """This decoding with some options changed, e.g. ``beam_size=4``; anything else is a ValueError."""
        unknown = sorted(set(options) - set(DECODING))
        if unknown:
            raise ValueError(f"not decoding options: {', '.join(unknown)}; they are {', '.join(DECODING)}")
        return replace(self, **options)


DECODING = tuple(f.name for f in fields(Decoding))  # also settings: a model's own decoding
# transformers' generate_kwargs names (and ours) -> ours
GENERATE_KWARGS = {f.metadata["transformers"]: f.name for f in fields(Decoding) if f.metadata["transformers"]} | {
    name: name for name in DECODING}


def flags() -> list[tuple[str, str, type, str]]:
    """Each option as a command-line flag: the flag, the option's name, its type and its help."""
    return [(f"--{f.name.replace('_', '-')}", f.name, type(f.default), f.metadata["help"]) for f in fields(Decoding)]
