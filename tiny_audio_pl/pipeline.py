"""``pipeline("automatic-speech-recognition", model=FOLDER, trust_remote_code=True)`` for an exported model.

An exported folder's ``config.json`` names this class as its custom pipeline for the task, so
``transformers`` loads it from the folder along with the model. It reads what the stock ASR
pipeline reads: a file path, encoded bytes, a waveform at the model's rate, or a dict with the
waveform under ``raw`` or ``array`` (as ``datasets`` yields it) and its ``sampling_rate``; stereo is
downmixed and any rate resampled, as training did. Audio longer than the encoder's 30 s window is
cut at pauses; the windows are decoded together and their texts joined: the same transcript
``tiny-audio transcribe`` gives. A list of inputs with ``batch_size`` is decoded ``batch_size``
inputs at a time (batched decoding equals one-by-one decoding). Decoding follows the model's settings;
``generate_kwargs`` (or ``max_new_tokens=``) changes ``max_new_tokens``, ``num_beams``,
``no_repeat_ngram_size`` or ``max_tokens_per_second`` for the call (the model's ``beam_size``,
``no_repeat_ngram`` ...); any other option is refused, not ignored.
The reading, cutting and decoding are the model's own (``processor.load``, ``processor.windows``,
``transcribe_windows``), shared with ``tiny-audio transcribe``. Copied into exported folders.
"""

from __future__ import annotations

from typing import Any

from transformers import Pipeline

from .decoding import GENERATE_KWARGS, Decoding


class TinyAudioPipeline(Pipeline):
    """Audio in, ``{"text": transcript}`` out."""

    _load_processor = False  # the model brings its own TinyAudioProcessor
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_image_processor = False

    def _sanitize_parameters(self, max_new_tokens: int | None = None, generate_kwargs: dict[str, Any] | None = None,
                             **unsupported: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        asked = dict(generate_kwargs or {}) | ({"max_new_tokens": max_new_tokens} if max_new_tokens else {})
        options = GENERATE_KWARGS  # transformers' names and ours -> ours
        refused = sorted(unsupported) + [f"generate_kwargs[{key!r}]" for key in sorted(asked) if key not in options]
        if refused:
            raise ValueError(f"this model's pipeline does not support {', '.join(refused)}: it returns "
                             f"{{'text': ...}}; its options are batch_size and generate_kwargs {', '.join(options)}")
        # A value per call: two threads of one pipeline never change each other's decoding.
        decoding = Decoding.of(self.model.config).but(**{options[key]: value for key, value in asked.items()})
        return {}, {"decoding": decoding}, {}

    def __call__(self, inputs: Any, *args: Any, batch_size: int | None = None, **kwargs: Any) -> Any:
        """One input, or a list; a list with ``batch_size`` > 1 is decoded that many inputs at a time."""
        if not isinstance(inputs, (list, tuple)) or (batch_size or 1) <= 1:
            return super().__call__(inputs, *args, **kwargs)
        _, forward, _ = self._sanitize_parameters(**kwargs)
        results = []
        for start in range(0, len(inputs), batch_size):
            windows = [self.preprocess(item)["windows"] for item in inputs[start:start + batch_size]]
            results += [{"text": text} for text in self.model.transcribe_windows(windows, batch_size,
                                                                                 forward["decoding"])]
        return results

    def preprocess(self, inputs: Any) -> dict[str, Any]:
        """The input as the model's processor reads it (:meth:`TinyAudioProcessor.load`), cut into windows."""
        processor = self.model.processor
        return {"windows": processor.windows(processor.load(inputs))}

    def _forward(self, model_inputs: dict[str, Any], decoding: Decoding) -> dict[str, Any]:
        windows = model_inputs["windows"]
        return {"text": self.model.transcribe_windows([windows], len(windows), decoding)[0]}

    def postprocess(self, model_outputs: dict[str, Any]) -> dict[str, str]:
        return {"text": model_outputs["text"]}
