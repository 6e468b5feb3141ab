"""Shared fixtures: the tiny offline assets, one thread, no hub access."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from in_process import run_main

os.environ["HF_HUB_OFFLINE"] = "1"  # as cli_env: read once, when huggingface_hub is imported
# What a user's shell exports must not steer the suite (read before datasets or transformers is imported): the
# Hub tests go online through the stand-in, which datasets' and transformers' own offline switches would refuse,
# and no test may read a user's cache or token or write to their tracker server.
USERS_OWN = ("HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_TOKEN",
             "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT")
for variable in [n for n in os.environ if n in USERS_OWN or n.startswith(("WANDB_", "MLFLOW_"))]:
    del os.environ[variable]
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the CLI, run in this process, then leaves the thread count alone
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
WHISPER = str(ASSETS / "tiny-whisper")
HUBERT = str(ASSETS / "tiny-hubert")
DECODER = str(ASSETS / "tiny-smollm3")
SPEECH = str(ASSETS / "tiny-speech")
SMOKE = str(ROOT / "configs" / "smoke.yaml")
# For the runs whose subject is not the data loader: smoke.yaml's 2 dataloader workers are forks of the test process,
# and their start and copy-on-write faults cost 1-2.5 core-seconds a run (the tests of the loader keep them).
NO_WORKERS = ("--data.num_workers", "0")


def cli(*args: str) -> list[str]:
    """The real ``tiny-audio`` command line."""
    return [sys.executable, "-m", "tiny_audio_pl.cli", *args]


def cli_env(**extra: str) -> dict[str, str]:
    """Offline, one thread, unbuffered output."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def later_day(days: int) -> datetime.date:
    """The first day at least ``days`` from today whose date, as SmolLM3's template writes it ("06 December 2026"),
    is of another length than today's: the prompt's length changes too."""
    today, day = datetime.date.today(), datetime.date.today() + datetime.timedelta(days=days)
    while len(f"{day:%d %B %Y}") == len(f"{today:%d %B %Y}"):
        day += datetime.timedelta(days=1)
    return day


def on_day(date: datetime.date, command: list[str]) -> list[str]:
    """``command`` run with its clock moved to noon of ``date`` (Debian's faketime; the clock runs on from there)."""
    if shutil.which("faketime") is None:
        pytest.skip("faketime is not installed (apt-get install faketime): a test that moves the clock needs it")
    return ["faketime", "-f", f"@{date.isoformat()} 12:00:00", *command]


def run_cli(workdir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``tiny-audio ARGS`` in ``workdir`` and capture its output."""
    return subprocess.run(cli(*args), cwd=workdir, env=cli_env(**env), capture_output=True, text=True, timeout=300)


def run_here(workdir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``tiny-audio ARGS`` as :func:`run_cli` runs it, but in this process: without a new interpreter's ~5 s of
    imports, for the commands that need no process of their own (no signal sent to it, no moved clock, no setting
    read at import such as ``HF_ENDPOINT``; those run with :func:`run_cli` or :func:`run_in_one_process`). It runs
    in ``workdir`` with ``env`` added to the environment, both put back afterwards; its output is captured as
    :func:`in_process.run_main` captures it."""
    environment, cwd = dict(os.environ), os.getcwd()
    os.environ.update(env)
    os.chdir(workdir)
    try:
        return run_main(args)
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environment)


# The child of run_in_one_process: the commands given as JSON, a line with each one's result as JSON after it.
RESULT = "tiny-audio result "
IN_ONE_PROCESS = f"""
import json, sys
from in_process import run_main
commands, sys.argv[1:] = json.loads(sys.argv[1]), []  # LightningCLI reads sys.argv too
for args in commands:
    result = run_main(args)
    print({RESULT!r} + json.dumps([result.returncode, result.stdout, result.stderr]), flush=True)
"""


def run_in_one_process(workdir: Path, *commands: list[str], **env: str) -> list[subprocess.CompletedProcess]:
    """``tiny-audio`` commands one after another in one new interpreter, run in ``workdir`` with ``env`` added to
    the environment as :func:`run_cli` runs one: for commands that need settings read at import (``HF_ENDPOINT``,
    ``HF_HOME``) but no process each. Each one's result as :func:`run_here` gives it."""
    environment = cli_env(**env)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), environment.get("PYTHONPATH")]))
    child = subprocess.run([sys.executable, "-c", IN_ONE_PROCESS, json.dumps(list(commands))], cwd=workdir,
                           env=environment, capture_output=True, text=True, timeout=600)
    results = [json.loads(line.removeprefix(RESULT)) for line in child.stdout.splitlines() if line.startswith(RESULT)]
    assert child.returncode == 0 and len(results) == len(commands), child.stdout[-2000:] + child.stderr[-3000:]
    return [subprocess.CompletedProcess(["tiny-audio", *args], *result) for args, result in zip(commands, results)]


