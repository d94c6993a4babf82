"""Every YAML under cluster/ validates offline, and a broken copy does not.

- Ray cluster launcher files (cluster/*.yaml) against the ray-schema.json that ships inside the
  installed ray, then through ray's own prepare_config + validate_config (what `ray up` runs first).
- KubeRay manifests (cluster/kuberay/*.yaml) against JSON Schemas of the KubeRay v1 CRDs, kept in
  tests/data/kuberay (source and version in its README); these reject unknown fields.
- The RayService's serveConfigV2 against Ray Serve's own ServeDeploySchema.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY_SCHEMAS = REPO / "tests" / "data" / "kuberay"
SCHEMA_FILES = {"RayCluster": "raycluster_v1.json", "RayJob": "rayjob_v1.json", "RayService": "rayservice_v1.json"}
SHARED_MOUNT = "/mnt/retro"  # where every pod and node sees the project storage

LAUNCHER_FILES = sorted(CLUSTER.glob("*.yaml"))
KUBERAY_FILES = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def kuberay_schemas() -> dict[str, dict]:
    out = {}
    for kind, name in SCHEMA_FILES.items():
        path = KUBERAY_SCHEMAS / name
        if not path.is_file():
            pytest.fail(f"missing KubeRay schema {path}: the repository ships {', '.join(SCHEMA_FILES.values())} "
                        "in tests/data/kuberay; restore them from git")
        out[kind] = json.loads(path.read_text())
    return out


def _validate_kuberay(doc: dict, schemas: dict[str, dict]) -> None:
    kind = doc.get("kind")
    if kind == "PersistentVolumeClaim":
        assert doc["apiVersion"] == "v1"
        assert "ReadWriteMany" in doc["spec"]["accessModes"], "the project volume must be shared by every pod"
        return
    assert kind in schemas, f"no schema for kind {kind!r}"
    jsonschema.validate(doc, schemas[kind])


def _serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def _validate_serve(cfg: dict) -> None:
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    ServeDeploySchema.model_validate(cfg)
    # Serve ignores unknown application keys; catch typos such as `import_pth` here.
    for app in cfg["applications"]:
        unknown = set(app) - set(ServeApplicationSchema.model_fields)
        assert not unknown, f"unknown keys in Serve application {app.get('name')!r}: {sorted(unknown)}"


def _cluster_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    return [s for s in (spec if doc["kind"] == "RayCluster" else None, spec.get("rayClusterSpec"),
                        spec.get("rayClusterConfig")) if s]


# --------------------------------------------------------------------------------------------
# Ray cluster launcher
# --------------------------------------------------------------------------------------------

def test_launcher_files_exist():
    assert {p.name for p in LAUNCHER_FILES} >= {"aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config_validates(path, ray_schema):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(path.read_text())
    jsonschema.validate(cfg, ray_schema)
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` does before launching anything


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config_shape(path):
    cfg = yaml.safe_load(path.read_text())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head runs GCS, dashboard and job drivers, not tasks"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) > 0]
    cpu = [v for v in workers.values() if not v["resources"].get("GPU")]
    assert gpu and cpu, "CPU workers (prep/db/index/query) and GPU workers (embed/train/serve)"
    for v in workers.values():
        assert v["min_workers"] == 0 < v["max_workers"], "autoscaling workers"
    assert cfg["max_workers"] >= sum(v["max_workers"] for v in workers.values())
    # torch pinned wherever it is installed; the CPU wheel index on nodes without a GPU
    commands = " ".join(cfg["setup_commands"])
    for m in re.finditer(r"pip install[^;&|]*torch[^;&|]*", commands):
        assert "torch==" in m.group(0), m.group(0)
    assert "download.pytorch.org/whl/cpu" in commands
    assert "constraints.txt" in commands
    # shared storage mounted on every node; the repository's bulky directories are not synced
    assert any(SHARED_MOUNT in c and "mount" in c for c in cfg["setup_commands"])
    assert any(".venv" in x for x in cfg["rsync_exclude"])


# --------------------------------------------------------------------------------------------
# KubeRay
# --------------------------------------------------------------------------------------------

def test_kuberay_files_exist():
    kinds = {d["kind"] for p in KUBERAY_FILES for d in _docs(p)}
    assert kinds >= {"RayCluster", "RayJob", "RayService"}


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_kuberay_manifest_validates(path, kuberay_schemas):
    docs = _docs(path)
    assert docs
    for doc in docs:
        _validate_kuberay(doc, kuberay_schemas)


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_kuberay_clusters_autoscale_with_cpu_and_gpu_groups(path):
    for doc in _docs(path):
        if doc["kind"] not in SCHEMA_FILES:
            continue
        for spec in _cluster_specs(doc):
            assert spec["enableInTreeAutoscaling"] is True
            assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
            groups = spec["workerGroupSpecs"]
            gpu = [g for g in groups
                   if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})]
            assert gpu and len(gpu) < len(groups), "a GPU group (embed/train/serve) and a CPU group"
            for g in groups:
                assert g["minReplicas"] <= g["maxReplicas"] and g["maxReplicas"] > 0
            templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups]
            for t in templates:
                for c in t["spec"]["containers"]:
                    mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                    assert SHARED_MOUNT in mounts, f"{c['name']} does not mount the shared project volume"


def test_rayjob_runs_the_pipeline_inside_the_job():
    doc = next(d for p in KUBERAY_FILES for d in _docs(p) if d["kind"] == "RayJob")
    # KubeRay pastes the entrypoint into the submitter's shell line: it must be a single word list
    # `bash -c '<chain>'` so that `&&` is evaluated in the Ray job, not in the submitter pod.
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["bash", "-c"] and len(argv) == 3, argv
    stages = re.findall(r"retro-ray (\S+)", argv[2])
    assert stages == ["prep", "db", "embed", "index", "query"]
    assert argv[2].count("&&") == len(stages) - 1
    assert SHARED_MOUNT in argv[2]
    assert doc["spec"]["shutdownAfterJobFinishes"] is True


def test_rayservice_serve_config_validates():
    doc = next(d for p in KUBERAY_FILES for d in _docs(p) if d["kind"] == "RayService")
    cfg = _serve_config(doc)
    _validate_serve(cfg)
    (app,) = cfg["applications"]
    assert app["import_path"] == "retro_ray.serve.app:build_app"
    assert set(app["args"]) == {"project_dir", "checkpoint"}
    assert all(str(v).startswith(SHARED_MOUNT) for v in app["args"].values())


# --------------------------------------------------------------------------------------------
# The checks can fail: broken copies are rejected
# --------------------------------------------------------------------------------------------

def _load_kind(kind: str) -> dict:
    return copy.deepcopy(next(d for p in KUBERAY_FILES for d in _docs(p) if d["kind"] == kind))


def _typo_autoscaling(doc):
    doc["spec"]["enableInTreeAutoscalling"] = doc["spec"].pop("enableInTreeAutoscaling")


def _no_group_name(doc):
    del doc["spec"]["workerGroupSpecs"][0]["groupName"]


def _bad_replicas(doc):
    doc["spec"]["workerGroupSpecs"][1]["maxReplicas"] = "eight"


def _bad_container_field(doc):
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []


def _rayjob_bad_field(doc):
    doc["spec"]["shutdownAfterJobFinish"] = True


@pytest.mark.parametrize("kind,breaker", [
    ("RayCluster", _typo_autoscaling), ("RayCluster", _no_group_name), ("RayCluster", _bad_replicas),
    ("RayCluster", _bad_container_field), ("RayJob", _rayjob_bad_field),
], ids=lambda x: getattr(x, "__name__", x))
def test_broken_kuberay_manifest_fails(kind, breaker, kuberay_schemas):
    doc = _load_kind(kind)
    breaker(doc)
    with pytest.raises(jsonschema.ValidationError):
        _validate_kuberay(doc, kuberay_schemas)


def test_broken_launcher_config_fails(ray_schema):
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    cfg["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "1"  # must be an integer
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, ray_schema)
    cfg = yaml.safe_load((CLUSTER / "gcp.yaml").read_text())
    cfg["available_node_types"]["cpu_worker"]["max_worker"] = 4  # typo: unknown key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, ray_schema)


@pytest.mark.parametrize("change", ["no_import_path", "typo_key", "bad_port"])
def test_broken_serve_config_fails(change):
    from pydantic import ValidationError

    cfg = _serve_config(_load_kind("RayService"))
    app = cfg["applications"][0]
    if change == "no_import_path":
        del app["import_path"]
    elif change == "typo_key":
        app["route_prefx"] = "/"
    else:
        cfg["http_options"]["port"] = "eight thousand"
    with pytest.raises((ValidationError, AssertionError)):
        _validate_serve(cfg)
