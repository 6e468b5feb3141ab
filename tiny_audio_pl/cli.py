"""The ``tiny-audio`` command: ``fit | validate | compare | demo | transcribe | export | download``.

``tiny-audio fit|validate -c configs/X.yaml [--section.key value ...]`` train and score (LightningCLI,
``lightning_cli.py``); ``tiny-audio transcribe AUDIO... --ckpt PATH`` and ``tiny-audio export --ckpt PATH
--out DIR`` use a trained model, ``tiny-audio demo --ckpt PATH`` serves it in a browser page,
``tiny-audio compare A B`` tells whether B's WER differs from A's beyond noise, and ``tiny-audio
download -c configs/X.yaml`` fetches what a config needs for a node without
internet (plain argparse: no Trainer).

This module imports neither torch nor Lightning nor transformers: each command imports what it
uses once its arguments are read, so ``tiny-audio --help``, a usage error, a config file that does
not parse or an audio path that does not exist is answered at once, in one line. A mistake is a
:class:`UsageError` printed as ``tiny-audio COMMAND: error: ...`` with exit status 2 (75 when a data
host stopped answering: try again later).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import gc
import importlib.util
import json
import logging
import multiprocessing
import os
import socket
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from tiny_audio_pl.decoding import flags as decoding_flags
from tiny_audio_pl.errors import DataUnavailable, UsageError
from tiny_audio_pl.slurm_checks import check_tasks
from tiny_audio_pl.trackers import missing_tracker

TRACEBACK = "TINY_AUDIO_TRACEBACK"  # set to 1 to see the traceback behind a one-line error
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}

COMMANDS = f"""usage: tiny-audio COMMAND [options]      (tiny-audio COMMAND --help: every option, documented;
                                          fit and validate take ~7 s to load Lightning and list theirs)

commands:
  fit          train the projector:  tiny-audio fit -c configs/smoke.yaml  [--ckpt_path last]
  validate     WER and loss of a checkpoint:  tiny-audio validate -c CONFIG --ckpt_path PATH
  compare      is B better than A (paired bootstrap):  tiny-audio compare RUN_A RUN_B [--plot wer.png]
  demo         try a model in the browser:  tiny-audio demo --ckpt CHECKPOINT_OR_EXPORT
  transcribe   audio files to text:  tiny-audio transcribe AUDIO... --ckpt CHECKPOINT_OR_EXPORT
  export       the shareable model folder:  tiny-audio export --ckpt CHECKPOINT --out DIR
  download     models and data into the hub cache, for nodes without internet:  tiny-audio download -c CONFIG

A mistake in a command or config is one line; {TRACEBACK}=1 shows its traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, like the rest of the command's."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_transcribe(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("transcribe", help="transcribe audio files (wav, flac, ogg, mp3; any rate/channels)")
    run.add_argument("audio", nargs="+", help="audio files, or folders to search for them")
    run.add_argument("--ckpt", required=True, help="checkpoint of `tiny-audio fit` or folder of `tiny-audio export`")
    run.add_argument("--batch-size", type=positive_int, default=8,
                     help="clips (or 30 s windows of long files) decoded together (default: 8)")
    run.add_argument("--json", action="store_true", help="print JSON lines instead of FILE<TAB>TEXT")
    run.add_argument("--device", help="cuda, cuda:1, cpu, mps (default: the best available)")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                     help="frozen models' dtype (default: the training setting, float32 on a CPU)")
    for flag, name, kind, text in decoding_flags():
        run.add_argument(flag, dest=name, type=kind, help=f"{text} (default: the model's setting)")


def run_transcribe(options: argparse.Namespace) -> None:
    from tiny_audio_pl.decoding import DECODING, Decoding

    asked = {name: getattr(options, name) for name in DECODING if getattr(options, name) is not None}
    Decoding(**asked)  # its checks, before any model loads
    if options.device:  # a device this machine does not have is told first (checking it needs torch)
        from tiny_audio_pl.transcribe import pick_device

        pick_device(options.device)
    files, problems = file_list(options.audio)
    for path, problem in problems:
        report_failure(path, problem, options.json)
    failed = len(problems)
    if files:
        quiet()
        from tqdm import tqdm

        from tiny_audio_pl.export import load_model
        from tiny_audio_pl.transcribe import pick_device, transcribe_files

        device = pick_device(options.device)
        model = load_model(options.ckpt, options.dtype or ("float32" if device.type == "cpu" else None)).to(device)
        decoding = Decoding.of(model.config).but(**asked)  # the model's own settings, but for those given here
        for result in transcribe_files(model, files, options.batch_size, decoding=decoding):
            if result.error:
                failed += 1
                report_failure(result.file, result.error, options.json, tqdm.write)  # above the progress bar
            elif options.json:
                fields = dataclasses.asdict(result) | {"duration_s": round(result.duration_s, 3)}
                print(json.dumps({k: v for k, v in fields.items() if k != "error"}), flush=True)
            else:
                print(f"{result.file}\t{result.text}", flush=True)
    if failed:
        raise SystemExit(f"{failed} of {len(files) + len(problems)} file(s) could not be transcribed")


