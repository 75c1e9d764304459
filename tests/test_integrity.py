"""A store that cannot mix two models and knows what it holds (issue 23, items 1 and 2).

- a resume over weights whose bytes changed in a tensor a done unit read is refused, naming it,
  before anything is computed, however small the edit and wherever it is (size and mtime kept);
- a done unit whose array or chunk is gone is recomputed (and said), never passed off as NaN; the
  repaired store equals an uninterrupted run;
- `store_status` / `open_results` say when an analysis is partial, failed or damaged.
"""
from __future__ import annotations

import json

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file

import moe_ray
from moe_ray.checkpoint import open_checkpoint
from moe_ray.errors import CheckpointError, StoreError
from moe_ray.store import IncompleteStoreWarning, store_status

from checkpoint_edits import set_tensor_value

PAIRS = ["0-1", "2-3", "1-5"]


def _spec(model, store, **kw) -> dict:
    return {"model": str(model), "store": str(store), "progress": False, "analyses": ["static", "reorder"],
            "reorder": {"pairs": PAIRS}, **kw}


def _arrays(store: str) -> dict[str, np.ndarray]:
    """Every array of the store's analysis groups, by path (bookkeeping ones too)."""
    root = zarr.open_group(store, mode="r", use_consolidated=False)
    return {path: np.asarray(a[...]) for path, a in root.members(max_depth=None)
            if isinstance(a, zarr.Array) and "/" in path}


def _assert_same(a: str, b: str) -> None:
    want, got = _arrays(a), _arrays(b)
    assert sorted(want) == sorted(got)
    for path in want:
        if want[path].dtype.kind in "fc":
            np.testing.assert_array_equal(want[path], got[path], err_msg=path)
        else:
            assert (want[path] == got[path]).all(), path


@pytest.fixture(scope="module")
def clean(ray_session, tiny, tmp_path_factory):
    """A tiny mixtral and the store of an uninterrupted static + reorder run over it."""
    ck = tiny("mixtral", "scratch", seed=21)
    store = str(tmp_path_factory.mktemp("clean") / "clean.zarr")
    moe_ray.run(_spec(ck.path, store))
    return ck, store


def _edit_in_place(path: str, start: int, raw: bytes) -> None:
    """Overwrite bytes of a file, keeping its size and its modification time."""
    stat = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(raw)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_resume_over_an_edited_tensor_is_refused_naming_it(clean, tmp_path):
    """The issue's case: a run fails at layer 3 (a NaN), layers 0-2 done; the NaN is repaired AND
    1,280 values of a layer-0 expert are changed (outside the start, middle and end KiB that the
    old identity sampled; size and mtime kept): the rerun is refused naming that tensor, computing
    nothing; with the layer-0 edit undone, the rerun resumes and equals an uninterrupted run."""
    ck, reference = clean
    model = tmp_path / "model"
    shutil.copytree(ck.path, model)
    ckpt = open_checkpoint(model)
    shard, original = set_tensor_value(model, ckpt.family.expert_keys(3, 2)["up"], (5, 7), float("nan"))
    store = tmp_path / "s.zarr"
    # static first, one task at a time (each asks for both CPUs): layers 0, 1, 2 finish, 3 fails
    with pytest.raises(CheckpointError, match=r"static layer 3: tensor .*experts\.2\.w3\.weight .* NaN/Inf"):
        moe_ray.run(_spec(model, store, resources={"cpus_per_task": 2}))
    done = zarr.open_group(str(store), mode="r")["static/unit_done"][...]
    assert done.tolist() == [1, 1, 1, 0]
    assert store_status(str(store))["static"]["text"] == "failed 3/4"

    save_file(original, shard, metadata={"format": "pt"})  # the NaN repaired
    edited = ckpt.family.expert_keys(0, 1)["up"]
    info = open_checkpoint(model).info(edited)
    values = load_file(info.file)[edited]  # bf16 [128, 64]
    rows = values[10:30].clone()  # 1,280 values, bytes 1,280..3,839 of 16,384
    assert rows.numel() == 1280
    _edit_in_place(info.file, info.start + 10 * 64 * 2, (rows * 1.01).contiguous().view(torch.uint8).numpy().tobytes())
    runs_before = len(zarr.open_group(str(store), mode="r").attrs["runs"])
    with pytest.raises(StoreError, match=rf"other weights: the model's tensor {edited} \(layer 0\) differs from the "
                                         r"one the store was made from \(static layer 0 read it; it has other bytes"):
        moe_ray.run(_spec(model, store))
    after = zarr.open_group(str(store), mode="r")
    assert len(after.attrs["runs"]) == runs_before and after["static/unit_done"][...].tolist() == [1, 1, 1, 0]

    _edit_in_place(info.file, info.start + 10 * 64 * 2, rows.contiguous().view(torch.uint8).numpy().tobytes())
    moe_ray.run(_spec(model, store))
    assert store_status(str(store)) == {
        "static": {"state": "complete", "done": 4, "planned": 4, "damage": None, "text": "complete"},
        "reorder": {"state": "complete", "done": 12, "planned": 12, "damage": None, "text": "complete"}}
    _assert_same(reference, str(store))


