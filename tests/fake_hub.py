"""A fake Hugging Face hub on 127.0.0.1 answering what `hf_hub_download` asks for.

Routes: HEAD/GET `/{org}/{name}/resolve/{revision}/{file}` (models) and
`/datasets/{org}/{name}/resolve/...`, with the headers huggingface_hub reads:
X-Repo-Commit, ETag and X-Linked-Etag (sha256 for "LFS" files, git blob SHA-1 otherwise),
X-Linked-Size, Content-Length, and Range requests (206 + Content-Range) for resumes.
Unknown repos answer 401 RepoNotFound, unknown files 404 EntryNotFound, gated repos 403
GatedRepo, anything else a plain 404. Faults for tests: `drop_after` closes the connection
after N body bytes (once per arm), `stall_after` sends N bytes then blocks until released,
and `advertise` lies about a file's hash. Every request is logged in `requests`.

    with FakeHub() as hub:
        hub.add_file("org/model", "w.pth", b"...")
        os.environ["HF_ENDPOINT"] = hub.endpoint
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeFile:
    data: bytes
    lfs: bool = True
    advertised: str | None = None  # a wrong hash to send instead of the real one

    @property
    def etag(self) -> str:
        if self.advertised:
            return self.advertised
        if self.lfs:
            return hashlib.sha256(self.data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()


@dataclass
class FakeRepo:
    files: dict[str, FakeFile] = field(default_factory=dict)
    gated: bool = False


class FakeHub:
    """The server plus its state; start with `with` or `start()`."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.authorizations: list[str | None] = []  # the Authorization header of each request
        self.drops: dict[str, int] = {}  # filename -> body bytes to send before closing, for the next GET
        self.stalls: dict[str, int] = {}
        self.stalled = threading.Event()  # set when a stalled GET reached its byte count
        self.release = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    def add_file(self, repo_id: str, filename: str, data: bytes, repo_type: str = "model",
                 lfs: bool = True, advertise: str | None = None) -> FakeFile:
        repo = self.repos.setdefault((repo_type, repo_id), FakeRepo())
        repo.files[filename] = FakeFile(data, lfs, advertise)
        return repo.files[filename]

    def gate(self, repo_id: str, repo_type: str = "model") -> None:
        self.repos.setdefault((repo_type, repo_id), FakeRepo()).gated = True

    def drop_after(self, filename: str, nbytes: int) -> None:
        self.drops[filename] = nbytes

    def stall_after(self, filename: str, nbytes: int) -> None:
        self.stalls[filename] = nbytes

    def gets(self, filename: str | None = None) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET" and (filename is None or r[1].endswith("/" + filename))]

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            owner = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    owner: FakeHub

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _error(self, status: int, code: str | None = None, commit: bool = False) -> None:
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
        if commit:
            self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, body: bool) -> None:
        hub = self.owner
        hub.requests.append((self.command, self.path, self.headers.get("Range")))
        hub.authorizations.append(self.headers.get("Authorization"))
        parts = unquote(self.path.split("?", 1)[0]).lstrip("/").split("/")
        repo_type = "model"
        if parts and parts[0] == "datasets":
            repo_type, parts = "dataset", parts[1:]
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404)
        repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        repo = hub.repos.get((repo_type, repo_id))
        if repo is None:
            return self._error(401, "RepoNotFound")
        if repo.gated:
            return self._error(403, "GatedRepo")
        if revision not in ("main", COMMIT):
            return self._error(404, "RevisionNotFound")
        fake = repo.files.get(filename)
        if fake is None:
            return self._error(404, "EntryNotFound", commit=True)
        data, start = fake.data, 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes="):-1])
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{fake.etag}"')
        if fake.lfs:
            self.send_header("X-Linked-Etag", f'"{fake.etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if not body:
            return
        payload = data[start:]
        if filename in hub.drops:
            cut = hub.drops.pop(filename)
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        if filename in hub.stalls:
            cut = hub.stalls.pop(filename)
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            hub.stalled.set()
            hub.release.wait(30)
            self.close_connection = True
            return
        self.wfile.write(payload)
