"""Issue 14: nothing lost, nothing mixed, no traceback.

A table of bad inputs through the CLI in-process: each ends in one `moe-ray: error:` line with the
words that name the problem, exit status 2, and no store (or an existing store unchanged byte for
byte). Then: a store refuses a resume over other weights (naming the model or the reference and the
first tensor that changed) but accepts the same checkpoint spelled differently; a rerun into a
complete store writes nothing; progress counts the units a job runs; `plot --out` and
`make-tiny --out` never touch files moe-ray did not write; Ray that is not there fails in seconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file

import moe_ray
from moe_ray.checkpoint import open_checkpoint
from moe_ray.checkpoint.tiny import make_tiny
from moe_ray.cli import main
from moe_ray.outdir import MARKER
from moe_ray.store import store_progress

from ports import free_port


# ---- helpers ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One tiny upcycled Mixtral (4 layers, 8 experts, d_hid 64, d_mid 128) with its dense parent."""
    return make_tiny("mixtral", "upcycled", tmp_path_factory.mktemp("base") / "ckpt", dtype="float32")


def _copy(base, tmp_path) -> tuple[Path, Path]:
    model = tmp_path / "model"
    shutil.copytree(base.path, model)
    return model, model / "dense-parent"


def _shard_of(ckpt_dir: Path, key: str) -> Path:
    index = json.loads((ckpt_dir / "model.safetensors.index.json").read_text())
    return ckpt_dir / index["weight_map"][key]


def _replace_tensor(ckpt_dir: Path, key: str, tensor: torch.Tensor) -> None:
    shard = _shard_of(ckpt_dir, key)
    tensors = load_file(str(shard))
    tensors[key] = tensor.contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})


