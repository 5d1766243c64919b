"""Helpers for the model-file tests: tiny GGUF files and a fake Hugging Face Hub on loopback.

The fake Hub answers the requests `huggingface_hub` makes for a file download, as the real one
does: HEAD (and GET) on `/{repo}/resolve/{revision}/{file}` return, for an LFS file, a 302 to
a CDN host (here a second server, so another origin) with `X-Repo-Commit`, `X-Linked-Etag`
(the file's sha256, quoted), `X-Linked-Size` and the pointer's own `ETag`; unknown repositories
get 401 `X-Error-Code: RepoNotFound`, missing files 404 `X-Error-Code: EntryNotFound`, gated
repositories without a token 403 `X-Error-Code: GatedRepo`. The CDN serves the bytes with
`Content-Length`, `Accept-Ranges: bytes` and answers `Range: bytes=N-` with 206 and
`Content-Range`. Every request is recorded, so tests can assert what was sent.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --- tiny GGUF files -------------------------------------------------------------------------


def _gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def make_gguf(
    *,
    version: int = 3,
    n_floats: int = 4096,
    file_type: int = 15,
    architecture: str = "llama",
    tensor_count: int | None = None,
) -> bytes:
    """A small valid GGUF file: a few metadata keys and two F32 tensors."""
    kv = [
        _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string(architecture),
        _gguf_string("general.name") + struct.pack("<I", 8) + _gguf_string("tiny test model"),
        _gguf_string("general.file_type") + struct.pack("<II", 4, file_type),
        _gguf_string("tokenizer.ggml.tokens")
        + struct.pack("<IIQ", 9, 8, 3)
        + b"".join(_gguf_string(t) for t in ("<s>", "</s>", "hello")),
        _gguf_string("llama.context_length") + struct.pack("<II", 4, 2048),
    ]
    tensors = [("a.weight", [n_floats // 2], 0), ("b.weight", [n_floats // 4, 2], 0)]
    infos = b""
    offset = 0
    for name, dims, ggml_type in tensors:
        infos += _gguf_string(name) + struct.pack("<I", len(dims))
        infos += b"".join(struct.pack("<Q", d) for d in dims)
        infos += struct.pack("<IQ", ggml_type, offset)
        nbytes = 4
        for d in dims:
            nbytes *= d
        offset += -(-nbytes // 32) * 32
    count = len(tensors) if tensor_count is None else tensor_count
    header = b"GGUF" + struct.pack("<IQQ", version, count, len(kv)) + b"".join(kv) + infos
    header += b"\0" * (-len(header) % 32)
    data = (bytes(range(256)) * (offset // 256 + 1))[:offset]
    return header + data


# --- the fake Hub ----------------------------------------------------------------------------


@dataclass
class Recorded:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased


@dataclass
class FakeHub:
    """Two loopback servers: the Hub (metadata, redirects) and its CDN (the bytes)."""

    files: dict[tuple[str, str], bytes] = field(default_factory=dict)
    gated: dict[str, str] = field(default_factory=dict)  # repo -> the token that may read it
    requests: list[Recorded] = field(default_factory=list)
    cut_next_gets: int = 0  # this many CDN GETs send half the body, then drop the connection
    corrupt_body: bool = False  # the CDN flips a byte of what it sends
    ignore_range: bool = False  # the CDN answers Range requests with the whole file
    etag_override: str | None = None  # report this sha256 instead of the real one
    expire_cut_links: bool = False  # a signed link whose GET was cut answers 403 from then on
    links_signed: int = 0
    expired: set[str] = field(default_factory=set)
    endpoint: str = ""
    cdn: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, repo: str, file: str, content: bytes) -> str:
        self.files[(repo, file)] = content
        return hashlib.sha256(content).hexdigest()

    def record(self, entry: Recorded) -> None:
        with self.lock:
            self.requests.append(entry)

    def gets(self) -> list[Recorded]:
        return [r for r in self.requests if r.server == "cdn" and r.method == "GET"]

    def blob(self, sha: str) -> bytes | None:
        for content in self.files.values():
            if hashlib.sha256(content).hexdigest() == sha:
                return content
        return None


def hub_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _error(self, status: int, code: str, message: str) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _resolve(self) -> None:
            hub.record(
                Recorded(
                    "hub", self.command, self.path, {k.lower(): v for k, v in self.headers.items()}
                )
            )
            parts = self.path.split("/")
            # /owner/name/resolve/revision/file
            if len(parts) < 6 or parts[3] != "resolve":
                self._error(404, "RepoNotFound", "Repository not found")
                return
            repo, file = f"{parts[1]}/{parts[2]}", "/".join(parts[5:])
            if not any(r == repo for r, _ in hub.files):
                self._error(401, "RepoNotFound", "Repository not found")
                return
            token = hub.gated.get(repo)
            if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                self._error(403, "GatedRepo", "Access to model is restricted")
                return
            content = hub.files.get((repo, file))
            if content is None:
                self._error(404, "EntryNotFound", "Entry not found")
                return
            sha = hub.etag_override or hashlib.sha256(content).hexdigest()
            with hub.lock:
                hub.links_signed += 1
                signature = hub.links_signed
            self.send_response(302)
            blob = hashlib.sha256(content).hexdigest()
            self.send_header("Location", f"{hub.cdn}/blobs/{blob}?signature={signature}")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(len(content)))
            self.send_header("ETag", '"1234567890abcdef1234567890abcdef12345678"')  # the pointer's
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = _resolve
        do_GET = _resolve

    return Handler


def cdn_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            hub.record(
                Recorded("cdn", "GET", self.path, {k.lower(): v for k, v in self.headers.items()})
            )
            path, _, signature = self.path.partition("?signature=")
            content = hub.blob(path.rsplit("/", 1)[-1])
            if signature in hub.expired:
                self.send_response(403)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if content is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if hub.corrupt_body:
                content = bytes([content[0] ^ 0xFF]) + content[1:]
            start = 0
            range_header = self.headers.get("Range")
            if range_header and not hub.ignore_range:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                if start >= len(content):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(content)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header(
                    "Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}"
                )
            else:
                self.send_response(200)
            body = content[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            with hub.lock:
                cut = hub.cut_next_gets > 0
                hub.cut_next_gets -= 1 if cut else 0
            if cut:
                if hub.expire_cut_links:
                    hub.expired.add(signature)
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)

    return Handler


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # a client that hangs up mid-body (a test of an aborted download) is not an error
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def serve(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, threading.Thread]:
    server = _QuietServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    return server, thread
