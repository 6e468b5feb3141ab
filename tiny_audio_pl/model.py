"""The LightningModule: frozen encoder -> trained projector -> frozen LLM decoder.

One training example becomes the decoder input::

    [chat prefix ... "Transcribe: "] [audio embeddings, n_i of them] [chat suffix ... assistant turn]
    [transcript tokens] [end-of-turn]

and the next-token loss covers only the transcript and the end-of-turn token. The prompt text comes
from the decoder's own chat template, split at the ``<audio>`` placeholder, so training sees exactly
what generation sees; a clip may bring its own prompt (mixed-task data). Only the projector is
trained (optionally LoRA adapters in the decoder too): the encoder runs without autograd, the
decoder passes gradients through to its input embeddings, and both stay in eval mode (no dropout)
for the whole run. The LM head is applied only at positions that carry a label, which skips the
128k-wide logits of every prompt and audio position. Checkpoints hold only the trained weights
(plus optimizer, scheduler, loop and data state); the frozen models are reloaded by name.
"""

from __future__ import annotations

import csv
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchmetrics.functional.text import word_error_rate
from torchmetrics.text import WordErrorRate
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase
from whisper_normalizer.english import EnglishTextNormalizer

from tiny_audio_pl.encoder import AudioEncoder
from tiny_audio_pl.errors import UsageError, explained_loading
from tiny_audio_pl.projector import Projector

AUDIO_PLACEHOLDER = "<audio>"
IGNORE = -100

_english = EnglishTextNormalizer()


def normalize_for_wer(text: str) -> str:
    """Whisper's English normaliser (the Open ASR Leaderboard convention), British spellings included."""
    return _english(text)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, then cosine to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class SetTally:
    """One evaluation set's totals over a validation pass (merged across ranks).

    Losses are summed over target tokens, so the set's loss is a mean per token whatever the batch
    sizes and however the clips were spread over ranks. The grounding losses: each clip's transcript
    scored with another clip's audio (its neighbour in the batch; batches of one clip have none) and
    with no audio at all. ``audio_gain`` is the wrong-audio loss minus the right-audio loss over the
    same tokens: zero while the decoder ignores the audio, growing once the projector carries it.
    """

    utterances: int = 0
    audio_s: float = 0.0
    compute_s: float = 0.0
    tokens: int = 0
    loss_sum: float = 0.0  # with each clip's own audio
    no_audio_sum: float = 0.0
    paired_tokens: int = 0  # tokens of clips that had a neighbour to swap audio with
    paired_loss_sum: float = 0.0  # ... their loss with their own audio
    wrong_audio_sum: float = 0.0  # ... and with the neighbour's
    rows: list[tuple[str, str, str, int, int]] = field(default_factory=list)  # id, ref, hyp, errors, words

    @staticmethod
    def merge(parts: list[SetTally]) -> SetTally:
        """Totals of all ranks (compute time: the slowest rank's, as they run in parallel)."""
        summed = {f.name: sum(getattr(p, f.name) for p in parts) for f in fields(SetTally)
                  if f.name not in ("compute_s", "rows")}
        return SetTally(**summed, compute_s=max(p.compute_s for p in parts), rows=[r for p in parts for r in p.rows])

    def metrics(self) -> dict[str, float]:
        """Per-token losses and the audio gain (NaN where there was nothing to average)."""
        def mean(total: float, count: int) -> float:
            return total / count if count else math.nan

        return {"loss": mean(self.loss_sum, self.tokens), "loss_no_audio": mean(self.no_audio_sum, self.tokens),
                "loss_wrong_audio": mean(self.wrong_audio_sum, self.paired_tokens),
                "audio_gain": mean(self.wrong_audio_sum - self.paired_loss_sum, self.paired_tokens)}


