"""The shareable model folder: only the trained weights, plus what it takes to rebuild the rest.

``tiny-audio export --ckpt PATH --out DIR`` writes::

    DIR/projector.safetensors   the projector's weights, the only trained tensors ...
    DIR/adapter.safetensors     ... unless the decoder had LoRA adapters (``model.lora_rank``): those
    DIR/config.json             every SpeechLLM setting (encoder and decoder names, prompt, k, sizes)
                                plus the training recipe and the last validation scores of the run
    DIR/README.md               a model card built from the same facts

The frozen encoder and decoder are not copied: they are reloaded by name (hub id or local folder),
as during training. :func:`load_model` rebuilds a :class:`SpeechLLM` from such a folder or straight
from a training checkpoint, so both transcribe identically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from tiny_audio_pl.checkpoint import give_usual_mode, read_training_checkpoint
from tiny_audio_pl.errors import UsageError
from tiny_audio_pl.model import SpeechLLM

FORMAT = "tiny-audio-projector"
WEIGHTS = "projector.safetensors"
ADAPTER = "adapter.safetensors"
OWN_FILES = ("config.json", "README.md", WEIGHTS, ADAPTER)


def load_model(path: str | Path, dtype: str | None = None) -> SpeechLLM:
    """A :class:`SpeechLLM` in eval mode from a training checkpoint or an exported folder.

    Local model folders named relatively by the training command are found as :func:`model_settings` says.

    Args:
        path: a ``.ckpt`` written by ``tiny-audio fit`` or a folder written by ``tiny-audio export``.
        dtype: override of ``frozen_dtype`` (e.g. ``float32`` on a CPU, where bf16 is slow).
    """
    path = Path(path)
    if path.is_dir():
        if not is_export(path):
            raise UsageError(f"{path} is not a folder written by tiny-audio export (config.json has no format "
                             f"'{FORMAT}'): pass such a folder or a .ckpt file")
        settings = json.loads((path / "config.json").read_text())["model"]
        weights = {f"projector.{k}": v for k, v in load_file(path / WEIGHTS).items()}
        if (path / ADAPTER).is_file():
            weights |= {f"decoder.{k}": v for k, v in load_file(path / ADAPTER).items()}
    else:
        checkpoint = read_training_checkpoint(path, what="--ckpt")
        settings, weights = model_settings(checkpoint, path), checkpoint["state_dict"]
    model = SpeechLLM(**{**settings, **({"frozen_dtype": dtype} if dtype else {})})
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    if trained != weights.keys():
        raise UsageError(f"{path} does not match its settings: missing {sorted(trained - weights.keys())[:3]}, "
                         f"unexpected {sorted(weights.keys() - trained)[:3]}")
    model.load_state_dict(weights, strict=False)
    return model.eval()


def is_export(folder: Path) -> bool:
    """Whether ``folder`` holds a ``config.json`` written by :func:`export`."""
    try:
        return json.loads((folder / "config.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def model_settings(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``SpeechLLM`` arguments saved in the checkpoint at ``path``, local model folders made absolute.

    Relative folders are looked up from the current folder, then from each folder above the
    checkpoint (a run writes ``lightning_logs/version_N/checkpoints/`` under the folder it ran in).
    """
    settings = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    for name in ("encoder", "decoder"):
        if not Path(settings[name]).is_absolute():
            found = [base / settings[name] for base in (Path.cwd(), *path.resolve().parents)
                     if (base / settings[name]).is_dir()]
            settings[name] = str(found[0].resolve()) if found else settings[name]  # else a hub id
    return settings


