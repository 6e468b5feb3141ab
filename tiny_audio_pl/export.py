"""The shareable model folder, and loading a model from it or from a training checkpoint.

``tiny-audio export --ckpt PATH --out DIR`` writes a folder that ``transformers`` loads by itself::

    DIR/config.json                the TinyAudioConfig (encoder and decoder names, projector, prompt, LoRA),
                                   the code to load (auto_map, custom pipeline) and the run's training facts
    DIR/model.safetensors          the trained weights only: projector (and LoRA adapters)
    DIR/processor/                 the processor: the encoder's feature extractor, the decoder's
                                   tokenizer and chat template, the prompts
    DIR/modeling.py, ...           the model's own code (it does not import tiny_audio_pl)
    DIR/README.md                  a model card built from the same facts

so that ``AutoModel.from_pretrained(DIR, trust_remote_code=True)`` and ``pipeline(
"automatic-speech-recognition", model=DIR, trust_remote_code=True)`` work with only transformers,
torch and soundfile installed. The frozen encoder and decoder are not copied: they are loaded by name
(hub id, or a local folder made absolute), as during training. :func:`load_model` rebuilds the model
from such a folder or straight from a training checkpoint, so both transcribe identically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tiny_audio_pl.checkpoint import TrainedCheckpoint, give_usual_mode
from tiny_audio_pl.configuration import TinyAudioConfig
from tiny_audio_pl.errors import UsageError
from tiny_audio_pl.hub import local_folder
from tiny_audio_pl.modeling import WEIGHTS, TinyAudioModel, build_processor, write_model_folder

MODEL_TYPE = TinyAudioConfig.model_type
OLD_FORMAT = "tiny-audio-projector"  # folders of tiny-audio before the model was a transformers model


def load_model(path: str | Path, dtype: str | None = None) -> TinyAudioModel:
    """A :class:`TinyAudioModel` in eval mode from an exported folder or a training checkpoint.

    Args:
        path: a folder written by ``tiny-audio export`` or a ``.ckpt`` written by ``tiny-audio fit``.
        dtype: override of ``frozen_dtype`` (e.g. ``float32`` on a CPU, where bf16 is slow).
    """
    path = Path(path)
    if path.is_dir():
        kind = export_kind(path)
        if kind == OLD_FORMAT:
            raise UsageError(f"{path} was exported by an older tiny-audio (projector.safetensors): export it again "
                             "with `tiny-audio export --ckpt CHECKPOINT --out DIR`")
        if kind != MODEL_TYPE:
            raise UsageError(f"{path} is not a folder written by tiny-audio export (its config.json has no model_type "
                             f"'{MODEL_TYPE}'): pass such a folder or a .ckpt file")
        return TinyAudioModel.from_pretrained(path, dtype=dtype)
    checkpoint = TrainedCheckpoint.read(path, what="--ckpt")  # read once: its weights, settings and facts
    config = TinyAudioConfig(**model_settings(checkpoint))
    config.training = checkpoint.facts()
    if dtype:
        config.frozen_dtype = dtype
    return TinyAudioModel(config).load_trained(checkpoint.weights(), path).eval()


def export_kind(folder: Path) -> str | None:
    """``tiny_audio`` for a model folder, the old format's name for an older export, else None."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    return config.get("model_type") if config.get("model_type") == MODEL_TYPE else config.get("format")


def model_settings(checkpoint: TrainedCheckpoint) -> dict[str, Any]:
    """The model settings saved in a checkpoint, local model folders made absolute.

    Relative folders are looked up from the current folder, then from each folder above the
    checkpoint (a run writes ``lightning_logs/version_N/checkpoints/`` under the folder it ran in).
    """
    checkpoint.note_unkept_prompt()
    settings = checkpoint.settings()
    for name in ("encoder", "decoder"):
        found = local_folder(settings[name], Path(checkpoint.source))
        settings[name] = str(found.resolve()) if found else settings[name]  # else a hub id
    return settings


