"""Preprocessing, in one place: audio to encoder features, text to decoder tokens and back, the chat layout.

Training (the data module's workers), validation, ``tiny-audio transcribe`` and the exported model's
``transformers`` pipeline all use :class:`TinyAudioProcessor`, so a clip is turned into features and a
transcript into tokens the same way everywhere. This file is copied into exported model folders and
imports nothing of ``tiny_audio_pl`` outside its own folder (only torch, transformers, numpy,
soundfile, and soxr when audio must be resampled).

- Audio is decoded with soundfile (wav, flac, ogg, mp3), downmixed, and resampled with soxr
  (``datasets``' own decoding would need torchcodec and FFmpeg).
- Features come from the encoder's own feature extractor, one clip at a time and unpadded; batches
  are padded to their longest clip only (not to Whisper's 30 s), with the true lengths alongside.
- The prompt comes from the decoder's chat template, split at the ``<audio>`` placeholder, so
  training sees exactly what generation sees; the end-of-turn token is read off the template. It is
  rendered once and its token ids kept for the model's life (:attr:`TinyAudioProcessor.prompt_ids`):
  SmolLM3's template writes the day's date into every prompt.
- Any input a user hands over (a file, encoded bytes, a ``datasets`` row, a waveform at any rate,
  stereo) becomes a mono waveform at the encoder's rate in one place (:meth:`TinyAudioProcessor.load`),
  and audio longer than the encoder's 30 s window is cut into windows at pauses in one place
  (:meth:`TinyAudioProcessor.windows`), for ``tiny-audio transcribe``, the pipeline and the scripts alike.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from transformers import AutoFeatureExtractor, AutoTokenizer, PreTrainedTokenizerBase

from .errors import UsageError, explained_loading

AUDIO_PLACEHOLDER = "<audio>"
WHISPER_WINDOW_S = 30.0  # the Whisper encoder's position table covers 30 s
MIN_DURATION_S = 0.1  # shorter than the encoders' first frame (Whisper's STFT, HuBERT's 25 ms conv)
PROCESSOR_FILE = "processor_config.json"


def _readable(value: dict | bytes | str) -> io.BytesIO | str:
    """What soundfile reads for a stored clip: its bytes (``datasets``' ``{bytes, path}`` or raw) or its path."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    return io.BytesIO(value) if isinstance(value, bytes) else value


def decode_audio(value: dict | bytes | str, sample_rate: int) -> np.ndarray:
    """Decode one stored clip or file to float32 mono at ``sample_rate``.

    Args:
        value: an undecoded ``datasets`` audio value (``{"bytes": ..., "path": ...}``), raw encoded
            bytes, or a file path. wav, flac, ogg and mp3 are read by libsndfile.
        sample_rate: the rate the encoder expects.

    Returns:
        ``[num_samples]`` float32 waveform.
    """
    audio, rate = sf.read(_readable(value), dtype="float32", always_2d=True)  # [T, C]
    return resample(audio.mean(axis=1), rate, sample_rate)


def resample(audio: np.ndarray, rate: int, sample_rate: int) -> np.ndarray:
    """``audio`` [T] from ``rate`` to ``sample_rate`` Hz with soxr (needed only when the rates differ)."""
    if rate != sample_rate:
        try:
            import soxr
        except ImportError as error:
            raise UsageError(f"resampling {rate} Hz audio to {sample_rate} Hz needs soxr: pip install soxr") from error
        audio = soxr.resample(audio, rate, sample_rate)
    return np.ascontiguousarray(audio, dtype=np.float32)


def to_mono(waveform: Any) -> np.ndarray:
    """A float32 waveform ``[T]``; a 2-D one (``[T, C]`` or ``[C, T]``, channels the shorter side) is averaged."""
    audio = np.asarray(waveform, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=int(np.argmin(audio.shape)))
    if audio.ndim != 1:
        raise ValueError(f"expected a waveform of shape [samples] or [samples, channels], got {audio.shape}")
    return audio


def stored_duration(value: dict | bytes | str | None) -> float:
    """Duration in seconds of a stored clip, read from its header (0 when unreadable)."""
    try:
        return sf.info(_readable(value)).duration
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError):
        return 0.0  # the clip is skipped later, when it fails to decode


