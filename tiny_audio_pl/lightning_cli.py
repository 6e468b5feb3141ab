"""``tiny-audio fit`` and ``tiny-audio validate``: LightningCLI over :class:`SpeechLLM` and :class:`SpeechDataModule`.

Imported only for these two commands (``cli.py`` answers the others without torch or Lightning).
Beyond the stock LightningCLI it adds:

- ``train/lr`` logged by Lightning's ``LearningRateMonitor`` (whenever there is a logger), and a
  progress bar in optimizer steps out of ``trainer.max_steps`` with the loss and the learning rate;
- a ``checkpoint.*`` section: the checkpoint callback is always there (every 1000 steps, named
  ``step=N.ckpt``, plus ``last``, a link to the newest; written atomically, and also on SIGTERM: see
  ``checkpoint.py``);
- the data module is handed the model's own processor (``SpeechDataModule.connect``), so clips are
  prepared with the feature extractor and tokenizer the model uses;
- runs go under ``trainer.default_root_dir`` (the loggers' ``save_dir`` unless set apart), and each
  run keeps its own folder whatever the logger (TensorBoard, CSV, W&B, MLflow: ``RUN_LAYOUT``),
  with its ``config.yaml`` (:class:`RunConfig`), per-utterance files and checkpoints;
- ``--ckpt_path last`` means the newest ``last.ckpt`` of any earlier run, and ``fit`` then keeps
  logging into that run (folder, W&B or MLflow run). Stock Lightning would look only in the new run's (empty) folder
  and silently start from scratch; here a missing checkpoint is an error, unless ``--ckpt_path
  auto`` asked to start afresh in that case (for restart loops on preemptible machines);
- checks that fail in the first second, before any weights load or any folder is written, with one
  line that names the setting and the fix (:class:`UsageError`): a YAML syntax error, a value out
  of range, ``trainer.max_steps`` unset, a checkpoint that is a folder or not a Lightning checkpoint,
  a dataset folder without the split or the columns, a run folder that cannot be written, a strategy
  that shards the weights (FSDP, DeepSpeed), a Slurm job whose tasks do not match the trainer
  (``slurm_checks.py``); what Lightning refuses when it builds the trainer is one line too;
- a stop signal (SIGTERM, Slurm's requeue signal) ends the run after the optimizer step in progress,
  saved, on every rank (``cluster.py``);
- no more compute threads than cores: the main process gets the cores the dataloader workers do not;
- ``validate --sclite DIR`` writes the last validation as NIST sclite ``trn`` files;
- at the end of ``fit`` and ``validate``, a summary: the run folder, the last checkpoint, the last
  validation's scores, and where each logger keeps the run.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar, RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from tiny_audio_pl.checkpoint import Checkpoint, TrainedCheckpoint, read_checkpoint
from tiny_audio_pl.cluster import note_early_signals
from tiny_audio_pl.configuration import SETTINGS, Settings
from tiny_audio_pl.data import SpeechDataModule
from tiny_audio_pl.decoding import DECODING
from tiny_audio_pl.encoder import encoder_config
from tiny_audio_pl.errors import UsageError
from tiny_audio_pl.runs import RunFolder
from tiny_audio_pl.scoring import read_utterances, write_trn
from tiny_audio_pl.slurm_checks import check_trainer
from tiny_audio_pl.trackers import missing_tracker
from tiny_audio_pl.trainer_checks import check_steps, check_strategy, check_writable, note_cpu_processes
from tiny_audio_pl.training import SpeechLLM

# save_dir "." (the default) means trainer.default_root_dir when that is set, as for Lightning's own logger.
LOGGER = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
          "init_args": {"save_dir": ".", "name": "lightning_logs", "default_hp_metric": False}}


# How each logger lays out its runs, ``save_dir/<name>/<run>/`` (where Lightning puts the checkpoints): the argument
# naming the runs' parent folder and its default (None: a folder of the tracker's own, e.g. an MLflow experiment id),
# and the argument that picks the run to log into (resuming).
RUN_LAYOUT = {"TensorBoardLogger": ("name", "lightning_logs", "version"),
              "CSVLogger": ("name", "lightning_logs", "version"),
              "WandbLogger": ("project", "lightning_logs", "id"),
              "MLFlowLogger": (None, None, "run_id")}


def logger_configs(value: Any) -> list[Namespace]:
    """The configured loggers (``class_path`` and ``init_args``), in order; none for ``false``."""
    loggers = value if isinstance(value, list) else [value]
    return [logger for logger in loggers if isinstance(logger, Namespace) and "class_path" in logger]


def run_root(logger: Namespace | None, default_root_dir: str | None) -> tuple[Path, str]:
    """The folder the first logger's runs go in, and the pattern of a run's checkpoint folder under it."""
    if logger is None:
        return Path(default_root_dir or ".") / "lightning_logs", "*/checkpoints"
    name_argument, default, _ = RUN_LAYOUT.get(logger.class_path.rsplit(".", 1)[-1], ("name", "lightning_logs", ""))
    save_dir = Path(logger.init_args.get("save_dir") or default_root_dir or ".")
    if name_argument is None:
        return save_dir, "*/*/checkpoints"
    return save_dir / (logger.init_args.get(name_argument) or default or ""), "*/checkpoints"


def find_last_checkpoint(checkpoint_dir: str | None, log_root: Path, pattern: str) -> Path | None:
    """The checkpoint to resume: in ``checkpoint_dir`` if set, else in the run folder under ``log_root`` (``pattern``:
    its checkpoint folders) that saved last. Its ``last.ckpt``, or its newest file where ``last.ckpt`` was never
    linked (a kill between the first step's file and its link); :func:`newest_beside` then passes over a
    ``last.ckpt`` left behind a newer step."""
    folders = [Path(checkpoint_dir)] if checkpoint_dir else log_root.glob(pattern)
    saved = [path for folder in folders for path in folder.glob("*.ckpt") if path.is_file()]
    if not saved:
        return None
    newest = max(saved, key=lambda path: path.stat().st_mtime)
    last = newest.parent / "last.ckpt"
    return last if last.is_file() else newest


def newest_beside(last: Path) -> Path:
    """``last`` or, where a checkpoint beside it holds more optimizer steps, that one: ``--ckpt_path last`` never goes
    back. (A kill between writing a step and linking ``last`` to it, or a folder written before ``last`` kept its
    one name, can leave ``last.ckpt`` behind the newest step.) Unreadable files are passed over."""
    steps = {}
    for path in last.parent.glob("*.ckpt"):
        try:
            steps[path] = int(read_checkpoint(path, mmap=True).get("global_step", -1))
        except (UsageError, AttributeError, TypeError, ValueError):
            continue
    return max(steps, key=lambda path: (steps[path], path == last), default=last)


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

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "validate":  # the results table is printed once: not Lightning's metrics table too
            parser.set_defaults({"verbose": False})
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.add_argument("--sclite", type=str | None, default=None, help="also write the last validation's "
                            "normalised references and hypotheses into this folder as NIST sclite trn files, one "
                            "pair per evaluation set (score them with sclite -i spu_id)")
        # A stream has no epochs to count: checkpoints are named by optimizer step.
        parser.set_defaults({"checkpoint.save_last": "link", "checkpoint.every_n_train_steps": 1000,
                             "checkpoint.save_top_k": -1, "checkpoint.filename": "{step}"})

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Resolve the run folder and ``--ckpt_path last``; check the checkpoint, the data and the run folder.

        All of it before the seed is set or anything loads, so that a mistake is one line in the first second.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        if config is None:
            return
        if subcommand == "fit":
            check_steps(config.trainer, config.model.align_steps)
        if subcommand == "validate" and not config.get("ckpt_path"):
            print("validate without --ckpt_path scores the untrained projector (step 0): pass --ckpt_path last, or a "
                  "checkpoint, to score a trained one")
        self.loggers = logger_configs(config.trainer.logger)
        for logger in self.loggers:  # a logger's package that is missing is one line, before anything loads
            missing = missing_tracker(logger.class_path)
            if missing:
                raise UsageError(missing)
            if logger.class_path.endswith("MLFlowLogger") and not (logger.init_args.get("tracking_uri")
                                                                   or os.environ.get("MLFLOW_TRACKING_URI")):
                # Lightning's default for MLflow is a local file store (save_dir), which MLflow 3 refuses unless asked
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            save_dir = logger.init_args.get("save_dir")
            if logger.class_path.endswith("MLFlowLogger") and save_dir in (None, "."):
                save_dir = logger.init_args.save_dir = "./mlruns"  # its store, not experiment folders in the root
            if config.trainer.default_root_dir and save_dir in (None, ".", "./mlruns"):  # defaults: under the root
                logger.init_args.save_dir = str(Path(config.trainer.default_root_dir, save_dir or "."))
        self.log_root, self.run_pattern = run_root(self.loggers[0] if self.loggers else None,
                                                   config.trainer.default_root_dir)
        self._resolve_ckpt_path(subcommand, config, self.loggers[0] if self.loggers else None)
        path = config.get("ckpt_path")
        if path and path not in ("best", "hpc") and not path.startswith("registry"):
            TrainedCheckpoint.read(path, mmap=True, what="--ckpt_path").note_unkept_prompt()  # Lightning reads it later
        check_strategy(config.trainer, config.model)
        note_cpu_processes(config.trainer)
        check_trainer(config.trainer.devices, config.trainer.num_nodes)  # a Slurm job's tasks against the trainer's
        settings = Settings(**{name: config.model[name] for name in SETTINGS})  # its checks, before anything loads
        SpeechDataModule(**config.data.as_dict()).check(subcommand)  # opens no audio, loads no model
        settings.check_used(encoder_config(settings.encoder, settings.trust_remote_code).model_type)  # config.json only
        check_writable(self.log_root, "the run folder (set --trainer.default_root_dir to a folder you can write)")
        if "OMP_NUM_THREADS" not in os.environ:  # the user's own setting wins
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, cores - config.data.num_workers))  # workers run one thread each

    def _resolve_ckpt_path(self, subcommand: str, config: Namespace, logger: Namespace | None) -> None:
        """``last``: the newest ``last.ckpt`` (``fit`` then logs into its run folder); ``auto``: that or none."""
        if config.get("ckpt_path") not in ("last", "auto"):
            return
        found = find_last_checkpoint(config.checkpoint.dirpath, self.log_root, self.run_pattern)
        if found is None and config.ckpt_path == "auto":
            print("--ckpt_path auto: no checkpoint yet, starting a new run")
            config.ckpt_path = None
            return
        if found is None:
            where = config.checkpoint.dirpath or self.log_root / self.run_pattern
            raise UsageError(f"--ckpt_path last: no checkpoint under {where}. Drop --ckpt_path to start a new "
                             "run, pass the path of a checkpoint, or use --ckpt_path auto to resume when there "
                             "is one and start afresh when there is not.")
        newest = newest_beside(found)
        if newest != found:
            print(f"{found} is behind {newest.name}, the newest step saved beside it")
        found = newest
        print(f"resuming from {found}")
        config.ckpt_path = str(found)
        if subcommand == "fit" and logger is not None and found.parent.name == "checkpoints":
            run_argument = RUN_LAYOUT.get(logger.class_path.rsplit(".", 1)[-1], (None, None, "version"))[2]
            logger.init_args[run_argument] = found.parent.parent.name  # keep logging into the same run

    def _parse_ckpt_path(self) -> None:
        """Lightning rebuilds the model from a checkpoint's hyperparameters, over the command's own ``model.*``;
        the decoding settings stay the command's: how to decode is not part of what was trained."""
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].model if subcommand else None
        decoding = {name: model[name] for name in DECODING} if model else {}
        super()._parse_ckpt_path()
        for name, value in decoding.items():
            self.config[subcommand].model[name] = value

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self.datamodule.connect(self.model.network.processor)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with the step progress bar unless the bar is off or the config brings its own."""
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if trainer.get("logger") not in (None, False, []):  # train/lr, to every logger there is
            callbacks = [*callbacks, LearningRateMonitor("step")]
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks = [*callbacks, StepProgressBar()]
        kwargs["callbacks"] = callbacks
        try:
            return super().instantiate_trainer(**kwargs)
        except (ValueError, MisconfigurationException) as error:  # Lightning's checks of the trainer's settings
            raise UsageError(f"trainer: {error}") from error

    def after_fit(self) -> None:
        self._write_sclite()
        self._summary()
        self._finish_runs()

    def after_validate(self) -> None:
        self._write_sclite()
        self._summary()
        self._finish_runs()

    def _finish_runs(self) -> None:
        """End each W&B run (Lightning leaves it open): its summary is written and it no longer shows as running."""
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and self.trainer.is_global_zero:
                logger.experiment.finish()

    def _write_sclite(self) -> None:
        """``--sclite DIR``: the last validation's utterances as sclite ``trn`` files (rank 0)."""
        folder = self.config[self.subcommand].get("sclite")
        path = self.model.utterances_file
        if folder and path is not None:
            written = write_trn(read_utterances(path), Path(folder))
            print(f"sclite files {', '.join(str(p) for p in written)}")

    def _summary(self) -> None:
        """Where the run went, how it did, and where each logger keeps it."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        lines = [f"run folder   {os.path.normpath(RunFolder.of_trainer(trainer).path)}"]
        checkpoint = next((c for c in trainer.checkpoint_callbacks if c.last_model_path), None)
        if self.subcommand == "fit" and checkpoint:
            lines.append(f"checkpoint   {os.path.normpath(checkpoint.last_model_path)} (step {trainer.global_step})")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        for prefix in sorted(k.removesuffix("wer") for k in metrics if k.endswith("/wer")):  # val/ or val/<set>/
            name = prefix.removeprefix("val/").removesuffix("/")
            scores = [f"WER {100 * metrics[prefix + 'wer']:.2f} % ({100 * metrics[prefix + 'wer_low']:.1f}-"
                      f"{100 * metrics[prefix + 'wer_high']:.1f})"] + [
                f"{key.replace('_', ' ')} {metrics[prefix + key]:.4f}" for key in ("loss", "audio_gain")]
            lines.append(f"validation   {name + ': ' if name else ''}{', '.join(scores)}")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                lines.append(f"tensorboard  tensorboard --logdir {shlex.quote(os.path.normpath(self.log_root))}")
            elif isinstance(logger, CSVLogger):
                lines.append(f"csv          {os.path.normpath(logger.log_dir)}/metrics.csv")
            elif isinstance(logger, WandbLogger):
                lines.append(f"wandb        run {logger.version} ({logger.experiment.dir})")
            elif isinstance(logger, MLFlowLogger):
                lines.append(f"mlflow       run {logger.run_id}: mlflow ui --backend-store-uri "
                             f"{shlex.quote(str(logger.save_dir or ''))}")
        print("\n".join(lines))


class RunConfig(SaveConfigCallback):
    """``config.yaml`` in the run's own folder (:class:`~tiny_audio_pl.runs.RunFolder`), whatever the logger:
    Lightning's would write it into a W&B or MLflow ``save_dir`` shared by every run. It holds the prompts' token
    ids the run uses (``model.prompt_ids``), so ``fit -c`` that file trains on the same prompt."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        folder = RunFolder.of_trainer(trainer)
        if trainer.is_global_zero:
            folder.path.mkdir(parents=True, exist_ok=True)
            self.config.model.prompt_ids = pl_module.network.processor.prompt_ids  # as rendered when the run started
            self.parser.save(self.config, folder.config, skip_none=False, overwrite=True,
                             multifile=self.multifile)
            self.already_saved = True


def run(args: list[str] | None, description: str) -> None:
    """Parse ``fit`` / ``validate`` arguments and run the command."""
    note_early_signals()
    # The model builds its own optimizer over the trained weights alone, so no --optimizer / --lr_scheduler.
    TinyAudioCLI(SpeechLLM, SpeechDataModule, args=args,
                 trainer_defaults={"logger": LOGGER, "enable_model_summary": False},  # SpeechLLM.setup prints its own
                 save_config_callback=RunConfig, auto_configure_optimizers=False,
                 # allow_abbrev off: argparse would take --trainer.max_step for --trainer.max_steps (a typo in YAML
                 # is an error; on the command line it must be one too)
                 parser_kwargs={"exit_on_error": False, "description": description, "allow_abbrev": False})
