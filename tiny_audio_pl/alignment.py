"""The alignment stage: the projector trained without the decoder, by CTC over the decoder's vocabulary.

Each audio vector is read as a token through the decoder's own frozen input embeddings: its cosine with
every token's embedding, both taken about the embeddings' mean (they share a common direction, so raw
dot products or cosines read most vectors as a handful of tokens, docs/experiments.md), times a fixed
scale. The CTC blank has no embedding: its score is a fixed cosine, so a vector near no token reads as
blank. The projector so learns to put the transcript's token embeddings, in order, into the audio
sequence, which is what the decoder reads as text; a step costs the encoder (no gradient), the projector
and one ``[N, D] x [D, V]`` readout, not the decoder's forward and backward.

Training-only: nothing of it is saved in a checkpoint or an export (the embeddings are the decoder's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCALE = 30.0  # a token's own centred embedding then reads as itself with probability ~0.96 (median over tokens)
BLANK_COSINE = 0.5  # the blank's score: above it a vector reads as its nearest token


class TokenAlignment(nn.Module):
    """CTC of a transcript's tokens read off the audio vectors by their centred cosine with the token embeddings."""

    def __init__(self, embeddings: torch.Tensor, scale: float = SCALE, blank_cosine: float = BLANK_COSINE) -> None:
        """Keep the decoder's centred, normalised token embeddings.

        Args:
            embeddings: ``[V, D]`` the decoder's input embeddings (frozen; copied here in float32).
            scale: multiplies the cosines into logits.
            blank_cosine: the cosine the blank scores.
        """
        super().__init__()
        embeddings = embeddings.detach().float()
        self.register_buffer("mean", embeddings.mean(0), persistent=False)  # [D]
        self.register_buffer("directions", F.normalize(embeddings - self.mean, dim=-1), persistent=False)  # [V, D]
        self.scale = scale
        self.blank_cosine = blank_cosine

    def log_probs(self, audio: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` audio vectors -> ``[B, N, 1 + V]`` log-probabilities, the blank at index 0."""
        cosines = F.normalize(audio.float() - self.mean, dim=-1) @ self.directions.T  # [B, N, V]
        blank = cosines.new_full((*cosines.shape[:2], 1), self.blank_cosine)  # [B, N, 1]
        return (self.scale * torch.cat([blank, cosines], dim=-1)).log_softmax(-1)

    def forward(self, audio: torch.Tensor, audio_lengths: list[int], targets: list[list[int]]) -> torch.Tensor:
        """Summed CTC loss (nats) of each clip's tokens given its audio vectors.

        Args:
            audio: ``[B, N, D]`` projected audio (:meth:`TinyAudioModel.embed_audio`).
            audio_lengths: valid vectors of each clip.
            targets: each clip's token ids, without the end-of-turn token.

        Returns:
            The loss summed over the clips; a clip too short for its tokens adds nothing (``zero_infinity``).
        """
        log_probs = self.log_probs(audio).transpose(0, 1)  # [N, B, 1 + V], as ctc_loss wants
        labels = torch.tensor([token + 1 for tokens in targets for token in tokens], device=audio.device)
        return F.ctc_loss(log_probs, labels, torch.tensor(audio_lengths), torch.tensor([len(t) for t in targets]),
                          blank=0, reduction="sum", zero_infinity=True)

    def best_path(self, audio: torch.Tensor, audio_lengths: list[int]) -> list[list[int]]:
        """Each clip's token ids read off its best path (repeats merged, blanks dropped): the stage's transcripts."""
        best = self.log_probs(audio).argmax(-1).tolist()  # [B, N]
        paths = [row[:n] for row, n in zip(best, audio_lengths)]
        return [[t - 1 for i, t in enumerate(p) if t and (i == 0 or t != p[i - 1])] for p in paths]
