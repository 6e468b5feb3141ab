"""The Hub stand-in and the fault proxy, each behaviour pinned against the client that relies on it.

Everything here goes to 127.0.0.1 only; the clients are huggingface_hub's own (``HfApi``,
``hf_hub_download``, ``HfFileSystem``, which datasets streams through), pointed at the server.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi, HfFileSystem, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

from hub_server import FaultProxy, HubServer

BLOB = bytes(range(256)) * 400  # 100 kB with a recognisable pattern


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    model = root / "models/org/model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "none"}')
    (model / "sub/blob.bin").write_bytes(BLOB)
    (root / "datasets/org/data/train").mkdir(parents=True)
    (root / "datasets/org/data/train/part.parquet").write_bytes(b"PAR1" + BLOB + b"PAR1")
    with HubServer(root) as server:
        yield server


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """The suite runs with HF_HUB_OFFLINE=1; these tests talk to the stand-in only."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_repository_info_with_and_without_a_revision(hub):
    """transformers 5 asks /api/models/{id} without a revision; datasets asks /api/datasets/{id}/revision/{rev}."""
    api = HfApi(endpoint=hub.url)
    info = api.model_info("org/model")
    assert len(info.sha) == 40 and {s.rfilename for s in info.siblings} == {"config.json", "sub/blob.bin"}
    assert api.model_info("org/model", revision=info.sha).sha == info.sha
    assert api.dataset_info("org/data", revision="main").sha


def test_tree_and_paths_info_list_files_and_folders(hub):
    api = HfApi(endpoint=hub.url)
    assert api.list_repo_files("org/model") == ["config.json", "sub/blob.bin"]
    top = {entry.path: type(entry).__name__ for entry in api.list_repo_tree("org/model")}
    assert top == {"config.json": "RepoFile", "sub": "RepoFolder"}
    inside = list(api.list_repo_tree("org/model", path_in_repo="sub"))
    assert [(e.path, e.size) for e in inside] == [("sub/blob.bin", len(BLOB))]
    assert inside[0].lfs is not None and len(inside[0].lfs.sha256) == 64
    found = api.get_paths_info("org/data", ["train", "train/part.parquet", "missing"], repo_type="dataset")
    assert sorted(e.path for e in found) == ["train", "train/part.parquet"]


def test_a_download_is_checked_by_etag_and_filed_under_the_commit(hub, tmp_path):
    path = Path(hf_hub_download("org/model", "sub/blob.bin", endpoint=hub.url, cache_dir=tmp_path))
    assert path.read_bytes() == BLOB
    assert path.parent.parent.name == HfApi(endpoint=hub.url).model_info("org/model").sha  # snapshots/<sha>/sub/


def test_ranged_reads_get_206_and_exactly_the_bytes_asked(hub):
    """What datasets' parquet streaming does: seek to the footer, read a range (Olah answered the whole file)."""
    fs = HfFileSystem(endpoint=hub.url, skip_instance_cache=True)
    with fs.open("datasets/org/data/train/part.parquet", "rb", block_size=1024) as file:
        file.seek(-4, 2)
        assert file.read(4) == b"PAR1"
        file.seek(5000)
        assert file.read(100) == (b"PAR1" + BLOB)[5000:5100]
    assert any(method == "GET" and "part.parquet" in path and status == 206 for method, path, status in hub.requests)


def test_missing_repositories_revisions_and_files_raise_the_clients_own_errors(hub, tmp_path):
    """A 404 with X-Error-Code: a missing optional file is then skipped by transformers, not fatal (Olah: 401)."""
    api = HfApi(endpoint=hub.url)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/model", "tokenizer.json", endpoint=hub.url, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/absent")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/model", revision="v9")


def _get(url: str, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_the_proxy_breaks_what_its_plan_names_and_refuses_while_stopped(hub):
    faults = {0: "error", 1: "reset"}
    path = "/org/model/resolve/main/sub/blob.bin"
    with FaultProxy(hub.url, lambda method, p, n: faults.get(n)) as proxy:
        assert _get(proxy.url, path)[0] == 503
        with pytest.raises((http.client.IncompleteRead, ConnectionResetError)):
            _get(proxy.url, path)
        assert _get(proxy.url, path) == (200, BLOB)
        proxy.stop()
        with pytest.raises(ConnectionRefusedError):
            _get(proxy.url, path)
        proxy.start()  # the same port, back
        status, body = _get(proxy.url, "/api/models/org/model")
        assert status == 200 and json.loads(body)["id"] == "org/model"
    assert proxy.faults == [("error", path), ("reset", path)]
