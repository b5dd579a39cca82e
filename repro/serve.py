"""Serve a trained model over HTTP with an OpenAI-style completions endpoint.

    python repro/serve.py --checkpoint RUN_OR_CKPT [--host 127.0.0.1] [--port 8000]
                          [--max-workers 32] [--backlog 128] [--read-timeout 10]

    GET  /health            {"status": "ok"}
    GET  /v1/models         the one model served, with its context length
    POST /v1/completions    OpenAI's request and response (`repro/completions.py`); "stream": true sends
                            Server-Sent Events, `data: {chunk}` per token and a last `data: [DONE]`

The standard library's threading HTTP server: each connection gets a thread, and a lock lets one
request at a time use the model. At most `max_workers` connections are served at once; a burst
beyond that is queued, not refused: the server stops accepting until a worker frees up, and the
waiting connections sit in the listen backlog (`backlog` of them; the kernel caps it at
net.core.somaxconn), so each is answered late rather than reset or given a 503; a client's own
timeout bounds its wait. A client that stalls for `read_timeout` seconds while sending its request
is dropped, and one that sends fewer body bytes than its Content-Length gets a 408.

Requests are checked before any generation; a bad one gets an OpenAI-style
`{"error": {"message", "type", "param", "code"}}` with a 4xx status, and an error inside generation
a 500 that is logged; the server keeps serving either way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from argparse import ArgumentError
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from jsonargparse import ArgumentParser
from jsonargparse.typing import PositiveFloat, PositiveInt
from tokenizers import Tokenizer

from modules.nn import Decoder
from repro.checkpoints import load_model, locate
from repro.completions import MAX_PROMPTS, Completions, RequestError
from repro.config import ConfigError

log = logging.getLogger("repro.serve")

MAX_BODY_BYTES = 1 << 20  # a larger body gets 413
MAX_WORKERS = 32  # connections served at once; generation is one at a time, so most of them wait on the model
BACKLOG = 128  # connections the kernel queues while every worker is busy
READ_TIMEOUT = 10.0  # seconds a client may stall while sending its request (or not read its answer)


class Handler(BaseHTTPRequestHandler):
    """One connection: routes a request to the server's `Completions`, answers in JSON or SSE."""

    server: _HTTPServer
    server_version = "llm-repro"
    ROUTES = {"/health": "GET", "/v1/models": "GET", "/v1/completions": "POST"}

    def setup(self) -> None:
        self.timeout = self.server.read_timeout  # the socket's timeout, on every read and write
        super().setup()

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    do_PUT = do_DELETE = do_PATCH = do_POST

    def _handle(self) -> None:
        path = urlsplit(self.path).path
        try:
            if path not in self.ROUTES:
                raise RequestError(404, f"no route {path}; this server has {', '.join(self.ROUTES)}", None, "not_found")
            if self.command != self.ROUTES[path]:
                raise RequestError(405, f"{path} takes {self.ROUTES[path]}, not {self.command}", None,
                                   "method_not_allowed", {"Allow": self.ROUTES[path]})
            if path == "/health":
                self._send_json(200, {"status": "ok"})
            elif path == "/v1/models":
                self._send_json(200, self._models())
            else:
                self._completions()
        except RequestError as err:
            self._send_json(err.status, err.body(), err.headers)
        except (ConnectionError, TimeoutError):
            log.info("%s closed the connection or stopped reading it", self.address_string())
        except Exception as err:
            log.exception("internal error on %s %s", self.command, self.path)
            error = RequestError(500, f"internal error: {type(err).__name__}: {err}", None, "internal_error")
            with contextlib.suppress(OSError):
                self._send_json(500, error.body())

    def _models(self) -> dict[str, Any]:
        completions = self.server.completions
        return {"object": "list", "data": [{"id": completions.name, "object": "model", "created": self.server.started,
                                            "owned_by": "llm-repro", "max_model_len": completions.block_size}]}

    def _completions(self) -> None:
        completions = self.server.completions
        request = completions.parse(self._read_json())
        if not request.stream:
            self._send_json(200, completions.complete(request))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
        with contextlib.closing(completions.stream(request)) as chunks:
            try:
                for chunk in chunks:
                    self._send_event(json.dumps(chunk))
            except (ConnectionError, TimeoutError):  # the client went away: nothing more to send it
                raise
            except Exception as err:  # the status line is sent: the error goes in the stream
                log.exception("internal error while streaming")
                self._send_event(json.dumps(RequestError(500, f"internal error: {type(err).__name__}: {err}", None,
                                                         "internal_error").body()))
                return
        self._send_event("[DONE]")

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "a request body needs a Content-Length header", None, "length_required")
        if not length.isdigit():
            raise RequestError(400, f"Content-Length {length!r} is not a byte count", None, "invalid_header")
        size, limit = int(length), self.server.max_body_bytes
        if size > limit:
            # read it, so that a client still sending gets the answer rather than a reset connection
            unread = size if size <= 16 * limit else 0
            with contextlib.suppress(TimeoutError):
                while unread > 0 and (chunk := self.rfile.read(min(unread, 1 << 16))):
                    unread -= len(chunk)
            raise RequestError(413, f"the body has {length} bytes; at most {limit}", None, "request_too_large")
        try:
            body = self.rfile.read(size)
        except TimeoutError:
            self.close_connection = True  # the stalled body's bytes may still come: nothing more is read
            raise RequestError(408, f"the body stalled before its {size} bytes (Content-Length) arrived; "
                                    f"this server waits {self.server.read_timeout:g} s", None, "request_timeout")
        if len(body) < size:
            raise RequestError(400, f"the body ended after {len(body)} of its {size} bytes (Content-Length)", None,
                               "incomplete_body")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(400, f"the body is not valid JSON: {err}", None, "invalid_json") from err

    def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_event(self, data: str) -> None:
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors http.server finds itself (a malformed request line, an unknown method) in the same JSON."""
        self.close_connection = True
        error = RequestError(code, message or explain or self.responses.get(code, ("error",))[0])
        self._send_json(code, error.body())

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), fmt % args)


class _HTTPServer(ThreadingHTTPServer):
    """The listening socket, with what every handler reads, and a thread per connection for at most
    `max_workers` connections at once: while that many are served, the accept loop waits and new
    connections queue in the listen backlog."""

    def __init__(self, address: tuple[str, int], completions: Completions, max_body_bytes: int,
                 max_workers: int, backlog: int, read_timeout: float) -> None:
        self.completions, self.max_body_bytes, self.started = completions, max_body_bytes, int(time.time())
        self.read_timeout, self.request_queue_size = read_timeout, backlog  # listen(request_queue_size)
        self._workers = threading.BoundedSemaphore(max_workers)
        self._stopping = threading.Event()
        super().__init__(address, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        while not self._workers.acquire(timeout=0.1):  # wakes to let shutdown() stop a full server
            if self._stopping.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nothing else frees the worker
            self._workers.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._workers.release()

    def shutdown(self) -> None:
        self._stopping.set()
        super().shutdown()


class Server:
    """An HTTP server for one model (in eval mode, on its device): `start()` serves from a background
    thread, `stop()` closes it.

        with Server(model, tokenizer, "tiny", port=0) as server:   # port 0: any free port
            urllib.request.urlopen(server.url + "/health")
    """

    def __init__(
        self,
        model: Decoder,
        tokenizer: Tokenizer,
        model_name: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_prompts: int = MAX_PROMPTS,
        max_workers: int = MAX_WORKERS,
        backlog: int = BACKLOG,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        if max_workers < 1 or backlog < 1 or not read_timeout > 0:
            raise ValueError(f"max_workers ({max_workers}) and backlog ({backlog}) must be at least 1 and "
                             f"read_timeout ({read_timeout}) above 0")
        self.completions = Completions(model, tokenizer, model_name, max_prompts)
        self.host, self.port, self.max_body_bytes = host, port, max_body_bytes
        self.max_workers, self.backlog, self.read_timeout = max_workers, backlog, read_timeout
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", arm: str | None = None,
                        model_name: str | None = None, **options: Any) -> Server:
        """A server for a run folder (its final, else last checkpoint) or a .ckpt; named after the run folder."""
        model, tokenizer = load_model(path, device, arm)
        return cls(model, tokenizer, model_name or locate(path)[1].name, **options)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def bind(self) -> Server:
        """Open the listening socket (OSError if the address is taken); `port` becomes the bound one."""
        self._httpd = _HTTPServer((self.host, self.port), self.completions, self.max_body_bytes, self.max_workers,
                                  self.backlog, self.read_timeout)
        self.port = self._httpd.server_address[1]
        return self

    def start(self) -> Server:
        """Serve from a daemon thread; returns at once, listening."""
        if self._thread is not None:
            raise RuntimeError(f"already serving at {self.url}")
        if self._httpd is None:
            self.bind()
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=f"serve-{self.port}", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve from this thread until interrupted (Ctrl-C), then close the socket."""
        if self._httpd is None:
            self.bind()
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()
            self._httpd = None

    def stop(self) -> None:
        """Stop accepting, close the socket and wait for the serving thread; requests in flight are cut off."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        if self._httpd is not None:
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="repro/serve.py", description=__doc__, exit_on_error=False)
    p.add_argument("--checkpoint", type=str, required=True, help="run folder (final, else last checkpoint) or a .ckpt")
    p.add_argument("--host", type=str, default="127.0.0.1", help="0.0.0.0 listens on every interface")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    p.add_argument("--name", type=str, default=None, help="the model's name in requests; default: the run folder's")
    p.add_argument("--arm", type=str, default=None, help="one of the models a run trained side by side (SFT: full, lora)")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-workers", type=PositiveInt, default=MAX_WORKERS,
                   help="connections served at once; more are queued (not refused) until one finishes")
    p.add_argument("--backlog", type=PositiveInt, default=BACKLOG,
                   help="connections the kernel queues while every worker is busy (capped at net.core.somaxconn)")
    p.add_argument("--read-timeout", type=PositiveFloat, default=READ_TIMEOUT,
                   help="seconds a client may stall sending its request or reading the answer; a body "
                        "shorter than its Content-Length gets 408 after this")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        args = parser().parse_args(argv)
        server = Server.from_checkpoint(args.checkpoint, args.device, args.arm, args.name, host=args.host,
                                        port=args.port, max_workers=args.max_workers, backlog=args.backlog,
                                        read_timeout=args.read_timeout).bind()
    except (ConfigError, ArgumentError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"serving {server.completions.name} at {server.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
