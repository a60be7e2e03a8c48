"""The Kubernetes and KServe manifests (deploy/k8s/, deploy/kserve/), offline: every document
against Kubernetes' schemas (``kubernetes-validate``, strict: unknown fields fail), and every
archive, configuration, model, port and pin they name against what the project builds."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Iterator

import kubernetes_validate
import pytest
import yaml

from deploy.kserve_store import CONFIG_FILES, port_of, store_properties
from export.archive import TASKS
from handlers.contract import KSERVE_MODEL_ROOT, KSERVE_POD_CPUS, MAX_REQUEST_BYTES

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "deploy").glob("*/*.yaml"))
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
ARCHIVES = {TASKS[t].archive_name(t) for t in TASKS}

# KServe v1beta1 (serving.kserve.io): the fields these manifests may use. The InferenceService
# CRD's schema is not shipped with kubernetes-validate; the predictor's container and pod fields
# are checked against Kubernetes' own Pod schema instead (inference_service_pod).
KSERVE_PREDICTOR_FIELDS = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "tolerations",
                           "nodeSelector", "affinity", "serviceAccountName", "pytorch"}
KSERVE_MODEL_FIELDS = {"protocolVersion", "storageUri", "runtimeVersion"}
KSERVE_SCALE_METRICS = {"cpu", "memory", "concurrency", "rps"}


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in MANIFESTS:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                docs.append((f"{path.relative_to(REPO)}#{i}", doc))
    return docs


DOCS = documents()


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def inference_service_pod(isvc: dict) -> dict:
    """The Pod KServe would make of an InferenceService's predictor (its container named as
    KServe names it), for Kubernetes' schema."""
    predictor = isvc["spec"]["predictor"]
    container = {k: v for k, v in predictor["pytorch"].items() if k not in KSERVE_MODEL_FIELDS}
    pod_spec = {k: v for k, v in predictor.items() if k in {"tolerations", "nodeSelector", "affinity",
                                                          "serviceAccountName"}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": isvc["metadata"],
            "spec": {**pod_spec, "containers": [{"name": "kserve-container", **container}]}}


