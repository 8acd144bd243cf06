"""A loopback Hugging Face Hub for tests: serves a folder on disk through the Hub HTTP API.

Layout on disk: ``ROOT/models/<org>/<name>/<files>`` and ``ROOT/datasets/<org>/<name>/<files>``.
It speaks enough of the API for the real ``huggingface_hub`` 2.4 client to run ``hf_hub_download``,
``snapshot_download``, ``create_repo``, ``upload_folder``/``create_commit``, ``repo_exists``,
``file_exists`` and ``list_repo_files``, all against ``HF_ENDPOINT=http://127.0.0.1:<port>``.

Simplifications, on purpose:
- Single-revision store: a repo has exactly one commit, its files on disk. The revisions it
  answers are ``main`` and that commit's sha; every commit replaces the sha. No branches, tags, PRs.
- Every file is stored and served as a plain git blob: preupload answers "regular" for every file,
  so uploads arrive inline (base64) in the commit, and downloads are plain HTTP (no LFS, no Xet headers).
- No auth: tokens are ignored and every repo is public. No Range requests (resumed downloads).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# URL / on-disk prefix of each repo type ("model" repos have no prefix in /resolve URLs).
PREFIXES = {"model": "models", "dataset": "datasets"}
REPO_TYPES = {prefix: repo_type for repo_type, prefix in PREFIXES.items()}

_REPO = r"(?P<repo_id>[^/]+/[^/]+)"
_ROUTES = [  # (method, compiled path regex, handler method name), matched on the still-quoted path
    ("GET", rf"/api/(?P<prefix>models|datasets)/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("GET", rf"/api/(?P<prefix>models|datasets)/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", rf"/api/(?P<prefix>models|datasets)/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/(?P<prefix>models|datasets)/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("HEAD", rf"/(?:(?P<prefix>datasets)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", rf"/(?:(?P<prefix>datasets)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]
_ROUTES = [(method, re.compile(pattern + r"/?"), name) for method, pattern, name in _ROUTES]


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob: what the Hub uses as ETag and oid of a non-LFS file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class RequestLog:
    """Thread-safe log of (method, path) of every request the server answered, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[tuple[str, str]] = []

    def append(self, method: str, path: str) -> None:
        with self._lock:
            self._entries.append((method, path))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def entries(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        return len(self.entries())


class HubServer:
    """The loopback Hub: ``with HubServer(root) as hub: ...`` serves ``root`` at ``hub.url``."""

    def __init__(self, root: str | Path, port: int = 0) -> None:
        self.root = Path(root)
        self.requests = RequestLog()
        self._lock = threading.RLock()  # guards the files on disk and the commit shas
        self._shas: dict[tuple[str, str], str] = {}
        self._commits = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    def repo_dir(self, repo_id: str, repo_type: str = "model") -> Path:
        return self.root / PREFIXES[repo_type] / repo_id

    def add_repo(self, repo_id: str, folder: str | Path, repo_type: str = "model") -> str:
        """Create or replace a repo with a copy of ``folder``; return its new commit sha."""
        with self._lock:
            target = self.repo_dir(repo_id, repo_type)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(folder, target)
            return self._new_commit(repo_id, repo_type)

    def commit_sha(self, repo_id: str, repo_type: str = "model") -> str | None:
        """The current commit of a repo (a repo put on disk by hand gets one), None if there is no repo."""
        with self._lock:
            if not self.repo_dir(repo_id, repo_type).is_dir():
                return None
            return self._shas.get((repo_type, repo_id)) or self._new_commit(repo_id, repo_type)

    def files(self, repo_id: str, repo_type: str = "model") -> list[str]:
        """Paths of every file in a repo, '/'-separated and sorted."""
        base = self.repo_dir(repo_id, repo_type)
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())

    def _new_commit(self, repo_id: str, repo_type: str) -> str:
        self._commits += 1
        sha = hashlib.sha1(f"{repo_type}/{repo_id}#{self._commits}".encode()).hexdigest()
        self._shas[(repo_type, repo_id)] = sha
        return sha