def last_checkpoint(workdir: Path) -> dict:
    """The first run's ``last.ckpt`` under ``workdir``."""
    return torch.load(workdir / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)


def assert_same_training(resumed: dict, expected: dict) -> None:
    """Same step, projector weights, Adam moments and LR schedule, to 1e-6."""
    assert resumed["global_step"] == expected["global_step"]
    for key, value in expected["state_dict"].items():
        assert (resumed["state_dict"][key] - value).abs().max() <= 1e-6, key
    for index, state in expected["optimizer_states"][0]["state"].items():
        for name, value in state.items():
            assert (resumed["optimizer_states"][0]["state"][index][name] - value).abs().max() <= 1e-6, (index, name)
    assert resumed["lr_schedulers"] == expected["lr_schedulers"]


def make_workdir(path: Path) -> Path:
    """A folder to run the CLI in, with the tiny assets where the smoke config expects them."""
    path.mkdir(exist_ok=True)
    (path / "assets").symlink_to(ASSETS)
    return path


def connected_data(encoder: str = WHISPER, decoder: str = DECODER, **options):
    """A ``SpeechDataModule(**options)`` handed the processor of a model with ``encoder`` and ``decoder``, as
    the CLI hands it the model's own."""
    from tiny_audio_pl.data import SpeechDataModule
    from tiny_audio_pl.modeling import TinyAudioConfig, build_processor

    data = SpeechDataModule(**options)
    data.connect(build_processor(TinyAudioConfig(encoder=encoder, decoder=decoder)))
    return data


def hub_env(endpoint: str, home: Path) -> dict[str, str]:
    """Online through ``endpoint`` (the Hub stand-in), with its own hub cache; a read that stalls 2 s is retried."""
    return cli_env(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HUB_DOWNLOAD_TIMEOUT="2")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub-compatible server on loopback (``hub_server.py``) with repositories laid out as the real ones
    (``hub_repos.py``): for commands run with :func:`hub_env`."""
    from hub_repos import build_repos
    from hub_server import HubServer

    with HubServer(build_repos(tmp_path_factory.mktemp("hub"))) as server:
        yield server


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return make_workdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_model():
    """The smoke configuration's model (random projector), shared by tests that only read it."""
    from tiny_audio_pl.training import SpeechLLM

    torch.manual_seed(0)
    return SpeechLLM(encoder=WHISPER, decoder=DECODER, projector_hidden=64, max_new_tokens=12).eval()


@pytest.fixture(scope="session")
def dev_batch():
    """The first 6 clips of the tiny dev split, prepared for the Whisper encoder."""
    data = connected_data(dataset=SPEECH, config_name=None, batch_size=6, num_workers=0, encoder=WHISPER,
                            decoder=DECODER)
    data.setup("validate")
    return next(iter(data.val_dataloader()[0]))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, worker_id: str) -> Path:
    """``last.ckpt`` of 20 smoke steps with one validation, trained through the real CLI: once per session, by
    the first xdist worker that asks (under a lock); the others read it. Tests only read its run folder."""
    shared = tmp_path_factory.getbasetemp()
    shared = shared if worker_id == "master" else shared.parent  # the session's folder, above each worker's own
    workdir = shared / "trained"
    checkpoint = workdir / "lightning_logs/version_0/checkpoints/last.ckpt"
    with FileLock(shared / "trained.lock"):
        if not checkpoint.exists():
            make_workdir(workdir)
            result = run_here(workdir, "fit", "-c", SMOKE, "--trainer.max_steps", "20", "--trainer.val_check_interval",
                              "20", "--checkpoint.every_n_train_steps", "20", "--data.max_eval_samples", "4",
                              "--model.max_new_tokens", "8", "--trainer.enable_progress_bar", "false", *NO_WORKERS)
            assert result.returncode == 0, result.stderr[-2000:]
    return checkpoint
