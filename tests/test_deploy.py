"""The installable artifact (issue 21, item 1): the wheel `python -m build` makes holds everything a job
needs, and a head started from a fresh venv that has only that wheel of moe-ray runs `moe-ray submit`'s
job to the same store as a local run.

The fresh venv lies outside the checkout and has no pip or moe-ray of its own but the wheel's; it sees
the test venv's third-party packages (torch, Ray, ...) through a .pth file, which adds their folder to
sys.path without running the .pth files there (so not the test venv's editable moe-ray). The tests
prove it: the moe_ray that venv imports, the one that `moe-ray` and the job run, is the wheel's file in
the fresh venv, and `pip check` finds every requirement of the wheel met.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from test_multinode import _assert_same, tiny_dynamic  # noqa: F401 (a fixture of this module too)
from ports import free_port, head_ports

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "cluster" / "local"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout, built as `make wheel` builds it: from the sdist, unpacked in a temp
    folder (so no stale build/ of the checkout gets in)."""
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = out.glob("moe_ray-*.whl")
    return path


@pytest.fixture(scope="module")
def fresh_venv(wheel) -> Path:
    """A venv in a temp folder outside the checkout with the wheel installed (no dependencies: those
    of the test venv are seen through a .pth file)."""
    venv = Path(tempfile.mkdtemp(prefix="moe-ray-wheel-")) / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "test-venv-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    # Ray's console script, as pip would write it, so that cluster/local/start-head.sh runs this venv's Ray
    (venv / "bin" / "ray").write_text(f"#!{python}\nimport sys\nfrom ray.scripts.scripts import main\n"
                                      "sys.exit(main())\n")
    (venv / "bin" / "ray").chmod(0o755)
    yield venv
    shutil.rmtree(venv.parent, ignore_errors=True)


