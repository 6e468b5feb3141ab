"""Every mistake is one line that says what to change, before any weights load, and writes nothing."""

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import DECODER, NO_WORKERS, ROOT, SMOKE, WHISPER, cli, cli_env, run_here
from tiny_audio_pl.errors import UsageError
from tiny_audio_pl.training import SpeechLLM


def test_unreachable_model_id_offline_says_so(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="cannot load the decoder 'no-such/model'.*HF_HUB_OFFLINE.*local directory"):
        SpeechLLM(encoder=WHISPER, decoder="no-such/model")
    with pytest.raises(UsageError, match="cannot load the encoder 'no-such/encoder'"):
        SpeechLLM(encoder="no-such/encoder", decoder=DECODER)


def test_unsupported_encoder_type():
    with pytest.raises(UsageError, match="unsupported encoder type 'smollm3'"):
        SpeechLLM(encoder=DECODER, decoder=DECODER)


def test_decoder_without_chat_template(tmp_path):
    plain = tmp_path / "plain-decoder"
    shutil.copytree(DECODER, plain, ignore=shutil.ignore_patterns("chat_template.jinja"))
    with pytest.raises(UsageError, match="no chat template"):
        SpeechLLM(encoder=WHISPER, decoder=str(plain))


def test_nonsense_sizes():
    with pytest.raises(UsageError, match="projector_stack"):
        SpeechLLM(encoder=WHISPER, decoder=DECODER, projector_stack=0)


@pytest.mark.parametrize("override, key", [("--data.batch_size=0", "data.batch_size"),
                                           ("--model.projector_stack=0", "model.projector_stack"),
                                           ("--model.projector_hidden=-5", "model.projector_hidden")])
def test_cli_rejects_nonsense_sizes_while_parsing(override, key, capsys, monkeypatch):
    from conftest import ROOT
    from tiny_audio_pl.cli import main

    monkeypatch.setattr("sys.argv", ["tiny-audio"])
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(ROOT / "configs" / "smoke.yaml"), override])
    out, err = capsys.readouterr()
    assert key in err and err.count("\n") == 1  # one line naming the setting
    assert "encoder" not in out  # before any model loaded


def _one_line_error(capfd, workdir: Path, *args: str) -> str:
    """Run ``tiny-audio ARGS`` in ``workdir``: it must exit 2 with one line on stderr and write nothing."""
    from tiny_audio_pl.cli import main

    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capfd.readouterr()
    assert exit_info.value.code == 2, out + err
    assert len(err.strip().splitlines()) == 1 and not out.strip(), out + err
    assert err.startswith(f"tiny-audio {args[0]}: error: ")
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before  # nothing written, no run folder
    return err


@pytest.fixture
def here(workdir: Path, monkeypatch) -> Path:
    monkeypatch.chdir(workdir)
    (workdir / "empty").mkdir()
    (workdir / "a-file").write_text("not a folder")
    torch.save({"weights": torch.ones(3)}, workdir / "plain.pt")
    save_file({"weights": torch.ones(3)}, workdir / "model.safetensors")
    (workdir / "broken.yaml").write_text("trainer:\n  max_steps: [1\n")
    (workdir / "corrupt.ckpt").write_bytes(b"\x80\x04not a checkpoint")
    return workdir


