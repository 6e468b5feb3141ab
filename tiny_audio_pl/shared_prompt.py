"""The prompt every row starts with, run through the frozen decoder once instead of once per row.

Every clip's decoder input begins with the same prompt tokens: the system message, or the default one
a chat template writes (SmolLM2's 29 tokens, SmolLM3's dated header), and the user turn's opening. The
decoder is frozen, so their keys and values are the same for every row: :class:`SharedPrompt` computes
them for a batch of one and hands the decoder a cache holding them for each row, and the decoder runs
over the rest of each row only. Copied into exported model folders with ``modeling.py``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from .processing import ChatPrompt


def common_prefix(prompts: list[ChatPrompt]) -> tuple[int, ...]:
    """The prompt token ids every row starts with: all of the prefix before the audio with one prompt,
    what the prompts of a mixed-task batch have in common (the system message) otherwise."""
    first = prompts[0].prefix_ids
    shared = len(first)
    for prompt in prompts[1:]:
        ids = prompt.prefix_ids
        shared = next((i for i in range(min(shared, len(ids))) if ids[i] != first[i]), min(shared, len(ids)))
    return tuple(first[:shared])


class SharedPrompt:
    """The decoder's keys and values over the shared prompt, as a cache the decoder continues from."""

    def __init__(self, decoder: PreTrainedModel, adapted: bool) -> None:
        """Wrap the frozen decoder.

        Args:
            decoder: the causal LM.
            adapted: it has trained LoRA adapters, so the prompt's keys and values change as it trains.
        """
        self.decoder, self.adapted = decoder, adapted
        # The decoder's cache argument: ``cache`` in transformers 5.25, ``past_key_values`` before.
        takes = inspect.signature(decoder.get_decoder().forward).parameters
        self._argument = "cache" if "cache" in takes else "past_key_values"
        self._memo: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def argument(self, cache: DynamicCache | None) -> dict[str, Any]:
        """``cache`` as the keyword argument the decoder (and its ``generate``) takes."""
        return {self._argument: cache}

    def cache(self, ids: tuple[int, ...], rows: int) -> DynamicCache | None:
        """The keys and values over ``ids``, the same for each of ``rows`` rows; ``None`` when ``ids`` is empty.

        Without adapters they never change and are kept for the model's life (per device, dtype and
        autocast dtype). With adapters they are computed once per call, inside the autograd graph when
        gradients are on, and the adapters' gradient through them is the sum over the rows, as when each
        row computed its own. Called inside the model's attention-kernel context.
        """
        if not ids:
            return None
        device = self.decoder.device
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        key = (ids, device, self.decoder.dtype, autocast)
        keys_values = None if self.adapted else self._memo.get(key)
        if keys_values is None:
            with torch.set_grad_enabled(self.adapted and torch.is_grad_enabled()):
                keys_values = self._run(ids)
            if not self.adapted:
                self._memo[key] = keys_values
        cache = DynamicCache(config=self.decoder.config)
        for layer, (keys, values) in enumerate(keys_values):  # [1, H_kv, P, head_dim] each
            cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), layer)
        return cache

    def _run(self, ids: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's keys and values ``[1, H_kv, P, head_dim]`` over the token ids ``ids``."""
        cache = DynamicCache(config=self.decoder.config)
        embeds = self.decoder.get_input_embeddings()(torch.tensor([ids], device=self.decoder.device))  # [1, P, D]
        self.decoder.get_decoder()(inputs_embeds=embeds, use_cache=True, **self.argument(cache))
        return [(layer.keys, layer.values) for layer in cache.layers]
