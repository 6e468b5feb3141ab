"""Where data and models come from: hub ids, local folders, and the hub cache on nodes without internet.

- A hub id streams with ``datasets`` and loads with ``transformers`` as usual; ``HF_ENDPOINT`` reaches
  a mirror the same way.
- Clusters often train on nodes that cannot reach the hub. ``tiny-audio download -c CONFIG`` (run
  where there is internet) fetches the models a config names into the hub cache, and the parquet
  files of every split it reads, laid out as on the hub; on the node, with ``HF_HUB_OFFLINE=1``, the
  same config then reads models and data from that cache
  (:func:`cached_dataset`). A split that was not fetched is one line naming what to fetch.
- A folder is read by its layout, ``[config/]split/*.parquet`` or ``split-*.parquet``
  (:func:`find_parquet_files`): LoquaciousSet's ``large/train-*.parquet`` and ``dev/dev-*.parquet``,
  LibriSpeech's ``all/test.clean/0000.parquet``. The same rules read a hub repository whose
  loading script ``datasets`` refuses (older revisions of ``openslr/librispeech_asr`` hold one).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem
from huggingface_hub import HfApi, HfFileSystem, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

from tiny_audio_pl.errors import UsageError

# The files a model folder needs at its top level (tokenizer, feature extractor, configs, weights);
# a repository's other formats (TF, Flax, ONNX) and folders are left out.
MODEL_SUFFIXES = (".json", ".txt", ".jinja", ".model", ".tiktoken", ".safetensors")
FETCH_HINT = "fetch it where there is internet with `tiny-audio download -c CONFIG`, or pass a local folder"


def local_folder(name: str, near: Path) -> Path | None:
    """A folder a run named relative to where it was started: found from the current folder or from any folder
    above ``near`` (a run writes ``lightning_logs/version_N/...`` under the folder it ran in); None when it is
    not a folder here (a hub id)."""
    if Path(name).is_absolute():
        return Path(name) if Path(name).is_dir() else None
    return next((base / name for base in (Path.cwd(), *near.resolve().parents) if (base / name).is_dir()), None)


def find_parquet_files(root: str | Path, config_name: str | None, split: str,
                       fs: AbstractFileSystem | None = None) -> list[str]:
    """Parquet files of ``split`` in a folder laid out as ``[config/]split/*.parquet`` or ``[config/]split-*.parquet``
    (in any subfolder of the configuration's, or of the folder without one).

    Args:
        root: the folder (on ``fs``).
        config_name: a subfolder looked in first, when given (a dataset configuration).
        split: the split's name, e.g. ``train``, ``dev`` or ``test.clean``.
        fs: the filesystem (default: local; an ``HfFileSystem`` reads a hub repository).
    """
    fs = fs or LocalFileSystem()
    root = str(root).rstrip("/")
    anywhere = [f"{split}/**/*.parquet", f"**/{split}-*.parquet", f"**/{split}/**/*.parquet"]
    # With a configuration, the root is searched only at its top (LoquaciousSet's dev/ and test/): its
    # other folders are other configurations', whose files must not stand in for this one's.
    searches = ([(f"{root}/{config_name}", anywhere), (root, [f"{split}/**/*.parquet", f"{split}-*.parquet"])]
                if config_name else [(root, anywhere)])
    for base, patterns in searches:
        for pattern in patterns:
            files = sorted(fs.glob(f"{base}/{pattern}"))
            if files:
                return files
    raise UsageError(f"no parquet files for split '{split}'" + (f" of config '{config_name}'" if config_name else "")
                     + f" under {root} (looked for {', '.join(f'{b}/{p}' for b, ps in searches for p in ps)})")


def cached_dataset(repo_id: str) -> Path | None:
    """The hub cache's copy of a dataset repository (what ``tiny-audio download`` fetched), or None."""
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None


def hub_parquet_files(repo_id: str, config_name: str | None, split: str) -> list[str]:
    """A hub dataset's parquet files of ``split``, found by their layout (:func:`find_parquet_files`), as URLs."""
    return ["hf://" + path for path in find_parquet_files(f"datasets/{repo_id}", config_name, split, HfFileSystem())]


def split_files(repo_id: str, config_name: str | None, split: str) -> list[str]:
    """The repository paths of a hub dataset's split: as its card's ``configs:`` map them, else by layout."""
    from datasets import load_dataset_builder

    try:
        urls = load_dataset_builder(repo_id, config_name).config.data_files[split]
    except (RuntimeError, KeyError, ValueError):  # a loading script datasets refuses, or no such split in the card
        urls = hub_parquet_files(repo_id, config_name, split)
    # hf://datasets/{repo_id}[@revision]/large/train-0.parquet -> large/train-0.parquet
    return [str(url).removeprefix(f"hf://datasets/{repo_id}").split("/", 1)[1] for url in urls]


def download_model(name: str) -> Path:
    """A model repository's top-level files into the hub cache (safetensors weights when it has them)."""
    files = [f for f in HfApi().list_repo_files(name) if "/" not in f and f.endswith(MODEL_SUFFIXES + (".bin",))]
    if any(f.endswith(".safetensors") for f in files):
        files = [f for f in files if not f.endswith(".bin")]
    return Path(snapshot_download(name, allow_patterns=files))


def download(models: Sequence[str], splits: Sequence[tuple[str, str | None, str]], max_files: int | None = None
             ) -> list[str]:
    """Fetch models and dataset splits into the hub cache, for nodes without internet.

    Args:
        models: hub ids (local folders are skipped).
        splits: ``(dataset id, config, split)`` to fetch (local folders are skipped).
        max_files: fetch only the first N files of each split (a smaller copy: training then sees only those).

    Returns:
        One line per model or split fetched, saying where it went.
    """
    done = []
    for name in dict.fromkeys(m for m in models if not Path(m).is_dir()):
        done.append(f"model    {name}: {download_model(name)}")
    for repo_id, config_name, split in dict.fromkeys(s for s in splits if not Path(s[0]).is_dir()):
        paths = split_files(repo_id, config_name, split)[:max_files]
        try:
            hf_hub_download(repo_id, "README.md", repo_type="dataset")  # the card, for the record
        except EntryNotFoundError:
            pass
        for path in paths:
            hf_hub_download(repo_id, path, repo_type="dataset")
        where = cached_dataset(repo_id)
        done.append(f"dataset  {repo_id} {config_name or '-'} {split}: {len(paths)} file(s) in {where}")
    return done
