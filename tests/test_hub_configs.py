"""The shipped configs as users run them: by hub ids through a Hub server, and on a node without internet from
what ``tiny-audio download`` fetched.

The configs run unchanged but for CPU and size overrides (``test_hub.SMALL``), against
:class:`hub_server.HubServer` (``HF_ENDPOINT``, loopback only) serving repositories laid out as the real ones.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import cli_env, hub_env, make_workdir, run_cli, run_in_one_process
from test_hub import CONFIGS, SMALL, WHISPER_YAML

# multi_task.yaml goes on top of whisper.yaml; laptop.yaml is a config of its own. hubert.yaml trains in the last
# test, from what `tiny-audio download` fetched through the same server.
SHIPPED = {"whisper+multi_task": ["-c", WHISPER_YAML, "-c", str(CONFIGS / "multi_task.yaml")],
           "laptop": ["-c", str(CONFIGS / "laptop.yaml")]}


@pytest.fixture(scope="module")
def shipped(hub, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Each of SHIPPED trained by hub ids, in its own run folder, one after the other in one new interpreter (the
    hub client reads HF_ENDPOINT at import): each one's result, by name."""
    workdir = make_workdir(tmp_path_factory.mktemp("shipped"))
    commands = [["fit", *files, *SMALL, "--trainer.default_root_dir", name] for name, files in SHIPPED.items()]
    return dict(zip(SHIPPED, run_in_one_process(workdir, *commands, **hub_env(hub.url, workdir / "hf"))))


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_configs_train_from_hub_ids(shipped, name):
    result = shipped[name]
    assert result.returncode == 0, result.stderr[-3000:]
    laptop = name == "laptop"
    encoder = "openai/whisper-tiny.en" if laptop else "openai/whisper-large-v3-turbo"
    assert f"encoder  {encoder} (frozen)" in result.stdout + result.stderr
    assert "validation   " in result.stdout
    if laptop:  # its 2,000 alignment steps cover these 2: said, not silently done
        assert "the whole run is the alignment stage (model.align_steps 2000, trainer.max_steps 2)" in result.stdout
    else:
        assert "speaker_sex_dev: WER" in result.stdout and "transcribe_dev: WER" in result.stdout


def test_a_node_without_internet_runs_the_same_config_from_what_download_fetched(hub, tmp_path):
    """Fetch once where the hub is reachable; then, with the hub gone and HF_HUB_OFFLINE=1, the same command."""
    home, workdir = tmp_path / "hf", make_workdir(tmp_path / "node")
    hubert = ["-c", WHISPER_YAML, "-c", str(CONFIGS / "hubert.yaml")]
    fetched = run_cli(workdir, "download", *hubert, **hub_env(hub.url, home))
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    assert "model    facebook/hubert-xlarge-ls960-ft" in fetched.stdout
    assert re.search(r"dataset  speechbrain/LoquaciousSet large train: 2 file\(s\)", fetched.stdout), fetched.stdout
    snapshot = next((home / "hub/models--facebook--hubert-xlarge-ls960-ft/snapshots").iterdir())
    assert (snapshot / "model.safetensors").exists() and not (snapshot / "pytorch_model.bin").exists()
    offline = cli_env(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="1", HF_HOME=str(home))  # nothing listens
    result, missing = run_in_one_process(workdir, ["fit", *hubert, *SMALL],
                                         ["fit", *hubert, "--data.config_name", "small", *SMALL], **offline)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "encoder  facebook/hubert-xlarge-ls960-ft (frozen)" in result.stdout + result.stderr
    assert "validation   WER" in result.stdout
    # the second names a split that download did not fetch
    errors = [line for line in missing.stderr.splitlines() if line.startswith("tiny-audio fit: error:")]
    assert missing.returncode == 2 and len(errors) == 1 and "Traceback" not in missing.stderr, missing.stderr
    assert "config small, split 'train'" in errors[0] and "tiny-audio download -c CONFIG" in errors[0]
