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
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from hub_server import FaultProxy, HubServer

BLOB = bytes(range(256)) * 400  # 100 kB with a recognisable pattern
CARD = "---\nlibrary_name: transformers\n---\n# A model\n"  # a README with metadata: the client has it validated


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


@pytest.fixture
def xet_cache(tmp_path, monkeypatch):
    """upload_folder opens an hf_xet session even when no file goes to Xet storage, and hf_xet writes a log under
    HF_XET_CACHE as it was when hf_xet was first imported: a test's folder, not the user's cache."""
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "xet"))


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


@pytest.mark.usefixtures("xet_cache")
def test_create_repo_and_upload_folder_write_the_files_that_are_then_served_under_a_new_sha(tmp_path):
    """What ``tiny-audio export --push-to-hub`` calls: create_repo (exist_ok accepts the 409 of a repository that
    exists) and upload_folder, whose files all go inline in the commit (preupload answers ``regular``: nothing
    goes to LFS or Xet storage); hf_hub_download then reads them back from the repository's folder."""
    folder = tmp_path / "upload"
    (folder / "sub").mkdir(parents=True)
    (folder / "README.md").write_text(CARD)
    (folder / "sub/blob.bin").write_bytes(BLOB)
    with HubServer(tmp_path / "hub") as server:
        api = HfApi(endpoint=server.url, token="any")
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("org/new")  # remembered as missing: creating it must replace that
        url = api.create_repo("org/new", exist_ok=True)
        assert url.repo_id == "org/new" and api.create_repo("org/new", exist_ok=True) == url
        with pytest.raises(HfHubHTTPError) as refused:
            api.create_repo("org/new")
        assert refused.value.response.status_code == 409
        empty = api.model_info("org/new")
        commit = api.upload_folder(folder_path=folder, repo_id="org/new")
        info = api.model_info("org/new")
        for name in ("README.md", "sub/blob.bin"):
            path = Path(hf_hub_download("org/new", name, endpoint=server.url, cache_dir=tmp_path / "cache"))
            served = tmp_path / "hub/models/org/new" / name  # written into the repository's folder
            assert path.read_bytes() == (folder / name).read_bytes() == served.read_bytes()
        posts = [path for method, path, _ in server.requests if method == "POST"]
    assert empty.siblings == [] and commit.oid == info.sha != empty.sha
    assert commit.commit_url == f"{server.url}/org/new/commit/{info.sha}"
    assert {s.rfilename for s in info.siblings} == {"README.md", "sub/blob.bin"}
    assert posts == [*["/api/repos/create"] * 3, "/api/validate-yaml", "/api/models/org/new/preupload/main",
                     "/api/models/org/new/commit/main"]


@pytest.mark.usefixtures("xet_cache")
def test_an_upload_commits_only_changed_files_and_replaces_a_symlink_without_writing_through_it(tmp_path):
    """Preupload names the blob oid of each file already there, so the client leaves unchanged files out (and an
    upload of nothing new makes no commit); a repository file that links to a test asset is replaced, the asset
    left as it was."""
    asset = tmp_path / "asset.bin"
    asset.write_bytes(BLOB)
    repo = tmp_path / "hub/models/org/model"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text('{"model_type": "none"}')
    (repo / "blob.bin").symlink_to(asset)
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "none"}')
    (folder / "blob.bin").write_bytes(BLOB[::-1])
    config = (repo / "config.json").stat().st_ino
    with HubServer(tmp_path / "hub") as server:
        api = HfApi(endpoint=server.url, token="any")
        before = api.model_info("org/model").sha
        first = api.upload_folder(folder_path=folder, repo_id="org/model")
        again = api.upload_folder(folder_path=folder, repo_id="org/model")
        commits = [path for _, path, _ in server.requests if "/commit/" in path]
    assert first.oid == again.oid != before and len(commits) == 1
    assert (repo / "config.json").stat().st_ino == config  # not sent, so not rewritten
    assert not (repo / "blob.bin").is_symlink() and (repo / "blob.bin").read_bytes() == BLOB[::-1]
    assert asset.read_bytes() == BLOB


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