def schema_problems(doc: dict, version: str) -> list[str]:
    """Why ``doc`` is not a valid manifest for Kubernetes ``version`` (empty if it is)."""
    try:
        if doc.get("kind") == "InferenceService":
            problems = []
            if doc.get("apiVersion") != "serving.kserve.io/v1beta1":
                problems.append(f"apiVersion {doc.get('apiVersion')}")
            predictor = doc["spec"]["predictor"]
            problems += [f"predictor.{k}: unknown field" for k in set(predictor) - KSERVE_PREDICTOR_FIELDS]
            if predictor.get("scaleMetric", "cpu") not in KSERVE_SCALE_METRICS:
                problems.append(f"scaleMetric {predictor['scaleMetric']}")
            kubernetes_validate.validate(inference_service_pod(doc), version, strict=True)
            return problems
        kubernetes_validate.validate(doc, version, strict=True)
        return []
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(str(p) for p in e.path)}: {e.message}"]
    except (KeyError, TypeError, AttributeError) as e:
        return [f"malformed: {type(e).__name__} {e}"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("where,doc", DOCS, ids=[w for w, _ in DOCS])
def test_manifest_is_valid(where, doc, version):
    assert schema_problems(doc, version) == []


def test_invalid_manifests_are_caught():
    """The validation can fail: a wrong type, an unknown field, an unknown KServe field."""
    deployment = copy.deepcopy(of_kind("Deployment")[0])
    deployment["spec"]["replicas"] = "two"
    assert schema_problems(deployment, K8S_VERSIONS[-1])
    deployment = copy.deepcopy(of_kind("Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    assert schema_problems(deployment, K8S_VERSIONS[-1])
    isvc = copy.deepcopy(of_kind("InferenceService")[0])
    isvc["spec"]["predictor"]["pytorch"]["readinessProbe"]["periodSeconds"] = "ten"
    assert schema_problems(isvc, K8S_VERSIONS[-1])
    isvc = copy.deepcopy(of_kind("InferenceService")[0])
    isvc["spec"]["predictor"]["replicas"] = 2
    assert schema_problems(isvc, K8S_VERSIONS[-1])


# --- what the manifests name -----------------------------------------------------------------
def containers(doc: dict) -> Iterator[dict]:
    if doc["kind"] == "InferenceService":
        yield doc["spec"]["predictor"]["pytorch"]
    elif doc["kind"] == "Deployment":
        yield from doc["spec"]["template"]["spec"]["containers"]


def ts_config(container: dict) -> str | None:
    """The store configuration a TorchServe container starts with (``--ts-config``)."""
    argv = [*container.get("command", []), *container.get("args", [])]
    for i, arg in enumerate(argv):
        if arg.startswith("--ts-config"):
            path = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
            assert path.startswith(f"{KSERVE_MODEL_ROOT}/config/"), path
            return path.rsplit("/", 1)[1]
    return None


def probes(container: dict) -> Iterator[list[str]]:
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container.get(kind, {}).get("exec", {}).get("command")
        if command:
            yield command


def naming_problems(doc: dict) -> list[str]:
    """Archives, configurations, models, ports and GPUs a manifest names that the store lacks."""
    problems = []
    for container in containers(doc):
        name = ts_config(container)
        if name is None:
            continue
        if name not in CONFIG_FILES:
            problems.append(f"--ts-config {name}: not written by deploy.kserve_store")
            continue
        cfg = CONFIG_FILES[name]
        props = store_properties(cfg.protocol, cfg.gpus, KSERVE_MODEL_ROOT, cfg.tasks)
        served = set(json.loads(props["model_snapshot"])["models"])
        argv = [*container.get("command", []), *container.get("args", [])]
        if not any(a.endswith(props["model_store"]) for a in argv):
            problems.append(f"model store is not {props['model_store']}")
        if doc["kind"] == "InferenceService":
            if container["protocolVersion"] != cfg.protocol:
                problems.append(f"protocolVersion {container['protocolVersion']} but {name} is {cfg.protocol}")
            if doc["metadata"]["labels"]["emotion/model"] not in served:
                problems.append(f"{name} does not serve {doc['metadata']['labels']['emotion/model']}")
        elif cfg.protocol is not None:
            problems.append(f"{name}: an envelope, but the Deployment's proxy publishes /predictions")
        for kind in ("requests", "limits"):  # the CPUs the archives' threads are sized for
            if container["resources"][kind]["cpu"] != str(KSERVE_POD_CPUS):
                problems.append(f"cpu {kind} {container['resources'][kind]['cpu']}, not {KSERVE_POD_CPUS}")
        gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        if gpus != cfg.gpus:
            problems.append(f"{gpus} GPU(s) per pod but {name} is for {cfg.gpus}")
        for command in probes(container):
            management = command[command.index("--management") + 1]
            if management != props["management_address"]:
                problems.append(f"probe asks {management}, TorchServe's management API is {props['management_address']}")
            models = [a for a in command[command.index("--management") + 2:] if not a.startswith("-")]
            if "--live" not in command and (not models or set(models) - served):
                problems.append(f"probe checks {models}; {name} serves {sorted(served)}")
        for port in container.get("ports", []):
            if port["name"] == "metrics" and port["containerPort"] != port_of(props["metrics_address"]):
                problems.append(f"metrics port {port['containerPort']}")
    annotations = doc.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
    if "prometheus.io/port" in annotations:
        metrics_port = port_of(store_properties()["metrics_address"])
        if int(annotations["prometheus.io/port"]) != metrics_port:
            problems.append(f"prometheus.io/port {annotations['prometheus.io/port']} is not {metrics_port}")
    return problems


@pytest.mark.parametrize("where,doc", DOCS, ids=[w for w, _ in DOCS])
def test_manifest_names_only_what_the_project_builds(where, doc):
    assert naming_problems(doc) == []


def test_wrong_names_are_caught():
    isvc = copy.deepcopy(of_kind("InferenceService")[0])
    args = isvc["spec"]["predictor"]["pytorch"]["args"]
    args[-1] = args[-1].replace(".properties", "-typo.properties")
    assert naming_problems(isvc)
    deployment = copy.deepcopy(of_kind("Deployment")[0])
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
    probe[-1] = "emotion_audio"
    assert naming_problems(deployment)
    probe[probe.index("--management") + 1] = "http://127.0.0.1:8081"
    assert len(naming_problems(deployment)) == 2


def test_every_model_has_a_cpu_and_a_gpu_inference_service_on_v2():
    variants = {(d["metadata"]["labels"]["emotion/model"], d["metadata"]["labels"]["emotion/variant"])
                for d in of_kind("InferenceService")}
    assert variants == {(a, v) for a in ARCHIVES for v in ("cpu", "gpu")}
    assert {c["protocolVersion"] for d in of_kind("InferenceService") for c in containers(d)} == {"v2"}


def test_deployments_serve_both_models_behind_the_key_from_a_secret():
    proxy = of_kind("ConfigMap")[0]["data"]["default.conf.template"]
    rest = store_properties(None)
    assert f"proxy_pass {rest['inference_address']};" in proxy
    mib = int(re.search(r"client_max_body_size (\d+)m;", proxy)[1])
    assert mib * 1024 * 1024 == MAX_REQUEST_BYTES == int(rest["max_request_size"])
    assert set(re.search(r"/predictions/\(([^)]*)\)", proxy)[1].split("|")) == ARCHIVES
    assert '"Bearer ${EMOTION_API_KEY}"' in proxy
    services = of_kind("Service")
    deployments = of_kind("Deployment")
    assert {d["metadata"]["labels"]["emotion/variant"] for d in deployments} == {"cpu", "gpu"}
    for deployment in deployments:
        pod = deployment["spec"]["template"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert all(s["spec"]["selector"].items() <= pod["metadata"]["labels"].items() for s in services)
        by_name = {c["name"]: c for c in pod["spec"]["containers"]}
        key = by_name["auth-proxy"]["env"][0]
        assert key["name"] == "EMOTION_API_KEY" and "secretKeyRef" in key["valueFrom"]
        published = {p["name"] for c in by_name.values() for p in c.get("ports", [])}
        assert {p["targetPort"] for s in services for p in s["spec"]["ports"]} <= published
        assert "metrics" not in {p["targetPort"] for s in services for p in s["spec"]["ports"]}
        name = deployment["metadata"]["name"]
        assert [h for h in of_kind("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == name]
        budgets = [p for p in of_kind("PodDisruptionBudget")
                   if p["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()]
        assert len(budgets) == 1, name


def pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b([a-z][a-z0-9-]*)==([0-9][0-9.]*)", text))


def test_image_pins_match_the_project():
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    project = {**pins((REPO / "pyproject.toml").read_text()), **pins((REPO / "Makefile").read_text())}
    image = pins(dockerfile)
    assert image and all(project[name] == version for name, version in image.items()), (image, project)
    base = re.search(r"ARG BASE=pytorch/torchserve-kfs:([0-9.]+)", dockerfile)[1]
    assert base == project["torchserve"]
    for isvc in of_kind("InferenceService") + of_kind("Deployment"):
        for container in containers(isvc):
            if "torchserve" in container["image"]:
                assert container["image"].endswith(f"-{isvc['metadata']['labels']['emotion/variant']}")