class _HubError(Exception):
    """An error answered the way the Hub does: status + X-Error-Code, which the client maps to its exceptions."""

    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0, BaseHTTPRequestHandler's default: one request per connection, no keep-alive bookkeeping.
    server_version = "LoopbackHub/1.0"

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - keep test output quiet
        pass

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.hub.requests.append(method, url.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)  # the client always sends a length
        self.body = self.rfile.read(length) if length else b""
        try:
            for route_method, pattern, name in _ROUTES:
                match = pattern.fullmatch(url.path)
                if route_method == method and match:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    return getattr(self, name)(**args)
            raise _HubError(404, None, f"no route for {method} {url.path}")
        except _HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:  # lets the client cache "this file does not exist at this commit"
                headers["X-Repo-Commit"] = e.commit
            self._send(e.status, json.dumps({"error": e.message}).encode(), headers)

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: object, status: int = 200) -> None:
        self._send(status, json.dumps(data).encode())

    def _repo(self, repo_id: str, repo_type: str, rev: str | None) -> tuple[Path, str]:
        """The repo folder and its commit sha; RepoNotFound / RevisionNotFound as the Hub answers them."""
        sha = self.hub.commit_sha(repo_id, repo_type)
        if sha is None:
            raise _HubError(404, "RepoNotFound", f"Repository not found: {repo_type} {repo_id}")
        if rev not in (None, "main", sha):
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return self.hub.repo_dir(repo_id, repo_type), sha

    # --- downloads -------------------------------------------------------------------------------
    def repo_info(self, prefix: str, repo_id: str, rev: str | None = None) -> None:
        """model_info/dataset_info: snapshot_download and repo_exists resolve a revision to a sha here."""
        repo_type = REPO_TYPES[prefix]
        _, sha = self._repo(repo_id, repo_type, rev)
        siblings = [{"rfilename": path} for path in self.hub.files(repo_id, repo_type)]
        self._json({"id": repo_id, "sha": sha, "private": False, "siblings": siblings})

    def tree(self, prefix: str, repo_id: str, rev: str, path: str = "") -> None:
        """list_repo_tree: snapshot_download and list_repo_files get the file list (one page, no Link)."""
        repo_type = REPO_TYPES[prefix]
        base, _ = self._repo(repo_id, repo_type, rev)
        start = (base / path) if path else base
        if not start.is_dir():
            raise _HubError(404, "EntryNotFound", f"{path} does not exist")
        recursive = self.query.get("recursive", "false").lower() == "true"
        entries = []
        for item in sorted(start.rglob("*") if recursive else start.iterdir()):
            rel = item.relative_to(base).as_posix()
            if item.is_file():
                data = item.read_bytes()
                entries.append({"type": "file", "path": rel, "size": len(data), "oid": git_blob_sha(data)})
            else:
                entries.append({"type": "directory", "path": rel, "size": 0, "oid": git_blob_sha(rel.encode())})
        self._json(entries)

    def resolve(self, repo_id: str, rev: str, path: str, prefix: str = "models") -> None:
        """HEAD gives hf_hub_download its metadata (X-Repo-Commit, ETag, size); GET gives the bytes."""
        repo_type = REPO_TYPES[prefix]
        base, sha = self._repo(repo_id, repo_type, rev)
        file = base / path
        if ".." in Path(path).parts or not file.is_file():
            raise _HubError(404, "EntryNotFound", f"{path} does not exist at {sha}", commit=sha)
        data = file.read_bytes()
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": sha,
                   "ETag": f'"{git_blob_sha(data)}"'}
        self._send(200, data, headers)

    # --- uploads ---------------------------------------------------------------------------------
    def create_repo(self) -> None:
        """create_repo: 409 (with the url) when it exists, which exist_ok=True accepts."""
        payload = json.loads(self.body)
        repo_type = payload.get("type") or "model"
        if repo_type not in PREFIXES:
            raise _HubError(400, None, f"repo type {repo_type!r} not supported by the loopback hub")
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.hub.url}/{'' if repo_type == 'model' else 'datasets/'}{repo_id}"
        with self.hub._lock:
            folder = self.hub.repo_dir(repo_id, repo_type)
            if folder.is_dir():
                return self._json({"error": "You already created this repo", "url": url}, status=409)
            folder.mkdir(parents=True)
            self.hub._new_commit(repo_id, repo_type)
        self._json({"url": url, "name": repo_id})

    def validate_yaml(self) -> None:
        """upload_folder validates a README.md's metadata here first; we accept any."""
        self._json({"errors": [], "warnings": []})

    def preupload(self, prefix: str, repo_id: str, rev: str) -> None:
        """create_commit asks how to send each file: always "regular" (inline), with the remote oid if any."""
        base, _ = self._repo(repo_id, REPO_TYPES[prefix], rev)
        files = []
        for f in json.loads(self.body)["files"]:
            existing = base / f["path"]
            oid = git_blob_sha(existing.read_bytes()) if existing.is_file() else None
            files.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._json({"files": files, "commitOid": None})

    def commit(self, prefix: str, repo_id: str, rev: str) -> None:
        """create_commit: an ndjson header line then one line per added/deleted file; makes a new sha."""
        repo_type = REPO_TYPES[prefix]
        if "create_pr" in self.query:
            raise _HubError(400, None, "pull requests are not supported by the loopback hub")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        with self.hub._lock:
            base, _ = self._repo(repo_id, repo_type, rev)
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    continue
                target = base / value["path"]
                if ".." in Path(value["path"]).parts:
                    raise _HubError(400, None, f"bad path {value['path']!r}")
                if key == "file":
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(value["content"]))
                elif key == "deletedFile":
                    target.unlink(missing_ok=True)
                elif key == "deletedFolder":
                    shutil.rmtree(target, ignore_errors=True)
                else:  # lfsFile: never asked for, since preupload says "regular"
                    raise _HubError(400, None, f"commit key {key!r} not supported by the loopback hub")
            sha = self.hub._new_commit(repo_id, repo_type)
        url_prefix = "" if repo_type == "model" else "datasets/"
        self._json({"commitUrl": f"{self.hub.url}/{url_prefix}{repo_id}/commit/{sha}", "commitOid": sha,
                    "pullRequestUrl": None})
