"""The ``tiny-audio`` command: LightningCLI over :class:`SpeechLLM` and :class:`SpeechDataModule`.

``tiny-audio fit|validate -c configs/X.yaml [--section.key value ...]``. Beyond the stock
LightningCLI it adds:

- ``train/lr`` logged by Lightning's ``LearningRateMonitor`` (always present);
- a ``checkpoint.*`` section: the checkpoint callback is always there (every 1000 steps plus
  ``last``, written atomically, and also on SIGTERM: see ``checkpoint.py``);
- ``model.encoder`` and ``model.decoder`` feed ``data.encoder`` and ``data.decoder``, so the data
  uses the encoder's own feature extractor and measures transcripts with the decoder's tokenizer;
- ``--ckpt_path last`` means the newest ``last.ckpt`` of any earlier run, and ``fit`` then keeps
  logging into that run's folder. Stock Lightning would look only in the new run's (empty) folder
  and silently start from scratch; here a missing checkpoint is an error, unless ``--ckpt_path
  auto`` asked to start afresh in that case (for restart loops on preemptible machines);
- checks that fail in the first second instead of after the models load: ``trainer.max_steps``
  set, the checkpoint readable.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from tiny_audio_pl.checkpoint import Checkpoint, read_checkpoint
from tiny_audio_pl.data import SpeechDataModule
from tiny_audio_pl.model import SpeechLLM

LOGGER = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
          "init_args": {"save_dir": ".", "name": "lightning_logs", "default_hp_metric": False}}


def find_last_checkpoint(checkpoint_dir: str | None, logger: Namespace | None) -> Path | None:
    """The newest ``last.ckpt``: in ``checkpoint_dir`` if set, else in any version folder of the logger."""
    if checkpoint_dir:
        candidates = [Path(checkpoint_dir) / "last.ckpt"]
    else:
        args = logger.init_args if isinstance(logger, Namespace) and "init_args" in logger else LOGGER["init_args"]
        root = Path(args.get("save_dir") or ".") / (args.get("name") or "")
        candidates = list(root.glob("*/checkpoints/last.ckpt"))
    existing = [c for c in candidates if c.is_file()]
    return max(existing, key=lambda c: c.stat().st_mtime) if existing else None


class TinyAudioCLI(LightningCLI):
    """LightningCLI with an always-present checkpoint callback and run-aware ``--ckpt_path last``."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only ``fit`` and ``validate``: the model defines no test or predict step (yet)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 1000,
                             "checkpoint.save_top_k": -1})
        parser.link_arguments("model.encoder", "data.encoder")
        parser.link_arguments("model.decoder", "data.decoder")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Resolve ``--ckpt_path last`` and check the checkpoint is readable, before anything loads."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        if config is None:
            return
        if subcommand == "fit" and (config.trainer.max_steps is None or config.trainer.max_steps <= 0):
            raise SystemExit("set --trainer.max_steps (e.g. 10000): the data is a stream with no length, so the "
                             "run and its learning-rate schedule are measured in optimizer steps")
        if config.get("ckpt_path") in ("last", "auto"):
            logger = config.trainer.logger
            found = find_last_checkpoint(config.checkpoint.dirpath, logger)
            if found is None and config.ckpt_path == "auto":
                print("--ckpt_path auto: no checkpoint yet, starting a new run")
                config.ckpt_path = None
                return
            if found is None:
                where = config.checkpoint.dirpath or "lightning_logs/*/checkpoints"
                raise SystemExit(f"--ckpt_path last: no last.ckpt under {where}. Drop --ckpt_path to start a new "
                                 "run, pass the path of a checkpoint, or use --ckpt_path auto to resume when there "
                                 "is one and start afresh when there is not.")
            print(f"resuming from {found}")
            config.ckpt_path = str(found)
            if subcommand == "fit" and isinstance(logger, Namespace) and "init_args" in logger \
                    and found.parent.name == "checkpoints":
                logger.init_args.version = found.parent.parent.name  # keep logging into the same run folder
        path = config.get("ckpt_path")
        if not path or path in ("best", "hpc") or path.startswith("registry"):
            return  # nothing to check, or resolved by Lightning itself
        try:
            read_checkpoint(path, mmap=True)  # Lightning reads it in full right after
        except (FileNotFoundError, RuntimeError) as error:
            raise SystemExit(f"--ckpt_path: {error}") from error


def main(args: list[str] | None = None) -> None:
    """Entry point of ``tiny-audio``."""
    # The frozen encoder and decoder are in eval mode on purpose (no dropout).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
    warnings.filterwarnings("ignore", message=r"'set_vital' is deprecated")  # torchdata 0.11 on torch >= 2.9
    # The model builds its own optimizer over the projector alone, so no --optimizer / --lr_scheduler.
    TinyAudioCLI(SpeechLLM, SpeechDataModule, args=args,
                 trainer_defaults={"logger": LOGGER, "callbacks": [LearningRateMonitor("step")]},
                 save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)


if __name__ == "__main__":
    main()
