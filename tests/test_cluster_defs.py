"""The cluster definitions (issue 21, items 2-4), checked as far as this machine can without Docker, a
Kubernetes cluster or an AWS account:

- cluster/image/Dockerfile: its base image's Ray and Python are pyproject's pins, and the only thing it
  pip-installs is the wheel it is given (by path);
- cluster/kuberay/*.yaml: valid against KubeRay's own CRD schemas (v1.7.0, vendored in
  tests/data/kuberay), closed as the API server's strict field validation closes them, and written to
  KubeRay's documented behaviour (the image, no pip at start, the token from a Secret, /dev/shm in
  memory, requests = limits, a runnable entrypoint);
- cluster/aws/gpu-cluster.yaml: valid against Ray's own cluster-launcher schema, one token made on the
  user's machine and read from the same path on every node, the image's Python 3.11.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from moe_ray.service import METADATA_KEY
from moe_ray.spec import Spec

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "cluster" / "kuberay"
CRDS = Path(__file__).resolve().parent / "data" / "kuberay"
DOCKERFILE = ROOT / "cluster" / "image" / "Dockerfile"
AWS = ROOT / "cluster" / "aws" / "gpu-cluster.yaml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


def _ray_pin() -> SpecifierSet:
    (pin,) = [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"ray\b", d)]
    return SpecifierSet(re.sub(r"^ray(\[[^]]*\])?", "", pin))


def _load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader) if doc]


# ---- the image ----------------------------------------------------------------------------------

def _dockerfile() -> tuple[dict[str, str], list[str]]:
    """The Dockerfile's ARG defaults and its instructions (continuation lines joined, comments out)."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    args = dict(re.fullmatch(r"ARG (\w+)=(\S+)", i).groups() for i in instructions if re.fullmatch(r"ARG \w+=\S+", i))
    return args, instructions


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], text)


def test_image_base_is_pyprojects_ray_and_python():
    args, instructions = _dockerfile()
    (base,) = [_expand(i.split()[1], args) for i in instructions if i.startswith("FROM ")]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cpu|cu\d+)", base)
    assert match, base
    ray, python = Version(match.group(1)), Version(f"{match.group(2)}.{match.group(3)}")
    assert ray in _ray_pin()
    assert python in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert python == Version("3.11")  # the lowest Python pyproject admits: the one the cluster runs
    assert match.group(4) == "cpu"  # the default; the CUDA image changes only the variant (the header's command)
    assert re.search(r"--build-arg IMAGE_VARIANT=cu\d+ ", DOCKERFILE.read_text())


def test_image_installs_only_the_wheel_it_is_given():
    args, instructions = _dockerfile()
    runs = [i for i in instructions if i.startswith("RUN ")]
    installs = [part for run in runs for part in re.split(r"&&|;", run) if re.search(r"\bpip\b", part)]
    (install,) = [p for p in installs if " install " in p]
    words = shlex.split(_expand(install, args))
    targets, valued = [], {"--extra-index-url", "--index-url", "-i"}  # pip options that take a value
    rest = iter(words[words.index("install") + 1:])
    for word in rest:
        assert word not in ("-r", "--requirement", "-e", "--editable"), install
        if word in valued:
            assert re.fullmatch(r"https://download\.pytorch\.org/whl/\w+", next(rest)), install
        elif not word.startswith("-"):
            targets.append(word)
    # the copied wheel (with its s3 extra), nothing by name
    assert targets == ["$(ls /tmp/wheels/moe_ray-*.whl)[s3]"], install
    (copy_,) = [i for i in instructions if i.startswith("COPY ")]
    assert copy_.split()[-1] == "/tmp/wheels/" and "${WHEEL}" in copy_
    assert "WHEEL" not in args  # no default: the build must be given the wheel's path
    assert "s3" in PYPROJECT["project"]["optional-dependencies"]


# ---- KubeRay ------------------------------------------------------------------------------------

