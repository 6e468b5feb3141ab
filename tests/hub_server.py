"""A Hub-compatible server and a fault-injecting proxy on 127.0.0.1: the stand-ins for the Hub and its network.

``HF_ENDPOINT=http://127.0.0.1:PORT`` points huggingface_hub, transformers and datasets, unmodified, at
:class:`HubServer`, as users point them at a mirror. Mirrors that exist were not enough (Olah 0.5.4
ignores ``Range``, so parquet streaming fails; it does not answer ``/api/models/{id}`` without a
revision; it answers a missing file with 401), so this one speaks exactly what these clients call
(huggingface_hub 2.4, transformers 5.25, datasets 5.2; each behaviour is pinned by ``test_hub_server.py``):

- ``GET /api/{models,datasets}/{id}[/revision/{rev}]``: the repository's ``sha`` and ``siblings``;
- ``GET /api/{type}/{id}/tree/{rev}[/{path}]`` (``recursive``, ``expand``) and ``POST .../paths-info/{rev}``:
  files with size, blob oid and LFS sha256, and folders;
- ``HEAD|GET /{id}/resolve/{rev}/{path}`` (``/datasets/{id}/...`` for datasets): ``ETag``,
  ``X-Repo-Commit``, ``Content-Length``, ``Accept-Ranges``, and ``Range`` answered with 206;
- 404 with ``X-Error-Code`` ``RepoNotFound``, ``RevisionNotFound`` or ``EntryNotFound``, which the
  clients turn into their own errors (a missing optional file is then skipped, not fatal).

and what ``HfApi.create_repo(id, exist_ok=True)`` then ``HfApi.upload_folder(...)`` call to upload:

- ``POST /api/repos/create``: an empty model or dataset repository and its ``url``; 409 (with the ``url``)
  if it exists, which ``exist_ok`` accepts;
- ``POST /api/validate-yaml``: the README's metadata, always valid (it is not checked);
- ``POST /api/{type}/{id}/preupload/{rev}``: every file ``regular`` (its content then comes inline in the
  commit), with the blob oid of the file already at that path, so that the client leaves out unchanged files;
- ``POST /api/{type}/{id}/commit/{rev}``: the NDJSON commit (a header line, then one ``file`` line per file,
  base64): the files are written into the repository's folder, which is read again, and the answer is
  ``commitOid`` (the new sha) and ``commitUrl``.

Not covered: LFS and Xet storage (no file is ever answered ``lfs``: with hf_xet installed, ``upload_folder``
would send such a file to Xet storage, never to the LFS batch API), deletions, copies and pull requests in a
commit, older commits (only the latest sha resolves), authentication (any token is accepted), pagination
(listings are small), repositories of one path part (``gpt2``), and the dataset viewer's ``datasets-server``.

Repositories are folders: ``ROOT/models/ORG/NAME/...`` and ``ROOT/datasets/ORG/NAME/...`` (files may
be symlinks; a commit replaces a symlink, it never writes through one), read at their first request and
again after each commit; revision ``main`` and the repository's sha (a hash of its files, so a commit that
changes a file gives a new one) both resolve.

:class:`FaultProxy` sits between a client and the server and breaks chosen requests: a connection
reset mid-body, a 5xx answer, a stall, or (stopped) a refused connection.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DATE = "2026-01-01T00:00:00.000Z"
REPO_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")  # ORG/NAME; a folder under ROOT/{models,datasets}, never outside it


class Repo:
    """One repository: its files (path -> file on disk) and the hashes the clients check."""

    def __init__(self, kind: str, repo_id: str, folder: Path) -> None:
        self.kind, self.repo_id = kind, repo_id
        self.files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        self.sha256: dict[str, str] = {}  # the LFS oid and ETag
        self.blob: dict[str, str] = {}  # git's blob oid
        for path, file in self.files.items():
            data = file.read_bytes()
            self.sha256[path] = hashlib.sha256(data).hexdigest()
            self.blob[path] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        self.sha = hashlib.sha1("".join(f"{p}:{h}\n" for p, h in self.sha256.items()).encode()).hexdigest()

    def folders(self) -> set[str]:
        return {"/".join(path.split("/")[:i]) for path in self.files for i in range(1, path.count("/") + 1)}

    def entry(self, path: str, expand: bool) -> dict[str, Any]:
        """A tree / paths-info entry, as the Hub writes it."""
        commit = {"lastCommit": {"id": self.sha, "title": "fixture", "date": DATE}} if expand else {}
        if path not in self.files:
            return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path,
                    **commit}
        size = self.files[path].stat().st_size
        return {"type": "file", "oid": self.blob[path], "size": size, "path": path,
                "lfs": {"oid": self.sha256[path], "size": size, "pointerSize": 134}, **commit}

    def info(self) -> dict[str, Any]:
        info = {"_id": self.sha[:24], "id": self.repo_id, "author": self.repo_id.split("/")[0], "sha": self.sha,
                "lastModified": DATE, "createdAt": DATE, "private": False, "gated": False, "disabled": False,
                "downloads": 0, "likes": 0, "tags": [], "siblings": [{"rfilename": p} for p in self.files]}
        return info | ({"modelId": self.repo_id} if self.kind == "models" else {})


class _LoopbackServer:
    """A server on 127.0.0.1 (port 0: any free one) from :meth:`start` to :meth:`stop`; also a context manager."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def start(self) -> _LoopbackServer:
        self._httpd = serve(self.port, self._handler())
        self.port = self._httpd.server_address[1]
        return self

    def stop(self) -> None:
        """Close the listening socket: new connections are refused."""
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> _LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HubServer(_LoopbackServer):
    """Serves the repositories under ``root``; each is read at its first request (so it must be complete by then)
    and again after each commit it receives."""

    def __init__(self, root: Path, port: int = 0) -> None:
        super().__init__(port)
        self.root = Path(root)
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status), for the tests
        self._repos: dict[tuple[str, str], Repo | None] = {}
        self._lock = threading.Lock()

    def repo(self, kind: str, repo_id: str) -> Repo | None:
        with self._lock:
            if (kind, repo_id) not in self._repos:
                folder = self.root / kind / repo_id
                found = repo_id.count("/") == 1 and folder.is_dir()
                self._repos[kind, repo_id] = Repo(kind, repo_id, folder) if found else None
            return self._repos[kind, repo_id]

    def repo_url(self, kind: str, repo_id: str) -> str:
        """The repository's page, as the Hub names it: the client takes the repository's id back from it."""
        return f"{self.url}/{'datasets/' if kind == 'datasets' else ''}{repo_id}"

    def create(self, kind: str, repo_id: str) -> bool:
        """Make an empty repository; False if it exists already (a folder under ``root``, or made before)."""
        folder = self.root / kind / repo_id
        with self._lock:
            if folder.is_dir():
                return False
            folder.mkdir(parents=True)
            self._repos[kind, repo_id] = Repo(kind, repo_id, folder)  # replaces a "not found" remembered before
            return True

    def commit(self, repo: Repo, files: dict[str, bytes]) -> Repo:
        """Write ``files`` (path in the repository -> content) into ``repo``'s folder and read it again.

        A file that is a symlink is replaced, not written through: a fixture's files may be links to the
        test assets. The repository read again has a new sha, so clients see a new revision.
        """
        folder = self.root / repo.kind / repo.repo_id
        with self._lock:
            for path, data in files.items():
                target = folder / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)
                target.write_bytes(data)
            self._repos[repo.kind, repo.repo_id] = Repo(repo.kind, repo.repo_id, folder)
            return self._repos[repo.kind, repo.repo_id]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return _hub_handler(self)


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True  # a proxy restarted after an outage takes its port back
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (or a connection the proxy cut) is not worth a traceback."""


def serve(port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """A threaded HTTP/1.1 server on 127.0.0.1:``port`` (0: any free port), serving in a daemon thread."""
    httpd = _Server(("127.0.0.1", port), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return httpd


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub

    def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
        pass

    def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        """Answer with ``body``; a HEAD answer says the length of the body a GET would get."""
        headers = dict(headers or {})
        length = headers.pop("Content-Length", None) if self.command == "HEAD" else None
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", length or str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _hub_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Quiet):
        def do_HEAD(self) -> None:
            self.route()

        def do_GET(self) -> None:
            self.route()

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.route(body)

        def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            hub.requests.append((self.command, self.path, status))
            super().send(status, body, headers)

        def error(self, code: str, message: str, status: int = 404, **fields: str) -> None:
            self.send(status, json.dumps({"error": message, **fields}).encode(),
                      {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"})

        def json(self, value: Any) -> None:
            self.send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

        def route(self, body: bytes = b"") -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            if self.command == "POST" and parts == ["api", "repos", "create"]:
                return self.create(json.loads(body or b"{}"))
            if self.command == "POST" and parts == ["api", "validate-yaml"]:
                return self.json({"errors": [], "warnings": []})
            if parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets"):
                return self.api(parts[1], "/".join(parts[2:4]), parts[4:], query, body)
            kind = "datasets" if parts[0] == "datasets" else "models"
            parts = parts[1:] if kind == "datasets" else parts
            if len(parts) >= 5 and parts[2] == "resolve":
                return self.resolve(kind, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
            self.error("EntryNotFound", f"no such endpoint: {url.path}")

        def create(self, form: dict[str, Any]) -> None:
            """``create_repo``: ``{"name", "organization", "type"}``, no type for a model repository."""
            kind = {"model": "models", "dataset": "datasets"}.get(form.get("type") or "model")
            repo_id = f"{form.get('organization') or ''}/{form.get('name')}"
            if kind is None or not REPO_ID.fullmatch(repo_id):
                return self.error("BadRequest", f"not covered: {form.get('type') or 'model'} repository {repo_id}", 400)
            url = hub.repo_url(kind, repo_id)
            if not hub.create(kind, repo_id):
                return self.error("Conflict", "You already created this repo", 409, url=url)
            self.json({"url": url, "name": repo_id})

        def checked(self, kind: str, repo_id: str, revision: str) -> Repo | None:
            repo = hub.repo(kind, repo_id)
            if repo is None:
                self.error("RepoNotFound", f"Repository Not Found for url: {self.path}")
            elif revision not in ("main", repo.sha):
                self.error("RevisionNotFound", f"Invalid rev id: {revision}")
                return None
            return repo

        def api(self, kind: str, repo_id: str, rest: list[str], query: dict[str, list[str]], body: bytes) -> None:
            revision = unquote(rest[1]) if len(rest) >= 2 else "main"
            repo = self.checked(kind, repo_id, revision)
            if repo is None:
                return
            expand = query.get("expand", ["false"])[0].lower() == "true"
            if not rest or rest[0] == "revision":
                return self.json(repo.info())
            if rest[0] == "tree":
                prefix = "/".join(rest[2:]).strip("/")
                if prefix and prefix not in repo.folders():
                    return self.error("EntryNotFound", f"{prefix} does not exist on {revision}")
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                paths = sorted(set(repo.files) | repo.folders())
                inside = [p for p in paths if p.startswith(f"{prefix}/" if prefix else "")]
                chosen = inside if recursive else [p for p in inside if "/" not in p[len(prefix) + bool(prefix):]]
                return self.json([repo.entry(p, expand) for p in chosen])
            if rest[0] == "paths-info":
                if self.headers.get("Content-Type", "").startswith("application/json"):
                    form = json.loads(body or b"{}")
                    wanted, expand = form.get("paths", []), bool(form.get("expand"))
                else:
                    form = parse_qs(body.decode())
                    wanted, expand = form.get("paths", []), form.get("expand", ["false"])[0].lower() == "true"
                known = set(repo.files) | repo.folders()
                return self.json([repo.entry(p.strip("/"), expand) for p in wanted if p.strip("/") in known])
            if rest[0] == "preupload":  # "lfs" would send the file to Xet storage (see the module docstring)
                files = json.loads(body)["files"]
                return self.json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                             "oid": repo.blob.get(f["path"])} for f in files]})
            if rest[0] == "commit":
                return self.commit(repo, body, query)
            self.error("EntryNotFound", f"no such endpoint: {self.path}")

        def commit(self, repo: Repo, body: bytes, query: dict[str, list[str]]) -> None:
            """The NDJSON commit: a header line (summary, description), then a ``file`` line per file, its content
            in base64 (what the client sends for a file preupload answered ``regular``)."""
            if "create_pr" in query:
                return self.error("BadRequest", "not covered: a commit that opens a pull request", 400)
            files: dict[str, bytes] = {}
            for line in body.splitlines()[1:]:
                operation = json.loads(line)
                path = operation["value"]["path"]
                if operation["key"] != "file" or any(part in ("", ".", "..") for part in path.split("/")):
                    return self.error("BadRequest", f"not covered: {operation['key']} {path}", 400)
                files[path] = base64.b64decode(operation["value"]["content"])
            repo = hub.commit(repo, files)
            self.json({"success": True, "commitOid": repo.sha,
                       "commitUrl": f"{hub.repo_url(repo.kind, repo.repo_id)}/commit/{repo.sha}"})

        def resolve(self, kind: str, repo_id: str, revision: str, path: str) -> None:
            repo = self.checked(kind, repo_id, revision)
            if repo is None:
                return
            if path not in repo.files:
                return self.error("EntryNotFound", f"{path} does not exist on {revision}")
            data = repo.files[path].read_bytes()
            headers = {"ETag": f'"{repo.sha256[path]}"', "X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            if self.command == "HEAD":
                return self.send(200, b"", {**headers, "Content-Length": str(len(data))})
            wanted = self.headers.get("Range")
            if not wanted:
                return self.send(200, data, headers)
            first, _, last = wanted.removeprefix("bytes=").partition("-")
            start = len(data) - int(last) if not first else int(first)
            end = len(data) - 1 if not first or not last else min(int(last), len(data) - 1)
            if start >= len(data) or start < 0 or end < start:
                return self.send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
            self.send(206, data[start:end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})

    return Handler


# A fault for a request: "reset" (the connection is cut halfway through the body), "error" (503),
# "stall" (no answer for FaultProxy.stall_s), or None (forwarded as it is).
FaultPlan = Callable[[str, str, int], str | None]


class FaultProxy(_LoopbackServer):
    """Forwards HTTP requests to ``upstream`` and breaks those ``plan(method, path, n)`` names.

    ``n`` counts the requests the proxy has seen (from 0). :meth:`stop` refuses new connections
    (an outage); :meth:`start` on the same port ends it. ``latency_s`` delays every answer.
    """

    def __init__(self, upstream: str, plan: FaultPlan | None = None, stall_s: float = 30.0, port: int = 0,
                 latency_s: float = 0.0) -> None:
        super().__init__(port)
        self.upstream = urlsplit(upstream).netloc
        self.plan, self.stall_s = plan or (lambda method, path, n: None), stall_s
        self.latency_s = latency_s  # added to every request, as a round trip to a distant host
        self.seen = 0
        self.faults: list[tuple[str, str]] = []  # (fault, path) injected so far
        self._lock = threading.Lock()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return _proxy_handler(self)

    def decide(self, method: str, path: str) -> str | None:
        with self._lock:
            fault, self.seen = self.plan(method, path, self.seen), self.seen + 1
            if fault:
                self.faults.append((fault, path))
            return fault


def _proxy_handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_Quiet):
        def do_HEAD(self) -> None:
            self.forward()

        def do_GET(self) -> None:
            self.forward()

        def do_POST(self) -> None:
            self.forward(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

        def forward(self, body: bytes | None = None) -> None:
            fault = proxy.decide(self.command, self.path)
            time.sleep(proxy.latency_s)
            if fault == "error":
                return self.send(503, b"Service Unavailable", {"Content-Type": "text/plain"})
            if fault == "stall":
                time.sleep(proxy.stall_s)
            connection = http.client.HTTPConnection(proxy.upstream, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            connection.close()
            dropped = ("connection", "transfer-encoding") + (() if self.command == "HEAD" else ("content-length",))
            passed = {k: v for k, v in response.getheaders() if k.lower() not in dropped}
            if fault != "reset" or self.command == "HEAD" or len(data) < 2:
                return self.send(response.status, data, passed)
            self.send_response(response.status)
            for key, value in passed.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            # SO_LINGER 0: close with a TCP reset, as a dropped connection reaches the client.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True

    return Handler
