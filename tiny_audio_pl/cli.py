"""The ``tiny-audio`` command: LightningCLI over :class:`SpeechLLM` and :class:`SpeechDataModule`.

``tiny-audio fit|validate -c configs/X.yaml [--section.key value ...]`` train and score; ``tiny-audio
transcribe AUDIO... --ckpt PATH`` and ``tiny-audio export --ckpt PATH --out DIR`` use a trained
model, and ``tiny-audio download -c configs/X.yaml`` fetches what a config needs for a node without
internet (plain argparse: no Trainer). Beyond the stock LightningCLI it adds:

- ``train/lr`` logged by Lightning's ``LearningRateMonitor`` (always present), and a progress bar
  in optimizer steps out of ``trainer.max_steps`` with the loss and the learning rate;
- a ``checkpoint.*`` section: the checkpoint callback is always there (every 1000 steps plus
  ``last``, named ``step=N.ckpt``, written atomically, and also on SIGTERM: see ``checkpoint.py``);
- ``model.encoder``, ``model.decoder`` and ``model.trust_remote_code`` feed the same ``data.*``
  settings, so the data is prepared by the model's own processor (feature extractor, tokenizer);
- runs go under ``trainer.default_root_dir`` (the TensorBoard logger's folder unless set apart);
- ``--ckpt_path last`` means the newest ``last.ckpt`` of any earlier run, and ``fit`` then keeps
  logging into that run's folder. Stock Lightning would look only in the new run's (empty) folder
  and silently start from scratch; here a missing checkpoint is an error, unless ``--ckpt_path
  auto`` asked to start afresh in that case (for restart loops on preemptible machines);
- checks that fail in the first second, before any weights load or any folder is written, with one
  line that names the setting and the fix (:class:`UsageError`): a YAML syntax error, a value out
  of range, ``trainer.max_steps`` unset, a checkpoint that is a folder or not a Lightning checkpoint,
  a dataset folder without the split or the columns, a run folder that cannot be written;
- no more compute threads than cores: the main process gets the cores the dataloader workers do not;
- at the end of ``fit`` and ``validate``, a summary: the run folder, the last checkpoint, the last
  validation's scores, and the TensorBoard command;
- a data host that stops answering ends the run in one line with status 75 (try again later).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import shlex
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar, RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from tqdm import tqdm

from tiny_audio_pl.checkpoint import Checkpoint, read_training_checkpoint
from tiny_audio_pl.data import SpeechDataModule
from tiny_audio_pl.errors import DataUnavailable, UsageError
from tiny_audio_pl.export import export, load_model, push_to_hub
from tiny_audio_pl.hub import download
from tiny_audio_pl.model import SpeechLLM
from tiny_audio_pl.modeling import TinyAudioConfig
from tiny_audio_pl.transcribe import file_list, pick_device, transcribe_files

# save_dir "." (the default) means trainer.default_root_dir when that is set, as for Lightning's own logger.
LOGGER = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
          "init_args": {"save_dir": ".", "name": "lightning_logs", "default_hp_metric": False}}
TRACEBACK = "TINY_AUDIO_TRACEBACK"  # set to 1 to see the traceback behind a one-line error

COMMANDS = f"""usage: tiny-audio COMMAND [options]      (tiny-audio COMMAND --help: every option, documented)

commands:
  fit          train the projector:  tiny-audio fit -c configs/smoke.yaml  [--ckpt_path last]
  validate     WER and loss of a checkpoint:  tiny-audio validate -c CONFIG --ckpt_path PATH
  transcribe   audio files to text:  tiny-audio transcribe AUDIO... --ckpt CHECKPOINT_OR_EXPORT
  export       the shareable model folder:  tiny-audio export --ckpt CHECKPOINT --out DIR
  download     models and data into the hub cache, for nodes without internet:  tiny-audio download -c CONFIG

A mistake in a command or config is one line; {TRACEBACK}=1 shows its traceback."""


def find_last_checkpoint(checkpoint_dir: str | None, log_root: Path) -> Path | None:
    """The newest ``last.ckpt``: in ``checkpoint_dir`` if set, else in any run folder under ``log_root``."""
    candidates = ([Path(checkpoint_dir) / "last.ckpt"] if checkpoint_dir
                  else list(log_root.glob("*/checkpoints/last.ckpt")))
    existing = [c for c in candidates if c.is_file()]
    return max(existing, key=lambda c: c.stat().st_mtime) if existing else None


def check_writable(folder: Path, what: str) -> None:
    """One line if ``folder`` cannot be created or written; writes nothing that stays."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        tempfile.TemporaryFile(dir=existing).close()  # the real test: root ignores permission bits
    except OSError as error:
        raise UsageError(f"cannot write {folder}: {error.strerror or error}; {what}") from error


