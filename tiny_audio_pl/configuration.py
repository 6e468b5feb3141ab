"""What rebuilds a model, defined once: a training run's :class:`Settings`, an export's ``transformers`` config.

Copied into exported model folders with ``modeling.py``: it imports only transformers and its sibling files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from transformers import PretrainedConfig

from .decoding import Decoding
from .errors import UsageError

LORA_ALPHA = 32.0  # the default; another value is a choice of the user's


@dataclass
class Settings:
    """What rebuilds a :class:`TinyAudioModel` around its trained weights, defined once: the ``model.*``
    options of a training run (``SpeechLLM`` passes them through) and the ``config.json`` of an export.

    Args:
        encoder: speech encoder, hub id or local directory (Whisper, HuBERT, wav2vec2, ...).
        decoder: causal LM with a chat template, hub id or local directory.
        projector_stack: k, encoder frames stacked into one audio token (50/k tokens per second).
        projector_hidden: hidden width of the projector's SwiGLU.
        projector_bias: give the projector a trained output bias that starts at the decoder's mean
            token embedding (and its output RMS at the embeddings' spread about it). An LLM's token
            embeddings share a common direction (SmolLM2-135M: median cosine 0.70 with their mean);
            without it the audio vectors start, and stay, nearly orthogonal to it (docs/experiments.md).
        system_prompt: system message (``/no_think`` turns off SmolLM3's reasoning); empty for none.
        prompt: user message; ``<audio>`` marks where the audio embeddings go.
        prompt_ids: the prompts' token ids, kept for the model's life. Leave null: a run renders the decoder's chat
            template when it starts (SmolLM3's writes that day's date into every prompt) and keeps the ids in its
            config.yaml, its checkpoints and its exports, which resume, ``validate``, ``transcribe`` and the
            exported pipeline then use. Set it back to null to render the prompt again (docs/configuration.md).
        max_new_tokens: generation limit when decoding for WER and transcription.
        beam_size: beam search with this many beams (1: greedy decoding).
        no_repeat_ngram: above 0, no n-gram of this many tokens is generated twice in a transcript (a guard
            against a decoder that loops on a phrase).
        max_tokens_per_second: above 0, end each clip's transcript after this many tokens per second of
            its audio (plus one), under ``max_new_tokens``: normal speech needs about 4 (docs/experiments.md).
        whisper_full_window: feed Whisper every clip padded to 30 s, as in its pretraining (slower);
            by default each batch is padded only to its longest clip.
        frozen_dtype: dtype the frozen encoder and decoder are held in (``bfloat16`` halves their
            memory on a GPU; the projector always keeps float32 weights).
        trust_remote_code: let the encoder or decoder checkpoint run its own Python code (off: only
            architectures built into transformers load).
        lora_rank: above 0, also train LoRA adapters of this rank in the decoder (needs ``peft``:
            ``pip install -e ".[lora]"``); checkpoints and exports then hold adapters + projector.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_rank``).
        lora_targets: decoder module names that get adapters (default: the attention's
            ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``).
    """

    encoder: str = "openai/whisper-large-v3-turbo"
    decoder: str = "HuggingFaceTB/SmolLM3-3B"
    projector_stack: int = 2
    projector_hidden: int = 5120
    projector_bias: bool = False
    system_prompt: str = "/no_think"
    prompt: str = "Transcribe: <audio>"
    prompt_ids: dict[str, Any] | None = None
    max_new_tokens: int = 128
    beam_size: int = 1
    no_repeat_ngram: int = 0
    max_tokens_per_second: float = 0.0
    whisper_full_window: bool = False
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    lora_rank: int = 0
    lora_alpha: float = LORA_ALPHA
    lora_targets: list[str] | None = None

    def __post_init__(self) -> None:
        for name in ("projector_stack", "projector_hidden"):
            if getattr(self, name) < 1:
                raise UsageError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        Decoding.of(self)  # its checks
        if self.lora_rank < 0 or self.lora_alpha <= 0:
            raise UsageError(f"model.lora_rank must be >= 0 and model.lora_alpha > 0, got {self.lora_rank} and "
                             f"{self.lora_alpha}")
        if self.frozen_dtype not in ("float32", "bfloat16", "float16"):
            raise UsageError(f"model.frozen_dtype must be float32, bfloat16 or float16, got {self.frozen_dtype!r}")

    def check_used(self, encoder_type: str) -> None:
        """One line for a setting that would do nothing (a user would believe they changed something). Checked
        when a command starts, not when a model is loaded: a checkpoint written with one still loads."""
        if self.lora_rank == 0 and (self.lora_targets is not None or self.lora_alpha != LORA_ALPHA):
            raise UsageError("model.lora_alpha and model.lora_targets shape LoRA adapters, which model.lora_rank 0 "
                             "turns off: set model.lora_rank (e.g. 16), or drop them")
        if self.whisper_full_window and encoder_type != "whisper":
            raise UsageError(f"model.whisper_full_window is for Whisper encoders; {self.encoder} is '{encoder_type}', "
                             "whose batches are never padded to a window: drop the setting")


SETTINGS = tuple(f.name for f in fields(Settings))


class TinyAudioConfig(PretrainedConfig):
    """The ``transformers`` config of a :class:`TinyAudioModel`: its :class:`Settings` as attributes."""

    model_type = "tiny_audio"

    def __init__(self, **kwargs: Any) -> None:
        """The :class:`Settings` given (their defaults for the others) and ``PretrainedConfig``'s own arguments."""
        vars(self).update(asdict(Settings(**{name: kwargs.pop(name) for name in SETTINGS if name in kwargs})))
        super().__init__(**kwargs)
