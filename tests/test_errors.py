"""Errors that say what happened (issues 21 and 23): bad checkpoints, tokenizers, URLs and store locations
are one `moe-ray: error:` line naming the path and the problem, exit 2, before any unit runs (no Ray is
reached: every case here fails while planning); a store is called damaged only when it exists and its
own metadata or chunks fail to read; anything else names its exception and where in moe-ray it
happened, exit 1."""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_ray.api import as_spec
from moe_ray.cli import explain_error, main
from moe_ray.store import ResultStore, find_damage


@pytest.fixture(scope="module")
def model(tiny):
    return tiny("mixtral", "scratch").path


@pytest.fixture
def copy(model, tmp_path):
    """A fresh copy of the tiny checkpoint to break."""
    def make(name: str = "ckpt") -> Path:
        out = tmp_path / name
        shutil.copytree(model, out)
        return out
    return make


def _error(args: list[str], capsys, status: int = 2) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == status, err
    assert err.startswith("moe-ray: error: ") and "\n" not in err, err
    return err


def _run(model: Path | str, store: Path | str, analyses: str = "static") -> list[str]:
    return ["run", "--model", str(model), "--store", str(store), "--analyses", analyses, "--no-progress"]


def test_a_very_deep_header_json_is_a_corrupted_shard(copy, tmp_path, capsys):
    ckpt = copy()
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    deep = b"[" * 200_000 + b"]" * 200_000
    shard.write_bytes(len(deep).to_bytes(8, "little") + deep)
    err = _error(_run(ckpt, tmp_path / "s.zarr"), capsys)
    assert f"corrupted safetensors file {shard.name}: its header JSON is nested too deeply" in err
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_config_or_index_a_directory_is_refused(copy, tmp_path, capsys, name):
    ckpt = copy()
    (ckpt / name).unlink()
    (ckpt / name).mkdir()
    err = _error(_run(ckpt, tmp_path / "s.zarr"), capsys)
    assert f"{name} in {ckpt} is a directory, not a regular file" in err


def test_an_unreadable_config_names_the_os_error(copy, tmp_path, capsys):
    """root reads any file whatever its mode, so chmod 000 proves nothing here: /proc/self/mem is a
    file whose read fails for root too (EIO or EINVAL, by how it is read)."""
    ckpt = copy()
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").symlink_to("/proc/self/mem")
    err = _error(_run(ckpt, tmp_path / "s.zarr"), capsys)
    assert f"cannot read config.json of the checkpoint {ckpt}: " in err
    assert "input/output error" in err or "invalid argument" in err


def test_a_missing_or_broken_tokenizer_is_one_line(copy, tmp_path, capsys):
    missing = copy("missing")
    (missing / "tokenizer.json").unlink()
    err = _error(_run(missing, tmp_path / "a.zarr", "dynamic"), capsys)
    assert f"no tokenizer in {missing}" in err
    broken = copy("broken")
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nonsense"}}')
    err = _error(_run(broken, tmp_path / "b.zarr", "dynamic"), capsys)
    assert f"cannot load the tokenizer of {broken}" in err and "tokenizer.json" in err
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_an_unknown_url_protocol_is_refused_at_spec_time(model, tmp_path, capsys):
    err = _error(_run("nosuch://bucket/model", tmp_path / "s.zarr"), capsys)
    assert "model nosuch://bucket/model: unknown protocol nosuch://" in err and "s3://" in err
    err = _error(_run(model, "nosuch://bucket/out.zarr"), capsys)
    assert "store nosuch://bucket/out.zarr: unknown protocol" in err
    # a protocol fsspec knows whose package (adlfs, Azure's) the test environment does not install
    assert importlib.util.find_spec("adlfs") is None
    err = _error(_run("abfs://container/model", tmp_path / "s.zarr"), capsys)
    assert "model abfs://container/model: abfs:// needs a package that is not installed" in err


