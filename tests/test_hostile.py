"""Issue 23, the last hostile inputs: addresses that do what they say, every path and value checked
before use, output directories that own only what moe-ray wrote, and signals.

Each case is a refusal (one `moe-ray: error:` line, exit status 2, no store created or changed) or
a result equal to the honest one. Most need no Ray: they are refused while planning.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
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
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

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


@pytest.mark.parametrize("argv", [["list"], ["status", "raysubmit_x"]])
def test_a_job_server_that_never_answers_fails_in_seconds(argv, silent_server, capsys, monkeypatch):
    from moe_ray import service

    monkeypatch.setattr(service, "JOB_SERVER_TIMEOUT_S", 1.0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = time.monotonic()
    code, out, err = _cli([*argv, "--address", silent_server], capsys)
    _assert_one_line(code, err, [silent_server, "did not answer within 1 s"])
    assert time.monotonic() - started < 10


# ---- signals (item 7) ------------------------------------------------------------------------------

def _group_members(pgid: int) -> list[str]:
    """The command lines of the processes still in process group `pgid` (Linux /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] not in "ZX":
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
                if command:  # an empty command line: the process is already being torn down
                    members.append(command)
        except (OSError, IndexError, ValueError):
            continue
    return members


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_to_the_process_group_ends_the_run_within_5_s(signum, status, big_mixtral, tmp_path):
    """`kill -TERM -PGID` (a process manager, a batch scheduler) or a hangup (the terminal closed) ends
    the driver, its local Ray and the Ray workers within 5 s, with one line and the interruption
    recorded in the store; before, the driver could sit a minute in a call to the dead GCS."""
    import zarr

    store = tmp_path / "run.zarr"
    env = dict(os.environ, RAY_ADDRESS="", PYTHONUNBUFFERED="1", RAY_AUTH_TOKEN_PATH=str(tmp_path / "token"))
    proc = subprocess.Popen([sys.executable, "-m", "moe_ray.cli", "run", "--model", str(big_mixtral.path), "--store",
                             str(store), "--num-cpus", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "units to run" in line:
                break
        os.killpg(proc.pid, signum)
        sent = time.monotonic()
        lines += proc.stdout.read().splitlines()
        code = proc.wait(timeout=60)
        took = time.monotonic() - sent
        while (left := _group_members(proc.pid)) and time.monotonic() - sent < 5:
            time.sleep(0.1)
        # Ray's runtime-env agent shuts down gracefully, in about 4-5 s: not a worker, but gone too
        left = [p for p in left if "Agent" not in p]
        while (stragglers := _group_members(proc.pid)) and time.monotonic() - sent < 20:
            time.sleep(0.2)
    finally:
        if proc.poll() is None or _group_members(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    text = "\n".join(lines)
    assert code == status, text[-3000:]
    assert took < 5, (took, text[-3000:])
    assert left == [] and stragglers == [], (left, stragglers)
    name = signal.Signals(signum).name
    shown = [line.rsplit("\r", 1)[-1] for line in lines]
    assert [line for line in shown if line.startswith("moe-ray: interrupted")] == [
        [line for line in shown if line.strip()][-1]], text[-3000:]
    assert f"moe-ray: interrupted by {name}." in text and "Traceback" not in text, text[-3000:]
    attrs = zarr.open_group(str(store), mode="r").attrs
    assert attrs["state"] == "failed" and attrs["error"] == f"interrupted by {name}; rerun the same spec to resume"


def test_a_store_deleted_mid_run_is_one_line(ray_session, tiny, tmp_path, capsys, monkeypatch):
    """`rm -rf` of the store once it is prepared, as the units start: the run ends with one line saying
    so and marks nothing (a store deleted under a run came back as loose chunks under a fresh root
    marked `failed`, or, where writes re-created the paths, `complete`)."""
    from moe_ray.units.job import TaskJob

    store = tmp_path / "gone.zarr"
    execute = TaskJob.execute

    def delete_then_execute(self, pending, spec):
        shutil.rmtree(store)
        return execute(self, pending, spec)

    monkeypatch.setattr(TaskJob, "execute", delete_then_execute)
    code, out, err = _cli(["run", "--model", str(tiny("mixtral", "upcycled").path), "--store", str(store),
                           "--no-progress"], capsys)
    _assert_one_line(code, err, [f"store {store} was deleted while this run wrote into it"])
    assert "Traceback" not in out + err
    assert not (store / "zarr.json").exists()


# ---- output directories own only what moe-ray wrote (item 6) ----------------------------------------

def _interrupted(out, kind, files: dict[str, str]):
    """A command that claimed `out`, wrote `files` and died before finishing."""
    from moe_ray.outdir import claim_output_dir

    output = claim_output_dir(out, kind)
    for rel, text in files.items():
        (output.path / rel).parent.mkdir(parents=True, exist_ok=True)
        (output.path / rel).write_text(text)
    return output


def test_files_added_after_an_interrupted_make_tiny_are_never_deleted(tmp_path, capsys):
    from moe_ray.outdir import MARKER, STAGING, TINY_OUTPUT

    out = tmp_path / "ckpt"
    _interrupted(out, TINY_OUTPUT, {"model-00001-of-00002.safetensors": "half"})
    (out / "notes.txt").write_text("mine")
    argv = ["make-tiny", "--family", "mixtral", "--variant", "scratch", "--out", str(out), "--overwrite"]
    code, _, err = _cli(argv, capsys)
    _assert_one_line(code, err, [f"{out / 'notes.txt'} was not written by moe-ray"])
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    code, out_text, err = _cli(argv, capsys)  # the dead run's staging folder is its own: replaced
    assert code == 0, err
    marker = json.loads((out / MARKER).read_text())
    assert marker["finished"] and not (out / STAGING).exists()
    assert sorted(marker["files"]) == sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                                             if p.is_file() and p.name != MARKER)


def test_files_added_after_an_interrupted_plot_are_kept(tmp_path):
    from moe_ray.outdir import MARKER, PLOT_OUTPUT, STAGING, claim_output_dir

    out = tmp_path / "report"
    first = _interrupted(out, PLOT_OUTPUT, {"index.html": "<title>moe-ray report", "figures/a.png": "a"})
    first.finish()
    _interrupted(out, PLOT_OUTPUT, {"figures/b.png": "b"})  # the next plot dies half-way
    assert not (out / "figures" / "a.png").exists()  # the finished run's output: replaced
    (out / "notes.txt").write_text("mine")
    (out / "figures").mkdir(exist_ok=True)
    output = claim_output_dir(out, PLOT_OUTPUT)
    assert (out / "notes.txt").read_text() == "mine"
    assert list(output.path.iterdir()) == []  # what the dead run staged is gone
    (output.path / "index.html").write_text("<title>moe-ray report")
    output.finish()
    assert json.loads((out / MARKER).read_text())["files"] == ["index.html"]
    assert (out / "notes.txt").read_text() == "mine" and not (out / STAGING).exists()


def test_a_link_inside_an_output_directory_is_never_written_through(tmp_path):
    from moe_ray.outdir import PLOT_OUTPUT, OutputError, claim_output_dir

    users = tmp_path / "users"
    users.mkdir()
    (users / "a.png").write_text("the user's")
    out = tmp_path / "report"
    first = _interrupted(out, PLOT_OUTPUT, {"index.html": "<title>moe-ray report", "figures/a.png": "a"})
    first.finish()
    shutil.rmtree(out / "figures")
    (out / "figures").symlink_to(users)
    with pytest.raises(OutputError, match="figures was not written by moe-ray"):
        claim_output_dir(out, PLOT_OUTPUT)
    (out / "figures").unlink()
    output = _interrupted(out, PLOT_OUTPUT, {"figures/a.png": "new"})
    (out / "figures").symlink_to(users)  # a link appears while the plot runs
    with pytest.raises(OutputError, match="is a symbolic link"):
        output.finish()
    assert (users / "a.png").read_text() == "the user's" and os.listdir(users) == ["a.png"]


# ---- every path and value checked before use (item 5) ---------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny upcycled Mixtral (float32) with its dense parent."""
    from moe_ray.checkpoint.tiny import make_tiny

    return make_tiny("mixtral", "upcycled", tmp_path_factory.mktemp("hostile") / "ckpt", dtype="float32")


def _shard_of(model, key: str):
    return model / json.loads((model / "model.safetensors.index.json").read_text())["weight_map"][key]


def _edit_shard(model, key: str, edit) -> None:
    """Rewrite `key`'s shard as `edit(header, data) -> (header, data)` makes it."""
    import struct

    shard = _shard_of(model, key)
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = edit(json.loads(raw[8:8 + n]), raw[8 + n:])
    text = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _fifo_instead(name):
    def make(model):
        path = _shard_of(model, EMBED) if name == "shard" else model / name
        path.unlink()
        os.mkfifo(path)
    return make


def _directory_instead_of_shard(model):
    path = _shard_of(model, EMBED)
    path.unlink()
    path.mkdir()


def _hole(model):
    def edit(header, data):
        for key, entry in header.items():
            if key != "__metadata__":
                entry["data_offsets"] = [o + 8 for o in entry["data_offsets"]]
        return header, b"\0" * 8 + data
    _edit_shard(model, EMBED, edit)


def _metadata_not_strings(model):
    _edit_shard(model, EMBED, lambda h, d: ({**h, "__metadata__": {"format": 1}}, d))


def _unknown_dtype_unread(model):  # the embeddings: a static run does not read them
    _edit_shard(model, EMBED, lambda h, d: ({**h, EMBED: {**h[EMBED], "dtype": "Q7"}}, d))


def _schema_99(model):
    import zarr

    zarr.open_group(str(model.parent / "out.zarr"), mode="w").attrs.update({"moe_ray": {"schema_version": 99}})


def _toml(text):
    def write(model):
        (model.parent / "job.toml").write_text(f'model = "{model}"\nstore = "{model.parent / "out.zarr"}"\n' + text)
    return write


EMBED = "model.embed_tokens.weight"
RUN = ["run", "--model", "{model}", "--store", "{store}", "--no-progress"]
SPEC = ["run", "{dir}/job.toml", "--no-progress"]
TINY = ["make-tiny", "--family", "mixtral", "--variant", "upcycled", "--out", "{dir}/tiny"]

REFUSED = {
    "config.json a FIFO": (_fifo_instead("config.json"), RUN, ["config.json in", "is a named pipe (FIFO)"]),
    "index a FIFO": (_fifo_instead("model.safetensors.index.json"), RUN, ["index.json in", "named pipe (FIFO)"]),
    "shard a FIFO": (_fifo_instead("shard"), RUN, ["safetensors file model-", "is a named pipe (FIFO)"]),
    "shard a directory": (_directory_instead_of_shard, RUN, ["safetensors file model-", "is a directory"]),
    "a hole in the data": (_hole, RUN, ["8 bytes lie between the header and tensor", "a hole in the data"]),
    "metadata not strings": (_metadata_not_strings, RUN, ["its __metadata__ is not an object of strings"]),
    "unknown dtype, tensor not read": (_unknown_dtype_unread, RUN, [f"tensor {EMBED} has dtype 'Q7'"]),
    "seed 1e29": (_toml("[static]\nseed = 1e29\n"), SPEC, ["seed must be between 0 and 4294967295"]),
    "bootstrap seed -1": (_toml('analyses = ["causal"]\n[causal]\nbootstrap_seed = -1\n'), SPEC,
                          ["bootstrap_seed must be between 0 and"]),
    "schema version 99": (_schema_99, RUN, ["schema version 99", "pass --overwrite"]),
    "checks without causal": (None, RUN + ["--checks", "ablation"], ["--checks (causal.checks) is given",
                                                                     "do not include causal"]),
    "mtp without MTP layers": (None, RUN + ["--mtp"], ["--mtp is given", "no multi-token-prediction layers"]),
    "reference with reorder only": (None, RUN + ["--analyses", "reorder", "--reference", "{dir}/nowhere"],
                                    ["--reference is given", "do not read a reference"]),
    "two specs": (_toml(""), ["run", "{dir}/job.toml", "--spec", "{dir}/job.toml"], ["two specs given"]),
    "plan --nodes -1": (None, ["plan", "--model", "{model}", "--nodes", "-1"], ["--nodes must be at least 1"]),
    "make-tiny sigma nan": (None, TINY + ["--sigma", "nan"], ["--sigma must be a finite number"]),
    "make-tiny sigma -1": (None, TINY + ["--sigma", "-1"], ["--sigma must be a finite number, 0 or more"]),
    "make-tiny seed 2**40": (None, TINY + ["--seed", str(2**40)], ["--seed must be between 0 and"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_before_anything_is_written(case, base, tmp_path, capsys, monkeypatch):
    """One line, exit 2, within seconds (a FIFO hung `run` before), and nothing created or changed."""
    monkeypatch.chdir(tmp_path)
    setup, argv, words = REFUSED[case]
    model = tmp_path / "model"
    shutil.copytree(base.path, model)
    if setup is not None:
        setup(model)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if not p.is_fifo()}
    values = {"model": model, "store": tmp_path / "out.zarr", "dir": tmp_path}
    code, _, err = _cli([a.format(**values) for a in argv], capsys)
    _assert_one_line(code, err, words)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if not p.is_fifo()} == before


def test_weights_too_large_for_float32_are_refused_when_read(base, tmp_path):
    """Finite 3e38 weights made NaN similarities in a store marked complete: the read refuses them as
    it refuses NaN/Inf, naming the tensor (rule: the tensor's squared norm must be finite in float32)."""
    import torch
    from safetensors.torch import load_file, save_file

    from moe_ray.checkpoint import open_checkpoint
    from moe_ray.errors import CheckpointError

    model = tmp_path / "model"
    shutil.copytree(base.path, model)
    key = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    shard = _shard_of(model, key)
    tensors = load_file(str(shard))
    ok = tensors[key].clone()
    ok[0, 0] = 1e15  # large but harmless: its squares sum to 1e30
    tensors[key] = ok
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert open_checkpoint(model).read(key)[0, 0] == 1e15
    tensors[key][0, 0] = 3e38
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"experts.2.w1.weight .* holds values too large to analyse \(largest "
                                              r"\|value\| 3e\+38\)"):
        open_checkpoint(model).read(key)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="has 1 NaN/Inf values"):
        open_checkpoint(model).read(key)


def test_num_cpus_that_would_be_ignored_or_oversubscribe_is_refused():
    from moe_ray.distributed.cluster import check_num_cpus
    from moe_ray.errors import MoeRayError

    machine = os.cpu_count()
    check_num_cpus(machine, None)
    check_num_cpus(None, "10.0.0.1:6379")
    with pytest.raises(MoeRayError, match=f"num_cpus {machine + 14} is more than this machine's {machine} CPUs"):
        check_num_cpus(machine + 14, None)
    with pytest.raises(MoeRayError, match="joining the Ray at 10.0.0.1:6379 it would be ignored"):
        check_num_cpus(2, "10.0.0.1:6379")
