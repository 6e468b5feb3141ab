"""The training loop around :class:`~tiny_audio_pl.modeling.TinyAudioModel`: steps, schedule, guards, checkpoints.

The network lives in ``modeling.py``; this LightningModule trains it. What it adds:

- the training step returns the batch's summed loss, and the optimizer step's gradient is divided by
  the target tokens of all its micro-batches and ranks (:meth:`SpeechLLM.on_before_optimizer_step`),
  so every token weighs the same whatever the batch sizes;
- AdamW over the trained parameters only, linear warmup then cosine, stepped every optimizer step;
- non-finite gradients skip the step and are counted; too many in a row stop the run;
- validation: per evaluation set the loss with each clip's own audio, its neighbour's and none
  (``val/audio_gain``), greedy transcripts and WER, reported by ``evaluation.py``;
- checkpoints hold only the trained weights (plus optimizer, scheduler, loop and data state) and the
  scores of the latest validation; the frozen models are reloaded by name.
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from tiny_audio_pl.errors import UsageError
from tiny_audio_pl.evaluation import (
    SetTally,
    log_examples,
    results_table,
    set_prefix,
    write_utterances,
)
from tiny_audio_pl.modeling import SETTINGS, TinyAudioConfig, TinyAudioModel


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, then cosine to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class SpeechLLM(LightningModule):
    """Trains the projector of a :class:`TinyAudioModel` (frozen encoder, trained projector, frozen LLM)."""

    def __init__(
        self,
        encoder: str = "openai/whisper-large-v3-turbo",
        decoder: str = "HuggingFaceTB/SmolLM3-3B",
        projector_stack: PositiveInt = 2,
        projector_hidden: PositiveInt = 5120,
        projector_bias: bool = False,
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
        ctc_weight: NonNegativeFloat = 0.0,
    ) -> None:
        """Load the frozen models and build the projector.

        Args:
            encoder: speech encoder, hub id or local directory (Whisper, HuBERT, wav2vec2, ...).
            decoder: causal LM with a chat template, hub id or local directory.
            projector_stack: k, encoder frames stacked into one audio token (50/k tokens per second).
            projector_hidden: hidden width of the projector's SwiGLU.
            projector_bias: give the projector a trained output bias that starts at the decoder's mean
                token embedding (and its output RMS at the embeddings' spread about it). An LLM's token
                embeddings share a common direction (SmolLM2-135M: median cosine 0.70 with their mean);
                without it the audio vectors start, and stay, nearly orthogonal to it (docs/experiments.md).
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
            ctc_weight: above 0, add this times an alignment loss to training: CTC of the transcript
                tokens read straight off the projected audio by cosine with the decoder's token
                embeddings (``TinyAudioModel.ctc_loss``), which pushes the projector towards
                token-like vectors in order; the validation losses stay the decoder's alone. An
                experiment: at 0.3 it slowed 600 laptop steps down (docs/experiments.md).
        """
        super().__init__()
        if projector_stack < 1:
            raise UsageError(f"model.projector_stack must be >= 1, got {projector_stack}")
        self.save_hyperparameters()
        self.model = TinyAudioModel(TinyAudioConfig(**{k: self.hparams[k] for k in SETTINGS}))
        self._tallies: dict[str, SetTally] = {}  # per evaluation set, this validation pass
        self.strict_loading = False  # checkpoints carry only the trained weights; on_load_checkpoint checks them
        self._validation: dict[str, Any] = {}  # the last validation's step and scores, kept in checkpoints
        self._validated_at: int | None = None
        self._nonfinite_in_row = 0
        self._nonfinite_total = 0
        self._loaded_step = 0  # the step of the checkpoint loaded, for reports of `validate`
        self._step_tokens = 0  # target tokens of the optimizer step so far, on this rank

    def setup(self, stage: str) -> None:
        trainable = sum(p.numel() for p in self.model.trainable_parameters().values())
        frozen = sum(p.numel() for p in self.parameters()) - trainable
        p, dim = self.model.projector, self.model.encoder.dim
        lora = f"; LoRA rank {self.hparams.lora_rank} adapters trainable" if self.hparams.lora_rank else ""
        rank_zero_info(
            f"encoder  {self.hparams.encoder} (frozen)\n"
            f"decoder  {self.hparams.decoder} (frozen{lora})\n"
            f"projector stack {p.stack} x {dim} -> {p.gate.in_features} -> SwiGLU {p.gate.out_features}"
            f" -> {p.down.out_features} (trainable)\n"
            f"parameters: {frozen:,} frozen, {trainable:,} trainable")

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean next-token loss over the target tokens of a collated batch."""
        return self.model(batch["features"], batch["feature_lengths"], self.targets(batch), batch.get("prompt"))

    def targets(self, batch: dict[str, Any]) -> list[list[int]]:
        """The batch's target token ids: tokenized by the data workers, or here when a batch was made by hand."""
        return batch.get("targets") or self.model.processor.targets(batch["text"])

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
        targets = self.targets(batch)
        audio, audio_lengths = self.model.embed_audio(batch["features"], batch["feature_lengths"])
        loss = self.model.loss(audio, audio_lengths, targets, batch.get("prompt"), reduction="sum")
        tokens = sum(len(t) for t in targets)  # counted on the CPU
        self._step_tokens += tokens
        self.log("train/loss", loss.detach() / tokens, prog_bar=True, batch_size=tokens)
        if self.hparams.ctc_weight:  # the alignment loss, summed like the decoder's
            ctc = self.model.ctc_loss(audio, audio_lengths, targets)
            self.log("train/ctc_loss", ctc.detach() / tokens, batch_size=tokens)
            loss = loss + self.hparams.ctc_weight * ctc
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
        params = [p for p in self.model.trainable_parameters().values() if p.grad is not None]
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
        name, size, prompts = batch["set"], len(batch["text"]), batch.get("prompt")
        targets = self.targets(batch)
        audio, audio_lengths = self.model.embed_audio(batch["features"], batch["feature_lengths"])  # once for all
        tally = self._tallies.setdefault(name, SetTally())
        tokens = sum(len(t) for t in targets)
        tally.tokens += tokens
        right = self.model.loss(audio, audio_lengths, targets, prompts, reduction="sum").item()
        tally.loss_sum += right
        tally.no_audio_sum += self.model.loss(audio, [0] * size, targets, prompts, reduction="sum").item()
        if size > 1:  # each clip's transcript with its neighbour's audio
            neighbours = audio_lengths[-1:] + audio_lengths[:-1]
            tally.wrong_audio_sum += self.model.loss(audio.roll(1, 0), neighbours, targets, prompts,
                                                     reduction="sum").item()
            tally.paired_loss_sum += right
            tally.paired_tokens += tokens
        hypotheses = self.model.processor.decode(self.model.generate_from_audio(audio, audio_lengths, prompts))
        tally.utterances += size
        tally.audio_s += sum(batch["duration"])
        tally.compute_s += time.perf_counter() - start
        tally.add_scores(batch["id"], batch["text"], hypotheses)
        room = max(0, self.hparams.num_logged_examples - len(tally.examples))  # rank 0 sends these to TensorBoard
        clips = batch.get("audio") or [None] * size
        rate = batch.get("sample_rate")
        tally.examples += [(i, r, h, a, rate) for i, r, h, a in zip(batch["id"], batch["text"], hypotheses, clips)
                           ][:room]

    def on_validation_epoch_start(self) -> None:
        self._tallies = {}

    def on_validation_epoch_end(self) -> None:
        """Merge the ranks' tallies, log each set's metrics, and report: the table, the per-utterance file, examples."""
        if not self.trainer.sanity_checking:
            self._validated_at = self.global_step  # Lightning fills callback_metrics after this hook
        tallies = self._tallies
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[dict[str, SetTally]] = [{} for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(gathered, tallies)
            tallies = {name: SetTally.merge([g[name] for g in gathered if name in g]) for name in tallies}
        for name, tally in tallies.items():  # the same merged totals on every rank
            for key, value in tally.metrics().items():
                self.log(f"{set_prefix(name)}{key}", value, rank_zero_only=True)
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective: every rank asks
        if self.global_rank != 0 or self.trainer.sanity_checking:
            return
        print(results_table(tallies))
        path = folder / "utterances" / f"step={self.trained_steps}.tsv"
        write_utterances(tallies, path)
        rank_zero_info(f"per-utterance results: {path}")
        if isinstance(self.logger, TensorBoardLogger):
            log_examples(self.logger.experiment, tallies, self.trained_steps)

    def configure_optimizers(self) -> dict[str, Any]:
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise UsageError("set trainer.max_steps: a streaming dataset has no length, so the LR schedule "
                             "cannot be sized from epochs")
        params = list(self.model.trainable_parameters().values())
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
        trainable = {f"model.{name}" for name in self.model.trainable_parameters()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        if self._validated_at is not None:
            self._validation = {"step": self._validated_at, "metrics": {
                k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}}
        checkpoint["validation"] = self._validation  # for the model card of `tiny-audio export`

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for name in [n for n in state if not n.startswith("model.")]:  # written before the model was its own class
            state[f"model.{name}"] = state.pop(name)
        expected = {f"model.{name}" for name in self.model.trainable_parameters()}
        missing = sorted(expected - state.keys())
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