class ChatPrompt:
    """Token ids around the audio, derived from the decoder's chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, system_prompt: str, prompt: str) -> None:
        if prompt.count(AUDIO_PLACEHOLDER) != 1:
            raise UsageError(f"model.prompt must contain '{AUDIO_PLACEHOLDER}' exactly once, got {prompt!r}")
        if not tokenizer.chat_template:
            raise UsageError("the decoder's tokenizer has no chat template: use an instruct/chat model")
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before, after = text.split(AUDIO_PLACEHOLDER)
        self.prefix_ids: list[int] = tokenizer(before, add_special_tokens=False).input_ids
        self.suffix_ids: list[int] = tokenizer(after, add_special_tokens=False).input_ids
        # The end-of-turn token is whatever the template writes right after an assistant message.
        sentinel = "SENTINEL7Q"
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": sentinel}], tokenize=False)
        tail = tokenizer(full.split(sentinel, 1)[1].strip(), add_special_tokens=False).input_ids
        self.end_ids: list[int] = tail[:1] or [tokenizer.eos_token_id]

    def length(self, audio_tokens: int) -> int:
        """Decoder positions of the prompt around ``audio_tokens`` audio embeddings (before the answer)."""
        return len(self.prefix_ids) + audio_tokens + len(self.suffix_ids)


class SpeechLLM(LightningModule):
    """Speech recognition with a frozen encoder, a trained projector and a frozen LLM decoder."""

    # Attention kernels for the frozen models. Not cuDNN's: it builds an execution plan for every new
    # input shape, and with batches of varying length nearly every batch is a new shape (measured on
    # an H100: see docs/benchmarks.md). Flash / memory-efficient kernels take any shape at no setup cost.
    attention_backends: list[SDPBackend] | None = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                   SDPBackend.MATH]

    def __init__(
        self,
        encoder: str = "openai/whisper-large-v3-turbo",
        decoder: str = "HuggingFaceTB/SmolLM3-3B",
        projector_stack: PositiveInt = 2,
        projector_hidden: PositiveInt = 5120,
        system_prompt: str = "/no_think",
        prompt: str = "Transcribe: <audio>",
        max_new_tokens: PositiveInt = 128,
        learning_rate: PositiveFloat = 1e-4,
        weight_decay: NonNegativeFloat = 0.0,
        warmup_steps: NonNegativeInt = 500,
        min_lr_ratio: ClosedUnitInterval = 0.0,
        whisper_full_window: bool = False,
        frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        num_logged_examples: NonNegativeInt = 8,
        max_nonfinite_steps: PositiveInt = 5,
        trust_remote_code: bool = False,
        lora_rank: NonNegativeInt = 0,
        lora_alpha: PositiveFloat = 32.0,
        lora_targets: list[str] | None = None,
    ) -> None:
        """Load the frozen models and build the projector.

        Args:
            encoder: speech encoder, hub id or local directory (Whisper, HuBERT, wav2vec2, ...).
            decoder: causal LM with a chat template, hub id or local directory.
            projector_stack: k, encoder frames stacked into one audio token (50/k tokens per second).
            projector_hidden: hidden width of the projector's SwiGLU.
            system_prompt: system message (``/no_think`` turns off SmolLM3's reasoning); empty for none.
            prompt: user message; ``<audio>`` marks where the audio embeddings go.
            max_new_tokens: generation limit when decoding for WER.
            learning_rate: peak AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: optimizer steps of linear warmup before the cosine decay.
            min_lr_ratio: the cosine decays to ``learning_rate * min_lr_ratio`` at the last step.
            whisper_full_window: feed Whisper every clip padded to 30 s, as in its pretraining (slower);
                by default each batch is padded only to its longest clip.
            frozen_dtype: dtype the frozen encoder and decoder are held in (``bfloat16`` halves their
                memory on a GPU; the projector always keeps float32 weights).
            num_logged_examples: validation clips per evaluation set sent to TensorBoard (audio, reference,
                hypothesis).
            max_nonfinite_steps: a batch with a non-finite loss, or an optimizer step with non-finite
                gradients, is skipped and counted; this many in a row stop the run.
            trust_remote_code: let the encoder or decoder checkpoint run its own Python code (off: only
                architectures built into transformers load).
            lora_rank: above 0, also train LoRA adapters of this rank in the decoder (needs ``peft``:
                ``pip install -e ".[lora]"``); checkpoints and exports then hold adapters + projector.
            lora_alpha: LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_rank``).
            lora_targets: decoder module names that get adapters (default: the attention's
                ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``).
        """
        super().__init__()
        if projector_stack < 1:
            raise UsageError(f"model.projector_stack must be >= 1, got {projector_stack}")
        self.save_hyperparameters()
        with explained_loading(decoder, "decoder"):
            self.tokenizer = AutoTokenizer.from_pretrained(decoder, trust_remote_code=trust_remote_code)
        self.prompt = ChatPrompt(self.tokenizer, system_prompt, prompt)  # checks the template before any weights
        self._chat_prompts: dict[str, ChatPrompt] = {}  # other prompts met in the data
        dtype = getattr(torch, frozen_dtype)
        self.encoder = AudioEncoder(encoder, whisper_full_window, dtype, trust_remote_code)
        with explained_loading(decoder, "decoder"):
            self.decoder = AutoModelForCausalLM.from_pretrained(decoder, dtype=dtype,
                                                                trust_remote_code=trust_remote_code)
        embeddings = self.decoder.get_input_embeddings().weight
        self.projector = Projector(self.encoder.dim, embeddings.shape[1], projector_stack, projector_hidden,
                                   output_scale=embeddings.detach().float().pow(2).mean().sqrt().item())
        for frozen in (self.encoder, self.decoder):
            frozen.requires_grad_(False)
            frozen.eval()
        if lora_rank > 0:
            self._add_lora(lora_rank, lora_alpha, lora_targets or ["q_proj", "k_proj", "v_proj", "o_proj"])
        self.set_wer = torch.nn.ModuleDict()  # one WordErrorRate per evaluation set, made on first use
        self._wer_keys: dict[str, str] = {}
        self._tallies: dict[str, SetTally] = {}  # per evaluation set, this validation pass
        self._examples: dict[str, list[tuple[str, str, str, Any, int]]] = {}  # id, ref, hyp, audio, sample rate
        self.strict_loading = False  # checkpoints carry only the projector; on_load_checkpoint checks it
        self._validation: dict[str, Any] = {}  # the last validation's step and scores, kept in checkpoints
        self._validated_at: int | None = None
        self._nonfinite_in_row = 0
        self._nonfinite_total = 0
        self._loaded_step = 0  # the step of the checkpoint loaded, for reports of `validate`
        self._step_tokens = 0  # target tokens of the optimizer step so far, on this rank

    def _add_lora(self, rank: int, alpha: float, targets: list[str]) -> None:
        """Trainable low-rank adapters in the frozen decoder (float32, B initialised to zero: no change at first)."""
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as error:
            raise UsageError("model.lora_rank needs peft: pip install -e \".[lora]\"") from error
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets),
                                self.decoder)
        for name, parameter in self.decoder.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.float()
                parameter.requires_grad_(True)

    # ----------------------------------------------------------------------------------------- setup
    def train(self, mode: bool = True) -> SpeechLLM:
        """Lightning puts the whole module in train mode at fit start; the frozen models stay in eval."""
        super().train(mode)
        self.encoder.eval()
        self.decoder.eval()
        return self

    def setup(self, stage: str) -> None:
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        p = self.projector
        rank_zero_info(
            f"encoder  {self.hparams.encoder} (frozen)\n"
            f"decoder  {self.hparams.decoder} (frozen)\n"
            f"projector stack {p.stack} x {self.encoder.dim} -> {p.gate.in_features} -> SwiGLU {p.gate.out_features}"
            f" -> {p.down.out_features} (trainable)\n"
            f"parameters: {frozen:,} frozen, {trainable:,} trainable")

    # ------------------------------------------------------------------------------------ the model
    def embed_audio(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Features -> projected audio embeddings ``[B, N, D_dec]`` and each clip's valid token count."""
        # Lengths arrive on the CPU (transfer_batch_to_device), so this reads no device memory: every
        # later shape and index is computed on the CPU, and the step never waits for the GPU.
        lengths = self.projector.output_lengths(self.encoder.frame_lengths(feature_lengths)).tolist()
        with torch.no_grad(), self.attention():
            frames, _ = self.encoder(features, feature_lengths)  # [B, T, D_enc]
        audio = self.projector(frames.float())  # [B, ceil(T/k), D_dec]; autocast picks the matmul dtype
        return audio, [min(n, audio.shape[1]) for n in lengths]

    def attention(self) -> AbstractContextManager:
        """The attention kernels the frozen models may use (all of PyTorch's when ``attention_backends`` is None)."""
        return sdpa_kernel(self.attention_backends) if self.attention_backends else nullcontext()

    def chat_prompts(self, prompts: list[str | None] | None, count: int) -> list[ChatPrompt]:
        """The chat layout of each clip: its own user prompt (mixed-task data) or ``model.prompt``."""
        prompts = prompts or [None] * count
        for text in set(prompts) - self._chat_prompts.keys() - {None}:
            self._chat_prompts[text] = ChatPrompt(self.tokenizer, self.hparams.system_prompt, text)
        return [self._chat_prompts[text] if text else self.prompt for text in prompts]

    def assemble(self, audio: torch.Tensor, audio_lengths: list[int], targets: list[list[int]] | None = None,
                 prompts: list[ChatPrompt] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Splice audio embeddings into the chat prompt, one row per clip.

        The layout (token ids, where each audio vector goes, labels) is built on the CPU and sent
        with one non-blocking copy each; the embeddings are then gathered in a few batched ops.

        Args:
            audio: ``[B, N, D]`` projected audio; row i is valid for ``audio_lengths[i]`` positions.
            audio_lengths: B counts.
            targets: token ids to append after the prompt (training); ``None`` for generation.
            prompts: each row's chat layout (default: ``model.prompt`` for all).

        Returns:
            ``embeds [B, L, D]`` (zero at padding), ``attention_mask [B, L]`` and ``labels [B, L]``
            (``-100`` except on targets). Training rows are right-padded; generation rows are
            left-padded so that every row's next token is at the end.
        """
        targets = targets or [[] for _ in audio_lengths]
        prompts = prompts or [self.prompt] * len(audio_lengths)
        batch, slots = len(audio_lengths), audio.shape[1]
        rows = [p.length(n) + len(t) for p, n, t in zip(prompts, audio_lengths, targets)]
        length = max(rows)
        left = not any(targets)
        ids = torch.zeros(batch, length, dtype=torch.long)  # token ids; 0 at audio and padding
        source = torch.full((batch, length), -1, dtype=torch.long)  # row of audio.view(B * N, D), -1: none
        labels = torch.full((batch, length), IGNORE, dtype=torch.long)
        mask = torch.zeros(batch, length, dtype=torch.long)
        for i, (n, target) in enumerate(zip(audio_lengths, targets)):
            prefix, suffix = prompts[i].prefix_ids, prompts[i].suffix_ids
            start = length - rows[i] if left else 0
            audio_at = start + len(prefix)
            ids[i, start:audio_at] = torch.tensor(prefix)
            source[i, audio_at:audio_at + n] = torch.arange(i * slots, i * slots + n)
            tail = torch.tensor(suffix + target, dtype=torch.long)
            ids[i, audio_at + n:start + rows[i]] = tail
            labels[i, start + rows[i] - len(target):start + rows[i]] = tail[len(suffix):]
            mask[i, start:start + rows[i]] = 1
        device = audio.device
        ids, source, labels, mask = (t.to(device, non_blocking=True) for t in (ids, source, labels, mask))
        tokens = self.decoder.get_input_embeddings()(ids)  # [B, L, D]
        placed = audio.reshape(batch * slots, -1).to(tokens.dtype)[source.clamp(min=0)]  # [B, L, D]
        embeds = torch.where(source[..., None] >= 0, placed, tokens) * mask[..., None].to(tokens.dtype)
        return embeds, mask, labels

    def target_ids(self, texts: list[str]) -> list[list[int]]:
        """Transcript tokens followed by the end-of-turn token."""
        return [ids + self.prompt.end_ids for ids in self.tokenizer(texts, add_special_tokens=False).input_ids]

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean next-token loss over the transcript tokens of the batch."""
        audio, audio_lengths = self.embed_audio(batch["features"], batch["feature_lengths"])
        return self.loss(audio, audio_lengths, batch["text"], batch.get("prompt"))

    def loss(self, audio: torch.Tensor, audio_lengths: list[int], texts: list[str],
             prompts: list[str | None] | None = None, reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
        """Next-token loss of ``texts`` given projected audio ``[B, N, D]`` (from :meth:`embed_audio`).

        ``reduction``: the mean over the batch's target tokens, or their sum. Row i uses the first
        ``audio_lengths[i]`` audio vectors of ``audio[i]`` (0: the prompt without any audio).
        """
        targets = self.target_ids(texts)
        layouts = self.chat_prompts(prompts, len(targets))
        embeds, _, labels = self.assemble(audio, audio_lengths, targets, layouts)
        # Rows are right-padded and attention is causal, so no real position can see padding: no mask
        # is needed, which lets SDPA run its flash kernel. Padded positions compute garbage nobody reads.
        with self.attention():
            hidden = self.decoder.get_decoder()(inputs_embeds=embeds, use_cache=False).last_hidden_state  # [B, L, D]
        # Position t predicts token t + 1: the LM head runs only where that token is a label.
        where = torch.cat([torch.arange(len(t)) + i * embeds.shape[1] + p.length(n) - 1
                           for i, (p, n, t) in enumerate(zip(layouts, audio_lengths, targets))])
        where = where.to(embeds.device, non_blocking=True)  # [N_labelled] flat positions
        logits = self.decoder.get_output_embeddings()(hidden.flatten(0, 1)[where])  # [N_labelled, V] only
        return F.cross_entropy(logits.float(), labels.flatten()[where + 1], reduction=reduction)

    @torch.no_grad()
    def transcribe(self, features: torch.Tensor, feature_lengths: torch.Tensor,
                   prompts: list[str | None] | None = None) -> list[str]:
        """Greedy batched decoding of a padded batch (each clip with its own prompt, if given); one string per clip."""
        return self.generate_text(*self.embed_audio(features, feature_lengths), prompts)

    @torch.no_grad()
    def generate_text(self, audio: torch.Tensor, audio_lengths: list[int], prompts: list[str | None] | None = None
                      ) -> list[str]:
        """Greedy batched decoding from projected audio ``[B, N, D]`` (from :meth:`embed_audio`)."""
        embeds, mask, _ = self.assemble(audio, audio_lengths, prompts=self.chat_prompts(prompts, len(audio_lengths)))
        config = GenerationConfig(max_new_tokens=self.hparams.max_new_tokens, do_sample=False,
                                  eos_token_id=self.prompt.end_ids[0],
                                  pad_token_id=self.prompt.end_ids[0] if self.tokenizer.pad_token_id is None
                                  else self.tokenizer.pad_token_id)
        with self.attention():
            tokens = self.decoder.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config)
        return [t.strip() for t in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    # -------------------------------------------------------------------------------------- training
    def transfer_batch_to_device(self, batch: dict[str, Any], device: torch.device, dataloader_idx: int
                                 ) -> dict[str, Any]:
        """Move all but ``feature_lengths``: the step reads them on the CPU to lay out the decoder input."""
        lengths = batch.pop("feature_lengths")
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        batch["feature_lengths"] = lengths
        return batch

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        """The summed loss of the batch's target tokens: the optimizer step's gradient is divided by its
        token count later (:meth:`on_before_optimizer_step`), so every token of the step weighs the same."""
        if not batch["text"]:  # every clip of the batch was skipped
            return None
        # No finiteness check here: it would make the CPU wait for the GPU every micro-batch. A
        # non-finite loss makes non-finite gradients, which on_before_optimizer_step skips.
        audio, audio_lengths = self.embed_audio(batch["features"], batch["feature_lengths"])
        loss = self.loss(audio, audio_lengths, batch["text"], batch.get("prompt"), reduction="sum")
        tokens = sum(len(t) for t in self.target_ids(batch["text"]))  # counted on the CPU
        self._step_tokens += tokens
        self.log("train/loss", loss.detach() / tokens, prog_bar=True, batch_size=tokens)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the gradient that of the mean over the step's target tokens; skip it if not finite.

        The gradient arrives as the sum over the step's micro-batches of their summed losses, divided
        by Lightning by the number of micro-batches (and, under DDP, averaged over the ranks). Dividing
        by the tokens of all micro-batches of all ranks instead gives the mean over every target
        token of the optimizer step: a mean of per-batch means would weigh the tokens of small
        batches more. One device sync per optimizer step (the finiteness check; the token all-reduce
        under DDP).
        """
        tokens, self._step_tokens = self._step_tokens, 0
        params = [p for p in self.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return
        world = self.trainer.world_size if self._trainer else 1
        if world > 1:
            counted = torch.tensor(float(tokens), device=params[0].device)
            torch.distributed.all_reduce(counted)
            tokens = int(counted.item())
        accumulate = self.trainer.accumulate_grad_batches if self._trainer else 1
        torch._foreach_mul_([p.grad for p in params], accumulate * world / max(tokens, 1))
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer else None
        if not torch.isfinite(norm) and scaler is None:  # fp16's GradScaler skips overflow steps itself
            for p in params:
                p.grad = None  # AdamW leaves parameters without a gradient untouched: the step is skipped
            self._skip_nonfinite("gradients")
            return
        self._nonfinite_in_row = 0
        self.log("train/grad_norm", norm)

    def _skip_nonfinite(self, what: str) -> None:
        """Count a skipped non-finite loss or gradient; stop the run after too many in a row."""
        self._nonfinite_in_row += 1
        self._nonfinite_total += 1
        self.log("train/nonfinite_skipped", float(self._nonfinite_total))
        if self._nonfinite_in_row >= self.hparams.max_nonfinite_steps:
            raise UsageError(
                f"non-finite {what} {self._nonfinite_in_row} times in a row at step {self.global_step}: stopping. "
                "The last checkpoint was written before this and is kept; resume from it with a lower "
                "model.learning_rate or with trainer.gradient_clip_val.")

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Losses (grounding included), greedy transcripts and WER of one batch of one evaluation set."""
        if not batch["text"]:
            return
        start = time.perf_counter()
        name, size = batch["set"], len(batch["text"])
        prefix = f"val/{name}/" if name else "val/"
        texts, prompts = batch["text"], batch.get("prompt")
        audio, audio_lengths = self.embed_audio(batch["features"], batch["feature_lengths"])  # once for all
        tally = self._tallies.setdefault(name, SetTally())
        tokens = sum(len(t) for t in self.target_ids(texts))
        tally.tokens += tokens
        right = self.loss(audio, audio_lengths, texts, prompts, reduction="sum").item()
        tally.loss_sum += right
        tally.no_audio_sum += self.loss(audio, [0] * size, texts, prompts, reduction="sum").item()
        if size > 1:  # each clip's transcript with its neighbour's audio
            neighbours = audio_lengths[-1:] + audio_lengths[:-1]
            tally.wrong_audio_sum += self.loss(audio.roll(1, 0), neighbours, texts, prompts, reduction="sum").item()
            tally.paired_loss_sum += right
            tally.paired_tokens += tokens
        hypotheses = self.generate_text(audio, audio_lengths, prompts)  # strings: on the CPU
        references = [normalize_for_wer(r) for r in batch["text"]]
        normalized = [normalize_for_wer(h) for h in hypotheses]
        key = self._wer_keys.setdefault(name, str(dataloader_idx))  # set names may hold dots, keys may not
        if key not in self.set_wer:
            self.set_wer[key] = WordErrorRate().to(self.device)
        wer = self.set_wer[key]
        wer.update(normalized, references)
        self.log(f"{prefix}wer", wer, batch_size=size, add_dataloader_idx=False, metric_attribute=f"set_wer.{key}")
        tally.utterances += size
        tally.audio_s += sum(batch["duration"])
        tally.compute_s += time.perf_counter() - start
        for i, (reference, hypothesis, h, r) in enumerate(zip(batch["text"], hypotheses, normalized, references)):
            words = len(r.split())
            errors = round(word_error_rate(h, r).item() * words) if words else len(h.split())
            tally.rows.append((batch["id"][i], reference, hypothesis, errors, words))
        examples = self._examples.setdefault(name, [])  # rank 0 sends these to TensorBoard
        room = max(0, self.hparams.num_logged_examples - len(examples))
        clips = batch.get("audio") or [None] * size
        rate = batch.get("sample_rate")
        examples += [(i, r, h, a, rate) for i, r, h, a in zip(batch["id"], batch["text"], hypotheses, clips)][:room]

    def on_validation_epoch_start(self) -> None:
        self._tallies, self._examples = {}, {}

    def on_validation_epoch_end(self) -> None:
        """One row per evaluation set (WER, utterances, hours, real-time factor), and the per-utterance file."""
        if not self.trainer.sanity_checking:
            self._validated_at = self.global_step  # Lightning fills callback_metrics after this hook
        tallies = self._tallies
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[dict[str, SetTally]] = [{} for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(gathered, tallies)
            tallies = {name: SetTally.merge([g[name] for g in gathered if name in g]) for name in tallies}
        wers = {name: self.set_wer[self._wer_keys[name]].compute().item() for name in tallies}
        for name, tally in tallies.items():  # the same merged totals on every rank
            prefix = f"val/{name}/" if name else "val/"
            for key, value in tally.metrics().items():
                self.log(f"{prefix}{key}", value, rank_zero_only=True)
            self.log(f"{prefix}hours", tally.audio_s / 3600, rank_zero_only=True)
            self.log(f"{prefix}rtf", tally.compute_s / max(tally.audio_s, 1e-9), rank_zero_only=True)
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective: every rank asks
        if self.global_rank != 0 or self.trainer.sanity_checking:
            return
        lines = [f"{'set':<20} {'utterances':>10} {'hours':>7} {'WER %':>7} {'loss':>7} {'gain':>7} {'RTF':>6}"]
        for name, t in tallies.items():
            metrics, rtf = t.metrics(), t.compute_s / max(t.audio_s, 1e-9)
            lines.append(f"{name or 'validation':<20} {t.utterances:>10} {t.audio_s / 3600:>7.3f} "
                         f"{100 * wers[name]:>7.2f} {metrics['loss']:>7.3f} {metrics['audio_gain']:>7.3f} {rtf:>6.3f}")
        print("\n".join(lines))
        self._write_utterances(tallies, folder / "utterances")
        if isinstance(self.logger, TensorBoardLogger):
            self._log_examples()

    def _write_utterances(self, tallies: dict[str, SetTally], folder: Path) -> None:
        """Every scored utterance, worst first, to ``<run folder>/utterances/step=N.tsv``."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step={self.trained_steps}.tsv"
        rows = [(name or "validation", *row) for name, tally in tallies.items() for row in tally.rows]
        rows.sort(key=lambda row: (-row[4], row[0], row[1]))  # most errors first
        with path.open("w", newline="") as file:
            writer = csv.writer(file, delimiter="\t", lineterminator="\n")
            writer.writerow(["set", "id", "reference", "hypothesis", "errors", "reference_words"])
            writer.writerows(rows)
        rank_zero_info(f"per-utterance results: {path}")

    def _log_examples(self) -> None:
        """A few clips per set to TensorBoard: the audio, and reference vs hypothesis."""
        experiment = self.logger.experiment
        for name, examples in self._examples.items():
            tag = f"val/{name}/examples" if name else "val/examples"
            table = "\n".join(f"| {i} | {r} | {h} |" for i, r, h, _, _ in examples)
            experiment.add_text(tag, "| id | reference | hypothesis |\n|---|---|---|\n" + table, self.trained_steps)
            for i, _, _, audio, rate in examples:
                if audio is not None:
                    experiment.add_audio(f"{tag}/{i}", torch.from_numpy(audio), self.trained_steps, sample_rate=rate)

    def configure_optimizers(self) -> dict[str, Any]:
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise UsageError("set trainer.max_steps: a streaming dataset has no length, so the LR schedule "
                             "cannot be sized from epochs")
        params = [p for p in self.parameters() if p.requires_grad]
        # Not fused: Lightning refuses gradient clipping with a fused optimizer under mixed precision,
        # and the projector's optimizer step is a negligible part of a step either way.
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        schedule = partial(warmup_cosine, warmup_steps=self.hparams.warmup_steps, total_steps=int(total),
                           min_ratio=self.hparams.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        # Logged as train/lr by the CLI's LearningRateMonitor (self.log of a float would sync the GPU).
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}

    # ----------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trained weights: the frozen models are reloaded from their names."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        if self._validated_at is not None:
            self._validation = {"step": self._validated_at, "metrics": {
                k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}}
        checkpoint["validation"] = self._validation  # for the model card of `tiny-audio export`

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = {name for name, p in self.named_parameters() if p.requires_grad}
        missing = sorted(expected - checkpoint["state_dict"].keys())
        if missing:
            raise UsageError(f"checkpoint lacks trained weights {missing[:5]}{'...' if len(missing) > 5 else ''}: "
                             "was it written with a different projector configuration?")
        self._validation = checkpoint.get("validation", {})
        self._loaded_step = checkpoint.get("global_step", 0)

    @property
    def trained_steps(self) -> int:
        """Optimizer steps behind the weights: the loop's step in ``fit``, the checkpoint's in ``validate``
        (where Lightning restores the weights but not the loop, so ``global_step`` reads 0)."""
        return max(self.global_step, self._loaded_step)

