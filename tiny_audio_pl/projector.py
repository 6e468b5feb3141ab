"""The only trained part: a projector from encoder frames to decoder input embeddings.

Shapes (Whisper large-v3-turbo -> SmolLM3-3B, k = 2, hidden 5120)::

    frames [B, T, 1280] --stack k--> [B, T/k, 2560] --RMSNorm--> SwiGLU 2560->5120->2048
        --RMSNorm (scaled to the decoder's embedding RMS)--> [B, T/k, 2048]

Stacking halves the audio sequence the decoder has to attend over (25 tokens per second instead of
50). The output norm matters: a frozen LLM expects inputs at the scale of its own token embeddings,
and an unnormalised projector output can sit orders of magnitude away from it, which slows or
stalls training. Its gain starts at the decoder's embedding RMS and is trained with the rest.

An LLM's token embeddings are not centred: they share a common direction (SmolLM2-135M's have a
median cosine of 0.70 with their mean). A zero-mean output starts, and after 600 laptop steps still
stays, almost orthogonal to it (median cosine 0.07), far from every token. With ``output_mean`` a
trained bias starts the output at the mean embedding and the norm's gain at the spread about it, so
the audio vectors begin among the tokens (docs/experiments.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def stack_frames(frames: torch.Tensor, k: int) -> torch.Tensor:
    """Concatenate every ``k`` consecutive frames, zero-padding the end to a multiple of ``k``.

    Args:
        frames: ``[B, T, D]`` encoder frames.
        k: number of frames to stack.

    Returns:
        ``[B, ceil(T / k), D * k]``.
    """
    batch, length, dim = frames.shape
    remainder = length % k
    if remainder:
        frames = F.pad(frames, (0, 0, 0, k - remainder))
    return frames.reshape(batch, -1, dim * k)


class Projector(nn.Module):
    """Frame stacking, then a SwiGLU MLP, with RMS norms on the way in and out."""

    def __init__(self, encoder_dim: int, decoder_dim: int, stack: int = 2, hidden: int = 5120,
                 output_scale: float = 1.0, output_mean: torch.Tensor | None = None) -> None:
        """Build the projector.

        Args:
            encoder_dim: width of one encoder frame (1280 for Whisper large-v3-turbo).
            decoder_dim: width of the decoder's token embeddings (2048 for SmolLM3-3B).
            stack: number of consecutive encoder frames concatenated into one audio token.
            hidden: SwiGLU hidden width.
            output_scale: initial RMS of the output, normally the RMS of the decoder's embeddings (about
                their mean, when ``output_mean`` is given).
            output_mean: ``[decoder_dim]``: when given, a trained output bias starting at this vector,
                normally the decoder's mean token embedding.
        """
        super().__init__()
        if stack < 1 or hidden < 1:
            raise ValueError(f"projector stack and hidden must be >= 1, got stack={stack}, hidden={hidden}")
        self.stack = stack
        in_dim = encoder_dim * stack
        self.norm_in = nn.RMSNorm(in_dim)
        self.gate = nn.Linear(in_dim, hidden, bias=False)
        self.up = nn.Linear(in_dim, hidden, bias=False)
        self.down = nn.Linear(hidden, decoder_dim, bias=False)
        self.norm_out = nn.RMSNorm(decoder_dim)
        with torch.no_grad():
            self.norm_out.weight.fill_(output_scale)
        self.bias = None if output_mean is None else nn.Parameter(output_mean.detach().float().clone())

    def output_lengths(self, frame_lengths: torch.Tensor) -> torch.Tensor:
        """Audio tokens produced from ``frame_lengths`` valid encoder frames: ``ceil(frames / k)``."""
        return torch.div(frame_lengths + self.stack - 1, self.stack, rounding_mode="floor")

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Map ``[B, T, encoder_dim]`` frames to ``[B, ceil(T / k), decoder_dim]`` audio embeddings."""
        x = self.norm_in(stack_frames(frames, self.stack))  # [B, T/k, D_enc * k]
        x = F.silu(self.gate(x)) * self.up(x)  # [B, T/k, hidden]
        # The norm in float32, like its weight: under bf16 autocast the matmuls come out in bf16, and a
        # mixed-dtype rms_norm falls back to an unfused kernel.
        x = self.norm_out(self.down(x).float())  # [B, T/k, D_dec]
        return x if self.bias is None else x + self.bias