def add_export(commands: argparse._SubParsersAction) -> None:
    out = commands.add_parser("export", help="write the shareable model folder for a checkpoint")
    out.add_argument("--ckpt", required=True, help="a checkpoint written by `tiny-audio fit`")
    out.add_argument("--out", required=True, help="folder to write: a transformers model folder (config.json, "
                     "model.safetensors, processor/, the code, README.md)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the export's files in a non-empty folder that is not an earlier export")
    out.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this hub repository")


def run_export(options: argparse.Namespace) -> None:
    quiet()
    from tiny_audio_pl.export import export, push_to_hub

    folder = export(options.ckpt, options.out, overwrite=options.overwrite)
    print(f"wrote {folder}")
    if options.push_to_hub:
        print(f"uploaded: {push_to_hub(folder, options.push_to_hub)}")


def add_compare(commands: argparse._SubParsersAction) -> None:
    versus = commands.add_parser("compare", help="each system's WER per set and overall, and every other system "
                                 "against the first: the difference with its paired-bootstrap interval and a verdict")
    versus.add_argument("systems", nargs="+", metavar="SYSTEM", help="run folders (their newest utterances/step=N"
                        ".tsv), per-utterance files, or checkpoints (validated first with their run's config.yaml); "
                        "the first is the baseline")
    versus.add_argument("--resamples", type=positive_int, default=1000, help="bootstrap resamples (default: 1000)")
    versus.add_argument("--seed", type=int, default=0, help="seed of the resampling (default: 0)")
    versus.add_argument("--json", action="store_true", help="print the comparison as JSON")
    versus.add_argument("--plot", metavar="FILE.png", help="also draw each set's WER with its interval")


def run_compare(options: argparse.Namespace) -> None:
    from tiny_audio_pl.compare import run as compare

    compare(options.systems, options.resamples, options.seed, options.json, options.plot)


def add_demo(commands: argparse._SubParsersAction) -> None:
    page = commands.add_parser("demo", help="try a model in the browser: upload or record audio, read the transcript")
    page.add_argument("--ckpt", help="checkpoint of `tiny-audio fit` or folder of `tiny-audio export`: a page to "
                      "transcribe with it")
    page.add_argument("--run", action="append", default=[], help="a run folder or per-utterance file: a page of its "
                      "errors, worst first, with the audio; twice: two runs side by side, most different first")
    page.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    page.add_argument("--port", type=positive_int, default=7860, help="port (default: 7860)")
    page.add_argument("--max-minutes", type=float, default=5.0, help="longest audio the page accepts (default: 5)")


def run_demo(options: argparse.Namespace) -> None:
    check_port(options.host, options.port)  # before anything loads
    if not options.ckpt and not options.run:
        raise UsageError("demo: give --ckpt (transcribe in the page), --run (a run's errors) or both")
    if len(options.run) > 2:
        raise UsageError("demo: --run at most twice (two runs side by side)")
    for path in [options.ckpt, *options.run]:
        if path and not Path(path).exists():
            raise UsageError(f"{path}: no such file or folder")
    if importlib.util.find_spec("gradio") is None:  # an optional extra
        raise UsageError('the demo needs gradio: pip install -e ".[demo]"')
    quiet()
    from tiny_audio_pl.demo import serve

    serve(options.ckpt, options.run, options.host, options.port, options.max_minutes)


def add_download(commands: argparse._SubParsersAction) -> None:
    fetch = commands.add_parser("download", help="fetch a config's models and data into the hub cache, for nodes "
                                "without internet (then run with HF_HUB_OFFLINE=1)")
    fetch.add_argument("-c", "--config", action="append", required=True,
                       help="config file(s), as for fit; --section.key value overrides too (--data.config_name small)")
    fetch.add_argument("--max-files", type=positive_int, help="only the first N files of each split (a smaller "
                       "copy: training then sees only those)")


def run_download(options: argparse.Namespace, overrides: list[str]) -> None:
    from tiny_audio_pl.download import download_config

    download_config(options.config, overrides, options.max_files)


# The commands without a Trainer (plain argparse): how each reads its arguments, and what it runs.
PLAIN = {"transcribe": (add_transcribe, run_transcribe), "export": (add_export, run_export),
         "compare": (add_compare, run_compare), "demo": (add_demo, run_demo), "download": (add_download, run_download)}


