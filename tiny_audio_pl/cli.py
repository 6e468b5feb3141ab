"""The ``tiny-audio`` command: LightningCLI over :class:`SpeechLLM` and :class:`SpeechDataModule`.

``tiny-audio fit|validate -c configs/X.yaml [--section.key value ...]`` train and score; ``tiny-audio
transcribe AUDIO... --ckpt PATH`` and ``tiny-audio export --ckpt PATH --out DIR`` use a trained
model (plain argparse: no Trainer). Beyond the stock LightningCLI it adds:

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

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from tiny_audio_pl.checkpoint import Checkpoint, read_checkpoint
from tiny_audio_pl.data import SpeechDataModule
from tiny_audio_pl.export import export, load_model, push_to_hub
from tiny_audio_pl.model import SpeechLLM
from tiny_audio_pl.transcribe import default_device, file_list, transcribe_files

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


def use_model(args: list[str]) -> None:
    """``tiny-audio transcribe`` and ``tiny-audio export``: plain argparse, no Trainer involved."""
    parser = argparse.ArgumentParser(prog="tiny-audio")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("transcribe", help="transcribe audio files (wav, flac, ogg, mp3; any rate/channels)")
    run.add_argument("audio", nargs="+", help="audio files, or folders to search for them")
    run.add_argument("--ckpt", required=True, help="checkpoint of `tiny-audio fit` or folder of `tiny-audio export`")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--json", action="store_true", help="print JSON lines instead of FILE<TAB>TEXT")
    run.add_argument("--device", help="cuda, cpu, mps (default: the best available)")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                     help="frozen models' dtype (default: the training setting, float32 on a CPU)")
    run.add_argument("--max-new-tokens", type=int, help="generation limit per 30 s window")
    out = commands.add_parser("export", help="write the shareable model folder for a checkpoint")
    out.add_argument("--ckpt", required=True, help="a checkpoint written by `tiny-audio fit`")
    out.add_argument("--out", required=True, help="folder to write (projector.safetensors, config.json, README.md)")
    out.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this hub repository")
    options = parser.parse_args(args)
    try:
        if options.command == "export":
            folder = export(options.ckpt, options.out)
            print(f"wrote {folder}")
            if options.push_to_hub:
                print(f"uploaded: {push_to_hub(folder, options.push_to_hub)}")
            return
        device = torch.device(options.device) if options.device else default_device()
        model = load_model(options.ckpt, options.dtype or ("float32" if device.type == "cpu" else None)).to(device)
        if options.max_new_tokens:
            model.hparams.max_new_tokens = options.max_new_tokens
        failed = 0
        for result in transcribe_files(model, file_list(options.audio), options.batch_size):
            if result.error:
                failed += 1
                print(f"{result.file}: {result.error}", file=sys.stderr)
            elif options.json:
                print(json.dumps(dataclasses.asdict(result) | {"duration_s": round(result.duration_s, 3)}), flush=True)
            else:
                print(f"{result.file}\t{result.text}", flush=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise SystemExit(f"tiny-audio {options.command}: {error}") from error
    if failed:
        raise SystemExit(f"{failed} file(s) could not be read")


def main(args: list[str] | None = None) -> None:
    """Entry point of ``tiny-audio``."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in ("transcribe", "export"):
        use_model(argv)
        return
    # The frozen encoder and decoder are in eval mode on purpose (no dropout).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
    warnings.filterwarnings("ignore", message=r"'set_vital' is deprecated")  # torchdata 0.11 on torch >= 2.9
    # SpeechLLM keeps the lengths on the CPU on purpose (model.py), whatever the data module.
    warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device`")
    # The model builds its own optimizer over the projector alone, so no --optimizer / --lr_scheduler.
    TinyAudioCLI(SpeechLLM, SpeechDataModule, args=args,
                 trainer_defaults={"logger": LOGGER, "callbacks": [LearningRateMonitor("step")]},
                 save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                 parser_kwargs={"description": "Train (fit) and score (validate) a speech LLM projector. Also: "
                                "`tiny-audio transcribe AUDIO... --ckpt PATH` and `tiny-audio export --ckpt PATH "
                                "--out DIR` (each with --help)."})


if __name__ == "__main__":
    main()
