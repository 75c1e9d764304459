"""The `moe-ray` command line: make-tiny, run from flags and from a TOML spec, one-line errors."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from moe_ray.cli import main, spec_from_args, build_parser
from moe_ray.spec import Spec, spec_fields
from moe_ray.plotting.common import expert_labels


def test_every_spec_field_has_a_flag():
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    dests = {a.dest for a in run._actions}
    assert {dotted for dotted, _, _ in spec_fields()} <= dests


def test_flags_override_the_spec_file(tmp_path):
    spec = tmp_path / "job.toml"
    spec.write_text('model = "a"\nstore = "s.zarr"\n[static]\ndbscan_eps = 50\n[resources]\nnum_cpus = 2\n')
    args = build_parser().parse_args(["run", str(spec), "--store", "t.zarr", "--layers", "1,3", "--no-progress"])
    args.spec = args.spec_file
    got = spec_from_args(args)
    assert got == Spec.from_dict({"model": "a", "store": "t.zarr", "layers": [1, 3], "progress": False,
                                  "static": {"dbscan_eps": 50.0}, "resources": {"num_cpus": 2}})


def test_run_from_spec_in_process(ray_session, tiny, tmp_path, capsys):
    ck = tiny("mixtral", "upcycled")
    spec = tmp_path / "job.toml"
    store = tmp_path / "out.zarr"
    spec.write_text(f'model = "{ck.path}"\nreference = "{ck.reference}"\nstore = "{store}"\n')
    assert main(["run", "--spec", str(spec), "--layers", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "2 units computed" in out and "Tab 3 mean R²" in out
    ds = xr.open_zarr(store, group="static")
    assert list(ds.layer.values) == [1, 2] and "F" in expert_labels(ds, "expert_i")


@pytest.mark.parametrize("argv, message", [
    (["run", "--model", "/nonexistent/ckpt", "--store", "x.zarr"], "checkpoint directory not found: /nonexistent/ckpt"),
    (["run", "--spec", "/nonexistent/job.toml"], "spec file not found"),
    (["run", "--model", "m", "--analyses", "everything"], "unknown analysis 'everything'"),
    (["run", "--model", "m", "--layers", "one"], "spec field layers must be int"),
    (["make-tiny", "--family", "mixtral", "--variant", "scratch", "--out", "/proc/forbidden/x"], "/proc/forbidden"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-ray: error: ") and message in err and "\n" not in err


def test_console_script_end_to_end(tmp_path):
    """The installed entry point, in a fresh process with its own local Ray: one command each."""
    env = dict(os.environ, RAY_AUTH_TOKEN_PATH=str(tmp_path / "token"))
    exe = [sys.executable, "-m", "moe_ray.cli"]
    subprocess.run(exe + ["make-tiny", "--family", "grok1", "--variant", "permuted", "--out", str(tmp_path / "g")],
                   check=True, env=env, capture_output=True)
    done = subprocess.run(exe + ["run", "--model", str(tmp_path / "g"), "--store", str(tmp_path / "g.zarr"),
                                 "--num-cpus", "1", "--layers", "0", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ds = xr.open_zarr(tmp_path / "g.zarr", group="static")
    np.testing.assert_allclose(ds.neuron_avg_similarity.sel(layer=0, expert_i=0, expert_j=1).values, 1, atol=1e-6)
    bad = subprocess.run(exe + ["run", "--model", str(tmp_path / "g" / "dense-parent"), "--store", str(tmp_path / "b.zarr")],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("moe-ray: error: checkpoint directory not found")


def test_parser_spells_out_families_and_variants_without_torch():
    """The parser's make-tiny choices are the package's own; building it imports no torch."""
    from moe_ray.checkpoint import FAMILIES
    from moe_ray.checkpoint.tiny import VARIANTS
    from moe_ray.cli import TINY_FAMILIES, TINY_VARIANTS

    assert set(TINY_FAMILIES) == set(FAMILIES) - {"dense"} and TINY_VARIANTS == VARIANTS
    code = "import sys; from moe_ray.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


MISTAKES = [
    (["run", "--model", "m", "--device", "gpu"], "device must be auto, cuda or cpu, not 'gpu'"),
    (["run", "--model", "m", "--bogus"], "unrecognized arguments: --bogus"),
    (["run", "--model", "m", "--shards", "0", "--analyses", "dynamic"], "shards must be at least 1"),
    (["plan"], "the following arguments are required: --model"),
    (["logs"], "the following arguments are required: job_id"),
    (["make-tiny", "--family", "nope", "--variant", "scratch", "--out", "x"], "invalid choice: 'nope'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
]


def test_every_cli_mistake_is_one_line_before_torch_or_ray(tmp_path):
    """argparse's own mistakes and bad spec values: one `moe-ray: error:` line each, exit 2, and
    nothing heavy imported (one fresh interpreter for all of them, so its sys.modules tell)."""
    script = (
        "import contextlib, io, json, sys\n"
        "from moe_ray.cli import main\n"
        f"out = []\n"
        f"for argv in {[a for a, _ in MISTAKES]!r}:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            rc = main(argv)\n"
        "        except SystemExit as exc:\n"
        "            rc = exc.code\n"
        "    out.append((rc, err.getvalue()))\n"
        "print(json.dumps({'results': out, 'heavy': [m for m in ('torch', 'ray', 'zarr', 'transformers') "
        "if m in sys.modules]}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    import json

    report = json.loads(done.stdout)
    for (argv, message), (rc, err) in zip(MISTAKES, report["results"]):
        assert rc == 2, (argv, err)
        assert err.startswith("moe-ray: error: ") and err.count("\n") == 1 and message in err, (argv, err)
    assert report["heavy"] == []


def test_run_help_groups_flags_with_defaults_and_choices(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    sections = {}
    for block in text.split("\n\n"):
        head = block.splitlines()[0] if block.strip() else ""
        if head.endswith(":") and not head.startswith(" "):
            sections[head[:-1]] = block
    assert {"spec", "analyses", "static", "reorder", "dynamic", "causal", "resources", "cluster"} <= set(sections)
    dynamic = " ".join(text.split("\ndynamic:", 1)[1].split("\ncausal:", 1)[0].split())
    assert "--shards SHARDS layer-shard actors the model is split over (default: 1)" in dynamic
    assert "--placement {PACK,SPREAD,STRICT_SPREAD}" in dynamic and "(default: PACK)" in dynamic
    cluster = " ".join(text.split("\ncluster:", 1)[1].split())
    assert "--address ADDRESS" in cluster and "--num-cpus NUM_CPUS" in cluster
    flat = " ".join(text.split())
    assert "--inputs {short,long,text,corpus},..." in flat and "(default: short,long)" in flat


def test_start_head_says_what_is_missing(tmp_path):
    """No `ray` beside the Python nor on PATH: one line naming what is missing, exit 1, nothing started."""
    script = os.path.join(os.path.dirname(__file__), "..", "cluster", "local", "start-head.sh")
    python = tmp_path / "python3"
    python.write_text("#!/bin/sh\nexit 0\n")
    python.chmod(0o755)
    done = subprocess.run(["bash", script], env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": str(python)},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr == (f"start-head.sh: no `ray` beside {python} nor on PATH; install moe-ray (and with it Ray) "
                           "into that Python, or set RAY=/path/to/ray\n")
