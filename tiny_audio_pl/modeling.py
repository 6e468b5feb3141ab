"""The network as a ``transformers`` model: frozen encoder -> trained projector -> frozen LLM decoder.

One example becomes the decoder input::

    [chat prefix ... "Transcribe: "] [audio embeddings, n_i of them] [chat suffix ... assistant turn]
    [answer tokens] [end-of-turn]

and the next-token loss covers only the answer and the end-of-turn token. The chat prefix before the
audio is the same for every clip (the system message, SmolLM2's or SmolLM3's default header, the
user turn's opening), and the decoder is frozen, so its keys and values are computed once for a batch
of one (``shared_prompt.py``) and the decoder runs over the rest of each row only: on
the laptop recipe the prefix was 27 % of the decoder's positions. Only the projector is
trained (optionally LoRA adapters in the decoder too): the encoder runs without autograd, the decoder
passes gradients through to its input embeddings, and both stay in eval mode (no dropout). The LM
head is applied only at positions that carry a label, which skips the 128k-wide logits of every
prompt and audio position.

:class:`TinyAudioModel` is the one place the network lives: the training loop wraps it
(``tiny_audio_pl.model``), ``tiny-audio transcribe`` runs it, and an exported folder holds its
config, its trained weights only (the frozen models are loaded by name, as in training), the
processor's files and this code, so that ``AutoModel.from_pretrained(folder, trust_remote_code=True)``
and ``pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)`` work without
``tiny_audio_pl`` installed. This file therefore imports only torch, transformers and its sibling files.
"""

from __future__ import annotations

import math
import shutil
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
)

from .configuration import TinyAudioConfig
from .decoding import Decoding
from .encoder import AudioEncoder, encoder_config
from .errors import UsageError, explained_loading
from .processing import ChatPrompt, TinyAudioProcessor
from .projector import Projector
from .shared_prompt import SharedPrompt, common_prefix

IGNORE = -100
WEIGHTS = "model.safetensors"
PROCESSOR = "processor"  # the processor's files, in a folder of their own: the Auto classes would read config.json
# The files an exported folder needs besides its config, weights and processor files: this model's code.
CODE = ("modeling.py", "configuration.py", "decoding.py", "shared_prompt.py", "processing.py", "pipeline.py",
        "encoder.py", "projector.py", "errors.py")
# Attention kernels for the frozen models. Not cuDNN's: it builds an execution plan for every new
# input shape, and with batches of varying length nearly every batch is a new shape (measured on an
# H100: see docs/benchmarks.md). Flash / memory-efficient kernels take any shape at no setup cost.
ATTENTION_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def build_processor(config: TinyAudioConfig) -> TinyAudioProcessor:
    """The processor of a model's settings, from the encoder's and decoder's names (no weights are read).

    The one place a processor is built from names: the model builds its own with it, ``tiny-audio
    export`` writes it into the folder, and training hands the model's to the data module.
    """
    return TinyAudioProcessor.from_models(config.encoder, config.decoder, config.system_prompt, config.prompt,
                                          config.trust_remote_code, config.prompt_ids)


def is_projector(name: str) -> bool:
    """Whether a trained tensor (named as :meth:`TinyAudioModel.trainable_parameters` names it) is the projector's;
    the others are the decoder's LoRA adapters."""
    return name.startswith("projector.")


class EndAfter(LogitsProcessor):
    """Ends each sequence once it has ``limits[i]`` new tokens: only the end-of-turn token is left to choose.

    A clip cannot hold more words than its duration allows; a decoder that loops on a phrase would
    otherwise run to ``max_new_tokens``, and every looped word is an insertion.
    """

    def __init__(self, limits: torch.Tensor, end_id: int) -> None:
        self.limits, self.end_id = limits, end_id  # [B * beams]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        done = self.limits <= input_ids.shape[1]  # [B * beams]: generated tokens so far (inputs_embeds: none given)
        if not done.any():  # a host read of B booleans; the [B, V] copy below only once a row is done
            return scores
        ended = torch.full_like(scores, -math.inf)
        ended[:, self.end_id] = 0.0
        return torch.where(done[:, None], ended, scores)