def test_a_store_under_a_regular_file_or_in_a_symlink_loop(model, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    store = tmp_path / "file" / "out.zarr"
    err = _error(_run(model, store), capsys)
    assert f"store {store}: not a directory" in err
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    store = tmp_path / "loop" / "out.zarr"
    err = _error(_run(model, store), capsys)
    assert f"store {store}: too many levels of symbolic links" in err


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare for a private read-only mount")
def test_a_new_store_on_a_read_only_filesystem(model, tmp_path):
    """A read-only tmpfs mounted in a private mount namespace of the command alone (gone when it exits)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"no user and mount namespaces here: {probe.stderr.decode().strip()}")
    store = ro / "out.zarr"
    command = (f"mount -t tmpfs -o ro tmpfs {ro} && exec {sys.executable} -m moe_ray.cli "
               f"run --model {model} --store {store} --analyses static --no-progress")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, timeout=120)
    err = done.stderr.strip()
    assert done.returncode == 2, err
    assert err == f"moe-ray: error: cannot create the store {store}: read-only file system (writing in {ro})"


def _moe_ray_store(url: Path) -> None:
    store = ResultStore.create_or_reuse(str(url), {"model": "test"}, {"model": "m"})
    store.root.require_group("static")


def test_a_moe_ray_store_with_a_damaged_root_is_damaged_and_overwritable(model, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    _moe_ray_store(store)
    (store / "zarr.json").write_bytes(b'{"zarr_format": 3, "node_type": "gr')
    err = _error(_run(model, store), capsys)
    assert f"store {store} is damaged: its root metadata zarr.json cannot be read" in err and "--overwrite" in err
    err = _error(["plot", str(store), "--out", str(tmp_path / "report"), "--parallel", "none"], capsys)
    assert f"store {store} is damaged: its root metadata zarr.json cannot be read" in err
    assert ResultStore.existing(str(store), overwrite=True) is None  # the rehearsal leaves it to be replaced
    replaced = ResultStore.create_or_reuse(str(store), {"model": "other"}, {"model": "m"}, overwrite=True)
    assert replaced.attrs["identity"] == {"model": "other"} and "static" not in replaced.root
    other = tmp_path / "other.zarr"  # a zarr store moe-ray did not make stays untouchable
    import zarr

    zarr.open_group(str(other), mode="w").attrs["mine"] = 1
    err = _error(_run(model, other), capsys)
    assert f"{other} exists and is not a moe-ray store" in err


def test_damage_is_claimed_only_for_a_store_that_exists(tmp_path):
    assert find_damage(tmp_path / "never.zarr") is None
    (tmp_path / "empty.zarr").mkdir()
    assert find_damage(tmp_path / "empty.zarr") is None
    args = argparse.Namespace(command="plot", stores=[str(tmp_path / "never.zarr")])
    try:
        {}["missing"]
    except KeyError as exc:
        line, status = explain_error(exc, args)
    assert status == 1 and "damaged" not in line and line.startswith("unexpected KeyError")


def test_an_unexpected_error_names_its_type_and_where_it_happened(model, tmp_path, capsys, monkeypatch):
    from moe_ray import api, spec

    def broken(*args, **kwargs):
        spec.set_path({"static": 1}, "static.seed", 2)  # a TypeError inside moe_ray/spec.py

    monkeypatch.setattr(api, "run", broken)
    err = _error(_run(model, tmp_path / "s.zarr"), capsys, status=1)
    line = next(n for n, text in enumerate(Path(spec.__file__).read_text().splitlines(), 1)
                if text.strip() == "data[leaf] = value")
    assert err.startswith(f"moe-ray: error: unexpected TypeError at moe_ray/spec.py:{line}: ")
    assert "--debug" in err
    assert main(_run(model, tmp_path / "s.zarr") + ["--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_paths_are_absolute_and_expanded_before_planning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    toml = tmp_path / "spec.toml"
    toml.write_text('model = "ckpt"\nreference = "file://dense"\nstore = "~/out.zarr"\n'
                    '[dynamic]\ncorpus_file = "~/corpus.jsonl"\n')
    spec = as_spec(str(toml))
    assert spec.model == str(tmp_path / "ckpt") and spec.reference == f"file://{tmp_path / 'dense'}"
    assert spec.store == str(tmp_path / "home" / "out.zarr")
    assert spec.dynamic.corpus_file == str(tmp_path / "home" / "corpus.jsonl")
    url = as_spec({"model": "s3://bucket/m", "store": "gs://b/out.zarr"})
    assert (url.model, url.store) == ("s3://bucket/m", "gs://b/out.zarr")
    assert os.path.isabs(as_spec({"model": "m", "store": "s.zarr"}).store)


def test_submit_refuses_an_in_process_location_before_reaching_a_cluster(model):
    from moe_ray import submit
    from moe_ray.errors import SpecError

    with pytest.raises(SpecError, match="memory:// lives in one process's memory"):
        submit({"model": str(model), "store": "memory://out.zarr"}, "http://127.0.0.1:1")


def test_storage_options_flat_or_by_protocol():
    from moe_ray.fs import options_for, use_storage_options

    flat = {"endpoint_url": "http://127.0.0.1:9000", "client_kwargs": {"region_name": "eu-west-1"}}
    with use_storage_options(flat):
        assert options_for("s3://b/m") == flat and options_for("/local/m") == {} and options_for("memory://x") == {}
    by_protocol = {"s3": {"anon": True}, "hf": {"token": "t"}}
    with use_storage_options(by_protocol):
        assert options_for("s3://b/m") == {"anon": True} and options_for("hf://org/m") == {"token": "t"}
        assert options_for("gs://b/m") == {}
    assert options_for("s3://b/m") == {}