def _closed(schema: dict) -> dict:
    """A CRD's openAPIV3Schema as JSON Schema that refuses unknown fields, as the API server's strict
    field validation (kubectl's default) does: objects with properties are closed unless
    `x-kubernetes-preserve-unknown-fields`; `x-kubernetes-int-or-string` takes an integer or a string.
    Changes `schema` in place (a fresh load) and returns it."""
    def walk(node):
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
            if "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@cache
def _crd_schema(kind: str, version: str) -> dict:
    for crd in CRDS.glob("ray.io_*.yaml"):
        doc = yaml.load(crd.read_text(), Loader=yaml.CSafeLoader)
        if doc["spec"]["names"]["kind"] == kind:
            (v,) = [v for v in doc["spec"]["versions"] if v["name"] == version]
            return _closed(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"no vendored CRD for {kind}")


@cache
def _crd_validator(kind: str, version: str) -> jsonschema.protocols.Validator:
    """A validator of the closed schema, built once."""
    return jsonschema.Draft7Validator(_crd_schema(kind, version))


def _manifests() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in _load_all(path)]


def _ray_resources() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in _manifests() if doc["apiVersion"].startswith("ray.io/")]


def _pod_specs(doc: dict) -> list[dict]:
    """Every pod template's spec of a RayCluster or RayJob."""
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec", spec) if doc["kind"] == "RayJob" else spec
    pods = []
    if "headGroupSpec" in cluster:
        pods.append(cluster["headGroupSpec"]["template"]["spec"])
        pods += [group["template"]["spec"] for group in cluster.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in spec:
        pods.append(spec["submitterPodTemplate"]["spec"])
    return pods


def test_vendored_crds_are_kuberays_v1_7():
    readme = (CRDS / "README.md").read_text()
    assert "v1.7.0" in readme and "github.com/ray-project/kuberay" in readme
    schema = _crd_schema("RayCluster", "v1")["properties"]["spec"]["properties"]
    assert set(schema["authOptions"]["properties"]) >= {"mode", "secretName"}


@pytest.mark.parametrize("name", sorted(p.name for p in KUBERAY.glob("*.yaml")))
def test_kuberay_manifests_valid_against_the_crds(name):
    docs = [doc for file, doc in _manifests() if file == name]
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            _crd_validator(doc["kind"], doc["apiVersion"].split("/")[1]).validate(doc)
        else:
            assert doc["apiVersion"] in ("v1", "apps/v1") and doc["kind"] and doc["metadata"]["name"]


def test_closed_schema_refuses_what_kubectl_would():
    """The schema check can fail: a misspelt field, a Ray start param that is not a string, and an env
    entry without a name are refused."""
    (cluster,) = [doc for _, doc in _ray_resources() if doc["kind"] == "RayCluster"]
    validator = _crd_validator("RayCluster", "v1")
    validator.validate(cluster)
    for change in (lambda c: c["spec"].update(authOption={"mode": "token"}),
                   lambda c: c["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
                   lambda c: c["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
                   .append({"value": "x"}),
                   lambda c: c["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
                   ["limits"].update({"cpu": [1]})):
        bad = copy.deepcopy(cluster)
        change(bad)
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(bad)


def test_kuberay_pods_run_the_image_and_install_nothing():
    for name, doc in _ray_resources():
        assert "pip" not in json.dumps(doc), name  # no pip at pod start (nor anywhere)
        overwrite = doc["metadata"].get("annotations", {}).get("ray.io/overwrite-container-cmd") == "true"
        for pod in _pod_specs(doc):
            for container in pod["containers"]:
                assert re.fullmatch(rf"[a-z0-9.-]+/moe-ray:{re.escape(VERSION)}-(cpu|cuda)", container["image"]), \
                    (name, container["image"])
                # a custom command is merged with KubeRay's unless the annotation says it replaces it
                assert "command" not in container or overwrite or container["name"] == "submitter", name


def test_kuberay_cluster_token_secret_shm_and_resources():
    (cluster,) = [doc for _, doc in _ray_resources() if doc["kind"] == "RayCluster"]
    spec = cluster["spec"]
    assert spec["authOptions"] == {"mode": "token", "secretName": "moe-ray-auth-token"}
    assert Version(spec["rayVersion"]) in _ray_pin()
    for name, doc in _ray_resources():
        for pod in _pod_specs(doc):
            for container in pod["containers"]:
                for env in container.get("env", []):  # the token never as a plain value
                    assert not (env["name"].startswith("RAY_AUTH_TOKEN") and "value" in env), name
                    assert "valueFrom" in env or not re.search(r"TOKEN|SECRET|PASSWORD|KEY", env["name"]), env
                limits, requests = container["resources"]["limits"], container["resources"]["requests"]
                assert limits == requests and {"cpu", "memory"} <= set(limits), (name, container["name"])
    pods = _pod_specs(cluster)
    for pod in pods:
        (container,) = pod["containers"]
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert [m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"] == [shm[0]["name"]]
        assert container["envFrom"] == [{"secretRef": {"name": "moe-ray-s3", "optional": True}}]
    head, *workers = pods
    assert head["containers"][0]["image"].endswith("-cpu")
    assert all(w["containers"][0]["image"].endswith("-cuda") and
               int(w["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) > 0 for w in workers)


def test_kuberay_jobs_run_a_valid_spec_with_the_clusters_submitter():
    cluster_name = [doc for _, doc in _ray_resources() if doc["kind"] == "RayCluster"][0]["metadata"]["name"]
    jobs = [(name, doc) for name, doc in _ray_resources() if doc["kind"] == "RayJob"]
    assert len(jobs) == 2
    for name, job in jobs:
        spec = job["spec"]
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster_name}
        assert spec["submitterPodTemplate"]["spec"]["containers"][0]["image"].endswith("-cpu")
        args = shlex.split(spec["entrypoint"])  # as the head's shell splits it...
        assert args[:3] == ["python", "-m", "moe_ray.entrypoints.analyze"]
        # ...after `ray job submit -- ENTRYPOINT` joined KubeRay's words again (subprocess.list2cmdline)
        assert shlex.split(subprocess.list2cmdline(args)) == args
        run = Spec.from_dict(json.loads(args[args.index("--spec") + 1]))
        run.validate()
        assert run.store.startswith("s3://") and run.model.startswith("s3://")
        assert spec["metadata"] == {METADATA_KEY + "_store": run.store, METADATA_KEY + "_model": run.model,
                                    METADATA_KEY + "_analyses": ",".join(run.analyses)}, name


# ---- AWS ----------------------------------------------------------------------------------------

def _aws() -> dict:
    return yaml.safe_load(AWS.read_text())


def test_aws_config_valid_against_rays_launcher_schema():
    """Ray's schema, and then what `ray up` itself checks: the config with the launcher's defaults."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = _aws()
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))
    bad = dict(config, docker=dict(config["docker"], imagee="x"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_aws_one_token_from_the_users_machine_on_every_node():
    config = _aws()
    text = json.dumps(config)  # what the launcher runs (the header's comments show what the user runs)
    assert "openssl rand" not in text and "token_hex" not in text and "get-auth-token" not in text
    (token_path,) = [remote for remote, local in config["file_mounts"].items() if "token" in remote]
    assert config["file_mounts"][token_path].startswith("~/")  # made once, on the user's machine
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    for command in ray_starts:  # every node: token auth, from that one file
        assert "RAY_AUTH_MODE=token" in command and f"RAY_AUTH_TOKEN_PATH={token_path}" in command, command
    assert "pip install" not in text and "setup_commands" not in config


def test_aws_nodes_run_the_image_of_python_3_11():
    docker = _aws()["docker"]
    for image in (docker["head_image"], docker["worker_image"]):
        assert re.fullmatch(rf"[a-z0-9.-]+(/[a-z0-9.-]+)*/moe-ray:{re.escape(VERSION)}-(cpu|cuda)", image), image
    assert docker["head_image"].endswith("-cpu") and docker["worker_image"].endswith("-cuda")
    args, instructions = _dockerfile()
    assert "-py311-" in _expand([i for i in instructions if i.startswith("FROM ")][0].split()[1], args)
