"""The completions server on loopback: its texts are `generate`'s, streamed or not; bad requests get a
clear 4xx and leave it serving; stop() closes the port; the command line serves a trained run."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from datamodules.tokenizer import EOT_ID, train_bpe
from modules.decoding.generation import generate, generate_text, truncate_at_stop
from modules.nn import Decoder, DecoderConfig
from repro import completions, serve
from repro.completions import settled_length
from repro.serve import Server

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 48
PROMPTS = ["The cat sat", "Once upon a time", "def main(", "x"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe(["The cat sat on the mat. Once upon a time there was a function: def main(): return 0\n" * 40], 300)


@pytest.fixture(scope="module")
def model(tokenizer: Tokenizer) -> Decoder:
    """A random decoder, its head untied from the embeddings (tied, it repeats the last token), that
    picks only tokens that decode to printable text: left alone it mostly picks lone UTF-8 bytes,
    which decode to U+FFFD and leave nothing to compare or cut."""
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=tokenizer.get_vocab_size(), block_size=BLOCK, n_layer=2, n_head=2, n_embd=32,
                           tie_embeddings=False)
    decoder = Decoder(config).eval()
    texts = [tokenizer.decode([i]) for i in range(config.vocab_size)]
    printable = torch.tensor([t != "" and "\ufffd" not in t and t.isprintable() for t in texts])
    with torch.no_grad():  # the other logits become 0, far below the largest of ~100 random ones
        decoder.lm_head.weight[: config.vocab_size] *= torch.where(printable, 4.0, 0.0)[:, None]
    return decoder


@pytest.fixture(scope="module")
def server(model: Decoder, tokenizer: Tokenizer) -> Server:
    with Server(model, tokenizer, "tiny", port=0, max_body_bytes=4096) as running:
        yield running


def request(url: str, body: object = None, method: str | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one request; a JSON `body` or `raw` bytes is sent as POST."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def complete(server: Server, **body: object) -> dict:
    status, response = request(server.url + "/v1/completions", body)
    assert status == 200, response
    return response


def stream(server: Server, **body: object) -> list[dict]:
    """The chunks of a streamed completion; the stream must end with `data: [DONE]`."""
    req = urllib.request.Request(server.url + "/v1/completions", json.dumps({**body, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=30) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: ") for event in events[:-1])
    return [json.loads(event.removeprefix("data: ")) for event in events[:-2]]


def streamed_texts(chunks: list[dict]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


def test_health_and_models(server: Server) -> None:
    assert request(server.url + "/health") == (200, {"status": "ok"})
    status, models = request(server.url + "/v1/models")
    assert status == 200 and models["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in models["data"]] == [("tiny", "model", BLOCK)]


def test_completion_is_the_greedy_generation(server: Server, model: Decoder, tokenizer: Tokenizer) -> None:
    response = complete(server, model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    ids = tokenizer.encode(PROMPTS[0]).ids
    new = generate(model, [ids], 12, eos_id=EOT_ID)[0]
    assert response["object"] == "text_completion" and response["id"].startswith("cmpl-")
    assert response["model"] == "tiny" and isinstance(response["created"], int)
    assert response["choices"] == [{"text": tokenizer.decode(new), "index": 0, "logprobs": None,
                                    "finish_reason": "stop" if new[-1] == EOT_ID else "length"}]
    assert response["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(new),
                                 "total_tokens": len(ids) + len(new)}
    # the same prompt as token ids; without max_tokens, OpenAI's default of 16
    by_ids = complete(server, prompt=ids, temperature=0)
    assert by_ids["choices"][0]["text"] == generate_text(model, tokenizer, PROMPTS[:1], 16, eos_id=EOT_ID)[0]


def test_a_list_of_prompts_is_one_choice_each(server: Server, model: Decoder, tokenizer: Tokenizer) -> None:
    response = complete(server, prompt=PROMPTS, max_tokens=10, temperature=0)
    expected = generate_text(model, tokenizer, PROMPTS, 10, eos_id=EOT_ID)
    assert [c["index"] for c in response["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in response["choices"]] == expected
    assert response["usage"]["prompt_tokens"] == sum(len(tokenizer.encode(p).ids) for p in PROMPTS)


def test_stop_sequences_cut_the_text(server: Server) -> None:
    text = complete(server, prompt=PROMPTS[1], max_tokens=20, temperature=0)["choices"][0]["text"]
    assert len(text) > 8, "the tiny model's greedy text is too short to cut"
    stop = text[6:8]
    for stops in (stop, ["never in it", stop]):
        choice = complete(server, prompt=PROMPTS[1], max_tokens=20, temperature=0, stop=stops)["choices"][0]
        assert choice == {"text": truncate_at_stop(text, [stop]), "index": 0, "logprobs": None, "finish_reason": "stop"}
        assert len(choice["text"]) <= 6


def test_streamed_chunks_join_into_the_completion(server: Server) -> None:
    text = complete(server, prompt=PROMPTS[1], max_tokens=20, temperature=0)["choices"][0]["text"]
    cases = [
        dict(prompt=PROMPTS[1], max_tokens=20, temperature=0),
        dict(prompt=PROMPTS[1], max_tokens=20, temperature=0, stop=[text[6:8], "never in it"]),
        dict(prompt=PROMPTS, max_tokens=10, temperature=0),
        dict(prompt=PROMPTS[2], max_tokens=24, temperature=1.0, top_k=50, top_p=0.9, seed=3),
    ]
    for body in cases:
        whole = complete(server, **body)
        chunks = stream(server, **body)
        assert len(chunks) > len(whole["choices"]), "one chunk per token, not the whole text at once"
        assert {chunk["id"] for chunk in chunks} == {chunks[0]["id"]}
        assert streamed_texts(chunks) == {c["index"]: c["text"] for c in whole["choices"]}
        finishes = {c["index"]: c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]}
        assert finishes == {c["index"]: c["finish_reason"] for c in whole["choices"]}
    sampled = cases[-1]
    assert complete(server, **sampled)["choices"] == complete(server, **sampled)["choices"]  # the seed repeats
    assert complete(server, **{**sampled, "seed": 4})["choices"] != complete(server, **sampled)["choices"]
    last = stream(server, prompt="x", max_tokens=5, temperature=0, stream_options={"include_usage": True})[-1]
    assert last["choices"] == [] and last["usage"]["prompt_tokens"] == 1
    assert last["usage"]["total_tokens"] == 1 + last["usage"]["completion_tokens"] <= 6


def test_settled_length_holds_back_what_a_later_token_may_change() -> None:
    assert settled_length("abc", ()) == 3
    assert settled_length("abc\ufffd", ()) == 3  # a character whose bytes are not all there
    assert settled_length("ab\n", ("\n\n",)) == 2  # may become the stop string
    assert settled_length("ab\nEN", ("\nEND", "xyz")) == 2


TOO_LONG = " ".join(["cat"] * BLOCK)
MALFORMED = [  # (method, path, body, status, code, param)
    ("POST", "/v1/completions", b"{not json", 400, "invalid_json", None),
    ("POST", "/v1/completions", b"[1, 2]", 400, None, None),
    ("POST", "/v1/completions", {}, 400, "missing_field", "prompt"),
    ("POST", "/v1/completions", {"prompt": 5}, 400, "invalid_value", "prompt"),
    ("POST", "/v1/completions", {"prompt": ""}, 400, "empty_prompt", "prompt"),
    ("POST", "/v1/completions", {"prompt": []}, 400, "invalid_value", "prompt"),
    ("POST", "/v1/completions", {"prompt": [1, 10**6]}, 400, "invalid_value", "prompt"),
    ("POST", "/v1/completions", {"prompt": TOO_LONG}, 400, "context_length_exceeded", "prompt"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "invalid_value", "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "invalid_value", "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": True}, 400, "invalid_value", "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1000}, 400, "context_length_exceeded", "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "n": 2}, 400, "unsupported_value", "n"),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "invalid_value", "temperature"),
    ("POST", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "invalid_value", "top_p"),
    ("POST", "/v1/completions", {"prompt": "x", "stop": 3}, 400, "invalid_value", "stop"),
    ("POST", "/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "invalid_value", "stream"),
    ("POST", "/v1/completions", {"prompt": "x", "echo": True}, 400, "unsupported_value", "echo"),
    ("POST", "/v1/completions", {"prompt": "x", "temprature": 0}, 400, "unknown_field", "temprature"),
    ("POST", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model_not_found", "model"),
    ("POST", "/v1/completions", b"{" + b" " * 5000 + b"}", 413, "request_too_large", None),
    ("GET", "/v1/nowhere", None, 404, "not_found", None),
    ("GET", "/v1/completions", None, 405, "method_not_allowed", None),
    ("POST", "/health", {"prompt": "x"}, 405, "method_not_allowed", None),
    ("DELETE", "/v1/models", None, 405, "method_not_allowed", None),
]


def test_malformed_requests_get_a_4xx_and_the_server_keeps_serving(server: Server) -> None:
    for method, path, body, status, code, param in MALFORMED:
        raw = body if isinstance(body, bytes) else None
        got, response = request(server.url + path, None if raw else body, method, raw)
        assert got == status, (method, path, body, response)
        error = response["error"]
        assert error["code"] == code and error["param"] == param, (body, error)
        assert error["type"] == "invalid_request_error" and len(error["message"]) > 10
    host, port = server.host, server.port
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(server.url + "/v1/completions", method="GET"))
    assert refused.value.headers["Allow"] == "POST"
    no_length = http.client.HTTPConnection(host, port, timeout=30)  # a body without Content-Length: 411
    no_length.putrequest("POST", "/v1/completions")
    no_length.endheaders()
    assert no_length.getresponse().status == 411
    unknown = http.client.HTTPConnection(host, port, timeout=30)  # a method http.server has no handler for
    unknown.request("BREW", "/health")
    reply = unknown.getresponse()
    assert reply.status == 501 and "error" in json.loads(reply.read())
    assert complete(server, prompt="x", max_tokens=3, temperature=0)["choices"][0]["finish_reason"] in ("length", "stop")


def test_an_internal_error_is_a_500_and_is_logged(server: Server, monkeypatch, caplog) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("the model broke")

    monkeypatch.setattr(completions, "generate", broken)
    monkeypatch.setattr(completions, "stream_tokens", broken)
    status, response = request(server.url + "/v1/completions", {"prompt": "x"})
    assert status == 500 and response["error"]["type"] == "server_error"
    assert "RuntimeError: the model broke" in response["error"]["message"]
    req = urllib.request.Request(server.url + "/v1/completions", json.dumps({"prompt": "x", "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=30) as streamed:  # the status went out before the error
        assert "the model broke" in json.loads(streamed.read().decode().removeprefix("data: "))["error"]["message"]
    assert sum("internal error" in r.getMessage() for r in caplog.records) == 2
    monkeypatch.undo()
    assert complete(server, prompt="x", max_tokens=2, temperature=0)["usage"]["prompt_tokens"] == 1


def test_concurrent_requests_get_their_own_answers(server: Server, model: Decoder, tokenizer: Tokenizer) -> None:
    expected = generate_text(model, tokenizer, PROMPTS, 8, eos_id=EOT_ID)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(complete, server, prompt=PROMPTS[i % 4], max_tokens=8, temperature=0) for i in range(16)]
        texts = [f.result()["choices"][0]["text"] for f in futures]
    assert texts == [expected[i % 4] for i in range(16)]


def workers() -> int:
    """Connection threads alive now: socketserver names them after their target."""
    return sum(t.name.endswith("(process_request_thread)") for t in threading.enumerate())


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_a_burst_of_200_requests_is_queued_and_all_answered(model: Decoder, tokenizer: Tokenizer) -> None:
    """200 requests from 50 clients at once, 4 workers: the rest wait in the backlog, none is reset or refused."""
    expected = generate_text(model, tokenizer, PROMPTS, 1, eos_id=EOT_ID)

    def post(i: int) -> tuple[int, str]:
        connection = http.client.HTTPConnection(running.host, running.port, timeout=30)
        try:
            connection.request("POST", "/v1/completions", json.dumps({"prompt": PROMPTS[i % 4], "max_tokens": 1,
                                                                      "temperature": 0}))
            reply = connection.getresponse()
            return reply.status, json.loads(reply.read())["choices"][0]["text"]
        finally:
            connection.close()

    start = time.monotonic()
    with Server(model, tokenizer, "tiny", port=0, max_workers=4) as running, ThreadPoolExecutor(50) as pool:
        with running.completions.lock:  # the model is busy: 50 clients connect, 4 workers take them and wait
            futures = [pool.submit(post, i) for i in range(200)]
            assert wait_for(lambda: workers() == 4), workers()
            time.sleep(0.3)
            assert workers() == 4, "more connection threads than max_workers"
        answers = [f.result() for f in futures]
    assert answers == [(200, expected[i % 4]) for i in range(200)]
    assert time.monotonic() - start < 60


def test_the_backlog_holds_connections_while_every_worker_is_busy(model: Decoder, tokenizer: Tokenizer) -> None:
    """One worker, held by an idle connection: a hundred more connect at once (the kernel would drop the
    SYNs of those beyond a backlog of 5), are answered in turn, and stop() does not wait for the worker."""
    with Server(model, tokenizer, "tiny", port=0, max_workers=1, read_timeout=5) as running:
        clients = []
        try:
            for _ in range(100):
                clients.append(socket.create_connection((running.host, running.port), timeout=0.5))
            for client in clients:
                client.settimeout(30)
                client.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            for client in clients:
                assert client.makefile("rb").readline().startswith(b"HTTP/1.0 200"), "answered, not reset"
            idle = [socket.create_connection((running.host, running.port), timeout=5) for _ in range(2)]
            clients += idle
            assert wait_for(lambda: workers() == 1)
            start = time.monotonic()
            running.stop()  # its one worker waits on an idle client, its accept loop for that worker
            assert time.monotonic() - start < 2
        finally:
            for client in clients:
                client.close()


def test_a_short_body_gets_a_408_within_the_read_timeout(model: Decoder, tokenizer: Tokenizer) -> None:
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    with Server(model, tokenizer, "tiny", port=0, read_timeout=0.5) as running:
        address = (running.host, running.port)
        with socket.create_connection(address, timeout=10) as client:
            client.sendall(head + b'{"prompt": "x"}')  # 15 of its 100 bytes, then nothing
            start = time.monotonic()
            reply = http.client.HTTPResponse(client)
            reply.begin()
            assert reply.status == 408 and 0.4 < time.monotonic() - start < 3
            assert json.loads(reply.read())["error"]["code"] == "request_timeout"
        with socket.create_connection(address, timeout=10) as client:  # the body ends early: 400, at once
            client.sendall(head + b'{"prompt": "x"}')
            client.shutdown(socket.SHUT_WR)
            reply = http.client.HTTPResponse(client)
            reply.begin()
            assert reply.status == 400 and json.loads(reply.read())["error"]["code"] == "incomplete_body"
        with socket.create_connection(address, timeout=10) as client:  # sends nothing: dropped, no answer
            start = time.monotonic()
            assert client.recv(1) == b"" and time.monotonic() - start < 3
        assert request(running.url + "/health") == (200, {"status": "ok"})


def test_stop_closes_the_port(model: Decoder, tokenizer: Tokenizer) -> None:
    with Server(model, tokenizer, "tiny", port=0) as running:
        assert running.port != 0 and request(running.url + "/health")[0] == 200
        with pytest.raises(RuntimeError, match="already serving"):
            running.start()
        address = (running.host, running.port)
    with socket.socket() as probe:
        assert probe.connect_ex(address) != 0


@pytest.fixture
def trained_run(tiny_overrides: list[str], tmp_path: Path) -> Path:
    from repro.runner import RunSpec, run

    return run(RunSpec("pretrain", "tiny", tiny_overrides, seed=1), out=tmp_path / "runs")


def greedy_text(run_dir: Path, prompt: str, max_tokens: int) -> str:
    from repro.checkpoints import load_model

    trained, bpe = load_model(run_dir)
    return generate_text(trained, bpe, [prompt], max_tokens, eos_id=EOT_ID)[0]


def test_command_line_loads_a_run_and_serves_it(trained_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """`main` up to its serving loop, which here serves from a thread so that the test can stop it."""
    assert serve.main(["--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert serve.main(["--checkpoint", str(trained_run), "--max-workers", "0"]) == 2
    assert "max_workers" in capsys.readouterr().err
    started: list[Server] = []
    monkeypatch.setattr(Server, "serve_forever", lambda self: started.append(self.start()))
    assert serve.main(["--checkpoint", str(trained_run), "--port", "0", "--device", "cpu"]) == 0
    (running,) = started
    try:
        assert capsys.readouterr().out == f"serving {trained_run.name} at {running.url}\n"
        body = {"model": trained_run.name, "prompt": "def f(x):", "max_tokens": 8, "temperature": 0}
        status, response = request(running.url + "/v1/completions", body)
        assert status == 200 and response["choices"][0]["text"] == greedy_text(trained_run, "def f(x):", 8)
    finally:
        running.stop()


@pytest.mark.slow
def test_script_serves_until_interrupted(trained_run: Path) -> None:
    """`python repro/serve.py` as a process: it prints where it listens, serves, and exits 0 on Ctrl-C."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "repro" / "serve.py"), "--checkpoint", str(trained_run), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith(f"serving {trained_run.name} at http://127.0.0.1:"), line + process.stderr.read()
        url = line.split(" at ")[1].strip()
        status, response = request(url + "/v1/completions", {"prompt": "def f(x):", "max_tokens": 8, "temperature": 0})
        assert status == 200 and response["choices"][0]["text"] == greedy_text(trained_run, "def f(x):", 8)
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
