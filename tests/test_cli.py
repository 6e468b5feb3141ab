"""The real ``tiny-audio`` command on the tiny assets: configs parse, fit, validate, resume."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import NO_WORKERS, ROOT, SMOKE, cli, cli_env, run_here
from tiny_audio_pl.cli import main

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _print_config(capsys, *configs: Path) -> dict:
    args = ["fit"] + [a for c in configs for a in ("-c", str(c))] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info, pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["tiny-audio"])
        main(args)
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    printed = _print_config(capsys, config)
    assert printed["model"]["encoder"] and printed["model"]["decoder"] and printed["data"]["dataset"]
    assert printed["checkpoint"]["save_last"] == "link"


def test_whisper_config_is_the_production_recipe(capsys):
    c = _print_config(capsys, ROOT / "configs" / "whisper.yaml")
    assert c["model"]["encoder"] == "openai/whisper-large-v3-turbo"
    assert c["model"]["decoder"] == "HuggingFaceTB/SmolLM3-3B"
    assert "/no_think" in c["model"]["system_prompt"]
    assert (c["model"]["projector_stack"], c["model"]["projector_hidden"]) == (2, 5120)
    assert (c["model"]["learning_rate"], c["model"]["warmup_steps"]) == (1e-4, 500)
    assert (c["data"]["dataset"], c["data"]["config_name"]) == ("speechbrain/LoquaciousSet", "large")
    assert (c["data"]["train_split"], c["data"]["val_split"]) == ("train", "dev")
    assert (c["data"]["batch_seconds"], c["data"]["max_batch_clips"], c["data"]["batch_size"]) == (65, 16, 8)
    t = c["trainer"]
    assert (t["precision"], t["accumulate_grad_batches"], t["max_steps"]) == ("bf16-mixed", 4, 10_000)
    assert t["val_check_interval"] == 4000  # batches: every 1000 optimizer steps
    assert c["checkpoint"]["every_n_train_steps"] == 1000 and c["checkpoint"]["save_last"] == "link"
    assert t["logger"]["init_args"]["name"] == "lightning_logs"


def test_hubert_mac_and_big_gpu_configs_compose(capsys):
    whisper = _print_config(capsys, ROOT / "configs" / "whisper.yaml")
    hubert = _print_config(capsys, ROOT / "configs" / "whisper.yaml", ROOT / "configs" / "hubert.yaml")
    assert hubert["model"].pop("encoder") == "facebook/hubert-xlarge-ls960-ft"
    whisper["model"].pop("encoder")
    assert hubert == whisper  # the same recipe otherwise
    mac = _print_config(capsys, ROOT / "configs" / "whisper.yaml", ROOT / "configs" / "mac.yaml")
    assert mac["trainer"]["accelerator"] == "mps" and mac["model"]["decoder"] == "HuggingFaceTB/SmolLM3-3B"
    big = _print_config(capsys, ROOT / "configs" / "whisper.yaml", ROOT / "configs" / "big_gpu.yaml")
    # the same audio per optimizer step as the recipe's 4 x 65 s, in one batch
    assert (big["trainer"]["accumulate_grad_batches"], big["data"]["batch_seconds"]) == (1, 260)
    assert big["data"]["max_batch_clips"] == 4 * whisper["data"]["max_batch_clips"]
    assert big["trainer"]["val_check_interval"] * 4 == whisper["trainer"]["val_check_interval"]


def _run(workdir: Path, *args: str) -> str:
    result = run_here(workdir, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_fit_validate_and_resume_on_the_tiny_assets(workdir):
    tmp_path, smoke = workdir, SMOKE
    quick = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--data.max_eval_samples", "4",
             "--checkpoint.every_n_train_steps", "2", *NO_WORKERS]
    out = _run(tmp_path, "fit", "-c", smoke, *quick)
    assert "assets/tiny-whisper (frozen)" in out and "trainable" in out

    run = tmp_path / "lightning_logs" / "version_0"
    assert list(run.glob("events.out.tfevents.*"))
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4
    assert checkpoint["state_dict"] and all(k.startswith("projector.") for k in checkpoint["state_dict"])
    assert "optimizer_states" in checkpoint and "lr_schedulers" in checkpoint
    projector_bytes = sum(v.numel() * v.element_size() for v in checkpoint["state_dict"].values())
    assert last.stat().st_size < 4 * projector_bytes + 1_000_000  # weights + Adam moments + loop state

    out = _run(tmp_path, "validate", "-c", smoke, "--data.max_eval_samples", "4", "--ckpt_path", str(last), *NO_WORKERS)
    assert out.count("validation   WER ") == 1 and out.count("per-utterance results: ") == 1  # reported once
    assert "val/wer" not in out  # Lightning's own metrics table is not printed too
    scored = EventAccumulator(str(tmp_path / "lightning_logs" / "version_1"))
    scored.Reload()
    assert [s.step for s in scored.Scalars("val/wer")] == [4]  # at the checkpoint's step, not at 0

    out = _run(tmp_path, "fit", "-c", smoke, *quick[2:], "--trainer.max_steps", "6", "--trainer.val_check_interval",
               "6", "--ckpt_path", "last")
    assert f"resuming from {Path('lightning_logs/version_0/checkpoints/last.ckpt')}" in out
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 6  # continued from step 4 in the same run folder
    assert not (tmp_path / "lightning_logs" / "version_2").exists()


def test_auto_resume_starts_fresh_only_when_asked_and_runs_go_under_default_root_dir(workdir):
    quick = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
             "--trainer.default_root_dir", "runs", *NO_WORKERS]
    result = run_here(workdir, "fit", "-c", SMOKE, *quick, "--ckpt_path", "auto")
    assert result.returncode == 0 and "no checkpoint yet, starting a new run" in result.stdout
    run = workdir / "runs" / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "step=2.ckpt").is_file() and list(run.glob("events.out.tfevents.*"))
    assert f"run folder   {Path('runs/lightning_logs/version_0')}" in result.stdout
    result = run_here(workdir, "fit", "-c", SMOKE, *quick[2:], "--trainer.max_steps", "3", "--ckpt_path", "auto")
    assert result.returncode == 0
    assert f"resuming from {Path('runs/lightning_logs/version_0/checkpoints/last.ckpt')}" in result.stdout
    assert (run / "checkpoints" / "step=3.ckpt").is_file()
    assert sorted(p.name for p in workdir.iterdir()) == ["assets", "runs"]  # nothing in ./lightning_logs


def test_a_token_in_the_environment_is_written_nowhere(workdir):
    token = "hf_PlantedTokenDoNotWrite1234567890"
    result = run_here(workdir, "fit", "-c", SMOKE, "--trainer.max_steps", "2", "--data.max_eval_samples", "2",
                      "--trainer.val_check_interval", "2", *NO_WORKERS, HF_TOKEN=token, HUGGING_FACE_HUB_TOKEN=token)
    assert result.returncode == 0, result.stderr[-2000:]
    written = [p for p in workdir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in written) and any(p.name == "config.yaml" for p in written)
    assert not [p for p in written if token.encode() in p.read_bytes()]
    assert token not in result.stdout + result.stderr


def test_only_the_subcommands_the_model_supports_are_offered(capsys):
    with pytest.raises(SystemExit), pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["tiny-audio"])
        main(["test", "-c", str(ROOT / "configs" / "smoke.yaml")])
    assert "invalid choice: 'test' (choose from 'fit', 'validate')" in capsys.readouterr().err


def _masked(text: str) -> list[str]:
    """Lines with every number as N and runs of spaces as one (times, speeds and widths vary)."""
    return [" ".join(re.sub(r"-?\d+", "N", line).split()) for line in text.splitlines() if line.strip()]


def test_the_readme_smoke_fit_prints_exactly_what_the_readme_shows(workdir):
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("is its whole output:\n\n```\n", 1)[1].split("```", 1)[0]
    result = subprocess.run(cli("fit", "--config", SMOKE), cwd=workdir, env=cli_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert not [line for line in result.stdout.splitlines() if "warn" in line.lower()]
    assert _masked(result.stdout) == _masked(shown)


NO_TORCH = """
import sys
from tiny_audio_pl.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "lightning", "transformers", "datasets") if m in sys.modules)
print("imported:", heavy)
"""


@pytest.mark.parametrize("args", [["--help"], ["transcribe", "gone.wav", "--ckpt", "x.ckpt"], ["export", "--bogus"],
                                  ["transcribe", "--help"], ["download", "-c", "missing.yaml"],
                                  ["fit", "-c", "missing.yaml"], ["compare", "a.tsv", "b.tsv"],
                                  ["demo", "--ckpt", "missing.ckpt"]],
                         ids=["help", "missing-audio", "bad-option", "transcribe-help", "download-no-config",
                              "fit-no-config", "compare-missing-file", "demo-missing-checkpoint"])
def test_usage_and_usage_errors_are_answered_without_torch(tmp_path, args):
    """What a user gets at once: the command list, a command's usage, a one-line mistake; torch is never imported."""
    result = subprocess.run([sys.executable, "-c", NO_TORCH, *args], cwd=tmp_path, capture_output=True, text=True,
                            env=cli_env(), timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "imported: []", result.stdout + result.stderr
    assert "Traceback" not in result.stderr