class StepProgressBar(RichProgressBar):
    """Progress in optimizer steps out of ``trainer.max_steps`` (a stream has no epochs), with loss and LR."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps

    def _get_train_description(self, current_epoch: int) -> str:
        return "step"

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.is_enabled and self.train_progress_bar_id is None:  # a restart inside the (single) epoch
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if "train/loss" in metrics:
            metrics["loss"] = metrics.pop("train/loss")
        if trainer.optimizers:
            metrics["lr"] = f"{trainer.optimizers[0].param_groups[0]['lr']:.2g}"
        return metrics


class TinyAudioCLI(LightningCLI):
    """LightningCLI with early checks, an always-present checkpoint callback and run-aware ``--ckpt_path last``."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only ``fit`` and ``validate``: the model defines no test or predict step."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        # A stream has no epochs to count: checkpoints are named by optimizer step.
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 1000,
                             "checkpoint.save_top_k": -1, "checkpoint.filename": "{step}"})
        parser.link_arguments("model.encoder", "data.encoder")
        parser.link_arguments("model.decoder", "data.decoder")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Resolve the run folder and ``--ckpt_path last``; check the checkpoint, the data and the run folder.

        All of it before the seed is set or anything loads, so that a mistake is one line in the first second.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        if config is None:
            return
        if subcommand == "fit" and (config.trainer.max_steps is None or config.trainer.max_steps <= 0):
            raise UsageError("set --trainer.max_steps (e.g. 10000): the data is a stream with no length, so the "
                             "run and its learning-rate schedule are measured in optimizer steps")
        logger = config.trainer.logger
        tensorboard = isinstance(logger, Namespace) and "init_args" in logger
        if tensorboard and config.trainer.default_root_dir and logger.init_args.get("save_dir") in (None, "."):
            logger.init_args.save_dir = config.trainer.default_root_dir
        self.log_root = (Path(logger.init_args.save_dir) / (logger.init_args.get("name") or "") if tensorboard
                         else Path(config.trainer.default_root_dir or ".") / "lightning_logs")
        self._resolve_ckpt_path(subcommand, config, logger if tensorboard else None)
        path = config.get("ckpt_path")
        if path and path not in ("best", "hpc") and not path.startswith("registry"):
            read_training_checkpoint(path, mmap=True, what="--ckpt_path")  # Lightning reads it in full later
        SpeechDataModule(**config.data.as_dict()).check(subcommand)  # opens no audio, loads no model
        check_writable(self.log_root, "the run folder (set --trainer.default_root_dir to a folder you can write)")
        if "OMP_NUM_THREADS" not in os.environ:  # the user's own setting wins
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, cores - config.data.num_workers))  # workers run one thread each

    def _resolve_ckpt_path(self, subcommand: str, config: Namespace, logger: Namespace | None) -> None:
        """``last``: the newest ``last.ckpt`` (``fit`` then logs into its run folder); ``auto``: that or none."""
        if config.get("ckpt_path") not in ("last", "auto"):
            return
        found = find_last_checkpoint(config.checkpoint.dirpath, self.log_root)
        if found is None and config.ckpt_path == "auto":
            print("--ckpt_path auto: no checkpoint yet, starting a new run")
            config.ckpt_path = None
            return
        if found is None:
            where = config.checkpoint.dirpath or self.log_root / "*/checkpoints"
            raise UsageError(f"--ckpt_path last: no last.ckpt under {where}. Drop --ckpt_path to start a new "
                             "run, pass the path of a checkpoint, or use --ckpt_path auto to resume when there "
                             "is one and start afresh when there is not.")
        print(f"resuming from {found}")
        config.ckpt_path = str(found)
        if subcommand == "fit" and logger is not None and found.parent.name == "checkpoints":
            logger.init_args.version = found.parent.parent.name  # keep logging into the same run folder

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with the step progress bar unless the bar is off or the config brings its own."""
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, StepProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        self._summary()

    def after_validate(self) -> None:
        self._summary()

    def _summary(self) -> None:
        """Where the run went and how it did, in four lines."""
        trainer = self.trainer
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        lines = [f"run folder   {os.path.normpath(log_dir)}"]
        checkpoint = next((c for c in trainer.checkpoint_callbacks if c.last_model_path), None)
        if self.subcommand == "fit" and checkpoint:
            lines.append(f"checkpoint   {os.path.normpath(checkpoint.last_model_path)} (step {trainer.global_step})")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        for prefix in sorted(k.removesuffix("wer") for k in metrics if k.endswith("/wer")):  # val/ or val/<set>/
            name = prefix.removeprefix("val/").removesuffix("/")
            scores = [f"WER {100 * metrics[prefix + 'wer']:.2f} %"] + [
                f"{key.replace('_', ' ')} {metrics[prefix + key]:.4f}" for key in ("loss", "audio_gain")
                if prefix + key in metrics]
            lines.append(f"validation   {name + ': ' if name else ''}{', '.join(scores)}")
        lines.append(f"tensorboard  tensorboard --logdir {shlex.quote(str(self.log_root))}")
        print("\n".join(lines))


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, like the rest of the command's."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def use_model(args: list[str]) -> None:
    """``tiny-audio transcribe``, ``export`` and ``download``: plain argparse, no Trainer involved."""
    parser = OneLineParser(prog="tiny-audio")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    run = commands.add_parser("transcribe", help="transcribe audio files (wav, flac, ogg, mp3; any rate/channels)")
    run.add_argument("audio", nargs="+", help="audio files, or folders to search for them")
    run.add_argument("--ckpt", required=True, help="checkpoint of `tiny-audio fit` or folder of `tiny-audio export`")
    run.add_argument("--batch-size", type=positive_int, default=8,
                     help="clips (or 30 s windows of long files) decoded together (default: 8)")
    run.add_argument("--json", action="store_true", help="print JSON lines instead of FILE<TAB>TEXT")
    run.add_argument("--device", help="cuda, cuda:1, cpu, mps (default: the best available)")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                     help="frozen models' dtype (default: the training setting, float32 on a CPU)")
    run.add_argument("--max-new-tokens", type=positive_int, help="generation limit per 30 s window")
    out = commands.add_parser("export", help="write the shareable model folder for a checkpoint")
    out.add_argument("--ckpt", required=True, help="a checkpoint written by `tiny-audio fit`")
    out.add_argument("--out", required=True, help="folder to write: a transformers model folder (config.json, "
                     "model.safetensors, processor/, the code, README.md)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the export's files in a non-empty folder that is not an earlier export")
    out.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this hub repository")
    fetch = commands.add_parser("download", help="fetch a config's models and data into the hub cache, for nodes "
                                "without internet (then run with HF_HUB_OFFLINE=1)")
    fetch.add_argument("-c", "--config", action="append", required=True,
                       help="config file(s), as for fit; --section.key value overrides too (--data.config_name small)")
    fetch.add_argument("--max-files", type=positive_int, help="only the first N files of each split (a smaller "
                       "copy: training then sees only those)")
    options, overrides = parser.parse_known_args(args)
    if options.command == "download":
        return download_config(options.config, overrides, options.max_files)
    if overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    if options.command == "export":
        folder = export(options.ckpt, options.out, overwrite=options.overwrite)
        print(f"wrote {folder}")
        if options.push_to_hub:
            print(f"uploaded: {push_to_hub(folder, options.push_to_hub)}")
        return
    device = pick_device(options.device)  # before anything loads
    files, problems = file_list(options.audio)
    for problem in problems:
        print(problem, file=sys.stderr)
    failed = len(problems)
    if files:
        model = load_model(options.ckpt, options.dtype or ("float32" if device.type == "cpu" else None)).to(device)
        if options.max_new_tokens:
            model.config.max_new_tokens = options.max_new_tokens
        for result in transcribe_files(model, files, options.batch_size):
            if result.error:
                failed += 1
                tqdm.write(f"{result.file}: {result.error}", file=sys.stderr)  # above the progress bar
            elif options.json:
                print(json.dumps(dataclasses.asdict(result) | {"duration_s": round(result.duration_s, 3)}), flush=True)
            else:
                print(f"{result.file}\t{result.text}", flush=True)
    if failed:
        raise SystemExit(f"{failed} of {len(files) + len(problems)} file(s) could not be transcribed")


def download_config(files: list[str], overrides: list[str], max_files: int | None) -> None:
    """``tiny-audio download``: the models and every split a config (``-c`` files, then ``--section.key value``
    overrides, as ``fit`` reads them) names, into the hub cache."""
    config: dict[str, Any] = {}
    for path in files:
        _merge(config, yaml.safe_load(Path(path).read_text()) or {})
    pairs = iter(overrides)
    for option in pairs:
        key, _, value = option.partition("=")
        value = value if "=" in option else next(pairs, None)
        if not key.startswith("--") or "." not in key or value is None:
            raise UsageError(f"download: unrecognized argument {option} (options are --section.key value)")
        *sections, name = key[2:].split(".")
        target = config
        for section in sections:
            target = target.setdefault(section, {})
        target[name] = yaml.safe_load(value)
    model = {"encoder": TinyAudioConfig().encoder, "decoder": TinyAudioConfig().decoder, **(config.get("model") or {})}
    try:
        data = SpeechDataModule(**(config.get("data") or {}))
    except TypeError as error:
        raise UsageError(f"download: the data section: {error}") from error
    splits = [(s.dataset, s.config_name, s.split) for s in data.train_streams() + data.evaluation_sets()]
    for line in download([model["encoder"], model["decoder"]], splits, max_files):
        print(line, flush=True)


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    """``new`` into ``into``, section by section (a later config file overrides an earlier one's keys)."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def check_config_files(args: Sequence[str]) -> None:
    """Each ``-c`` / ``--config`` file exists and is valid YAML, or one line naming the file and the line."""
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            path = Path(args[i + 1])
        elif arg.startswith("--config="):
            path = Path(arg.removeprefix("--config="))
        else:
            continue
        if not path.is_file():
            raise UsageError(f"config file {path} does not exist")
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise UsageError(f"{path} is not valid YAML{where}: {problem}") from error


def quiet() -> None:
    """Silence what a user cannot act on (each filter names its source)."""
    # The frozen encoder and decoder are in eval mode on purpose (no dropout).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
    warnings.filterwarnings("ignore", message=r"'set_vital' is deprecated")  # torchdata 0.11 on torch >= 2.9
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # lightning 2.6 on torch 2.13
    # SpeechLLM keeps the lengths on the CPU on purpose (model.py), whatever the data module.
    warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device`")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not any(text in record.getMessage() for text in ("litlogger", "TPU available")))
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars of models read from disk


def one_line(error: BaseException) -> str:
    """The message of a one-line error, also when a dataloader worker raised it (torch then puts the worker's
    traceback in the message, ending with ``module.Class: message``)."""
    text = str(error)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())  # one line, even for jsonargparse's indented messages


def main(args: list[str] | None = None) -> None:
    """Entry point of ``tiny-audio``."""
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] in ("-h", "--help"):
        print(COMMANDS)
        return
    try:
        quiet()
        if argv[0] in ("transcribe", "export", "download"):
            use_model(argv)
            return
        check_config_files(argv)
        # The model builds its own optimizer over the trained weights alone, so no --optimizer / --lr_scheduler.
        TinyAudioCLI(SpeechLLM, SpeechDataModule, args=args,
                     trainer_defaults={"logger": LOGGER, "callbacks": [LearningRateMonitor("step")],
                                       "enable_model_summary": False},  # SpeechLLM.setup prints its own
                     save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                     parser_kwargs={"exit_on_error": False, "description": COMMANDS})
    except (UsageError, ArgumentError) as error:
        if os.environ.get(TRACEBACK):
            raise
        print(f"tiny-audio {argv[0]}: error: {one_line(error)}", file=sys.stderr)
        # 75 (EX_TEMPFAIL): try again later, for restart loops around `--ckpt_path auto`
        raise SystemExit(75 if isinstance(error, DataUnavailable) else 2) from None
    finally:
        # Dataloader workers ignore SIGTERM (stream.ignore_sigterm), so a run that stops on an error
        # while they wait on the network would hang in multiprocessing's exit, which only terminates them.
        for worker in multiprocessing.active_children():
            worker.kill()


if __name__ == "__main__":
    main()
