"""Issue 23, the last hostile inputs: addresses that do what they say, every path and value checked
before use, output directories that own only what moe-ray wrote, and signals.

Each case is a refusal (one `moe-ray: error:` line, exit status 2, no store created or changed) or
a result equal to the honest one. Most need no Ray: they are refused while planning.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from moe_ray.cli import main


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def _assert_one_line(code: int, err: str, words: list[str]) -> None:
    assert code == 2, err
    assert err.startswith("moe-ray: error: ") and "\n" not in err, err
    for word in words:
        assert word in err, (word, err)


# ---- addresses do what they say (item 4) ---------------------------------------------------------

class _FakeJobServer:
    """An HTTP server on 127.0.0.1 that answers Ray's job API as an empty cluster would (a Ray
    version, no jobs) and counts the requests it got: which server a command talked to."""

    def __init__(self):
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                body = {"/api/version": {"ray_version": "2.60.0", "version": "4"}}.get(self.path.split("?")[0], [])
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def job_servers():
    servers = [_FakeJobServer(), _FakeJobServer()]
    yield servers
    for server in servers:
        server.close()


@pytest.mark.parametrize("variable, value", [
    ("RAY_ADDRESS", "other"), ("RAY_API_SERVER_ADDRESS", "other"), ("RAY_ADDRESS", "local"),
    ("RAY_ADDRESS", "127.0.0.1:1")])
def test_explicit_address_wins_over_the_environment(variable, value, job_servers, capsys, monkeypatch):
    given, other = job_servers
    monkeypatch.setenv(variable, other.address if value == "other" else value)
    code, out, err = _cli(["list", "--address", given.address], capsys)
    assert code == 0 and err == "", err
    assert "/api/jobs/" in given.requests and other.requests == []
    assert os.environ[variable] == (other.address if value == "other" else value)  # put back


def test_without_address_the_environment_names_the_job_server(job_servers, capsys, monkeypatch):
    named, default = job_servers
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", named.address)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    code, out, err = _cli(["list"], capsys)
    assert code == 0 and err == "", err
    assert "/api/jobs/" in named.requests


@pytest.fixture
def silent_server():
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    for conn in held:
        conn.close()
    listener.close()


@pytest.mark.parametrize("argv", [["list"], ["status", "raysubmit_x"], ["stop", "raysubmit_x"],
                                  ["logs", "raysubmit_x"]])
def test_a_job_server_that_never_answers_fails_in_seconds(argv, silent_server, capsys, monkeypatch):
    from moe_ray import service

    monkeypatch.setattr(service, "JOB_SERVER_TIMEOUT_S", 1.0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = time.monotonic()
    code, out, err = _cli([*argv, "--address", silent_server], capsys)
    _assert_one_line(code, err, [silent_server, "did not answer within 1 s"])
    assert time.monotonic() - started < 10