def export(checkpoint_path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the model folder for a training checkpoint (see module docstring); returns ``out``.

    Nothing of a user's is replaced unasked: ``out`` must be new, empty or an earlier export, unless
    ``overwrite``. The files are written into a temporary folder inside ``out`` and moved into place
    only once all of them are complete, so a failed export leaves ``out`` as it was.
    """
    checkpoint = read_training_checkpoint(checkpoint_path, what="--ckpt")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: name a folder")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    earlier = is_export(out)
    if present and not overwrite and not earlier:
        raise UsageError(f"--out {out} already holds files that are not a tiny-audio export ({', '.join(present[:3])}"
                         f"{', ...' if len(present) > 3 else ''}): name a new or empty folder, or pass --overwrite to "
                         f"replace {', '.join(OWN_FILES)} in it")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    except OSError as error:
        raise UsageError(f"cannot write to --out {out}: {error.strerror or error}") from error
    try:
        _write_export(checkpoint, Path(checkpoint_path), staging)
        written = sorted(staging.iterdir())
        for file in written:
            give_usual_mode(file)
            os.replace(file, out / file.name)
        if earlier and ADAPTER not in {f.name for f in written}:
            (out / ADAPTER).unlink(missing_ok=True)  # the earlier export's, from a LoRA run
    except OSError as error:
        raise UsageError(f"cannot write to --out {out}: {error.strerror or error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
    if created:
        give_usual_mode(out)
    return out


def _write_export(checkpoint: dict[str, Any], checkpoint_path: Path, folder: Path) -> None:
    """The export's files, into ``folder``."""
    state = checkpoint["state_dict"]
    weights = {k.removeprefix("projector."): v.contiguous() for k, v in state.items() if k.startswith("projector.")}
    adapter = {k.removeprefix("decoder."): v.contiguous() for k, v in state.items() if k.startswith("decoder.")}
    save_file(weights, folder / WEIGHTS, metadata={"format": FORMAT})
    if adapter:
        save_file(adapter, folder / ADAPTER, metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "model": model_settings(checkpoint, checkpoint_path),  # local folders absolute: usable anywhere
        "projector_parameters": sum(v.numel() for v in weights.values()),
        "adapter_parameters": sum(v.numel() for v in adapter.values()),
        "training": {"global_step": checkpoint.get("global_step"),
                     "data": {k: v for k, v in checkpoint.get("datamodule_hyper_parameters", {}).items()
                              if not k.startswith("_")},
                     "validation": checkpoint.get("validation", {})},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    (folder / "README.md").write_text(model_card(config))


def model_card(config: dict[str, Any]) -> str:
    """A short model card: what the model is, how it was trained, how well it did, how to use it."""
    model, training = config["model"], config["training"]
    data, validation = training["data"], training["validation"]
    scores = ("\n".join(f"| {name} | {value:.4g} |" for name, value in sorted(validation.get("metrics", {}).items()))
              or "| (no validation in this run) | |")
    return f"""---
library_name: tiny-audio
tags: [automatic-speech-recognition, speech-llm]
---
# Speech recognition projector for {model['decoder']}

A projector trained with tiny-audio (PyTorch Lightning) between the frozen speech encoder
`{model['encoder']}` and the frozen LLM `{model['decoder']}`. Only the projector is in this folder
(`{WEIGHTS}`, {config['projector_parameters']:,} parameters); the encoder and decoder are loaded by name.

## Training recipe

- projector: stack {model['projector_stack']} frames, SwiGLU hidden {model['projector_hidden']}, RMSNorm in and out
- decoder LoRA: {f"rank {model['lora_rank']} on {model['lora_targets'] or 'q/k/v/o_proj'}, "
                 f"{config['adapter_parameters']:,} parameters in `{ADAPTER}`" if model.get('lora_rank') else 'none'}
- prompt: system `{model['system_prompt']}`, user `{model['prompt']}`
- AdamW, learning rate {model['learning_rate']}, {model['warmup_steps']} warmup steps then cosine;
  {training['global_step']} optimizer steps
- data: `{data.get('dataset')}` ({data.get('config_name')}), split `{data.get('train_split')}`,
  batch {data.get('batch_size')} per device, transcripts `{data.get('text_normalization')}`

## Validation (split `{data.get('val_split')}`, step {validation.get('step')})

| metric | value |
| --- | --- |
{scores}

WER is computed after Whisper's English text normaliser.

## Use

```bash
tiny-audio transcribe clip.wav --ckpt THIS_FOLDER
```
"""


def push_to_hub(folder: str | Path, repo_id: str) -> str:
    """Upload an exported folder to the Hugging Face Hub with the token from the environment."""
    from huggingface_hub import HfApi
    from huggingface_hub import constants as hub_constants

    if hub_constants.HF_HUB_OFFLINE:
        raise UsageError("cannot push to the hub: HF_HUB_OFFLINE is set. Unset it (and log in with "
                      "`hf auth login` or set HF_TOKEN) to upload.")
    api = HfApi(token=os.environ.get("HF_TOKEN"))  # None: huggingface_hub's own login, never written by us
    api.create_repo(repo_id, exist_ok=True)
    return str(api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                 commit_message="Upload tiny-audio projector"))

