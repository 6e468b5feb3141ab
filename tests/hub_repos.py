"""Hub repositories laid out as the real ones, filled with the tiny assets, for :class:`hub_server.HubServer`.

Every repository id a shipped config names is here, holding a tiny stand-in (test fixtures only).
Where each fact about the real layout comes from (read 2026-12-01 from the Hub's published pages):

- ``speechbrain/LoquaciousSet`` (https://huggingface.co/datasets/speechbrain/LoquaciousSet/tree/main,
  formerly ``speechbrain/LargeScaleASR``): top-level folders ``clean/ dev/ large/ medium/ small/ test/``,
  ``README.md`` and ``largescaleasr_*.csv`` files. ``dev/`` and ``test/`` hold
  ``{split}-0000N-of-00006.parquet``; each config folder holds ``train-NNNNN-of-MMMMM.parquet``
  (small 72, medium 716, large 6323, clean 2615 shards). The README's ``configs:`` entries give each
  config its own ``features`` and ``data_files`` (``train: {config}/train*``, ``dev: dev/dev*``,
  ``test: test/test*``), with ``wav`` as ``audio`` written ``{sample_rate: 16000, decode: false}``
  (``sample_rate``, a key datasets does not know and drops). Columns ``ID`` (string), ``duration``
  (float32), ``wav`` ({bytes, path}), ``spk_id``, ``sex``, ``text`` (upper case).
- ``openslr/librispeech_asr`` (README ``dataset_info`` at commit e8230f9; shard paths from scripts that
  pin its files): configs ``all``, ``clean``, ``other``; ``all`` has splits ``train.clean.100``,
  ``train.clean.360``, ``train.other.500``, ``validation.clean``, ``validation.other``, ``test.clean``,
  ``test.other``; shards ``{config}/{split}/NNNN.parquet`` (``all/test.clean/0000.parquet``); columns
  ``file``, ``audio`` (audio, 16 kHz), ``text``, ``speaker_id``, ``chapter_id``, ``id``. Its ``configs:``
  block was not found published; the one here follows the file layout. Older revisions also held a
  loading script ``librispeech_asr.py``, which datasets 5 refuses: :func:`build_repos` can add one.
- Model repositories (their ``tree/main`` pages): ``openai/whisper-large-v3-turbo`` and
  ``openai/whisper-tiny.en`` (config, preprocessor_config, tokenizer files, ``model.safetensors``),
  ``HuggingFaceTB/SmolLM3-3B`` (``chat_template.jinja``, tokenizer files, weights in two
  ``model-0000N-of-00002.safetensors`` shards with ``model.safetensors.index.json``),
  ``HuggingFaceTB/SmolLM2-135M-Instruct`` (one ``model.safetensors``), ``facebook/hubert-xlarge-ls960-ft``
  (config, preprocessor_config, ``model.safetensors`` and ``pytorch_model.bin``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from conftest import ASSETS, DECODER, HUBERT, WHISPER

SPEECH = ASSETS / "tiny-speech"
LOQUACIOUS_CONFIGS = ("large", "clean", "medium", "small")

LOQUACIOUS_FEATURES = """    features:
      - name: ID
        dtype: string
      - name: duration
        dtype: float32
      - name: wav
        dtype:
          audio:
            sample_rate: 16000
            decode: false
      - name: spk_id
        dtype: string
      - name: sex
        dtype: string
      - name: text
        dtype: string
"""

LIBRISPEECH_README = """---
dataset_info:
- config_name: all
  features:
  - name: file
    dtype: string
  - name: audio
    dtype:
      audio:
        sampling_rate: 16000
  - name: text
    dtype: string
  - name: speaker_id
    dtype: int64
  - name: chapter_id
    dtype: int64
  - name: id
    dtype: string