MISTAKES = {
    "negative learning rate": (["--model.learning_rate", "-1"], "model.learning_rate"),
    "empty dataset folder": (["--data.dataset", "empty"], "no parquet files for split 'train' under empty"),
    "missing text column": (["--data.text_column", "transcript"], "column(s) ['transcript'] not in"),
    "YAML syntax error": (["-c", "broken.yaml"], "broken.yaml is not valid YAML at line 3"),
    "not a Lightning checkpoint": (["--ckpt_path", "plain.pt"], "plain.pt is a torch file but not a checkpoint"),
    "checkpoint is a folder": (["--ckpt_path", "empty"], "checkpoint empty is a folder"),
    "corrupt checkpoint": (["--ckpt_path", "corrupt.ckpt"], "cannot read checkpoint corrupt.ckpt"),
    "nothing to resume": (["--ckpt_path", "last"], "--ckpt_path last: no checkpoint under"),
    "no length": (["--trainer.max_steps", "-1"], "set --trainer.max_steps"),
    "no steps": (["--trainer.max_steps", "0"], "trainer.max_steps must be a positive number of optimizer steps, got 0"),
    "abbreviated option": (["--trainer.max_step", "10"], "unrecognized arguments: --trainer.max_step 10"),
    "exported weights": (["--ckpt_path", "model.safetensors"], "model.safetensors holds a model's weights"),
    "ignored length grouping": (["--data.batch_seconds", "60", "--data.group_by_length", "false"],
                                "data.group_by_length false has no effect with data.batch_seconds"),
    "weight on an eval set": (["--data.eval_sets", "[{name: dev, weight: 2}]"], "weight mixes data.train_sources only"),
    "run folder under a file": (["--trainer.default_root_dir", "a-file/runs"], "cannot write a-file/runs"),
    "sharding strategy": (["--trainer.strategy", "fsdp"], "trainer.strategy fsdp is not supported"),
    "unreachable decoder offline": (["--model.decoder", "HuggingFaceTB/SmolLM3-3B"],
                                    "cannot load the decoder 'HuggingFaceTB/SmolLM3-3B'"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_config_mistake_is_one_line_and_writes_nothing(mistake, here, capfd):
    args, message = MISTAKES[mistake]
    assert message in _one_line_error(capfd, here, "fit", "-c", SMOKE, *args)


# What srun sets for each task of a job of 2 tasks per node on 1 node (read off Slurm 22.05), and what is changed.
SLURM_TASK = {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "fit.sbatch", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
              "SLURM_NNODES": "1", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
JOB_MISTAKES = {
    "devices": ({}, ["--trainer.devices", "1"], "runs 2 task(s) per node but trainer.devices is 1: set "
                                                "--trainer.devices 2"),
    "nodes": ({}, ["--trainer.devices", "2", "--trainer.num_nodes", "2"],
              "has 1 node(s) but trainer.num_nodes is 2: set --trainer.num_nodes 1"),
    "ntasks": ({"SLURM_NTASKS_PER_NODE": None}, [], "asks for --ntasks=2: ask for --ntasks-per-node"),
    "no srun": ({"SLURM_STEP_ID": None}, [], "has 2 tasks but the command was not started by srun"),
}


@pytest.mark.parametrize("mistake", JOB_MISTAKES)
def test_a_slurm_job_that_does_not_match_the_trainer_is_one_line(mistake, here, capfd, monkeypatch):
    """The job itself runs on a real Slurm in test_ddp.py; here each mismatch, with the variables Slurm sets."""
    changes, args, message = JOB_MISTAKES[mistake]
    for name, value in {**SLURM_TASK, **changes}.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert message in _one_line_error(capfd, here, "fit", "-c", SMOKE, *args)


def test_a_trainer_setting_lightning_refuses_is_one_line(here, capfd):
    """Lightning checks these when it builds the trainer, after the model: its own message, as one line."""
    from tiny_audio_pl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", SMOKE, "--trainer.strategy", "nonsense"])
    err = capfd.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("tiny-audio fit: error: trainer: You selected an invalid strategy")


def test_the_production_config_offline_is_one_line(here, capfd):
    err = _one_line_error(capfd, here, "fit", "-c", str(ROOT / "configs" / "whisper.yaml"))
    assert "speechbrain/LoquaciousSet" in err and "HF_HUB_OFFLINE" in err and "tiny-audio download -c CONFIG" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_is_one_line(here, capfd):
    (here / "read-only").mkdir(mode=0o555)
    assert "cannot write" in _one_line_error(capfd, here, "fit", "-c", SMOKE, "--trainer.default_root_dir",
                                            "read-only")


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--device", "cuda:7"], "--device cuda:7: this machine has"),
    (["--device", "nonsense"], "not a device name"),
])
def test_transcribe_option_mistakes_are_one_line(args, message, here, capfd):
    assert message in _one_line_error(capfd, here, "transcribe", "clip.wav", "--ckpt", "x.ckpt", *args)


def test_the_traceback_is_there_for_bug_reports(here, monkeypatch):
    from tiny_audio_pl.cli import main

    monkeypatch.setenv("TINY_AUDIO_TRACEBACK", "1")
    with pytest.raises(UsageError, match="checkpoint empty is a folder"):
        main(["fit", "-c", SMOKE, "--ckpt_path", "empty"])


def test_help_lists_every_command(capsys):
    from tiny_audio_pl.cli import main

    for args in ([], ["--help"]):
        main(args)
        listed = capsys.readouterr().out
        assert all(f"\n  {command} " in listed for command in ("fit", "validate", "transcribe", "export"))
    with pytest.raises(SystemExit):
        main(["transcribe", "--help"])
    assert "clips (or 30 s windows of long files) decoded together" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("args, hint", [(["--model.ctc_weight", "0.3"], "removed for not helping"),
                                        (["--data.encoder", "x"], "set model.encoder")])
def test_a_retired_key_is_one_line_that_says_what_replaced_it(args, hint, capsys, monkeypatch):
    from conftest import ROOT
    from tiny_audio_pl.cli import main

    monkeypatch.setattr("sys.argv", ["tiny-audio"])
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(ROOT / "configs" / "smoke.yaml"), *args])
    err = capsys.readouterr().err
    assert args[0][2:] in err and hint in err and err.count("\n") == 1


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_download_offline_or_without_a_network_is_one_line(here, capfd):
    whisper = str(ROOT / "configs" / "whisper.yaml")
    assert "HF_HUB_OFFLINE is set: run it where there is a network" in _one_line_error(capfd, here, "download", "-c",
                                                                                        whisper)
    result = subprocess.run(cli("download", "-c", whisper), cwd=here, capture_output=True, text=True, timeout=120,
                            env=cli_env(HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}"))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "cannot reach the Hub (ConnectError" in result.stderr and "check the network" in result.stderr
    smoke = run_here(here, "download", "-c", SMOKE)
    assert smoke.stdout == "nothing to fetch: the config names local folders only\n"


def test_a_demo_port_out_of_range_or_in_use_is_one_line(here, capfd):
    assert "--port 99999 is not a port: pass one of 1-65535" in _one_line_error(capfd, here, "demo", "--run", "x",
                                                                                 "--port", "99999")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = _one_line_error(capfd, here, "demo", "--run", "x", "--port", str(port))
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use): pass another --port" in err


def test_compare_checks_the_plot_format_before_any_work(here, capfd):
    err = _one_line_error(capfd, here, "compare", "missing-a", "missing-b", "--plot", "wer.txt")
    assert "--plot wer.txt: matplotlib cannot write '.txt' files" in err and "png" in err


def test_a_run_too_short_to_validate_says_so_and_compare_points_at_its_checkpoint(workdir):
    result = run_here(workdir, "fit", "-c", SMOKE, "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "false",
                      *NO_WORKERS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("no validation in this run: trainer.val_check_interval is 60 batches and the run has 4; set "
            "--trainer.val_check_interval 4 to score it at the end") in result.stdout
    compared = run_here(workdir, "compare", "lightning_logs/version_0", "lightning_logs/version_0")
    assert compared.returncode == 2 and len(compared.stderr.splitlines()) == 1
    assert ("this run has no validation yet (no utterances/step=*.tsv): name its checkpoint instead "
            "(lightning_logs/version_0/checkpoints/last.ckpt)") in compared.stderr


def test_a_config_run_from_another_folder_says_where_its_paths_are_read(tmp_path, monkeypatch, capfd):
    """The smoke config names assets/... relative to the repository: from elsewhere, the line says so."""
    monkeypatch.chdir(tmp_path)
    err = _one_line_error(capfd, tmp_path, "fit", "-c", SMOKE)
    assert f"is neither a folder under {tmp_path} (a config's paths are read from the folder you run in)" in err


def test_more_cpu_processes_than_cores_is_said(capsys):
    from jsonargparse import Namespace

    from tiny_audio_pl.trainer_checks import note_cpu_processes

    cores = os.cpu_count() or 1
    note_cpu_processes(Namespace(devices=cores + 1, accelerator="cpu"))
    out = capsys.readouterr().out
    assert f"trainer.devices {cores + 1} on a CPU of {cores} cores: {cores + 1} DDP processes" in out
    note_cpu_processes(Namespace(devices=cores, accelerator="cpu"))
    assert not capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--model.lora_alpha", "16"], "model.lora_alpha and model.lora_targets shape LoRA adapters"),
    (["--model.lora_targets", "[q_proj]"], "which model.lora_rank 0 turns off"),
    (["--model.adapter_learning_rate", "0.002"], "model.lora_rank 0 makes none"),
    (["--model.encoder", "assets/tiny-hubert", "--model.whisper_full_window", "true"],
     "model.whisper_full_window is for Whisper encoders; assets/tiny-hubert is 'hubert'"),
    (["--data.max_batch_clips", "8"], "data.max_batch_clips bounds the batches of data.batch_seconds"),
    (["--trainer.devices", "2", "--model.lora_rank", "2", "--model.align_steps", "5"],
     "pass --trainer.strategy ddp_find_unused_parameters_true"),
], ids=["lora_alpha", "lora_targets", "adapter_learning_rate", "full window", "max_batch_clips", "alignment under ddp"])
def test_a_setting_that_would_do_nothing_is_one_line(args, message, here, capfd):
    assert message in _one_line_error(capfd, here, "fit", "-c", SMOKE, *args)