def test_an_edit_is_found_in_a_complete_store_and_in_reorder_records(clean, tmp_path):
    """A complete store is not 'nothing to do' over edited weights: one flipped bit in the last byte
    of a layer-2 expert is found, naming the tensor and a unit that read it."""
    ck, reference = clean
    model = tmp_path / "model"
    shutil.copytree(ck.path, model)
    store = tmp_path / "s.zarr"
    shutil.copytree(reference, store)
    key = open_checkpoint(model).family.expert_keys(2, 5)["down"]
    info = open_checkpoint(model).info(key)
    with open(info.file, "rb") as f:
        f.seek(info.end - 1)
        last = f.read(1)
    _edit_in_place(info.file, info.end - 1, bytes([last[0] ^ 1]))  # one bit of the tensor's last byte
    with pytest.raises(StoreError, match=rf"the model's tensor {key} \(layer 2\) differs .*\((static|reorder)"):
        moe_ray.run(_spec(model, store))


@pytest.mark.parametrize("damage", ["array", "chunk"])
def test_a_deleted_array_or_chunk_is_named_and_recomputed(clean, tmp_path, damage, capsys):
    """`rm -rf static/neuron_pca` (every done layer lacks it) or one chunk of it (layer 1 lacks it):
    the store says damaged (status, open_results' warning), a rerun names it and recomputes exactly
    the units that lack it (the other layers' chunks are not rewritten), and the store then equals
    an uninterrupted run."""
    ck, reference = clean
    store = tmp_path / "s.zarr"
    shutil.copytree(reference, store)
    if damage == "array":
        shutil.rmtree(store / "static" / "neuron_pca")
        missing = "static/neuron_pca is missing"
    else:
        (store / "static" / "neuron_pca" / "c" / "1" / "0" / "0" / "0" / "0").unlink()
        missing = "chunk static/neuron_pca/c/1/0/0/0/0 is missing"
    status = store_status(str(store))
    assert status["static"]["state"] == "damaged" and status["static"]["damage"] == missing
    assert status["reorder"]["state"] == "complete"
    with pytest.warns(IncompleteStoreWarning, match="static damaged"):
        tree = moe_ray.open_results(str(store))
    assert json.loads(tree.attrs["moe_ray_status"])["static"] == f"damaged: {missing}"
    others = {p: p.stat().st_mtime_ns for p in (store / "static" / "matrix_similarity" / "c").glob("[023]/*/*/*")}
    capsys.readouterr()
    moe_ray.run(_spec(ck.path, store, progress=True))
    out = capsys.readouterr().out
    redone = 4 if damage == "array" else 1
    assert f"is damaged: static: {missing}: {redone} done units will be recomputed" in out
    assert f"{redone} of 16 units to run" in out
    kept = {p: p.stat().st_mtime_ns for p in others}
    assert (kept == others) == (damage == "chunk")
    _assert_same(reference, str(store))
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompleteStoreWarning)
        assert json.loads(moe_ray.open_results(str(store)).attrs["moe_ray_status"]) == {"static": "complete",
                                                                            "reorder": "complete"}


