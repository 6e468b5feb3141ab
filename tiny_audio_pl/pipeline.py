"""``pipeline("automatic-speech-recognition", model=FOLDER, trust_remote_code=True)`` for an exported model.

An exported folder's ``config.json`` names this class as its custom pipeline for the task, so
``transformers`` loads it from the folder along with the model. It reads what the stock ASR
pipeline reads: a file path, encoded bytes, a waveform at the model's rate, or a dict with the
waveform under ``raw`` or ``array`` (as ``datasets`` yields it) and its ``sampling_rate``; stereo is
downmixed and any rate resampled, as training did. Audio longer than the encoder's 30 s window is
cut at pauses; the windows are decoded together and their texts joined: the same transcript
``tiny-audio transcribe`` gives. A list of inputs with ``batch_size`` is decoded ``batch_size``
inputs at a time (batched decoding equals one-by-one decoding). Decoding is greedy: the options are
``max_new_tokens`` (or ``generate_kwargs={"max_new_tokens": N}``); any other is refused, not ignored.
Copied into exported folders: it imports only transformers, numpy, torch and its siblings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import Pipeline

from .processing import decode_audio, resample, split_windows


class TinyAudioPipeline(Pipeline):
    """Audio in, ``{"text": transcript}`` out."""

    _load_processor = False  # the model brings its own TinyAudioProcessor
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_image_processor = False

    def _sanitize_parameters(self, max_new_tokens: int | None = None, generate_kwargs: dict[str, Any] | None = None,
                             **unsupported: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        generate_kwargs = dict(generate_kwargs or {})
        max_new_tokens = generate_kwargs.pop("max_new_tokens", max_new_tokens)
        refused = sorted(unsupported) + [f"generate_kwargs[{key!r}]" for key in sorted(generate_kwargs)]
        if refused:
            raise ValueError(f"this model's pipeline does not support {', '.join(refused)}: it decodes greedily and "
                             "returns {'text': ...}; its options are max_new_tokens and batch_size")
        return {}, ({"max_new_tokens": max_new_tokens} if max_new_tokens else {}), {}

    def __call__(self, inputs: Any, *args: Any, batch_size: int | None = None, **kwargs: Any) -> Any:
        """One input, or a list; a list with ``batch_size`` > 1 is decoded that many inputs at a time."""
        if not isinstance(inputs, (list, tuple)) or (batch_size or 1) <= 1:
            return super().__call__(inputs, *args, **kwargs)
        _, forward, _ = self._sanitize_parameters(**kwargs)
        results = []
        for start in range(0, len(inputs), batch_size):
            prepared = [self.preprocess(item) for item in inputs[start:start + batch_size]]
            windows = [window for item in prepared for window in item["windows"]]
            tokens = self.forward({"windows": windows}, **forward)["tokens"]
            first = 0
            for item in prepared:  # each input's windows, back in order
                count = len(item["windows"])
                results.append(self.postprocess({"tokens": tokens[first:first + count]}))
                first += count
        return results

    def preprocess(self, inputs: Any) -> dict[str, Any]:
        """The input's audio at the model's rate, mono, cut into windows, each as encoder features."""
        processor = self.model.processor
        rate = processor.sample_rate
        if isinstance(inputs, dict):
            if "raw" not in inputs and "array" not in inputs:
                raise ValueError(f"an audio dict needs 'raw' or 'array' and 'sampling_rate'; got {sorted(inputs)}")
            waveform = inputs["raw"] if "raw" in inputs else inputs["array"]
            audio = resample(_mono(waveform), int(inputs["sampling_rate"]), rate)
        elif isinstance(inputs, np.ndarray):
            audio = _mono(inputs)  # already at the model's rate, as transformers' ASR expects
        else:
            audio = decode_audio(inputs, rate)  # a path or encoded bytes
        return {"windows": [processor.features(window) for window in split_windows(audio, rate)]}

    def _forward(self, model_inputs: dict[str, Any], max_new_tokens: int | None = None) -> dict[str, Any]:
        features, lengths = self.model.processor.pad(model_inputs["windows"])  # [W, n_mels, T] or [W, T], [W]
        return {"tokens": self.model.generate(features.to(self.device), lengths, max_new_tokens=max_new_tokens)}

    def postprocess(self, model_outputs: dict[str, Any]) -> dict[str, str]:
        return {"text": " ".join(text for text in self.model.processor.decode(model_outputs["tokens"]) if text)}


def _mono(waveform: Any) -> np.ndarray:
    """A float32 waveform ``[T]``; a 2-D one (``[T, C]`` or ``[C, T]``, channels the shorter side) is averaged."""
    audio = np.asarray(waveform, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=int(np.argmin(audio.shape)))
    if audio.ndim != 1:
        raise ValueError(f"expected a waveform of shape [samples] or [samples, channels], got {audio.shape}")
    return audio
