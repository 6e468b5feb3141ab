"""Models by hub ids, the way users run them: the recipe trained, validated on eval.yaml's sets, exported,
pushed and loaded back by its id, through a Hub server.

The recipe runs unchanged but for CPU and size overrides, against :class:`hub_server.HubServer`
(``HF_ENDPOINT``, loopback only) serving repositories laid out as the real ones (``hub_repos.py``). The other
shipped configs and nodes without internet: ``test_hub_configs.py``; a network that fails:
``test_network_faults.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, hub_env, make_workdir, run_here, run_in_one_process
from hub_server import HubServer
from test_transcribe import HUB_LOAD

CONFIGS = ROOT / "configs"
WHISPER_YAML = str(CONFIGS / "whisper.yaml")
CLIP = str(ROOT / "assets" / "clips" / "dev-0000.wav")
PUSHED = "some-org/tiny-asr"  # a repository the server does not hold until the push creates it
# Only what a CPU and a test need changed: the rest is the shipped config.
CPU = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.frozen_dtype", "float32",
       "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0"]
# 2 optimizer steps of one batch each (whisper.yaml accumulates 4), validated once at the end.
SMALL = [*CPU, "--trainer.max_steps", "2", "--trainer.accumulate_grad_batches", "1", "--trainer.val_check_interval",
         "2", "--data.max_eval_samples", "2", "--model.max_new_tokens", "2", "--model.projector_hidden", "32"]


@pytest.fixture(scope="module")
def recipe(hub, trained, tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """``tiny-audio fit --config configs/whisper.yaml``, as shipped but for CPU and size, through the server; then
    its checkpoint validated on eval.yaml's sets, exported to ``model/``, and the export transcribing a clip; and the
    smoke checkpoint exported to ``pushed/`` with ``--push-to-hub`` (a token set, as a user's would be): one
    interpreter for the five commands (:func:`conftest.run_in_one_process`). Its folder, and each command's result."""
    workdir = make_workdir(tmp_path_factory.mktemp("recipe"))
    last = "lightning_logs/version_0/checkpoints/last.ckpt"
    commands = {"fit": ["fit", "--config", WHISPER_YAML, *SMALL],
                "validate": ["validate", "-c", WHISPER_YAML, "-c", str(CONFIGS / "eval.yaml"), *CPU, "--ckpt_path",
                             last, "--model.max_new_tokens", "2"],
                "export": ["export", "--ckpt", last, "--out", "model"],
                "transcribe": ["transcribe", CLIP, "--ckpt", "model"],
                "push": ["export", "--ckpt", str(trained), "--out", "pushed", "--push-to-hub", PUSHED]}
    results = dict(zip(commands, run_in_one_process(workdir, *commands.values(), **hub_env(hub.url, workdir / "hf"),
                                                    HF_TOKEN="any")))
    fit = results["fit"]
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "encoder  openai/whisper-large-v3-turbo (frozen)" in fit.stdout + fit.stderr
    assert "decoder  HuggingFaceTB/SmolLM3-3B (frozen)" in fit.stdout + fit.stderr
    assert re.search(r"validation   WER [\d.]+ %", fit.stdout), fit.stdout
    return workdir, results


def test_validate_scores_the_evaluation_sets_of_eval_yaml(recipe):
    """LoquaciousSet test and LibriSpeech test.clean / test.other, by the hub ids and splits eval.yaml names."""
    result = recipe[1]["validate"]
    assert result.returncode == 0, result.stderr[-3000:]
    for name, clips in (("loquacious_test", 10), ("librispeech_test.clean", 20), ("librispeech_test.other", 20)):
        assert re.search(rf"^{re.escape(name)}\s+{clips}\s", result.stdout, re.M), result.stdout


OPEN_TEST_CLEAN = """
from tiny_audio_pl.data import Source, SpeechDataModule
test_clean = Source("librispeech_test.clean", dataset="openslr/librispeech_asr", config_name="all", split="test.clean",
                    audio_column="audio", id_column="id")
data = SpeechDataModule(max_eval_samples=3, eval_sets=[test_clean])
print([row["id"] for row in data.open_source(data.evaluation_sets()[0])])
import gc; gc.collect()  # as tiny-audio does at its end: a stream read in part is freed while Arrow is whole
"""


def test_a_dataset_with_a_loading_script_is_read_from_its_parquet_files(tmp_path):
    """Older revisions of openslr/librispeech_asr hold librispeech_asr.py, which datasets 5 refuses: eval.yaml's
    LibriSpeech sets are then read from the repository's parquet files, laid out as all/test.clean/0000.parquet."""
    from hub_repos import librispeech

    librispeech(tmp_path / "hub/datasets/openslr/librispeech_asr", script=True)
    with HubServer(tmp_path / "hub") as scripted:
        result = subprocess.run([sys.executable, "-c", OPEN_TEST_CLEAN], env=hub_env(scripted.url, tmp_path / "hf"),
                                capture_output=True, text=True, timeout=120)
        seen = [status for _, path, status in scripted.requests if path.endswith("/librispeech_asr.py")]
    assert 200 in seen  # datasets found the script (and refused it)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "['dev-0000', 'dev-0001', 'dev-0002']", result.stdout


def test_transcribe_and_the_pipeline_on_a_model_folder_that_names_hub_ids(hub, recipe, tmp_path):
    workdir, results = recipe
    folder = workdir / "model"
    assert results["export"].returncode == 0, results["export"].stderr[-2000:]
    assert '"encoder": "openai/whisper-large-v3-turbo"' in (folder / "config.json").read_text()
    ours = results["transcribe"]
    assert ours.returncode == 0, ours.stderr[-2000:]
    text = ours.stdout.strip().split("\t", 1)[1]
    (tmp_path / "load.py").write_text(HUB_LOAD)
    theirs = subprocess.run([sys.executable, "load.py", str(folder), CLIP], cwd=tmp_path,
                            env=hub_env(hub.url, workdir / "hf"), capture_output=True, text=True, timeout=300)
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    assert f'"texts": ["{text}"]' in theirs.stdout


def test_export_push_to_hub_then_the_pipeline_loads_it_by_its_hub_id(hub, recipe, trained, tmp_path):
    """``tiny-audio export --push-to-hub`` uploads the folder through the server (create_repo, upload_folder);
    AutoModel and pipeline then load the model by its hub id alone into an empty cache, in a Python that cannot
    import tiny_audio_pl, and transcribe as ``tiny-audio transcribe`` does from the checkpoint."""
    workdir, results = recipe
    pushed = results["push"]
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    ours = run_here(tmp_path, "transcribe", CLIP, "--ckpt", str(trained))
    assert ours.returncode == 0, ours.stderr[-2000:]
    (tmp_path / "load.py").write_text(HUB_LOAD)
    theirs = subprocess.run([sys.executable, "load.py", PUSHED, CLIP], cwd=tmp_path,
                            env=hub_env(hub.url, tmp_path / "hf"), capture_output=True, text=True, timeout=300)
    sha = hub.repo("models", PUSHED).sha
    assert f"uploaded: {hub.url}/{PUSHED}/commit/{sha}" in pushed.stdout, pushed.stdout
    folder, served = workdir / "pushed", hub.root / "models" / PUSHED
    exported = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert exported == sorted(p.relative_to(served) for p in served.rglob("*") if p.is_file())
    assert all((served / name).read_bytes() == (folder / name).read_bytes() for name in exported)
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    assert (tmp_path / "hf/hub/models--some-org--tiny-asr/snapshots" / sha).is_dir()  # read from the hub, by its id
    text = ours.stdout.strip().split("\t", 1)[1]
    assert text and json.loads(theirs.stdout.strip().splitlines()[-1])["texts"] == [text]