def export(checkpoint_path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the model folder for a training checkpoint (see module docstring); returns ``out``.

    Nothing of a user's is replaced unasked: ``out`` must be new, empty or an earlier export, unless
    ``overwrite``. The files are written into a temporary folder inside ``out`` and moved into place
    only once all of them are complete, so a failed export leaves ``out`` as it was.
    """
    checkpoint = TrainedCheckpoint.read(checkpoint_path, what="--ckpt")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: name a folder")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    earlier = export_kind(out) in (MODEL_TYPE, OLD_FORMAT)
    if present and not overwrite and not earlier:
        raise UsageError(f"--out {out} already holds files that are not a tiny-audio export ({', '.join(present[:3])}"
                         f"{', ...' if len(present) > 3 else ''}): name a new or empty folder, or pass --overwrite to "
                         "write the export's files into it")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    except OSError as error:
        raise UsageError(f"cannot write to --out {out}: {error.strerror or error}") from error
    try:
        _write_export(checkpoint, staging)
        written = sorted(staging.iterdir())
        for path in written:
            for part in (path, *path.rglob("*")):
                give_usual_mode(part)
            if path.is_dir() and (out / path.name).is_dir():
                shutil.rmtree(out / path.name)  # the export's own subfolder (processor/), replaced whole
            os.replace(path, out / path.name)
        if earlier:  # files of the earlier export that this one does not have (an adapter, an old format's)
            names = {f.name for f in written}
            for stale in ("projector.safetensors", "adapter.safetensors"):
                if stale not in names:
                    (out / stale).unlink(missing_ok=True)
    except OSError as error:
        raise UsageError(f"cannot write to --out {out}: {error.strerror or error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
    if created:
        give_usual_mode(out)
    return out


def _write_export(checkpoint: TrainedCheckpoint, folder: Path) -> None:
    """The export's files, into ``folder``."""
    config = TinyAudioConfig(**model_settings(checkpoint))  # local folders absolute: usable anywhere
    config.training = checkpoint.facts()
    write_model_folder(folder, config, checkpoint.weights(), build_processor(config))
    (folder / "README.md").write_text(model_card(config))


def model_card(config: TinyAudioConfig) -> str:
    """The model card: its metadata (base models, training data and the validation's WER as ``model-index``, which
    the Hub renders; written by ``huggingface_hub``'s own ``ModelCardData``), what the model is, how to use it, how
    it was trained and decodes, and every score of the last validation."""
    from huggingface_hub import EvalResult, ModelCardData

    training = config.training
    data, validation = training["data"], training["validation"]
    scores = ("\n".join(f"| {name} | {value:.4g} |" for name, value in sorted(validation.get("metrics", {}).items()))
              or "| (no validation in this run) | |")
    lora = (f"rank {config.lora_rank} on {config.lora_targets or 'q/k/v/o_proj'}, "
            f"{training['adapter_parameters']:,} parameters" if config.lora_rank else "none")
    title = f"{Path(config.encoder).name} + {Path(config.decoder).name} speech recognition"
    metadata = ModelCardData(
        model_name=title, library_name="transformers", pipeline_tag="automatic-speech-recognition",
        tags=["automatic-speech-recognition", "speech-llm", "tiny-audio"],
        base_model=[name for name in (config.encoder, config.decoder) if not Path(name).is_dir()] or None,
        datasets=sorted({s["dataset"] for s in _sources(data, "train") if not Path(s["dataset"]).is_dir()}) or None,
        eval_results=[EvalResult(**result) for result in _wer_results(data, validation)] or None)
    return f"""---
{metadata.to_yaml()}
---
# {title}

A projector trained with tiny-audio (PyTorch Lightning) between the frozen speech encoder
{_shown(config.encoder)} and the frozen LLM {_shown(config.decoder)}. Only the trained weights are in this
folder (`{WEIGHTS}`: the projector's {training['projector_parameters']:,} parameters); the encoder and
decoder are loaded by name.

## Use

```python
from transformers import pipeline

asr = pipeline("automatic-speech-recognition", model="THIS_FOLDER", trust_remote_code=True)
print(asr("clip.wav")["text"])
```

`AutoModel.from_pretrained("THIS_FOLDER", trust_remote_code=True)` gives the model itself; its
`processor` turns audio into features and `generate` / `transcribe` decode. Needs
`transformers`, `torch` and `soundfile` (and `soxr` for audio not at 16 kHz). With tiny-audio
installed: `tiny-audio transcribe clip.wav --ckpt THIS_FOLDER`.

## Training recipe

- projector: stack {config.projector_stack} frames, SwiGLU hidden {config.projector_hidden}, RMSNorm in and out\
{', output bias' if config.projector_bias else ''}
- decoder LoRA: {lora}
- prompt: system `{config.system_prompt}`, user `{config.prompt}` (its token ids: `prompt_ids` in `config.json`)
- AdamW, learning rate {training['learning_rate']}{_adapter_rate(training)}, {training['warmup_steps']} warmup steps
  then cosine; {training['global_step']} optimizer steps
- data: {_data_line(data)}, transcripts `{data.get('text_normalization')}`
- decoding: {_decoding_line(config)}

## Validation (step {validation.get('step')})

| metric | value |
| --- | --- |
{scores}

WER is computed after Whisper's English text normaliser.
"""


def _shown(name: str) -> str:
    """A model's name for the card: its hub id, or a local folder's name (the card is read elsewhere)."""
    return f"`{Path(name).name}` (a local folder)" if Path(name).is_dir() else f"`{name}`"


def _sources(data: dict[str, Any], stage: str) -> list[dict[str, Any]]:
    """What a run trained on (``train``) or scored (``eval``): each source's name, dataset, config and split."""
    entries = [e if isinstance(e, dict) else vars(e) for e in data.get(f"{stage}_sources" if stage == "train"
                                                                      else "eval_sets") or []]
    default = {"name": "validation", "dataset": data.get("dataset"), "config_name": data.get("config_name"),
               "split": data.get("train_split" if stage == "train" else "val_split")}
    return [{**default, **{k: v for k, v in e.items() if v is not None}} for e in entries] or [default]


def _wer_results(data: dict[str, Any], validation: dict[str, Any]) -> list[dict[str, Any]]:
    """Each scored set's WER (in %) with what the Hub's ``model-index`` names it by: task, dataset id, config, split."""
    metrics = validation.get("metrics", {})
    found = [(s, metrics.get("val/wer" if s["name"] == "validation" else f"val/{s['name']}/wer"))
             for s in _sources(data, "eval")]
    return [{"task_type": "automatic-speech-recognition", "dataset_type": str(s["dataset"]), "dataset_name": s["name"],
             "dataset_config": s["config_name"], "dataset_split": s["split"], "metric_type": "wer",
             "metric_name": "WER (%)", "metric_value": round(100 * wer, 2)} for s, wer in found if wer is not None]


def _decoding_line(config: TinyAudioConfig) -> str:
    """How the model decodes unless a call says otherwise."""
    parts = ["greedy" if config.beam_size == 1 else f"beam search, {config.beam_size} beams",
             f"at most {config.max_new_tokens} new tokens"]
    if config.no_repeat_ngram:
        parts.append(f"no {config.no_repeat_ngram}-gram repeated")
    if config.max_tokens_per_second:
        parts.append(f"at most {config.max_tokens_per_second:g} tokens per second of audio")
    return ", ".join(parts)


def _adapter_rate(training: dict[str, Any]) -> str:
    """The adapters' own learning rate for the model card, when they had one."""
    rate = training.get("adapter_learning_rate")
    return f" (LoRA adapters {rate})" if rate is not None else ""


def _data_line(data: dict[str, Any]) -> str:
    """What the run trained on, for the model card: the dataset's split, or the mix of sources."""
    if data.get("train_sources"):
        return "a mix of " + ", ".join(f"{s['name']} (weight {s.get('weight', 1.0)})" for s in _sources(data, "train"))
    config = f" ({data['config_name']})" if data.get("config_name") else ""
    return f"`{data.get('dataset')}`{config}, split `{data.get('train_split')}`"


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
                                 commit_message="Upload tiny-audio model"))
