"""The training loop around :class:`~tiny_audio_pl.modeling.TinyAudioModel`: steps, schedule, guards, checkpoints.

The network lives in ``modeling.py``; this LightningModule trains it. What it adds:

- the training step returns the batch's summed loss, and the optimizer step's gradient is divided by
  the target tokens of all its micro-batches and ranks (:meth:`SpeechLLM.on_before_optimizer_step`),
  so every token weighs the same whatever the batch sizes;
- AdamW over the trained parameters only, linear warmup then cosine, stepped every optimizer step;
- optionally an alignment stage first (``align_steps``): the projector alone, by CTC over the decoder's
  vocabulary (``alignment.py``), then the decoder's loss with a warmup and cosine of its own;
- non-finite gradients skip the step and are counted; too many in a row stop the run;
- validation: each batch handed to ``evaluation.py``, which scores it (losses with each clip's own
  audio, its neighbour's and none, greedy transcripts, WER) and reports each set;
- checkpoints hold only the trained weights, under the network's own names, written and read by its
  trained-state methods (plus optimizer, scheduler, loop and data state), the scores of the latest
  validation and the prompts' token ids (:class:`~tiny_audio_pl.checkpoint.TrainedCheckpoint` reads them);
  the frozen models are reloaded by name.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from tiny_audio_pl.alignment import TokenAlignment
from tiny_audio_pl.checkpoint import TrainedCheckpoint
from tiny_audio_pl.configuration import Settings, TinyAudioConfig
from tiny_audio_pl.errors import UsageError
from tiny_audio_pl.evaluation import Evaluation, metrics, report
from tiny_audio_pl.modeling import TinyAudioModel, is_projector
from tiny_audio_pl.runs import RunFolder


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0, align_steps: int = 0
                  ) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, then cosine to ``min_ratio`` at ``total_steps``.

    With ``align_steps``, the alignment stage (steps below it) and the rest each have a warmup and cosine of their own.
    """
    if align_steps:
        in_stage = step < align_steps
        return warmup_cosine(step if in_stage else step - align_steps, warmup_steps,
                             align_steps if in_stage else total_steps - align_steps, min_ratio)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class SpeechLLM(LightningModule):
    """Trains the projector of a :class:`TinyAudioModel` (frozen encoder, trained projector, frozen LLM)."""

    def __init__(
        self,
        learning_rate: PositiveFloat = 1e-4,
        weight_decay: NonNegativeFloat = 0.0,
        warmup_steps: NonNegativeInt = 500,
        min_lr_ratio: ClosedUnitInterval = 0.0,
        num_logged_examples: NonNegativeInt = 8,
        max_nonfinite_steps: PositiveInt = 5,
        align_steps: NonNegativeInt = 0,
        adapter_learning_rate: PositiveFloat | None = None,
        **settings: Any,
    ) -> None:
        """Load the frozen models and build the projector.

        Args:
            learning_rate: peak AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: optimizer steps of linear warmup before the cosine decay.
            min_lr_ratio: the cosine decays to ``learning_rate * min_lr_ratio`` at the last step.
            num_logged_examples: validation clips per evaluation set sent to TensorBoard (audio, reference,
                hypothesis).
            max_nonfinite_steps: a batch with a non-finite loss, or an optimizer step with non-finite
                gradients, is skipped and counted; this many in a row stop the run.
            align_steps: an alignment stage first: this many optimizer steps train the projector alone, by CTC of the
                transcript over the decoder's vocabulary read through its frozen embeddings (no decoder pass: a
                fraction of a step's cost, ``alignment.py``); the decoder's loss then takes over, with a warmup and
                cosine of its own. Validations of the stage score the projector alone: its CTC loss and best-path
                transcripts. 0: none.
            adapter_learning_rate: peak learning rate of the decoder's LoRA adapters, on the same warmup and cosine,
                when it should differ from the projector's ``learning_rate`` (twice it did not help the laptop
                recipe, docs/experiments.md). None: ``learning_rate`` for every trained parameter.
            settings: the network's :class:`~tiny_audio_pl.configuration.Settings` (``model.encoder``,
                ``model.decoder``, ``model.projector_*`` ...), documented there and listed by ``--help``.
        """
        super().__init__()
        given = Settings(**settings)
        if adapter_learning_rate is not None and not given.lora_rank:
            raise UsageError("model.adapter_learning_rate is the LoRA adapters' learning rate, and model.lora_rank 0 "
                             "makes none: set model.lora_rank (e.g. 16), or drop it")
        # Not model.prompt_ids: trackers log hyperparameters by name, and its names are prompts ("<audio>" is refused by
        # MLflow). Checkpoints get the ids in on_save_checkpoint.
        self.save_hyperparameters(ignore=["prompt_ids"])
        self.hparams.update(asdict(given))  # every setting, given or default: the export reads them
        self.network = TinyAudioModel(TinyAudioConfig(**asdict(given)))
        self.evaluation = Evaluation(num_logged_examples)
        self.alignment = TokenAlignment(self.network.decoder.get_input_embeddings().weight) if align_steps else None
        self.strict_loading = False  # checkpoints carry only the trained weights; on_load_checkpoint reads them
        self._validation: dict[str, Any] = {}  # the last validation's step and scores, kept in checkpoints
        self.utterances_file: Path | None = None  # the last validation's per-utterance file (rank 0)
        self._validated_at: int | None = None
        self._nonfinite_in_row = 0
        self._nonfinite_total = 0
        self._loaded_step = 0  # the step of the checkpoint loaded, for reports of `validate`
        self._step_tokens = 0  # target tokens of the optimizer step so far, on this rank

    def setup(self, stage: str) -> None:
        trainable = sum(p.numel() for p in self.network.trainable_parameters().values())
        frozen = sum(p.numel() for p in self.parameters()) - trainable
        p, dim, config = self.network.projector, self.network.encoder.dim, self.network.config
        lora = f"; LoRA rank {config.lora_rank} adapters trainable" if config.lora_rank else ""
        rank_zero_info(
            f"encoder  {config.encoder} (frozen)\n"
            f"decoder  {config.decoder} (frozen{lora})\n"
            f"projector stack {p.stack} x {dim} -> {p.gate.in_features} -> SwiGLU {p.gate.out_features}"
            f" -> {p.down.out_features} (trainable)\n"
            f"parameters: {frozen:,} frozen, {trainable:,} trainable")

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean next-token loss over the target tokens of a collated batch."""
        return self.network(batch["features"], batch["feature_lengths"], self.targets(batch), batch.get("prompt"))

    def targets(self, batch: dict[str, Any]) -> list[list[int]]:
        """The batch's target token ids: tokenized by the data workers, or here when a batch was made by hand."""
        return batch.get("targets") or self.network.processor.targets(batch["text"])

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
        audio, audio_lengths = self.network.embed_audio(batch["features"], batch["feature_lengths"])
        if self.global_step < self.hparams.align_steps:
            targets = [t[:-1] for t in targets]  # the transcript's tokens, without the end-of-turn token
            loss, name = self.alignment(audio, audio_lengths, targets), "train/align_loss"
        else:
            loss = self.network.loss(audio, audio_lengths, targets, batch.get("prompt"), reduction="sum")
            name = "train/loss"
        tokens = sum(len(t) for t in targets)  # counted on the CPU
        self._step_tokens += tokens
        self.log(name, loss.detach() / max(tokens, 1), prog_bar=True, batch_size=tokens)
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
        params = [p for p in self.network.trainable_parameters().values() if p.grad is not None]
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
        """One batch of one evaluation set, scored by :class:`~tiny_audio_pl.evaluation.Evaluation`."""
        if batch["text"]:
            aligning = self.alignment is not None and self.trained_steps <= self.hparams.align_steps
            self.evaluation.score(self.network, batch, self.targets(batch), self.alignment if aligning else None)

    def on_validation_epoch_start(self) -> None:
        self.evaluation.start()

    def on_validation_epoch_end(self) -> None:
        """Each set's metrics (merged over the ranks) to every logger at the step the weights were trained to;
        rank 0 reports them (table, per-utterance file, examples)."""
        if not self.trainer.sanity_checking:
            self._validated_at = self.global_step  # Lightning fills callback_metrics after this hook
        tallies = self.evaluation.merged()
        per_set = {name: tally.metrics() for name, tally in tallies.items()}  # the bootstrap intervals, once
        scores = metrics(per_set)
        for key, value in scores.items():  # the same merged totals on every rank: for checkpoints and the summary
            self.log(key, value, logger=False)
        if self.global_rank == 0 and not self.trainer.sanity_checking:
            # Logged here, not by self.log: Lightning would log them one step early in fit (the step counter
            # moves after validation) and at step 0 in validate.
            for logger in self.loggers:
                logger.log_metrics(scores, step=self.trained_steps)
            self.utterances_file = report(tallies, per_set, RunFolder.of_trainer(self.trainer), self.trained_steps,
                                         self.loggers)

    def configure_optimizers(self) -> dict[str, Any]:
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise UsageError("set trainer.max_steps: a streaming dataset has no length, so the LR schedule "
                             "cannot be sized from epochs")
        trained = self.network.trainable_parameters()
        groups: list[dict[str, Any]] = [{"params": list(trained.values())}]
        if self.hparams.adapter_learning_rate is not None:  # named groups: logged as train/lr/projector, .../adapters
            groups = [{"params": [p for name, p in trained.items() if is_projector(name)], "name": "projector"},
                      {"params": [p for name, p in trained.items() if not is_projector(name)], "name": "adapters",
                       "lr": self.hparams.adapter_learning_rate}]
        # Fused (one pass over the weights, not a kernel per operation and tensor: 14 ms against 48 ms a step for the
        # laptop recipe's 20.5 M trained parameters on 2 CPU cores, benchmarks/laptop_step.py), except under mixed
        # precision, where Lightning refuses to clip a fused optimizer's gradients (there the step costs little).
        fused = "mixed" not in str(self.trainer.precision)
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay,
                                      fused=fused)
        schedule = partial(warmup_cosine, warmup_steps=self.hparams.warmup_steps, total_steps=int(total),
                           min_ratio=self.hparams.min_lr_ratio, align_steps=self.hparams.align_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        # Logged as train/lr by the CLI's LearningRateMonitor (self.log of a float would sync the GPU).
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}

    # ----------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trained weights (the model's :meth:`~TinyAudioModel.trainable_state_dict`): the
        frozen models are reloaded from their names."""
        checkpoint["state_dict"] = self.network.trainable_state_dict()  # under the network's names, as in an export
        if self._validated_at is not None:
            self._validation = {"step": self._validated_at, "metrics": {
                k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}}
        checkpoint["validation"] = self._validation  # for the model card of `tiny-audio export`
        # The prompts' token ids as rendered when the run started, with any prompt met since: a resumed run,
        # `validate`, `transcribe` and an export rebuild the processor from them, never from a new rendering.
        checkpoint["hyper_parameters"]["prompt_ids"] = self.network.processor.prompt_ids

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Load the trained weights through the model's own reader (all of them, or one line), and nothing else."""
        self.network.load_trained(TrainedCheckpoint(checkpoint).weights(), "the checkpoint")
        checkpoint["state_dict"] = {}  # loaded: Lightning's own (non-strict) load has nothing left to do
        self._validation = checkpoint.get("validation", {})
        self._loaded_step = checkpoint.get("global_step", 0)

    @property
    def trained_steps(self) -> int:
        """Optimizer steps behind the weights: the loop's step in ``fit``, the checkpoint's in ``validate``
        (where Lightning restores the weights but not the loop, so ``global_step`` reads 0)."""
        return max(self.global_step, self._loaded_step)