def test_a_partial_reorder_store_says_so_and_resumes_to_an_equal_store(clean, tmp_path):
    """A reorder run killed half-way (SIGKILL: done flags of some pairs set, `state` left `running`,
    no live lease): status and open_results say `partial 5/12`; the rerun computes the 7 others and
    the store equals an uninterrupted run."""
    ck, reference = clean
    store = tmp_path / "s.zarr"
    shutil.copytree(reference, store)
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    done = root["reorder/joint/unit_done"]
    flags = np.asarray(done[...])
    cells = np.argwhere(flags)
    for cell in cells[5:]:  # units the killed run had not marked done (some of their data may be written)
        flags[tuple(cell)] = 0
    done[...] = flags
    root.attrs["state"] = "running"
    status = store_status(str(store))
    assert status["reorder"] == {"state": "partial", "done": 5, "planned": 12, "damage": None, "text": "partial 5/12"}
    with pytest.warns(IncompleteStoreWarning, match="reorder partial 5/12"):
        assert json.loads(moe_ray.open_results(str(store)).attrs["moe_ray_status"])["reorder"] == "partial 5/12"
    moe_ray.run(_spec(ck.path, store))
    _assert_same(reference, str(store))
    assert store_status(str(store))["reorder"]["text"] == "complete"


def test_a_causal_resume_over_an_edited_tensor_is_refused(clean, tmp_path):
    """Every causal unit runs the whole model: its digests (taken once, before the first unit) cover
    the final norm and the output head too; one changed byte there refuses the resume."""
    ck, _ = clean
    model = tmp_path / "model"
    shutil.copytree(ck.path, model)
    store = tmp_path / "c.zarr"
    spec = {"model": str(model), "store": str(store), "progress": False, "analyses": ["causal"], "layers": [1],
            "dynamic": {"max_sequences": 2}, "causal": {"checks": ["norm_routing"], "bootstrap_resamples": 20}}
    moe_ray.run(spec)
    ckpt = open_checkpoint(model)
    key = ckpt.family.final_norm_key()
    info = ckpt.info(key)
    with open(info.file, "rb") as f:
        f.seek(info.start)
        first = f.read(1)
    _edit_in_place(info.file, info.start, bytes([first[0] ^ 4]))
    with pytest.raises(StoreError, match=rf"the model's tensor {key} \(other\) differs .*\(causal \(its done units\) "
                                         "read it"):
        moe_ray.run(spec)
    _edit_in_place(info.file, info.start, first)
    moe_ray.run(spec)  # the same bytes again: complete, nothing to do


# ---- causal groups: their units' results per done unit, their summaries once written ------------------

CAUSAL_UNITS = 24  # 2 sequences, norm routing 2 layers + 2 sequences, ablation 2 layers x 8 experts, agreement 2


def _causal_spec(model, store, **kw) -> dict:
    return {"model": str(model), "store": str(store), "progress": True, "analyses": ["causal"], "layers": [1, 2],
            "dynamic": {"max_sequences": 2}, "causal": {"bootstrap_resamples": 20}, **kw}


@pytest.fixture(scope="module")
def causal_clean(ray_session, tiny, tmp_path_factory):
    """A tiny mixtral and the store of an uninterrupted run of every causal check over it."""
    ck = tiny("mixtral", "scratch", seed=21)
    store = str(tmp_path_factory.mktemp("causal") / "clean.zarr")
    moe_ray.run(_causal_spec(ck.path, store, progress=False))
    return ck, store


def _assert_close(a: str, b: str) -> None:
    """Two causal stores hold the same results (float32 forwards batched differently: to 1e-5)."""
    want, got = _arrays(a), _arrays(b)
    assert sorted(want) == sorted(got)
    for path in want:
        if want[path].dtype.kind in "fc":
            np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-7, err_msg=path)
        else:
            assert (want[path] == got[path]).all(), path


