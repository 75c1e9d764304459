"""A real S3 API server on 127.0.0.1 for the object-storage tests: moto's server (from PyPI) in a process
of its own, so Ray workers, job drivers and subprocesses reach it over HTTP exactly as they would reach
AWS or MinIO. Credentials and endpoint go the standard way (AWS_* variables, or `storage_options`).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from ports import free_port


@dataclass
class ObjectServer(ABC):
    """An object-storage API server in a process of ours: its endpoint, buckets made once, stop."""

    endpoint_url: str
    process: subprocess.Popen
    log: Path | None = None
    _buckets: set[str] = field(default_factory=set)
    scheme = "s3"

    @abstractmethod
    def filesystem(self):
        """An fsspec filesystem talking to this server."""

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (once); its URL, <scheme>://name."""
        if name not in self._buckets:
            self.filesystem().mkdir(name)
            self._buckets.add(name)
        return f"{self.scheme}://{name}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def wait_until_answers(process: subprocess.Popen, probe: str, log: Path, name: str, timeout_s: float) -> None:
    """Wait until `probe` (a URL of the server) answers; RuntimeError naming `name` if it exits or stays
    silent for `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited at start ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(probe, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{name} did not answer at {probe} within {timeout_s:.0f} s")
            time.sleep(0.2)


@dataclass
class S3Server(ObjectServer):
    """A running moto server: its endpoint, the credentials it accepts (any, as S3 signs them), and the
    environment a client needs to reach it."""

    region: str = "eu-west-1"
    key: str = "moe-ray-test"
    secret: str = "moe-ray-test-secret"

    @property
    def env(self) -> dict[str, str]:
        """AWS_* variables that point boto3/s3fs at this server."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_DEFAULT_REGION": self.region, "AWS_ENDPOINT_URL": self.endpoint_url,
                "AWS_ENDPOINT_URL_S3": self.endpoint_url}

    @property
    def storage_options(self) -> dict:
        """The same as fsspec `storage_options` (for s3fs)."""
        return {"key": self.key, "secret": self.secret, "endpoint_url": self.endpoint_url,
                "client_kwargs": {"region_name": self.region}}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)



def start_s3_server(log_dir: Path, timeout_s: float = 30.0) -> S3Server:
    """Start `python -m moto.server` on 127.0.0.1 (a free port) and wait until it answers."""
    port = free_port()
    log = log_dir / "moto-server.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    wait_until_answers(process, url + "/moto-api/", log, "moto's S3 server", timeout_s)
    return S3Server(url, process, log=log)