def _env(venv: Path, **extra: str) -> dict[str, str]:
    """The environment of a user of the fresh venv: its bin first on PATH, nothing of the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return {**env, **extra}


def test_wheel_holds_every_module_and_data_file_a_job_needs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    source = {str(p.relative_to(ROOT)) for p in (ROOT / "moe_ray").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    assert {"moe_ray/entrypoints/analyze.py", "moe_ray/entrypoints/plot.py", "moe_ray/data/corpus.jsonl",
            "moe_ray/data/declaration.txt"} <= source
    assert {n for n in names if n.startswith("moe_ray/")} == source  # every module and data file, no more
    assert not any(n.startswith(("jobs/", "tests/", "cluster/")) for n in names)
    version = PYPROJECT["project"]["version"]
    dist_info = f"moe_ray-{version}.dist-info"
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert f"Version: {version}\n" in metadata
    assert "Requires-Dist: ray[default]==2.60.*\n" in metadata
    assert "moe-ray = moe_ray.cli:main" in zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()


def test_fresh_venv_runs_the_wheels_moe_ray(fresh_venv, tmp_path):
    python = str(fresh_venv / "bin" / "python")
    where = subprocess.run([python, "-c", "import moe_ray; print(moe_ray.__file__)"], cwd=tmp_path,
                           env=_env(fresh_venv), capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(fresh_venv) and not Path(where).is_relative_to(ROOT)
    check = subprocess.run([python, "-m", "pip", "check"], env=_env(fresh_venv), capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    version = subprocess.run([str(fresh_venv / "bin" / "moe-ray"), "--version"], cwd=tmp_path, env=_env(fresh_venv),
                             capture_output=True, text=True, check=True).stdout
    assert version == f"moe-ray {PYPROJECT['project']['version']}\n"
    # the job entrypoint refuses a submitter of another version in one line, before any work
    other = subprocess.run([python, "-m", "moe_ray.entrypoints.analyze", "--submitter-version", "0.0.1",
                            "--spec", '{"model": "/nowhere"}'], cwd=tmp_path, env=_env(fresh_venv),
                           capture_output=True, text=True)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [
        f"moe-ray: error: this cluster runs moe-ray {PYPROJECT['project']['version']} ({Path(where).parent}), the "
        "job was submitted with moe-ray 0.0.1: install the same wheel on both (cluster/README.md, \"The "
        "cluster's moe-ray\"), or submit with --ship-package"]


@pytest.fixture(scope="module")
def wheel_head(fresh_venv):
    """A token-auth head started from the fresh venv (cluster/local/start-head.sh: job server on
    127.0.0.1), its own RAY_TMPDIR and free ports; stopped at the end, that head only."""
    from moe_ray.distributed.cluster import ensure_token_auth, token_path

    temp = Path(tempfile.mkdtemp(prefix="mrw-", dir="/tmp"))  # short: Ray's socket paths live in it
    os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(temp / "auth_token"))
    ensure_token_auth()  # the head's token is this process's, so the tests submit in-process too
    env = _env(fresh_venv, PYTHON=str(fresh_venv / "bin" / "python"), RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token_path()), RAY_TMPDIR=str(temp))
    dashboard, ports = free_port(), head_ports()
    cmd = [str(SCRIPTS / "start-head.sh"), "--dashboard-port", str(dashboard), "--temp-dir", str(temp / "ray"),
           "--num-cpus", "2", "--object-store-memory", str(200 * 2**20), *map(str, ports)]
    try:
        started = subprocess.run(cmd, env=env, cwd=temp, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([str(SCRIPTS / "stop-head.sh"), "--temp-dir", str(temp / "ray")], env=env,
                       capture_output=True, timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def test_submit_from_the_wheel_equals_a_local_run(wheel_head, fresh_venv, ray_session, tiny_dynamic, tmp_path):
    """`moe-ray submit --wait` of the fresh venv, from a folder outside the checkout, to the head of the
    fresh venv: static, reorder and dynamic; the job ran the wheel's moe_ray, and the store equals,
    value for value, the same analyses run locally from the checkout (static and reorder on the
    local Ray, dynamic by the shards' own code in this process)."""
    import moe_ray

    address, env = wheel_head
    model, one_dynamic = tiny_dynamic
    one = moe_ray.run(model=model, store=str(tmp_path / "one.zarr"), progress=False, layers=[0, 1, 2, 3],
                      analyses=["static", "reorder"], reorder={"pairs": ["0-1", "2-3"]})
    user = tmp_path / "user"
    user.mkdir()
    (user / "spec.toml").write_text(
        f'model = "{model}"\nstore = "wheel.zarr"\nanalyses = ["static", "reorder", "dynamic"]\n'
        'layers = [0, 1, 2, 3]\n[reorder]\npairs = ["0-1", "2-3"]\n[dynamic]\ninputs = ["short"]\n')
    (user / "env.yaml").write_text("env_vars:\n  MOE_RAY_DEPLOY_MARK: wheel\n")
    out = subprocess.run([str(fresh_venv / "bin" / "moe-ray"), "submit", "spec.toml", "--address", address, "--wait",
                          "--runtime-env", "env.yaml"], cwd=user, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "SUCCEEDED" in out.stdout
    assert f"moe-ray: this job runs moe-ray {moe_ray.__version__} from {fresh_venv}/lib/" in out.stdout  # the job's moe_ray: the wheel's
    # the job ran with the user's runtime_env merged into moe-ray's own, and nothing shipped
    (job_id,) = re.findall(r"submitted job (raysubmit_\w+)", out.stdout)
    from ray.job_submission import JobSubmissionClient

    ran_with = JobSubmissionClient(address).get_job_info(job_id).runtime_env
    job_id = ran_with["env_vars"].pop("MOE_RAY_JOB_ID")  # the submission id, which the store's run log names
    assert job_id.startswith("raysubmit_")
    assert ran_with["env_vars"] == {"PYTHONUNBUFFERED": "1", "MOE_RAY_DEPLOY_MARK": "wheel"}
    assert "py_modules" not in ran_with and "working_dir" not in ran_with
    for group in ("static", "reorder/joint"):
        _assert_same(one, str(user / "wheel.zarr"), group)
    _assert_same(one_dynamic, str(user / "wheel.zarr"), "dynamic/short")


def test_submitter_of_another_version_is_refused_unless_it_ships_its_package(wheel_head, tiny, tmp_path,
                                                                                monkeypatch):
    """A submitter whose moe-ray is not the cluster's: the job fails before any work, and says why; with
    `ship_package` (`--ship-package`) the job runs the submitter's own moe_ray instead."""
    import moe_ray
    from moe_ray.errors import JobError

    address, _ = wheel_head
    monkeypatch.setattr(moe_ray, "__version__", "0.0.1")
    spec = {"model": str(tiny("mixtral", "upcycled").path), "store": str(tmp_path / "v.zarr"), "layers": [1]}
    handle = moe_ray.submit(spec, address)
    with pytest.raises(JobError, match=r"this cluster runs moe-ray \S+ \(.*moe-ray-wheel-.*\), the job was "
                                       r"submitted with moe-ray 0.0.1"):
        handle.result(timeout=120)
    assert not (tmp_path / "v.zarr").exists()

    shipped = moe_ray.submit(spec, address, ship_package=True)
    assert shipped.wait(timeout=300).state == "SUCCEEDED", shipped.logs()[-3000:]
    (ran,) = re.findall(r"^moe-ray: this job runs moe-ray \S+ from (.*)$", shipped.logs(), re.M)
    assert "runtime_resources/py_modules_files" in ran and "moe-ray-wheel-" not in ran  # Ray's copy of ours


# ---- the job's runtime_env: moe-ray's own and the user's (`submit --runtime-env FILE`) ----------------

def test_runtime_env_merges_the_users_with_moe_rays(tmp_path):
    from moe_ray.service import job_runtime_env, load_runtime_env

    (tmp_path / "env.yaml").write_text("env_vars:\n  HF_HOME: /cache\n  PYTHONUNBUFFERED: '0'\n"
                                       "py_modules: [/opt/extra]\npip: [einops]\n")
    (tmp_path / "env.json").write_text('{"env_vars": {"A": "1"}, "config": {"setup_timeout_seconds": 60}}')
    user = load_runtime_env(tmp_path / "env.yaml")
    assert job_runtime_env(user) == {"env_vars": {"PYTHONUNBUFFERED": "0", "HF_HOME": "/cache"},
                                     "py_modules": ["/opt/extra"], "pip": ["einops"]}
    shipped = job_runtime_env(load_runtime_env(tmp_path / "env.json"), ship_package=True)
    assert shipped == {"env_vars": {"PYTHONUNBUFFERED": "1", "A": "1"}, "config": {"setup_timeout_seconds": 60},
                       "py_modules": [str(ROOT / "moe_ray")]}
    assert job_runtime_env() == {"env_vars": {"PYTHONUNBUFFERED": "1"}}  # the cluster's installed moe-ray


@pytest.mark.parametrize("text, says", [
    (None, "cannot read the runtime env file {path}: No such file or directory"),
    ("env_vars: [a\n", "the runtime env file {path} is not YAML or JSON"),
    ("- pip\n", "the runtime env file {path} must hold a mapping of runtime_env fields"),
    ("env_vars: [A]\n", "the runtime env file {path}: env_vars must be a mapping and py_modules a list"),
])
def test_bad_runtime_env_file_is_one_line_before_anything_is_sent(tmp_path, capsys, text, says):
    from moe_ray.cli import main

    path = tmp_path / "env.yaml"
    if text is not None:
        path.write_text(text)
    spec = tmp_path / "spec.toml"
    spec.write_text(f'model = "{tmp_path / "ckpt"}"\nstore = "{tmp_path / "s.zarr"}"\n')
    status = main(["submit", str(spec), "--runtime-env", str(path), "--address", "http://127.0.0.1:9"])
    assert status == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("moe-ray: error: " + says.format(path=path)), line


def test_a_cluster_without_moe_ray_is_named_as_such(monkeypatch):
    """A job whose Python cannot import moe_ray (a cluster without the wheel) fails with what to do."""
    from moe_ray.errors import JobError
    from moe_ray.service import JobHandle, JobStatus

    handle = object.__new__(JobHandle)  # its job server is stood in for by the two calls result() makes
    handle.id = "raysubmit_x"
    monkeypatch.setattr(handle, "wait", lambda timeout=None: JobStatus("raysubmit_x", "FAILED", "exit 1", None, {}),
                        raising=False)
    monkeypatch.setattr(handle, "logs", lambda: "/usr/bin/python: Error while finding module specification for "
                        "'moe_ray.entrypoints.analyze' (ModuleNotFoundError: No module named 'moe_ray')\n", raising=False)
    with pytest.raises(JobError, match=r"^job raysubmit_x failed: the cluster's Python has no moe-ray: install the "
                                       r"wheel on every node, or run the image built from it"):
        handle.result()
