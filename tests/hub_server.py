"""A loopback stand-in for the Hugging Face Hub: just enough of its HTTP API for huggingface_hub 2.x to create a
model repo, upload a folder (regular, base64 NDJSON commits) and download it back (repo info, tree listing,
resolve). In memory, threaded, on 127.0.0.1 with a random port.

    with HubServer() as hub:
        hub.url          # use as HF_ENDPOINT / HfApi(endpoint=...)
        hub.repos        # {repo_id: {path: bytes}}
        hub.fail_commits = 500   # answer commits with this status (a failing upload)
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional
from urllib.parse import parse_qs, unquote, urlparse

# The user the loopback token belongs to: repos created under a bare name land in this namespace.
LOOPBACK_USER = "loopback-user"


class HubServer:
    """The in-memory Hub. Start with `with HubServer() as hub:` (or `start()` / `stop()`)."""

    def __init__(self) -> None:
        self.repos: Dict[str, Dict[str, bytes]] = {}
        self.commits: List[Dict[str, object]] = []  # every accepted commit: repo, paths, deleted, create_pr
        self.requests: List[str] = []  # "METHOD path" of every request, for assertions
        self.fail_commits: Optional[int] = None
        self.lock = threading.Lock()
        self.url = ""
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"  # use as HF_ENDPOINT / HfApi(endpoint=...)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def sha(self, repo_id: str) -> str:
        """The repo's current "commit": a hash of its content."""
        digest = hashlib.sha1()
        for path, data in sorted(self.repos[repo_id].items()):
            digest.update(path.encode() + b"\0" + hashlib.sha1(data).digest())
        return digest.hexdigest()


_RESOLVE = re.compile(r"^/(?:models/)?(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)(?P<rest>/(?:preupload|commit|revision|tree)/.*)?$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: HubServer

    def log_message(self, format, *args):  # quiet: tests read hub.requests instead
        pass

    # -- helpers ----------------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None, head: bool = False):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # A HEAD answer has no body, errors included: a stray body would corrupt the next answer on the connection.
        if not head and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: object, headers: Optional[Dict[str, str]] = None):
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _not_found(self, code: str, message: str):
        self._json(404, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # -- verbs ------------------------------------------------------------------------------------------------

    def do_HEAD(self):
        self._get(head=True)

    def do_GET(self):
        self._get(head=False)

    def _get(self, head: bool):
        hub = self.server_hub
        path = unquote(urlparse(self.path).path)
        hub.requests.append(f"{'HEAD' if head else 'GET'} {path}")
        resolve = _RESOLVE.match(path)
        if resolve and not path.startswith("/api/"):
            repo, file_path = resolve.group("repo"), resolve.group("path")
            with hub.lock:
                files = hub.repos.get(repo)
                if files is None:
                    return self._not_found("RepoNotFound", f"Repository {repo} not found")
                if file_path not in files:
                    return self._not_found("EntryNotFound", f"{file_path} does not exist in {repo}")
                data, sha = files[file_path], hub.sha(repo)
            etag = hashlib.sha1(data).hexdigest()
            headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
            return self._send(200, data, headers, head=head)
        api = _API.match(path)
        if api:
            repo, rest = api.group("repo"), api.group("rest") or ""
            with hub.lock:
                files = hub.repos.get(repo)
                if files is None:
                    return self._not_found("RepoNotFound", f"Repository {repo} not found")
                sha = hub.sha(repo)
                listing = sorted(files.items())
            if rest.startswith("/tree/"):
                entries = [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in listing
                ]
                return self._json(200, entries)
            info = {
                "id": repo,
                "modelId": repo,
                "sha": sha,
                "private": False,
                "disabled": False,
                "gated": False,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "siblings": [{"rfilename": name, "size": len(data)} for name, data in listing],
            }
            return self._json(200, info)
        self._not_found("EntryNotFound", f"no route for GET {path}")

    def do_POST(self):
        hub = self.server_hub
        path = unquote(urlparse(self.path).path)
        hub.requests.append(f"POST {path}")
        body = self._body()
        if path == "/api/repos/create":
            payload = json.loads(body or b"{}")
            # A bare name goes to the token's own namespace, as on the Hub.
            namespace = payload.get("organization") or (None if "/" in payload["name"] else LOOPBACK_USER)
            repo = f"{namespace}/{payload['name']}" if namespace else payload["name"]
            with hub.lock:
                hub.repos.setdefault(repo, {})
            return self._json(200, {"url": f"{hub.url}/{repo}", "name": repo})
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body or b"{}").get("content", ""))
        api = _API.match(path)
        if not api or not api.group("rest"):
            return self._not_found("EntryNotFound", f"no route for POST {path}")
        repo, rest = api.group("repo"), api.group("rest")
        with hub.lock:
            if repo not in hub.repos:
                return self._not_found("RepoNotFound", f"Repository {repo} not found")
        if rest.startswith("/preupload/"):
            files = json.loads(body)["files"]
            answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            return self._json(200, {"files": answer})
        if rest.startswith("/commit/"):
            if hub.fail_commits:
                return self._json(hub.fail_commits, {"error": "Internal Error - the loopback Hub was told to fail"})
            added, deleted = {}, []
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                if item["key"] == "file":
                    added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    deleted.append(item["value"]["path"])
                elif item["key"] != "header":
                    return self._json(400, {"error": f"the loopback Hub does not support {item['key']} entries"})
            with hub.lock:
                files = hub.repos[repo]
                for name in deleted:
                    for existing in [p for p in files if p == name or p.startswith(name.rstrip("/") + "/")]:
                        del files[existing]
                files.update(added)
                # A pull request's files land in the repo too: tests read `create_pr` to tell it from a commit to main.
                create_pr = parse_qs(urlparse(self.path).query).get("create_pr") == ["1"]
                hub.commits.append({"repo": repo, "paths": sorted(added), "deleted": deleted, "create_pr": create_pr})
                sha = hub.sha(repo)
            answer = {"commitUrl": f"{hub.url}/{repo}/commit/{sha}", "commitOid": sha}
            if create_pr:
                answer["pullRequestUrl"] = f"{hub.url}/{repo}/discussions/{len(hub.commits)}"
            return self._json(200, answer)
        self._not_found("EntryNotFound", f"no route for POST {path}")

    def _validate_yaml(self, content: str):
        """README.md metadata check, as the Hub does before a commit: the front matter must be a YAML mapping."""
        import yaml

        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        if match is None:
            return self._json(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError as error:
            return self._json(400, {"errors": [{"message": f"invalid YAML: {error}"}]})
        if not isinstance(metadata, dict):
            return self._json(400, {"errors": [{"message": "metadata must be a YAML mapping"}]})
        return self._json(200, {"errors": [], "warnings": []})
