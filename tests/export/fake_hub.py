"""A minimal Hugging Face Hub on 127.0.0.1 for tests: records every request, keeps committed files in memory.

It answers the calls ``huggingface_hub`` makes to create a repo and a branch, upload a folder
(preupload with content hashes, so unchanged files are skipped, then an NDJSON commit with
base64 file contents) and download it again (repo info, file metadata and content). Point the
client at it with ``HF_ENDPOINT=<url>`` (set before huggingface_hub is imported, e.g. in a
subprocess) or ``HfApi(endpoint=<url>)``. Unknown routes answer 404 and are recorded too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml


def git_blob_sha1(data: bytes) -> str:
    """The oid git (and the Hub, for regular files) gives a file's content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def validate_card(content: str) -> list[str]:
    """Problems in a README.md's YAML metadata header (the Hub's /api/validate-yaml, in small)."""
    if not content.startswith("---\n"):
        return ["no YAML metadata block"]
    try:
        meta = yaml.safe_load(content.split("---\n")[1])
    except yaml.YAMLError as e:
        return [f"invalid YAML: {e}"]
    if not isinstance(meta, dict):
        return ["metadata is not a mapping"]
    errors = []
    if "library_name" in meta and not isinstance(meta["library_name"], str):
        errors.append('"library_name" must be a string')
    for key in ("tags", "base_model"):
        if key in meta and not (isinstance(meta[key], (str, list)) and all(isinstance(t, str) for t in
                                                                            ([meta[key]] if isinstance(meta[key], str)
                                                                             else meta[key]))):
            errors.append(f'"{key}" must be a string or a list of strings')
    return errors


@dataclass
class Request:
    method: str
    path: str
    query: str
    authorization: str
    body: Any = None


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=lambda: {"main": ""})
    """Branch -> head commit oid ("" before the first commit)."""
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"": {}})
    """Commit oid -> the files at that commit."""
    commits: list[tuple[str, str]] = field(default_factory=list)
    """(branch, oid) of every commit, in order."""

    def files(self, rev: str) -> dict[str, bytes] | None:
        """Files at a branch or commit (None: unknown revision)."""
        return self.snapshots.get(self.branches.get(rev, rev))


class FakeHub:
    """Start with ``with FakeHub() as hub:``; ``hub.url`` is the endpoint, ``hub.requests`` the log."""

    def __init__(self):
        self.requests: list[Request] = []
        self.repos: dict[str, Repo] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def seed(self, repo_id: str, folder: Path) -> None:
        """Create ``repo_id`` holding every file under ``folder`` in one commit on main (no requests)."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        repo = self.repos.setdefault(repo_id, Repo(private=False))
        oid = hashlib.sha1(f"{repo_id}seed{len(repo.commits)}".encode()).hexdigest()
        repo.snapshots[oid], repo.branches["main"] = files, oid
        repo.commits.append(("main", oid))

    def calls(self, method: str, pattern: str) -> list[Request]:
        """Recorded requests with this method whose path matches the regex ``pattern``."""
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    # --- routes ---------------------------------------------------------------------------
    def _route(self, method: str, path: str, body: Any) -> tuple[int, dict[str, str], bytes]:
        m = re.fullmatch(r"/api/repos/create", path)
        if method == "POST" and m:
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            if repo_id in self.repos:
                return self._json({"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, 409)
            self.repos[repo_id] = Repo(private=bool(body.get("private")) or body.get("visibility") == "private")
            return self._json({"url": f"{self.url}/{repo_id}", "name": repo_id})
        if method == "POST" and path == "/api/validate-yaml":
            errors = validate_card(body["content"])
            return self._json({"errors": [{"message": e} for e in errors], "warnings": []}, 400 if errors else 200)
        m = re.fullmatch(r"/api/models/(.+?)/branch/(.+)", path)
        if method == "POST" and m:
            repo = self.repos[m[1]]
            if m[2] in repo.branches:
                return self._json({"error": "Reference already exists"}, 409)
            repo.branches[m[2]] = repo.branches["main"]
            return self._json({})
        m = re.fullmatch(r"/api/models/(.+?)/preupload/(.+)", path)
        if method == "POST" and m:
            files = self.repos[m[1]].files(unquote(m[2])) or {}
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                          "oid": git_blob_sha1(files[f["path"]]) if f["path"] in files else None}
                                         for f in body["files"]]})
        m = re.fullmatch(r"/api/models/(.+?)/commit/(.+)", path)
        if method == "POST" and m:
            repo, branch = self.repos[m[1]], unquote(m[2])
            files = dict(repo.files(branch) or {})
            for line in body:
                if line["key"] == "file":
                    files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            oid = hashlib.sha1(f"{m[1]}{len(repo.commits)}".encode()).hexdigest()
            repo.snapshots[oid], repo.branches[branch] = files, oid
            repo.commits.append((branch, oid))
            return self._json({"commitUrl": f"{self.url}/{m[1]}/commit/{oid}", "commitOid": oid, "success": True})
        m = re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)(?:/(.*))?", path)
        if method == "GET" and m and m[1] in self.repos:
            files = self.repos[m[1]].files(unquote(m[2]))
            if files is None:
                return 404, {"X-Error-Code": "RevisionNotFound"}, b"revision not found"
            return self._json([{"type": "file", "path": p, "size": len(d), "oid": git_blob_sha1(d)}
                               for p, d in sorted(files.items())])
        m = re.fullmatch(r"/api/models/(.+?)(?:/revision/(.+))?", path)
        if method == "GET" and m and m[1] in self.repos:
            repo, rev = self.repos[m[1]], unquote(m[2] or "main")
            files = repo.files(rev)
            if files is None:
                return 404, {"X-Error-Code": "RevisionNotFound"}, b"revision not found"
            sha = repo.branches.get(rev, rev) or "0" * 40
            return self._json({"id": m[1], "modelId": m[1], "sha": sha, "private": repo.private,
                               "siblings": [{"rfilename": p} for p in sorted(files)]})
        m = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
        if method in ("GET", "HEAD") and m and m[1] in self.repos:
            repo, rev = self.repos[m[1]], unquote(m[2])
            data = (repo.files(rev) or {}).get(unquote(m[3]))
            if data is None:
                return 404, {"X-Error-Code": "EntryNotFound"}, b"not found"
            headers = {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": repo.branches.get(rev, rev),
                       "Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}
            return 200, headers, data
        return 404, {"X-Error-Code": "RepoNotFound"}, b"unknown route"

    @staticmethod
    def _json(obj: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
        return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _serve(self) -> None:
                url = urlparse(self.path)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body: Any = None
                if raw:
                    text = raw.decode()
                    try:
                        body = json.loads(text)
                    except json.JSONDecodeError:
                        body = [json.loads(line) for line in text.splitlines() if line.strip()]
                hub.requests.append(Request(self.command, url.path, url.query,
                                            self.headers.get("Authorization", ""), body))
                status, headers, data = hub._route(self.command, url.path, body)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_HEAD = do_PUT = _serve

        return Handler