@dataclass
class Layout:
    """The decoder input :meth:`TinyAudioModel.assemble` built, and where its labels are."""

    embeds: torch.Tensor  # [B, L, D], zero at padding
    mask: torch.Tensor  # [B, L], 1 at real positions
    labels: torch.Tensor  # [B, L], the token at each answer position, IGNORE elsewhere
    predicting: torch.Tensor  # [N_labels] flat indices (b * L + t) of the positions whose next token is a label


class TinyAudioModel(PreTrainedModel):
    """Speech recognition with a frozen encoder, a trained projector and a frozen LLM decoder."""

    config_class = TinyAudioConfig
    base_model_prefix = "tiny_audio"
    def __init__(self, config: TinyAudioConfig, processor: TinyAudioProcessor | None = None) -> None:
        """Load the frozen models by name and build the projector (its own initialisation).

        Args:
            config: the settings.
            processor: feature extraction and tokenization (default: from the encoder's and decoder's names).
        """
        super().__init__(config)
        remote = config.trust_remote_code
        encoder_config(config.encoder, remote)  # a wrong encoder fails here, before any weights are read
        self.processor = processor or build_processor(config)
        dtype = getattr(torch, config.frozen_dtype)
        self.encoder = AudioEncoder(config.encoder, config.whisper_full_window, dtype, remote)
        with explained_loading(config.decoder, "decoder"):
            self.decoder = AutoModelForCausalLM.from_pretrained(config.decoder, dtype=dtype, trust_remote_code=remote)
        embeddings = self.decoder.get_input_embeddings().weight.detach().float()  # [V, D_dec]
        mean = embeddings.mean(0) if config.projector_bias else None
        spread = embeddings if mean is None else embeddings - mean
        self.projector = Projector(self.encoder.dim, embeddings.shape[1], config.projector_stack,
                                   config.projector_hidden, output_scale=spread.pow(2).mean().sqrt().item(),
                                   output_mean=mean)
        for frozen in (self.encoder, self.decoder):
            frozen.requires_grad_(False)
            frozen.eval()
        if config.lora_rank > 0:
            self._add_lora(config.lora_rank, config.lora_alpha, config.lora_targets or ["q_proj", "k_proj", "v_proj",
                                                                                          "o_proj"])
        self.shared_prompt = SharedPrompt(self.decoder, adapted=config.lora_rank > 0)

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing to do: the frozen weights come from their checkpoints, the projector initialises itself."""

    @classmethod
    def can_generate(cls) -> bool:
        """False for ``transformers``: :meth:`generate` is this model's own decoding, not GenerationMixin's."""
        return False

    def _add_lora(self, rank: int, alpha: float, targets: list[str]) -> None:
        """Trainable low-rank adapters in the frozen decoder (float32, B initialised to zero: no change at first)."""
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as error:
            raise UsageError("model.lora_rank needs peft: pip install peft") from error
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets),
                                self.decoder)
        for name, parameter in self.decoder.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.float()
                parameter.requires_grad_(True)

    def train(self, mode: bool = True) -> TinyAudioModel:
        """Train mode reaches the projector only: the frozen models stay in eval (no dropout)."""
        super().train(mode)
        self.encoder.eval()
        self.decoder.eval()
        return self

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trained parameters (projector, LoRA adapters) by name: what the optimizer sees."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors: all a checkpoint or an export holds."""
        return {name: p.detach() for name, p in self.trainable_parameters().items()}

    def load_trained(self, weights: dict[str, torch.Tensor], source: str | Path) -> TinyAudioModel:
        """Load the trained tensors of :meth:`trainable_state_dict`: all of them and nothing else, or one line.

        The one reader of trained weights: exported folders, training checkpoints (``tiny-audio
        transcribe`` and ``export``) and the resumed training run all come through here.
        """
        expected = set(self.trainable_state_dict())
        if set(weights) != expected:
            raise UsageError(f"{source} does not match its settings: missing {sorted(expected - set(weights))[:3]}, "
                             f"unexpected {sorted(set(weights) - expected)[:3]} (written with another projector or "
                             "LoRA configuration?)")
        self.load_state_dict(weights, strict=False)
        return self

    # ------------------------------------------------------------------------------------ the network
    def attention(self) -> AbstractContextManager:
        """The attention kernels the frozen models may use (:data:`ATTENTION_KERNELS`)."""
        return sdpa_kernel(ATTENTION_KERNELS)

    def embed_audio(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Features -> projected audio embeddings ``[B, N, D_dec]`` and each clip's valid token count."""
        # Lengths stay on the CPU, so this reads no device memory: every later shape and index is
        # computed on the CPU, and the step never waits for the GPU.
        lengths = self.projector.output_lengths(self.encoder.frame_lengths(feature_lengths.cpu())).tolist()
        with torch.no_grad(), self.attention():
            frames, _ = self.encoder(features, feature_lengths)  # [B, T, D_enc]
        audio = self.projector(frames.float())  # [B, ceil(T/k), D_dec]; autocast picks the matmul dtype
        return audio, [min(n, audio.shape[1]) for n in lengths]

    def chat_prompts(self, prompts: list[str | None] | None, count: int) -> list[ChatPrompt]:
        """The chat layout of each clip: its own user prompt (mixed-task data) or the configured one."""
        return [self.processor.chat(text) for text in prompts or [None] * count]

    def assemble(self, audio: torch.Tensor, audio_lengths: list[int], prompts: list[ChatPrompt],
                 targets: list[list[int]] | None = None, padding: Literal["right", "left"] = "right",
                 skip: int = 0) -> Layout:
        """Splice audio embeddings into the chat prompt, one row per clip.

        The layout (token ids, where each audio vector goes, labels) is built on the CPU and sent
        with one non-blocking copy each; the embeddings are then gathered in a few batched ops.

        Args:
            audio: ``[B, N, D]`` projected audio; row i is valid for ``audio_lengths[i]`` positions.
            audio_lengths: B counts (0: the prompt without any audio).
            prompts: each row's chat layout.
            targets: token ids to append after the prompt (training); ``None`` for generation.
            padding: ``right`` for training (causal attention needs no mask then), ``left`` for
                generation (every row's next token is at the end).
            skip: leave out every row's first ``skip`` prompt tokens (the shared prompt, whose keys and
                values come from the :class:`SharedPrompt`).
        """
        targets = targets or [[] for _ in audio_lengths]
        batch, slots = len(audio_lengths), audio.shape[1]
        rows = [p.length(n) - skip + len(t) for p, n, t in zip(prompts, audio_lengths, targets)]
        length = max(rows)
        ids = torch.zeros(batch, length, dtype=torch.long)  # token ids; 0 at audio and padding
        source = torch.full((batch, length), -1, dtype=torch.long)  # row of audio.view(B * N, D), -1: none
        labels = torch.full((batch, length), IGNORE, dtype=torch.long)
        mask = torch.zeros(batch, length, dtype=torch.long)
        predicting = []
        for i, (n, target) in enumerate(zip(audio_lengths, targets)):
            prefix, suffix = prompts[i].prefix_ids[skip:], prompts[i].suffix_ids
            start = length - rows[i] if padding == "left" else 0
            audio_at = start + len(prefix)
            ids[i, start:audio_at] = torch.tensor(prefix, dtype=torch.long)
            source[i, audio_at:audio_at + n] = torch.arange(i * slots, i * slots + n)
            tail = torch.tensor(suffix + target, dtype=torch.long)
            ids[i, audio_at + n:start + rows[i]] = tail
            answer_at = start + rows[i] - len(target)
            labels[i, answer_at:start + rows[i]] = tail[len(suffix):]
            predicting.append(torch.arange(len(target)) + i * length + answer_at - 1)  # position t predicts t + 1
            mask[i, start:start + rows[i]] = 1
        device = audio.device
        ids, source, labels, mask, predicting = (t.to(device, non_blocking=True)
                                                 for t in (ids, source, labels, mask, torch.cat(predicting)))
        tokens = self.decoder.get_input_embeddings()(ids)  # [B, L, D]
        placed = audio.reshape(batch * slots, -1).to(tokens.dtype)[source.clamp(min=0)]  # [B, L, D]
        embeds = torch.where(source[..., None] >= 0, placed, tokens) * mask[..., None].to(tokens.dtype)
        return Layout(embeds, mask, labels, predicting)

    def loss(self, audio: torch.Tensor, audio_lengths: list[int], targets: list[list[int]],
             prompts: list[str | None] | None = None, reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
        """Next-token loss of the ``targets`` given projected audio ``[B, N, D]`` (from :meth:`embed_audio`).

        ``reduction``: the mean over the target tokens, or their sum.
        """
        chats = self.chat_prompts(prompts, len(targets))
        shared = common_prefix(chats)
        layout = self.assemble(audio, audio_lengths, chats, targets, skip=len(shared))
        # Rows are right-padded and attention is causal, so no real position can see padding: no padding
        # mask is needed. Padded positions compute garbage nobody reads.
        with self.attention():
            cache = self.shared_prompt.cache(shared, len(targets))
            hidden = self.decoder.get_decoder()(inputs_embeds=layout.embeds, use_cache=cache is not None,
                                                **self.shared_prompt.argument(cache)).last_hidden_state
        # The LM head runs only at the positions whose next token is a label: [N_labels, V], not [B, L, V].
        logits = self.decoder.get_output_embeddings()(hidden.flatten(0, 1)[layout.predicting])
        return F.cross_entropy(logits.float(), layout.labels.flatten()[layout.predicting + 1], reduction=reduction)

    def forward(self, input_features: torch.Tensor, feature_lengths: torch.Tensor, targets: list[list[int]],
                prompts: list[str | None] | None = None) -> torch.Tensor:
        """Mean next-token loss over the target tokens of a padded batch."""
        return self.loss(*self.embed_audio(input_features, feature_lengths), targets, prompts)

    @torch.no_grad()
    def generate(self, input_features: torch.Tensor, feature_lengths: torch.Tensor,
                 prompts: list[str | None] | None = None, decoding: Decoding | None = None) -> torch.Tensor:
        """Batched decoding of a padded batch (:meth:`generate_from_audio`): the answer's token ids ``[B, T]``."""
        return self.generate_from_audio(*self.embed_audio(input_features, feature_lengths), prompts, decoding)

    @torch.no_grad()
    def generate_from_audio(self, audio: torch.Tensor, audio_lengths: list[int],
                            prompts: list[str | None] | None = None, decoding: Decoding | None = None) -> torch.Tensor:
        """Batched decoding from projected audio ``[B, N, D]`` (from :meth:`embed_audio`), as ``decoding`` says (the
        model's own settings by default): greedy or beam search (``beam_size``), a repetition guard
        (``no_repeat_ngram``) and a cap on each clip's new tokens from its duration (``max_tokens_per_second``)
        under ``max_new_tokens``."""
        chats = self.chat_prompts(prompts, len(audio_lengths))
        shared = common_prefix(chats)
        layout = self.assemble(audio, audio_lengths, chats, padding="left", skip=len(shared))
        end, pad = self.processor.end_id, self.processor.tokenizer.pad_token_id
        settings = decoding or Decoding.of(self.config)
        config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=False,
                                  num_beams=settings.beam_size, no_repeat_ngram_size=settings.no_repeat_ngram,
                                  eos_token_id=end, pad_token_id=end if pad is None else pad)
        processors = LogitsProcessorList()
        if settings.max_tokens_per_second:
            seconds = [n * self.config.projector_stack / self.encoder.frames_per_second for n in audio_lengths]
            limits = torch.tensor([math.ceil(settings.max_tokens_per_second * s) + 1 for s in seconds])  # [B]
            processors.append(EndAfter(limits.repeat_interleave(settings.beam_size).to(audio.device), end))
        # Each row is [shared prompt (cached)] [left padding] [rest]: transformers takes the embeddings of the
        # whole rows and computes only those past the cache; the mask keeps the padding out and the positions
        # (its running count) are those of an unpadded row.
        embeds = F.pad(layout.embeds, (0, 0, len(shared), 0))  # [B, P + L, D], the first P never read
        mask = F.pad(layout.mask, (len(shared), 0), value=1)  # [B, P + L]
        with self.attention():
            cache = self.shared_prompt.cache(shared, len(audio_lengths) * settings.beam_size)  # beams: own rows
            return self.decoder.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config,
                                         logits_processor=processors, **self.shared_prompt.argument(cache))

    def transcribe(self, input_features: torch.Tensor, feature_lengths: torch.Tensor,
                   prompts: list[str | None] | None = None, decoding: Decoding | None = None) -> list[str]:
        """Batched decoding of a padded batch (each clip with its own prompt, if given); one string per clip."""
        return self.processor.decode(self.generate(input_features, feature_lengths, prompts, decoding))

    def transcribe_windows(self, windows: list[list[np.ndarray]], batch_size: int = 8,
                           decoding: Decoding | None = None) -> list[str]:
        """Each recording's transcript from the features of its windows (``processor.windows``).

        The windows of all recordings are decoded together, ``batch_size`` at a time, shortest first
        (little padding per batch; batched decoding equals one-by-one decoding), and each
        recording's texts are joined with a space: ``tiny-audio transcribe`` and the pipeline both
        decode long audio this way.
        """
        flat = [(i, piece) for i, pieces in enumerate(windows) for piece in pieces]  # recording, features
        order = sorted(range(len(flat)), key=lambda j: flat[j][1].shape[-1])
        texts = [""] * len(flat)
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            features, lengths = self.processor.pad([flat[j][1] for j in chosen])
            for j, text in zip(chosen, self.transcribe(features.to(self.device), lengths, decoding=decoding)):
                texts[j] = text
        joined: list[list[str]] = [[] for _ in windows]
        for (i, _), text in zip(flat, texts):  # in time order within each recording
            if text:
                joined[i].append(text)
        return [" ".join(parts) for parts in joined]

    # ------------------------------------------------------------------------------------ the folder
    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """The model folder: config, trained weights only, processor files and this code (see module docstring)."""
        write_model_folder(save_directory, self.config, self.trainable_state_dict(), self.processor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, dtype: Any = None,
                        config: TinyAudioConfig | None = None, **kwargs: Any) -> TinyAudioModel:
        """Rebuild the model from a folder (or hub repository) written by :meth:`save_pretrained`.

        The frozen encoder and decoder are loaded by the names in the config; ``dtype`` (a
        ``torch.dtype`` or its name; ``None`` or ``"auto"``: the config's ``frozen_dtype``) overrides
        the dtype they are held in. Extra keyword arguments of ``transformers`` are accepted and ignored.
        """
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(pretrained_model_name_or_path)))
        config = config or TinyAudioConfig.from_pretrained(folder)
        if dtype not in (None, "auto"):
            config.frozen_dtype = str(dtype).removeprefix("torch.")
        model = cls(config, TinyAudioProcessor.from_pretrained(folder / PROCESSOR))
        return model.load_trained(load_file(folder / WEIGHTS), folder).eval()


def write_model_folder(folder: str | Path, config: TinyAudioConfig, weights: dict[str, torch.Tensor],
                       processor: TinyAudioProcessor) -> None:
    """Write a loadable model folder: ``config.json`` (with the ``auto_map`` and the custom pipeline that
    point ``transformers`` at the code), ``model.safetensors`` (``weights``), the processor's files and the code."""
    folder = Path(folder)
    config.prompt_ids = processor.prompt_ids  # with any prompt rendered since the model was built
    config.auto_map = {"AutoConfig": "modeling.TinyAudioConfig", "AutoModel": "modeling.TinyAudioModel"}
    config.custom_pipelines = {"automatic-speech-recognition": {"impl": "pipeline.TinyAudioPipeline",
                                                                "pt": ["AutoModel"], "type": "audio"}}
    config.architectures = ["TinyAudioModel"]
    config.save_pretrained(folder)
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()}, folder / WEIGHTS,
              metadata={"format": "pt"})
    processor.save_pretrained(folder / PROCESSOR)
    for name in CODE:
        shutil.copyfile(Path(__file__).with_name(name), folder / name)