def run_plain(args: list[str]) -> None:
    """``tiny-audio transcribe``, ``export``, ``compare``, ``demo`` or ``download``."""
    parser = OneLineParser(prog="tiny-audio")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for add, _ in PLAIN.values():
        add(commands)
    options, overrides = parser.parse_known_args(args)
    run = PLAIN[options.command][1]
    if options.command == "download":  # its --section.key value overrides, as for fit
        return run(options, overrides)
    if overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    return run(options)


def check_port(host: str, port: int) -> None:
    """One line when the demo could not listen on ``host:port`` (out of range, in use, not this machine's)."""
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a port: pass one of 1-65535 (default 7860)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            hint = f"pass another --port (e.g. --port {port + 1})" if error.errno == errno.EADDRINUSE else \
                "pass --host with an address of this machine"
            raise UsageError(f"cannot listen on {host}:{port} ({error.strerror}): {hint}") from error


def report_failure(path: str, problem: str, as_json: bool, write: Callable[..., Any] = print) -> None:
    """A file that could not be transcribed: a line on stderr, and with ``--json`` a line on stdout too, so that
    a program reading the JSON sees every file it asked for."""
    write(f"{path}: {problem}", file=sys.stderr)
    if as_json:
        print(json.dumps({"file": path, "error": problem}), flush=True)


def file_list(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Folders expanded into the audio files they hold (sorted), files kept as given; and, for each path that
    gives no file (missing, or a folder without audio), the path and why."""
    files: list[str] = []
    problems: list[tuple[str, str]] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
            files += found
            if not found:
                problems.append((str(path), f"no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in this folder"))
        elif path.exists():
            files.append(str(path))
        else:
            problems.append((str(path), "no such file or folder"))
    return files, problems


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
    """Silence what a user cannot act on (each filter names its source); called by the commands that load models."""
    # The frozen encoder and decoder are in eval mode on purpose (no dropout).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
    warnings.filterwarnings("ignore", message=r"'set_vital' is deprecated")  # torchdata 0.11 on torch >= 2.9
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # lightning 2.6 on torch 2.13
    # Lightning's hint on a machine with Slurm installed, e.g. a login node; inside a job, slurm_checks tells a
    # command started without srun, as one line.
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")
    # The val/* values are merged over the ranks before they are logged (Evaluation.merged): no sync_dist needed.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/")
    # SpeechLLM keeps the lengths on the CPU on purpose (training.py), whatever the data module.
    warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device`")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not any(text in record.getMessage() for text in ("litlogger", "TPU available")))
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars of models read from disk


# Keys of earlier versions, and what replaced them: named in the error a config that still has one gets.
RETIRED = {"data.encoder": "the data is prepared by the model's own processor: set model.encoder",
           "data.decoder": "the data is prepared by the model's own processor: set model.decoder",
           "data.trust_remote_code": "set model.trust_remote_code",
           "model.ctc_weight": "the CTC loss beside the decoder's was removed for not helping; model.align_steps "
                               "trains the projector by CTC alone before the decoder's loss, see docs/experiments.md"}


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
        check_config_files(argv)
        if argv[0] in PLAIN:
            run_plain(argv)
            return
        check_tasks(argv[0])  # a job script's mistake, before the seconds of importing Lightning
        quiet()
        from tiny_audio_pl.lightning_cli import run

        run(args, description=COMMANDS)
    except Exception as error:
        jsonargparse = sys.modules.get("jsonargparse")  # its errors exist only once fit / validate imported it
        mistake = isinstance(error, UsageError) or (jsonargparse and isinstance(error, jsonargparse.ArgumentError))
        if not mistake or os.environ.get(TRACEBACK):
            raise
        message = one_line(error)
        message += "".join(f" ({key}: {hint})" for key, hint in RETIRED.items() if key in message)
        message = missing_tracker(message) or message
        print(f"tiny-audio {argv[0]}: error: {message}", file=sys.stderr)
        # 75 (EX_TEMPFAIL): try again later, for restart loops around `--ckpt_path auto`
        raise SystemExit(75 if isinstance(error, DataUnavailable) else 2) from None
    finally:
        # Dataloader workers ignore SIGTERM (stream.ignore_stop_signals), so a run that stops on an error
        # while they wait on the network would hang in multiprocessing's exit, which only terminates them.
        for worker in multiprocessing.active_children():
            worker.kill()
        # A stream read only in part (max_eval_samples) can leave a pyarrow scanner in a reference cycle; freed in
        # the interpreter's final teardown, its threads call std::terminate (SIGABRT after a finished run:
        # apache/arrow#45214). Collected here, while Arrow is still whole.
        gc.collect()


if __name__ == "__main__":
    main()