def _edit_header(ckpt_dir: Path, key: str, edit) -> None:
    """Rewrite the safetensors header of `key`'s shard through `edit(header) -> new header` (any JSON),
    keeping the data bytes as they are."""
    shard = _shard_of(ckpt_dir, key)
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    new = json.dumps(edit(header)).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    shard.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _edit_config(ckpt_dir: Path, edit) -> None:
    path = ckpt_dir / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _snapshot(path: Path) -> dict[str, str]:
    """Every file under `path` with a hash of its bytes (a store unchanged byte for byte)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line(code: int, err: str, words: list[str]) -> None:
    assert code == 2, err
    assert err.startswith("moe-ray: error: ") and "\n" not in err, err
    for word in words:
        assert word in err, (word, err)


EXPERT = "model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight"
ROUTER = "model.layers.{l}.block_sparse_moe.gate.weight"
REF = "model.layers.{l}.mlp.{p}.weight"


def _transposed_expert(model, ref):
    key = EXPERT.format(l=2, e=5, w="w3")
    _replace_tensor(model, key, load_file(str(_shard_of(model, key)))[key].T)


def _router_wrong(model, ref):
    key = ROUTER.format(l=1)
    _replace_tensor(model, key, torch.zeros(7, 64))


def _int8_expert(model, ref):
    key = EXPERT.format(l=0, e=3, w="w1")
    _replace_tensor(model, key, torch.zeros(128, 64, dtype=torch.int8))


def _reference_down_differs(model, ref):
    key = REF.format(l=3, p="down_proj")
    _replace_tensor(ref, key, torch.zeros(64, 96))


def _header_list(model, ref):
    _edit_header(model, EXPERT.format(l=0, e=0, w="w1"), lambda h: [1, 2, 3])


def _header_overlap(model, ref):
    key = EXPERT.format(l=0, e=0, w="w1")

    def edit(h):
        twin = next(k for k in h if k not in ("__metadata__", key) and h[k]["shape"] == h[key]["shape"])
        h[twin]["data_offsets"] = list(h[key]["data_offsets"])
        return h
    _edit_header(model, key, edit)


def _header_span_lies(model, ref):
    key = EXPERT.format(l=0, e=0, w="w1")

    def edit(h):
        h[key]["shape"] = [64, 64]
        return h
    _edit_header(model, key, edit)


def _header_beyond_file(model, ref):
    key = EXPERT.format(l=0, e=0, w="w1")

    def edit(h):
        begin, end = h[key]["data_offsets"]
        h[key]["data_offsets"] = [begin + 10**9, end + 10**9]
        return h
    _edit_header(model, key, edit)


def _config(edit):
    return lambda model, ref: _edit_config(model, edit)


def _without(name):
    return _config(lambda c: {k: v for k, v in c.items() if k != name})


def _spec_file(text):
    def write(model, ref):
        (model.parent / "job.toml").write_text(f'model = "{model}"\nstore = "{model.parent / "out.zarr"}"\n' + text)
    return write


def _nothing(model, ref):
    pass


RUN = ["run", "--model", "{model}", "--store", "{store}", "--no-progress"]
WITH_REF = RUN + ["--reference", "{ref}"]
SPEC = ["run", "{dir}/job.toml", "--no-progress"]

BAD_INPUTS = {
    # config.json through one schema
    "config is a list": (_config(lambda c: [c]), RUN, ["config.json in", "is a list, not a JSON object"]),
    "config lacks num_hidden_layers": (_without("num_hidden_layers"), RUN, ["lacks 'num_hidden_layers'"]),
    "num_hidden_layers 'four'": (_config(lambda c: {**c, "num_hidden_layers": "four"}), RUN,
                                 ["num_hidden_layers must be an integer", "'four'"]),
    "num_local_experts missing": (_without("num_local_experts"), RUN, ["gives no expert count", "num_local_experts"]),
    "more experts than held": (_config(lambda c: {**c, "num_local_experts": 10}), RUN,
                               ["says 10 experts (num_local_experts)", "holds 8", "experts.8."]),
    "more layers than held": (_config(lambda c: {**c, "num_hidden_layers": 6}), RUN,
                              ["says 6 layers", "holds layers 0-3", "layer 4 has no tensors"]),
    "top-k above experts": (_config(lambda c: {**c, "num_experts_per_tok": 9}), RUN, ["routes each token to 9"]),
    "architectures a string": (_config(lambda c: {**c, "architectures": "MixtralForCausalLM"}), RUN,
                               ["architectures must be a list of strings"]),
    # safetensors headers
    "header is a JSON list": (_header_list, RUN, ["corrupted safetensors file", "header is a JSON list"]),
    "header offsets overlap": (_header_overlap, RUN, ["corrupted safetensors file", "overlap"]),
    "header shape disagrees with offsets": (_header_span_lies, RUN, ["experts.0.w1.weight", "data_offsets span"]),
    "header offsets beyond the file": (_header_beyond_file, RUN, ["experts.0.w1.weight ends at byte", "the file has"]),
    # every tensor the job reads, from the headers
    "expert 5 transposed": (_transposed_expert, RUN,
                            ["experts.5.w3.weight (layer 2 expert 5 up)", "[64, 128]", "implies [128, 64]"]),
    "router of the wrong size": (_router_wrong, RUN, ["gate.weight (layer 1 router)", "[7, 64]", "implies [8, 64]"]),
    "int8 expert": (_int8_expert, RUN, ["experts.3.w1.weight (layer 0 expert 3 gate) is stored as I8", "cannot analyse"]),
    "reference down differs": (_reference_down_differs, WITH_REF,
                               ["layers.3.mlp.down_proj.weight (reference layer 3 FFN down)", "implies [64, 128]"]),
    "dense model as --model": (_nothing, ["run", "--model", "{ref}", "--store", "{store}"], ["no MoE layers"]),
    # spec fields: types, ranges, NaN, empty lists, unknown keys, conflicting flags
    # `store = ["x.zarr"]` once wrote a directory literally named ['x.zarr']
    "store is a list": (lambda model, ref: (model.parent / "job.toml").write_text(
        f'model = "{model}"\nstore = ["x.zarr"]\n'), SPEC, ["spec field store must be str", "list"]),
    "dbscan eps nan": (_nothing, RUN + ["--dbscan-eps", "nan"], ["dbscan_eps must be a finite number"]),
    "dbscan eps inf": (_nothing, RUN + ["--dbscan-eps", "inf"], ["dbscan_eps must be a finite number"]),
    "text file without the text input": (_nothing, RUN + ["--analyses", "dynamic", "--inputs", "short",
                                                           "--text-file", "{dir}/t.txt"],
                                         ["--text-file is given", "does not include 'text'"]),
    "text file without dynamic": (_nothing, RUN + ["--text-file", "{dir}/t.txt"],
                                  ["--text-file is given but the analyses do not include dynamic"]),
    "pairs without reorder": (_nothing, RUN + ["--pairs", "0-1"], ["--pairs is given", "do not include reorder"]),
    "num cpus 0": (_nothing, RUN + ["--num-cpus", "0"], ["num_cpus must be at least 1"]),
    "num cpus 0, no fit check": (_nothing, RUN + ["--num-cpus", "0", "--no-check-fit"], ["num_cpus must be at least 1"]),
    "negative layer": (_nothing, RUN + ["--layers", "-1"], ["layer -1 is negative"]),
    "num cpus 1.5": (_spec_file("[resources]\nnum_cpus = 1.5\n"), SPEC, ["num_cpus must be int", "1.5"]),
    "progress maybe": (_spec_file('progress = "maybe"\n'), SPEC, ["progress must be true or false"]),
    "empty analyses": (_spec_file("analyses = []\n"), SPEC, ["analyses is an empty list"]),
    "unknown key": (_spec_file("stores = 1\n"), SPEC, ["unknown spec field 'stores'"]),
    "unknown nested key": (_spec_file("[static]\neps = 1\n"), SPEC, ["unknown spec field 'static.eps'"]),
    "memory per task 0": (_nothing, RUN + ["--memory-per-task-gb", "0"], ["memory_per_task_gb must be positive"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_no_store(case, base, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    setup, argv, words = BAD_INPUTS[case]
    model, ref = _copy(base, tmp_path)
    (tmp_path / "t.txt").write_text("some text")
    setup(model, ref)
    store = tmp_path / "out.zarr"
    values = {"model": model, "ref": ref, "store": store, "dir": tmp_path}
    before = set(os.listdir(tmp_path))
    code, err = _cli([a.format(**values) for a in argv], capsys)
    _assert_one_line(code, err, words)
    assert not store.exists() and set(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("case, words", [
    ("list", ["is a list, not a JSON object"]),
    ("no_layers", ["lacks 'num_hidden_layers'"]),
    ("four", ["num_hidden_layers must be an integer", "'four'"]),
])
def test_plan_refuses_bad_config_in_one_line(case, words, base, tmp_path, capsys):
    config = json.loads((base.path / "config.json").read_text())
    config = {"list": [config], "no_layers": {k: v for k, v in config.items() if k != "num_hidden_layers"},
              "four": {**config, "num_hidden_layers": "four"}}[case]
    (tmp_path / "config.json").write_text(json.dumps(config))
    _assert_one_line(*_cli(["plan", "--model", str(tmp_path)], capsys), words)


# ---- a store knows the weights it was made from ---------------------------------------------------

@pytest.fixture(scope="module")
def made(ray_session, base, tmp_path_factory):
    """A complete static store of the base model with its reference (layers 0-1)."""
    tmp = tmp_path_factory.mktemp("made")
    model, ref = _copy(base, tmp)
    store = tmp / "s.zarr"
    moe_ray.run(model=str(model), reference=str(ref), store=str(store), layers=[0, 1], progress=False)
    return model, ref, store


def _rerun_argv(model, ref, store) -> list[str]:
    return ["run", "--model", str(model), "--reference", str(ref), "--store", str(store), "--layers", "0,1"]


def test_rerun_into_a_complete_store_writes_nothing_whatever_the_path_spelling(made, tmp_path, capsys, monkeypatch):
    model, ref, store = made
    before = _snapshot(store)
    monkeypatch.chdir(model.parent)
    for spelling in (str(model) + "/", os.path.relpath(model, model.parent), f"file://{model}"):
        assert main(_rerun_argv(spelling, ref, store)) == 0
        assert "nothing to do" in capsys.readouterr().out
        assert _snapshot(store) == before
    copy = tmp_path / "copy"  # the same weights elsewhere (a copy, a mount) are the same weights
    shutil.copytree(model, copy)
    assert main(_rerun_argv(copy, ref, store)) == 0 and _snapshot(store) == before


@pytest.mark.parametrize("change, words", [
    ("model tensor", ["other weights: the model's tensor", "experts.0.w1.weight (layer 0) differs"]),
    ("reference tensor", ["other weights: the reference's tensor model.layers.1.mlp.up_proj.weight (layer 1) differs"]),
    ("model config", ["the model's config.json differs (rope_theta"]),
    ("no reference", ["made with a reference", "this job has none"]),
])
def test_resume_over_other_weights_is_refused_and_the_store_unchanged(change, words, made, tmp_path, capsys):
    model, ref, store = made
    copy, copy_ref = _copy(type("C", (), {"path": model})(), tmp_path)
    argv = _rerun_argv(copy, copy_ref, store)
    if change == "model tensor":
        key = EXPERT.format(l=0, e=0, w="w1")  # a tensor a done unit read (one no done unit read may change)
        _replace_tensor(copy, key, torch.randn(128, 64))
    elif change == "reference tensor":
        key = REF.format(l=1, p="up_proj")
        _replace_tensor(copy_ref, key, torch.randn(128, 64))
    elif change == "model config":
        _edit_config(copy, lambda c: {**c, "rope_theta": 5e5})
    else:
        argv = argv[:3] + argv[5:]
    before = _snapshot(store)
    _assert_one_line(*_cli(argv, capsys), words + ["--overwrite"])
    assert _snapshot(store) == before


def test_half_done_store_refuses_another_models_shards(ray_session, base, tmp_path, capsys):
    """A run that failed half-way, then the shards replaced by another model's with the same config
    and layout: the rerun is refused naming the first tensor that changed, nothing written."""
    model, _ = _copy(base, tmp_path)
    store = tmp_path / "half.zarr"
    moe_ray.run(model=str(model), store=str(store), progress=False)
    done = zarr.open_array(str(store / "static" / "unit_done"), mode="r+")
    done[2:] = 0  # layers 2 and 3 did not finish
    other = make_tiny("mixtral", "upcycled", tmp_path / "other", dtype="float32", seed=7)
    for shard in model.glob("*.safetensors"):
        shutil.copy(other.path / shard.name, shard)
    before = _snapshot(store)
    code, err = _cli(["run", "--model", str(model), "--store", str(store)], capsys)
    _assert_one_line(code, err, ["other weights: the model's tensor model.layers.0.", "(layer 0) differs",
                                 "--overwrite"])
    assert _snapshot(store) == before


def test_read_only_complete_store_works(made, capsys, monkeypatch):
    """A complete store need not be writable: a rerun only reads it (any write would fail here)."""
    import zarr.storage

    model, ref, store = made
    original = zarr.storage.LocalStore.__init__

    def read_only(self, root, *, read_only=False, **kw):
        original(self, root, read_only=True, **kw)

    monkeypatch.setattr(zarr.storage.LocalStore, "__init__", read_only)
    assert main(_rerun_argv(model, ref, store) + ["--no-progress"]) == 0


def test_different_parameters_refused_before_any_write(made, capsys):
    model, ref, store = made
    before = _snapshot(store)
    _assert_one_line(*_cli(_rerun_argv(model, ref, store) + ["--dbscan-eps", "50"], capsys),
                     ["computed with other parameters (dbscan_eps: None in the store, 50.0 now)"])
    _assert_one_line(*_cli(_rerun_argv(model, ref, store)[:-1] + ["0,1,2"], capsys),
                     ["coordinate static/layer in the store is [0, 1], this job's is [0, 1, 2]"])
    assert _snapshot(store) == before


# ---- progress counts the units a job runs ---------------------------------------------------------

def test_progress_counts_planned_pairs_not_every_cell(ray_session, base, tmp_path):
    store = str(tmp_path / "r.zarr")
    moe_ray.run(model=str(base.path), store=store, analyses=["reorder"], layers=[1], progress=False,
                reorder={"pairs": ["0-1", "2-3", "1-5"]})
    assert store_progress(store) == {"reorder": (3, 3)}
    moe_ray.run(model=str(base.path), store=store, analyses=["reorder"], layers=[1], progress=False)
    assert store_progress(store) == {"reorder": (28, 28)}  # every pair i<j of 8 experts, not 64 cells
    from moe_ray.service import JobStatus

    line = JobStatus("raysubmit_x", "SUCCEEDED", "", store, store_progress(store)).line()
    assert line == "raysubmit_x: SUCCEEDED (reorder 28/28 units)"


# ---- files moe-ray did not write are never touched ------------------------------------------------

def test_make_tiny_leaves_foreign_files_alone(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["make-tiny", "--family", "mixtral", "--variant", "upcycled", "--out", str(out), "--overwrite"]
    _assert_one_line(*_cli(argv, capsys), ["is not empty and was not made by moe-ray"])
    assert os.listdir(out) == ["notes.txt"]
    out2 = tmp_path / "out2"
    assert main(argv[:-2] + [str(out2)]) == 0
    (out2 / "dense-parent" / "notes.txt").write_text("mine too")
    _assert_one_line(*_cli(argv[:-2] + [str(out2), "--overwrite"], capsys), ["notes.txt was not written by moe-ray"])
    assert (out2 / "dense-parent" / "notes.txt").read_text() == "mine too"
    (out2 / "dense-parent" / "notes.txt").unlink()
    _assert_one_line(*_cli(argv[:-2] + [str(out2)], capsys), ["pass --overwrite"])
    capsys.readouterr()
    assert main(argv[:-2] + [str(out2), "--overwrite"]) == 0  # its own output: replaced
    assert (out2 / MARKER).exists() and (out2 / "dense-parent" / "config.json").exists()


def test_plot_leaves_foreign_files_alone(made, tmp_path, capsys):
    _, _, store = made
    out = tmp_path / "report"
    out.mkdir()
    (out / "index.html").write_text("my page")
    _assert_one_line(*_cli(["plot", str(store), "--out", str(out), "--parallel", "none"], capsys),
                     ["is not empty and was not made by moe-ray"])
    assert (out / "index.html").read_text() == "my page"
    fresh = tmp_path / "fresh"
    assert main(["plot", str(store), "--out", str(fresh), "--parallel", "none"]) == 0
    (fresh / "notes.txt").write_text("kept")  # beside the report: kept on a re-plot
    (fresh / "figures" / "mine.png").write_bytes(b"x")  # where plot writes: refused
    _assert_one_line(*_cli(["plot", str(store), "--out", str(fresh), "--parallel", "none"], capsys),
                     ["figures/mine.png was not written by moe-ray"])
    (fresh / "figures" / "mine.png").unlink()
    assert main(["plot", str(store), "--out", str(fresh), "--parallel", "none"]) == 0  # its own: replaced
    assert (fresh / "notes.txt").read_text() == "kept" and (fresh / "index.html").exists()


def test_plot_of_a_damaged_store_is_one_line(made, tmp_path, capsys):
    _, _, store = made
    broken = tmp_path / "broken.zarr"
    shutil.copytree(store, broken)
    chunk = next(p for p in sorted((broken / "static" / "matrix_similarity").rglob("*")) if p.is_file()
                 and p.name != "zarr.json")
    chunk.write_bytes(os.urandom(64))
    code, err = _cli(["plot", str(broken), "--out", str(tmp_path / "r"), "--parallel", "none"], capsys)
    _assert_one_line(code, err, [f"store {broken} is damaged: static/matrix_similarity/c/", "new store"])
    code = main(["plot", str(broken), "--out", str(tmp_path / "r2"), "--parallel", "none", "--debug"])
    assert code == 2 and "Traceback" in capsys.readouterr().err


# ---- Ray that is not there: one line in seconds ----------------------------------------------------

@pytest.mark.parametrize("command", ["run", "submit", "status"])
def test_unreachable_ray_fails_in_seconds(command, base, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    spec = tmp_path / "job.toml"
    spec.write_text(f'model = "{base.path}"\nstore = "{tmp_path / "s.zarr"}"\n')
    argv = {"run": ["run", str(spec), "--address", address],
            "submit": ["submit", str(spec), "--address", address],
            "status": ["status", "raysubmit_x", "--address", address]}[command]
    env = dict(os.environ, RAY_AUTH_TOKEN_PATH=str(tmp_path / "token"))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "moe_ray.cli", *argv], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert err.startswith("moe-ray: error: cannot reach") and address in err and "\n" not in err, err
    assert time.monotonic() - started < 60
    assert not (tmp_path / "s.zarr").exists()


def test_no_check_fit_on_a_local_ray_moe_ray_started_still_refuses_what_cannot_run(ray_session, base, tmp_path, capsys):
    """A local Ray that moe-ray started has this machine's CPUs and never grows: work it cannot hold
    is refused even with --no-check-fit, instead of waiting forever."""
    from moe_ray.distributed.cluster import started_local_ray

    assert started_local_ray()
    store = tmp_path / "s.zarr"
    argv = ["run", "--model", str(base.path), "--store", str(store), "--cpus-per-task", "64", "--no-check-fit"]
    _assert_one_line(*_cli(argv, capsys), ["64 CPU"])
    assert not store.exists()


def test_submit_refuses_other_weights_before_sending(made, tmp_path, capsys):
    """Where the store is readable on the submitting machine, what the job would refuse is refused
    there, before anything is sent (no job server is even asked)."""
    model, ref, store = made
    copy, _ = _copy(type("C", (), {"path": model})(), tmp_path)
    _replace_tensor(copy, EXPERT.format(l=0, e=1, w="w2"), torch.randn(64, 128))
    spec = tmp_path / "job.toml"
    spec.write_text(f'model = "{copy}"\nreference = "{ref}"\nstore = "{store}"\nlayers = [0, 1]\n')
    before = _snapshot(store)
    _assert_one_line(*_cli(["submit", str(spec), "--address", f"http://127.0.0.1:{free_port()}"], capsys),
                     ["other weights: the model's tensor model.layers.0.block_sparse_moe.experts.1.w2.weight"])
    assert _snapshot(store) == before


def test_fingerprint_is_the_weights_not_the_location(base, tmp_path):
    """The same bytes over fsspec (memory://), in a copy, re-sharded into one file: one fingerprint."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for f in base.path.iterdir():
        if f.is_file():
            fs.pipe(f"/fp-ckpt/{f.name}", f.read_bytes())
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(base.path / "config.json", single / "config.json")
    tensors = {}
    for f in base.path.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    save_file(tensors, str(single / "model.safetensors"))
    want = open_checkpoint(base.path).fingerprint
    for other in ("memory://fp-ckpt", single):
        got = open_checkpoint(other).fingerprint
        assert got["units"] == want["units"] and got["config"] == want["config"]
