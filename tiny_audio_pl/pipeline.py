"""``pipeline("automatic-speech-recognition", model=FOLDER, trust_remote_code=True)`` for an exported model.

An exported folder's ``config.json`` names this class as its custom pipeline for the task, so
``transformers`` loads it from the folder along with the model. It reads a file path, encoded bytes,
a waveform at the model's rate, or ``{"raw": waveform, "sampling_rate": rate}``, decodes and
resamples it as training did, cuts audio longer than the encoder's 30 s window at pauses, decodes all
windows of the input in one batch and joins their texts: the same transcript ``tiny-audio
transcribe`` gives. Copied into exported folders: it imports only transformers, numpy and its siblings.
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

    def _sanitize_parameters(self, max_new_tokens: int | None = None, **kwargs: Any
                             ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        return {}, ({"max_new_tokens": max_new_tokens} if max_new_tokens else {}), {}

    def preprocess(self, inputs: Any) -> dict[str, Any]:
        processor = self.model.processor
        rate = processor.sample_rate
        if isinstance(inputs, dict):
            audio = resample(np.asarray(inputs["raw"], dtype=np.float32), int(inputs["sampling_rate"]), rate)
        elif isinstance(inputs, np.ndarray):
            audio = np.asarray(inputs, dtype=np.float32)  # already at the model's rate, as transformers' ASR expects
        else:
            audio = decode_audio(inputs, rate)  # a path or encoded bytes
        windows = split_windows(audio, rate)
        features, lengths = processor.pad([processor.features(window) for window in windows])
        return {"input_features": features, "feature_lengths": lengths}

    def _forward(self, model_inputs: dict[str, Any], max_new_tokens: int | None = None) -> dict[str, Any]:
        return {"tokens": self.model.generate(model_inputs["input_features"], model_inputs["feature_lengths"],
                                              max_new_tokens=max_new_tokens)}

    def postprocess(self, model_outputs: dict[str, Any]) -> dict[str, str]:
        return {"text": " ".join(text for text in self.model.processor.decode(model_outputs["tokens"]) if text)}