def split_windows(audio: np.ndarray, sample_rate: int, window_s: float = WHISPER_WINDOW_S,
                  search_s: float = 3.0) -> list[np.ndarray]:
    """Cut ``audio`` into pieces of at most ``window_s`` seconds, each cut at the quietest 25 ms near the limit.

    The cut falls within the last ``search_s`` seconds before each limit, where the energy is lowest,
    so it lands between words where there is a pause; nothing is dropped or repeated.
    """
    window, search, frame = int(window_s * sample_rate), int(search_s * sample_rate), int(0.025 * sample_rate)
    pieces, start = [], 0
    while len(audio) - start > window:
        lo = start + window - search
        region = audio[lo:start + window]
        energy = np.square(region[: len(region) // frame * frame]).reshape(-1, frame).sum(axis=1)  # [frames]
        cut = lo + int(np.argmin(energy)) * frame + frame // 2
        pieces.append(audio[start:cut])
        start = cut
    pieces.append(audio[start:])
    return [piece for piece in pieces if len(piece)]


@dataclass(frozen=True)
class ChatPrompt:
    """Token ids around the audio: ``prefix_ids`` [audio embeddings] ``suffix_ids``, then the answer."""

    prefix_ids: list[int]
    suffix_ids: list[int]

    def length(self, audio_tokens: int) -> int:
        """Decoder positions of the prompt around ``audio_tokens`` audio embeddings (before the answer)."""
        return len(self.prefix_ids) + audio_tokens + len(self.suffix_ids)


def render_chat(tokenizer: PreTrainedTokenizerBase, system_prompt: str, prompt: str) -> ChatPrompt:
    """The decoder's chat template rendered now around the ``<audio>`` placeholder, as token ids.

    Now matters: a template may write the day's date into the prompt (SmolLM3's does), so a rendering
    is made once and then kept (:attr:`TinyAudioProcessor.prompt_ids`).
    """
    if prompt.count(AUDIO_PLACEHOLDER) != 1:
        raise UsageError(f"model.prompt must contain '{AUDIO_PLACEHOLDER}' exactly once, got {prompt!r}")
    if not tokenizer.chat_template:
        raise UsageError("the decoder's tokenizer has no chat template: use an instruct/chat model")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = text.split(AUDIO_PLACEHOLDER)
    return ChatPrompt(tokenizer(before, add_special_tokens=False).input_ids,
                      tokenizer(after, add_special_tokens=False).input_ids)


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token the chat template writes right after an assistant message."""
    sentinel = "SENTINEL7Q"
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    tail = tokenizer(full.split(sentinel, 1)[1].strip(), add_special_tokens=False).input_ids
    return tail[0] if tail else tokenizer.eos_token_id


class TinyAudioProcessor:
    """The encoder's feature extractor and the decoder's tokenizer, with the chat layout around the audio."""

    def __init__(self, feature_extractor: Any, tokenizer: PreTrainedTokenizerBase, system_prompt: str = "",
                 prompt: str = f"Transcribe: {AUDIO_PLACEHOLDER}", prompt_ids: dict[str, Any] | None = None) -> None:
        """Wrap the two.

        Args:
            feature_extractor: the encoder's own (Whisper log-mel, or a waveform normaliser).
            tokenizer: the decoder's, with a chat template.
            system_prompt: system message of the chat ("" for none).
            prompt: user message; ``<audio>`` marks where the audio embeddings go.
            prompt_ids: a rendering kept from before (:attr:`prompt_ids`), used instead of rendering the chat
                template again; ``None``: render it now.
        """
        self.feature_extractor, self.tokenizer = feature_extractor, tokenizer
        self.system_prompt, self.user_prompt = system_prompt, prompt
        self.sample_rate: int = feature_extractor.sampling_rate
        self._input_name = feature_extractor.model_input_names[0]  # input_features (log-mel) or input_values
        self._prompts: dict[str, ChatPrompt] = {}  # by user prompt: the configured one and those met in the data
        kept_end = None if prompt_ids is None else self._restore(prompt_ids)
        self.prompt = self.chat(prompt)  # rendered unless kept (which checks the template)
        self.end_id = end_of_turn(tokenizer) if kept_end is None else kept_end

    def _restore(self, stored: dict[str, Any]) -> int:
        """Take the prompts of a kept rendering; its end-of-turn id."""
        try:
            if stored["system_prompt"] != self.system_prompt:
                raise UsageError(f"model.prompt_ids were rendered for the system prompt {stored['system_prompt']!r}, "
                                 f"not {self.system_prompt!r}: to change the prompt on purpose, set model.prompt_ids "
                                 "to null (it is rendered again when the run starts; docs/configuration.md)")
            self._prompts = {text: ChatPrompt([int(i) for i in before], [int(i) for i in after])
                             for text, (before, after) in stored["prompts"].items()}
            return int(stored["end_of_turn"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise UsageError(f"model.prompt_ids is not a kept rendering ({type(error).__name__}: {error}): set it to "
                             "null to render the prompt from the decoder's chat template") from error

    @property
    def prompt_ids(self) -> dict[str, Any]:
        """The rendering in use, as settings, checkpoints and exports keep it (``model.prompt_ids``).

        Rendered once and then kept for the model's life: a chat template may write the day's date into
        every prompt (SmolLM3's does), so rendering it again on another day (a resumed run, ``transcribe``
        next month) would feed the decoder other tokens than those it was trained with. Holds the system
        prompt it was rendered for, the end-of-turn id, and each user prompt's ids before and after the audio.
        """
        return {"system_prompt": self.system_prompt, "end_of_turn": self.end_id,
                "prompts": {text: [list(chat.prefix_ids), list(chat.suffix_ids)]  # copies: the caller keeps them
                            for text, chat in self._prompts.items()}}

    @classmethod
    def from_models(cls, encoder: str, decoder: str, system_prompt: str = "",
                    prompt: str = f"Transcribe: {AUDIO_PLACEHOLDER}", trust_remote_code: bool = False,
                    prompt_ids: dict[str, Any] | None = None) -> TinyAudioProcessor:
        """The processor of an encoder and a decoder named by hub id or local folder (no weights are read)."""
        with explained_loading(encoder, "encoder"):
            features = AutoFeatureExtractor.from_pretrained(encoder, trust_remote_code=trust_remote_code)
        with explained_loading(decoder, "decoder"):
            tokenizer = AutoTokenizer.from_pretrained(decoder, trust_remote_code=trust_remote_code)
        return cls(features, tokenizer, system_prompt, prompt, prompt_ids)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> TinyAudioProcessor:
        """The processor saved in a model folder by :meth:`save_pretrained`."""
        settings = json.loads((Path(folder) / PROCESSOR_FILE).read_text())
        if settings.get("prompt_ids") is None:
            logging.getLogger(__name__).warning(
                "%s keeps no prompt token ids (saved before they were kept): using the prompt rendered from its chat "
                "template today", folder)
        return cls(AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=False),
                   AutoTokenizer.from_pretrained(folder, trust_remote_code=False),
                   settings["system_prompt"], settings["prompt"], settings.get("prompt_ids"))

    def save_pretrained(self, folder: str | Path) -> None:
        """The feature extractor's and tokenizer's files, and the prompts with their ids, into ``folder``."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.feature_extractor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        settings = {"system_prompt": self.system_prompt, "prompt": self.user_prompt, "prompt_ids": self.prompt_ids}
        (Path(folder) / PROCESSOR_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    # ------------------------------------------------------------------------------------- audio
    def __call__(self, audio: list[Any]) -> dict[str, torch.Tensor]:
        """Clips of at most 30 s, as anything :meth:`load` reads -> the model's inputs in one call:
        ``input_features`` ``[B, n_mels, T]`` or ``[B, T]`` zero-padded to the longest, ``feature_lengths`` ``[B]``."""
        features, lengths = self.pad([self.features(self.load(clip)) for clip in audio])
        return {"input_features": features, "feature_lengths": lengths}

    def load(self, audio: Any) -> np.ndarray:
        """Anything a user or a dataset hands over -> float32 mono ``[samples]`` at ``sample_rate``.

        Reads a file path, encoded bytes, a ``datasets`` audio value (``{"bytes", "path"}``), a dict
        with a waveform under ``array`` or ``raw`` and its ``sampling_rate``, or a waveform array
        already at ``sample_rate`` (as ``transformers``' ASR pipeline takes it); stereo is averaged,
        other rates are resampled.
        """
        if isinstance(audio, dict) and ("array" in audio or "raw" in audio):
            if "sampling_rate" not in audio:
                raise ValueError("an audio dict with a waveform needs its 'sampling_rate'")
            waveform = audio["raw"] if "raw" in audio else audio["array"]
            return resample(to_mono(waveform), int(audio["sampling_rate"]), self.sample_rate)
        if isinstance(audio, dict) and not (audio.get("bytes") or audio.get("path")):
            raise ValueError(f"an audio dict needs 'array' (or 'raw') and 'sampling_rate', or 'bytes' or 'path'; "
                             f"got {sorted(audio)}")
        if isinstance(audio, (np.ndarray, torch.Tensor)):
            return to_mono(audio)
        return decode_audio(audio, self.sample_rate)

    def features(self, audio: np.ndarray) -> np.ndarray:
        """One clip at ``sample_rate`` -> log-mel ``[n_mels, frames]`` or normalised waveform ``[samples]``."""
        # padding / truncation: Whisper's extractor would otherwise pad or cut every clip to 30 s
        out = self.feature_extractor(audio, sampling_rate=self.sample_rate, padding="longest", truncation=False,
                                     return_tensors="np")
        return out[self._input_name][0]

    def windows(self, audio: np.ndarray) -> list[np.ndarray]:
        """The features of a waveform of any length, one per window of at most 30 s cut at a pause
        (:func:`split_windows`): how long audio is cut everywhere. Shorter than ``MIN_DURATION_S``: a ValueError."""
        if len(audio) < MIN_DURATION_S * self.sample_rate:
            raise ValueError(f"too short ({len(audio) / self.sample_rate:.3f} s; at least {MIN_DURATION_S} s of audio)")
        return [self.features(window) for window in split_windows(audio, self.sample_rate)]

    @staticmethod
    def pad(features: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips' features zero-padded to the longest: ``[B, n_mels, T]`` or ``[B, T]``, and the ``[B]`` lengths."""
        lengths = torch.tensor([f.shape[-1] for f in features], dtype=torch.long)
        if not features:
            return torch.zeros(0), lengths
        padded = torch.zeros(len(features), *features[0].shape[:-1], int(lengths.max()), dtype=torch.float32)
        for i, clip in enumerate(features):
            padded[i, ..., : lengths[i]] = torch.from_numpy(clip)
        return padded, lengths

    # -------------------------------------------------------------------------------------- text
    def chat(self, prompt: str | None) -> ChatPrompt:
        """The chat layout for a user prompt (``None``: the default one)."""
        prompt = self.user_prompt if prompt is None else prompt
        if prompt not in self._prompts:  # rendered once, then kept with the others (prompt_ids)
            self._prompts[prompt] = render_chat(self.tokenizer, self.system_prompt, prompt)
        return self._prompts[prompt]

    def targets(self, texts: list[str]) -> list[list[int]]:
        """Answer tokens followed by the end-of-turn token: what the decoder learns to write."""
        return [ids + [self.end_id] for ids in self.tokenizer(texts, add_special_tokens=False).input_ids]

    def decode(self, tokens: torch.Tensor | list[list[int]]) -> list[str]:
        """Generated token ids to text, special tokens and surrounding spaces removed."""
        return [text.strip() for text in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
