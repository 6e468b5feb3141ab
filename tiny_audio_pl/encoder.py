"""The frozen speech encoder: Whisper (log-mel input) or a HuBERT / wav2vec2-style model (waveform input).

Both kinds produce about 50 frames per second. Two things need care:

- Loading. ``WhisperEncoder.from_pretrained(<full Whisper checkpoint>)`` in transformers 5 silently
  leaves the encoder randomly initialised, so the full model is loaded with ``AutoModel`` and its
  ``get_encoder()`` taken. A CTC checkpoint such as ``facebook/hubert-xlarge-ls960-ft`` loads into
  the bare ``HubertModel`` the same way (the ``hubert.`` prefix is mapped by transformers).
- Whisper's 30 s window. The stock Whisper encoder refuses anything but 3000 mel frames (30 s), so
  every 3 s clip would pay for 30 s of attention. We run its own modules on each batch padded only
  to the longest clip: padded mel frames and conv outputs are zeroed (exactly what the convs' own
  zero padding does at the end of a lone clip) and padded frames are masked out of self-attention,
  so a clip encodes the same whatever it is batched with. This differs from Whisper's pretraining,
  which always saw 30 s with trailing silence; ``full_window=True`` restores that (pads every clip
  to 30 s with its silence floor and runs the stock encoder), encoding ten times the frames of a 3 s clip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from .errors import UsageError, explained_loading


def encoder_config(name: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The encoder's config, or one line if it cannot be read or is of a kind this project cannot use.

    Reads only ``config.json``: a wrong encoder is refused before any weights are read.
    """
    with explained_loading(name, "encoder"):
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    known_class = MODEL_MAPPING.get(type(config), None)  # None for remote code: checked once loaded
    if config.model_type != "whisper" and known_class and not hasattr(known_class, "_get_feat_extract_output_lengths"):
        raise unsupported_encoder(config.model_type, name)
    return config


def unsupported_encoder(model_type: str, name: str) -> UsageError:
    return UsageError(f"unsupported encoder type '{model_type}' ({name}): use a Whisper checkpoint or a waveform "
                      "encoder such as HuBERT, wav2vec2, WavLM or data2vec-audio")


class AudioEncoder(nn.Module):
    """Wraps a pretrained encoder; maps padded features plus lengths to frames plus lengths."""

    def __init__(self, name: str, full_window: bool = False, dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False) -> None:
        """Load the encoder.

        Args:
            name: hub id or local directory of a Whisper, HuBERT, wav2vec2, WavLM or data2vec-audio checkpoint.
            full_window: Whisper only: pad every clip to the full 30 s window as in pretraining.
            dtype: dtype of the weights (features are cast to it on the way in).
            trust_remote_code: allow the checkpoint to run its own Python code.
        """
        super().__init__()
        config = encoder_config(name, trust_remote_code)
        self.is_whisper = config.model_type == "whisper"
        with explained_loading(name, "encoder"):
            model = AutoModel.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
        if not self.is_whisper and not hasattr(model, "_get_feat_extract_output_lengths"):
            raise unsupported_encoder(config.model_type, name)
        self.model = model.get_encoder() if self.is_whisper else model
        self.full_window = full_window and self.is_whisper
        self.dim: int = config.d_model if self.is_whisper else config.hidden_size
        self.frames_per_second = 50  # Whisper: 100 mel frames a second, halved by conv2; waveform models: 20 ms
        # Waveform models with group-norm feature extractors (e.g. hubert-base) must not get a mask.
        self.use_waveform_mask = not self.is_whisper and getattr(config, "feat_extract_norm", "layer") == "layer"

    def frame_lengths(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        """Valid encoder frames for ``feature_lengths`` mel frames (Whisper) or samples (waveform)."""
        if self.is_whisper:
            return torch.div(feature_lengths + 1, 2, rounding_mode="floor")  # conv2 has stride 2
        return self.model._get_feat_extract_output_lengths(feature_lengths).long()

    def forward(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a padded batch.

        Args:
            features: ``[B, n_mels, T]`` log-mel (Whisper) or ``[B, T]`` waveform, zero-padded.
            feature_lengths: ``[B]`` valid mel frames or samples.

        Returns:
            ``frames [B, T_enc, D]`` and ``frame_lengths [B]``; frames past a clip's length are zero.
        """
        features = features.to(self.model.dtype)
        feature_lengths = feature_lengths.to(features.device, non_blocking=True)  # may come from the CPU
        if not self.is_whisper:
            mask = torch.arange(features.shape[-1], device=features.device) < feature_lengths[:, None]
            frames = self.model(features, attention_mask=mask.long() if self.use_waveform_mask else None)
            frames = frames.last_hidden_state
        elif self.full_window:
            frames = self._whisper_full_window(features, feature_lengths)
        else:
            frames = self._whisper_trimmed(features, feature_lengths)
        lengths = self.frame_lengths(feature_lengths)
        # Zero the padding: frame stacking would otherwise mix it into a clip's last audio token.
        valid = torch.arange(frames.shape[1], device=frames.device) < lengths[:, None]  # [B, T_enc]
        return frames * valid.unsqueeze(-1), lengths

    def _whisper_trimmed(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> torch.Tensor:
        """Whisper's encoder over the batch's own length, with padding masked (see module docstring)."""
        enc = self.model
        max_frames = 2 * enc.config.max_source_positions
        if mel.shape[-1] > max_frames:
            raise ValueError(f"{mel.shape[-1]} mel frames exceed Whisper's window of {max_frames}")
        mel_mask = (torch.arange(mel.shape[-1], device=mel.device) < mel_lengths[:, None]).unsqueeze(1)  # [B, 1, T]
        x = F.gelu(enc.conv1(mel * mel_mask)) * mel_mask  # [B, D, T]
        x = F.gelu(enc.conv2(x)).transpose(1, 2)  # [B, T/2, D]
        x = x + enc.embed_positions.weight[: x.shape[1]]
        valid = torch.arange(x.shape[1], device=x.device) < self.frame_lengths(mel_lengths)[:, None]  # [B, T/2]
        bias = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill(~valid, torch.finfo(x.dtype).min)
        bias = bias[:, None, None, :]  # [B, 1, 1, T/2]: no query attends to padded keys
        for layer in enc.layers:
            x = layer(x, bias)
        return enc.layer_norm(x)

    def _whisper_full_window(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> torch.Tensor:
        """Stock Whisper: every clip padded to 3000 frames with its own floor (what silence maps to)."""
        max_frames = 2 * self.model.config.max_source_positions
        floor = mel.masked_fill(torch.arange(mel.shape[-1], device=mel.device) >= mel_lengths[:, None, None],
                                float("inf")).amin(dim=(1, 2), keepdim=True)  # [B, 1, 1]
        padded = floor.expand(-1, mel.shape[1], max_frames).clone()
        length = min(mel.shape[-1], max_frames)
        valid = torch.arange(length, device=mel.device) < mel_lengths[:, None, None]
        padded[..., :length] = torch.where(valid, mel[..., :length], padded[..., :length])
        return self.model(padded).last_hidden_state  # [B, 1500, D]