CAUSAL_DAMAGE = {  # what is done to a complete store -> what status names, and the units it costs
    "chunk": ("causal/agreement/output_similarity_sum/c/1/0/0/0/0",
              "chunk causal/agreement/output_similarity_sum/c/1/0/0/0/0 is missing", 1),
    "array": ("causal/norm_routing_all/loss", "causal/norm_routing_all/loss is missing", 2),
    "corrupt": ("causal/loss/c/0", "chunk causal/loss/c/0 cannot be read (", 2),
    "summary": ("causal/ablation/delta_loss", "causal/ablation/delta_loss is missing", 0),
}


def _damage(store: Path, kind: str) -> None:
    target = store / CAUSAL_DAMAGE[kind][0]
    if kind == "corrupt":
        target.write_bytes(b"not a zstd frame " * 4)
    elif target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()


def test_a_damaged_causal_store_is_named_and_repaired_and_a_running_one_is_not_damaged(
        causal_clean, tmp_path, capsys, monkeypatch):
    """Causal groups are checked like the others: a deleted chunk, a deleted array, a corrupt chunk of a
    done unit's results and a deleted summary are each named by `store_status` (and by `moe-ray status`
    of a job that has ended: `with_damage`); a resume over all four
    recomputes exactly the damaged units (5 of 24) and the summaries. A store whose units are all done
    but whose summaries are not written (its run stopped in `finish`) is failed, or running while a
    writer holds it, never damaged; the next run writes them and the store equals an uninterrupted run."""
    from moe_ray.lease import Lease
    from moe_ray.service import JobStatus, with_damage
    from moe_ray.units.causal import CausalJob

    ck, reference = causal_clean
    assert store_status(reference)["causal"]["text"] == "complete"
    store = tmp_path / "s.zarr"
    for kind, (_, named, _) in CAUSAL_DAMAGE.items():
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(reference, store)
        _damage(store, kind)
        status = store_status(str(store))["causal"]
        assert status["state"] == "damaged" and status["damage"].startswith(named), (kind, status)
        job = with_damage(JobStatus("raysubmit_1", "SUCCEEDED", "", str(store), {"causal": (24, 24)}))
        assert job.line().startswith(f"raysubmit_1: SUCCEEDED (causal 24/24 units, store causal damaged: {named}")
    for kind in ("chunk", "array", "corrupt"):  # the summary is already gone
        _damage(store, kind)
    capsys.readouterr()

    def fails(self, store):
        raise RuntimeError("stopped before the summaries")

    monkeypatch.setattr(CausalJob, "finish", fails)
    with pytest.raises(RuntimeError, match="stopped before the summaries"):
        moe_ray.run(_causal_spec(ck.path, store))
    out = capsys.readouterr().out
    for kind, (_, named, units) in CAUSAL_DAMAGE.items():
        redone = f"{units} done units will be recomputed" if units else "its summaries will be computed again"
        line = next(line for line in out.splitlines() if named in line)
        assert f"{store} is damaged: " in line and line.endswith(redone), (kind, line)
    assert f"5 of {CAUSAL_UNITS} units to run" in out
    status = store_status(str(store))["causal"]
    assert status["state"] == "failed" and status["damage"] is None, status
    assert status["text"].startswith(f"failed {CAUSAL_UNITS}/{CAUSAL_UNITS} (causal") and \
        status["text"].endswith(": summaries not written)")
    with Lease(str(store), "moe-ray run"):  # a live writer: running, whatever its summaries say
        assert store_status(str(store))["causal"]["state"] == "running"
    monkeypatch.undo()
    moe_ray.run(_causal_spec(ck.path, store))
    assert f"0 of {CAUSAL_UNITS} units to run" in capsys.readouterr().out
    assert store_status(str(store))["causal"]["text"] == "complete"
    _assert_close(reference, str(store))