configs:
- config_name: all
  data_files:
  - split: test.clean
    path: all/test.clean/*
  - split: test.other
    path: all/test.other/*
  - split: validation.clean
    path: all/validation.clean/*
- config_name: clean
  data_files:
  - split: test
    path: clean/test/*
---
# LibriSpeech (tiny stand-in)
"""


def _shards(table: pa.Table, count: int) -> list[pa.Table]:
    size = -(-len(table) // count)
    return [table.slice(i * size, size) for i in range(count)]


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _link_model(source: str | Path, folder: Path, readme: str) -> None:
    folder.mkdir(parents=True)
    for file in Path(source).iterdir():
        (folder / file.name).symlink_to(file)
    (folder / "README.md").write_text(f"# {readme} (tiny stand-in for the tests)\n")


def loquacious(folder: Path) -> None:
    """``speechbrain/LoquaciousSet``: the tiny train split in every config's folder, dev and test shared."""
    train = pa.concat_tables([pq.read_table(p) for p in sorted((SPEECH / "train").glob("*.parquet"))])
    dev = pq.read_table(SPEECH / "dev" / "dev-00000.parquet")
    for config in LOQUACIOUS_CONFIGS:
        for i, shard in enumerate(_shards(train, 2)):
            _write(shard, folder / config / f"train-{i:05d}-of-00002.parquet")
    for split, table in (("dev", dev), ("test", dev.slice(10))):
        for i, shard in enumerate(_shards(table, 2)):
            _write(shard, folder / split / f"{split}-{i:05d}-of-00002.parquet")
    configs = "".join(f"  - config_name: {config}\n{LOQUACIOUS_FEATURES}    data_files:\n"
                      f"      - split: train\n        path: {config}/train*\n"
                      "      - split: dev\n        path: dev/dev*\n      - split: test\n        path: test/test*\n"
                      for config in LOQUACIOUS_CONFIGS)
    (folder / "README.md").write_text(f"---\nlicense: cc-by-4.0\nconfigs:\n{configs}---\n# LoquaciousSet (tiny)\n")
    (folder / "largescaleasr_dev.csv").write_text("ID,duration,wav,spk_id,sex,text\n")  # not data: no config names it


def librispeech(folder: Path, script: bool = False) -> None:
    """``openslr/librispeech_asr``: the tiny dev clips renamed to LibriSpeech's columns."""
    dev = pq.read_table(SPEECH / "dev" / "dev-00000.parquet")
    table = pa.table({"file": dev["ID"], "audio": dev["wav"], "text": dev["text"],
                      "speaker_id": pa.array(range(len(dev)), pa.int64()),
                      "chapter_id": pa.array([1] * len(dev), pa.int64()), "id": dev["ID"]})
    for path in ("all/test.clean", "all/test.other", "all/validation.clean", "clean/test"):
        _write(table, folder / path / "0000.parquet")
    (folder / "README.md").write_text(LIBRISPEECH_README)
    if script:
        (folder / "librispeech_asr.py").write_text("import datasets  # a loading script, as older revisions had\n")


def smollm3(folder: Path) -> None:
    """``HuggingFaceTB/SmolLM3-3B``: the tiny decoder with its weights in two shards and an index, as the real one."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(DECODER).save_pretrained(folder, max_shard_size="2MB")
    for file in Path(DECODER).iterdir():
        if file.name not in ("model.safetensors", "config.json", "generation_config.json"):
            shutil.copy(file, folder / file.name)
    (folder / "README.md").write_text("# SmolLM3-3B (tiny stand-in for the tests)\n")


def build_repos(root: Path, librispeech_script: bool = False) -> Path:
    """Every repository the shipped configs name, under ``root`` as :class:`hub_server.HubServer` reads them."""
    loquacious(root / "datasets/speechbrain/LoquaciousSet")
    librispeech(root / "datasets/openslr/librispeech_asr", librispeech_script)
    for repo_id, source in (("openai/whisper-large-v3-turbo", WHISPER), ("openai/whisper-tiny.en", WHISPER),
                            ("facebook/hubert-xlarge-ls960-ft", HUBERT),
                            ("HuggingFaceTB/SmolLM2-135M-Instruct", DECODER)):
        _link_model(source, root / "models" / repo_id, repo_id)
    hubert = root / "models/facebook/hubert-xlarge-ls960-ft"
    torch.save(load_file(hubert / "model.safetensors"), hubert / "pytorch_model.bin")  # both formats, as the real one
    smollm3(root / "models/HuggingFaceTB/SmolLM3-3B")
    return root
