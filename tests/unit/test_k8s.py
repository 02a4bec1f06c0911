"""Offline checks of the Kubernetes deployment (k8s/), its generated inputs and `modgate deploy`.

Each overlay is built with `kubectl kustomize` (no cluster needed). Built-in kinds are
validated with kubernetes-validate's strict schemas for K8S_VERSION, the RayService with the
KubeRay v1.7.0 CRD's openAPIV3Schema (k8s/crds/, made strict: unknown fields are errors, as
with kubectl's server-side field validation). Then the properties that matter to us: probes,
security context, GPUs, Redis durability, NetworkPolicy selectors, and that the committed
serveConfigV2 files are exactly what `modgate deploy serve-config` generates and validate
against Ray Serve LLM's own argument models (without starting Ray).
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.metadata
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from gateway.cli.deploy import deploy_app, render_json_schema
from gateway.config import AppConfig, load_config
from serving.config import ModelConfig, ServingConfig
from serving.serve_config import HEADER, build_serve_config, render_serve_config_yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# Oldest Kubernetes minor we support; kubernetes-validate ships strict schemas for it.
K8S_VERSION = "1.31"
NAMESPACE = "modgate"
RAYSERVICE_CRD = K8S / "crds" / "ray.io_rayservices.yaml"
# RayService spec.upgradeStrategy.type values KubeRay v1.7.0 accepts (a plain string in the CRD).
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
# overlay -> the example config it is generated from (serve-config.yaml, modgate.yaml copy)
OVERLAYS = {
    "prod-gpu": ROOT / "configs" / "examples" / "prod-cluster.yaml",
    "dev-cpu": ROOT / "configs" / "examples" / "dev-cpu-cluster.yaml",
}
GPU = "nvidia.com/gpu"

Doc = dict[str, Any]


# -- helpers -----------------------------------------------------------------------------------

def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl not found: install kubectl (kustomize is built in)")
    return path


@functools.cache
def _build(overlay: str) -> tuple[Doc, ...]:
    out = subprocess.run([_kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
                         check=False, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        pytest.fail(f"kubectl kustomize k8s/overlays/{overlay} failed:\n{out.stderr}")
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def build(overlay: str) -> list[Doc]:
    return copy.deepcopy(list(_build(overlay)))


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def ray_groups(rs: Doc) -> list[tuple[str, Doc]]:
    """(role, group spec) for the head and every worker group of a RayService."""
    rc = rs["spec"]["rayClusterConfig"]
    return [("head", rc["headGroupSpec"])] + [("worker", g) for g in rc.get("workerGroupSpecs", [])]


def pod_templates(docs: list[Doc]) -> list[tuple[str, dict[str, str], Doc]]:
    """(owner, labels, pod spec) of every pod the build will create."""
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            t = d["spec"]["template"]
            out.append((f"{d['kind']}/{d['metadata']['name']}", t["metadata"].get("labels", {}),
                        t["spec"]))
        elif d["kind"] == "RayService":
            for role, group in ray_groups(d):
                t = group["template"]
                out.append((f"RayService/{d['metadata']['name']}/{role}",
                            t.get("metadata", {}).get("labels", {}), t["spec"]))
    return out


def selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in match_labels.items())


def container(spec: Doc, name: str) -> Doc:
    found = [c for c in spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"container {name} not found"
    return found[0]


def _strict(schema: Any) -> Any:
    """Make an openAPIV3Schema reject unknown fields, like kubectl's strict field validation."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for key in ("properties", "patternProperties"):
            for sub in schema.get(key, {}).values():
                _strict(sub)
        for key in ("items", "additionalProperties", "not"):
            if isinstance(schema.get(key), dict):
                _strict(schema[key])
        for key in ("anyOf", "allOf", "oneOf"):
            for sub in schema.get(key, []):
                _strict(sub)
    return schema


@functools.cache
def _rayservice_validator() -> jsonschema.protocols.Validator:
    crd = yaml.safe_load(RAYSERVICE_CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "RayService"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"] and v1["storage"]
    schema = _strict(copy.deepcopy(v1["schema"]["openAPIV3Schema"]))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def crd_errors(doc: Doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in _rayservice_validator().iter_errors(doc)]


# The Prometheus Operator's kinds (k8s/components/monitoring), validated like the RayService
# but against schemas written here: the fields of monitoring.coreos.com/v1 PrometheusRule and
# PodMonitor that the manifests may use, typed and patterned as in the operator's CRDs, strict
# (anything else is an error).
_DURATION = {"type": "string",
             "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {"type": "object", "required": ["name"], "additionalProperties": False,
             "properties": {"name": {"type": "string", "minLength": 1}, "namespace": {"type": "string"},
                            "labels": _STRINGS, "annotations": _STRINGS}}
_RULE = {"type": "object", "required": ["expr"], "additionalProperties": False,
         "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
         "properties": {"alert": {"type": "string", "minLength": 1}, "record": {"type": "string"},
                        "expr": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                        "for": _DURATION, "keep_firing_for": _DURATION, "labels": _STRINGS,
                        "annotations": _STRINGS}}
_GROUP = {"type": "object", "required": ["name"], "additionalProperties": False,
          "properties": {"name": {"type": "string", "minLength": 1}, "interval": _DURATION,
                         "query_offset": _DURATION, "limit": {"type": "integer"}, "labels": _STRINGS,
                         "partial_response_strategy": {"type": "string"},
                         "rules": {"type": "array", "items": _RULE}}}
_SELECTOR = {"type": "object", "additionalProperties": False,
             "properties": {"matchLabels": _STRINGS, "matchExpressions": {"type": "array", "items": {
                 "type": "object", "required": ["key", "operator"], "additionalProperties": False,
                 "properties": {"key": {"type": "string"}, "operator": {"type": "string"},
                                "values": {"type": "array", "items": {"type": "string"}}}}}}}
_ENDPOINT = {"type": "object", "additionalProperties": False,
             "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]}, "interval": _DURATION,
                            "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"}}}


def _kind_schema(kind: str, spec: Doc) -> Doc:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "additionalProperties": False,
            "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind},
                           "metadata": _METADATA, "spec": spec}}


MONITORING_SCHEMAS: dict[str, Doc] = {
    "PrometheusRule": _kind_schema("PrometheusRule", {
        "type": "object", "required": ["groups"], "additionalProperties": False,
        "properties": {"groups": {"type": "array", "minItems": 1, "items": _GROUP}}}),
    "PodMonitor": _kind_schema("PodMonitor", {
        "type": "object", "required": ["selector", "podMetricsEndpoints"], "additionalProperties": False,
        "properties": {"selector": _SELECTOR, "jobLabel": {"type": "string"},
                       "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                           "any": {"type": "boolean"},
                           "matchNames": {"type": "array", "items": {"type": "string"}}}},
                       "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}}}),
}


def monitoring_errors(doc: Doc) -> list[str]:
    schema = MONITORING_SCHEMAS[doc["kind"]]
    jsonschema.Draft202012Validator.check_schema(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]


overlays = pytest.mark.parametrize("overlay", sorted(OVERLAYS))


# -- schema validation ---------------------------------------------------------------------------

@overlays
def test_overlay_builds_and_every_builtin_object_validates(overlay: str) -> None:
    docs = build(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "StatefulSet", "ConfigMap", "NetworkPolicy", "RayService", "ServiceAccount"} <= kinds
    assert "Secret" not in kinds, "Secrets are created out of band, never built from the repo"
    for d in docs:
        if d["kind"] == "RayService":
            continue
        if d["kind"] in MONITORING_SCHEMAS:  # Prometheus Operator kinds (components/monitoring)
            assert monitoring_errors(d) == [], f"{d['kind']}/{d['metadata']['name']}"
        else:
            try:
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{d['kind']}/{d['metadata']['name']}: {exc.message}")
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, d["metadata"]["name"]


@overlays
def test_rayservice_validates_against_kuberay_crd(overlay: str) -> None:
    rs = one(build(overlay), "RayService", "modgate-llm")
    assert rs["apiVersion"] == "ray.io/v1"
    assert crd_errors(rs) == []


def test_crd_validation_rejects_unknown_and_mistyped_fields() -> None:
    rs = one(build("prod-gpu"), "RayService", "modgate-llm")
    typo = copy.deepcopy(rs)
    typo["spec"]["rayClusterConfig"]["enableInTreeAutoscale"] = True
    assert any("enableInTreeAutoscale" in e for e in crd_errors(typo))
    wrong = copy.deepcopy(rs)
    wrong["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    assert any("maxReplicas" in e for e in crd_errors(wrong))


@overlays
def test_every_container_image_is_pinned(overlay: str) -> None:
    for owner, _, spec in pod_templates(build(overlay)):
        for c in spec.get("initContainers", []) + spec["containers"]:
            image = c.get("image", "")
            assert image, f"{owner}/{c['name']} has no image"
            name, _, tag = image.rpartition(":")
            assert name and "/" not in tag and tag not in ("", "latest"), f"{owner}: {image}"


# -- gateway -----------------------------------------------------------------------------------

@overlays
def test_gateway_deployment_probes_and_security(overlay: str) -> None:
    docs = build(overlay)
    dep = one(docs, "Deployment", "modgate-gateway")
    pod = dep["spec"]["template"]["spec"]
    c = container(pod, "gateway")
    assert c["image"].startswith("modgate:")
    assert c["command"] + c["args"] == [
        "modgate", "gateway", "--config", "/etc/modgate/modgate.yaml"]
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"

    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    cfg = load_config(OVERLAYS[overlay])
    # /readyz probes the model with gateway.readiness_probe_timeout_s; the kubelet must wait longer
    assert c["readinessProbe"]["timeoutSeconds"] > cfg.gateway.readiness_probe_timeout_s
    port = next(p for p in c["ports"] if p["name"] == "http")["containerPort"]
    assert port == cfg.gateway.port and cfg.gateway.host == "0.0.0.0"

    psc, csc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False

    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    assert {"cpu", "memory"} <= limits.keys() and {"cpu", "memory"} <= requests.keys()

    ann = dep["spec"]["template"]["metadata"]["annotations"]
    metrics_port = next(p for p in c["ports"] if p["name"] == "metrics")["containerPort"]
    assert metrics_port == cfg.gateway.metrics_port != port  # /metrics on its own listener
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == str(metrics_port) and ann["prometheus.io/path"] == "/metrics"

    env = {e["name"]: e for e in c["env"]}
    ref = env[cfg.registry.redis_url_env]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("modgate-redis", "url")

    # Writable paths are emptyDirs (read-only root filesystem); config and prompts are mounted
    # where the config says.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
    assert "emptyDir" in mounts[str(cfg.data_dir)] and "emptyDir" in mounts["/tmp"]
    assert mounts[cfg.registry.seed_dir]["configMap"]["name"].startswith("modgate-prompts-")
    assert mounts["/etc/modgate/modgate.yaml"]["configMap"]["name"].startswith("modgate-config-")

    hpa = one(docs, "HorizontalPodAutoscaler", "modgate-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "modgate-gateway"}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    pdb = one(docs, "PodDisruptionBudget", "modgate-gateway")
    assert pdb["spec"]["selector"] == dep["spec"]["selector"]
    if "minAvailable" in pdb["spec"]:
        assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "PDB would block drains"
    svc = one(docs, "Service", "modgate-gateway")
    assert selects(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])


@overlays
def test_selectors_match_their_pod_templates(overlay: str) -> None:
    for d in build(overlay):
        if d["kind"] in ("Deployment", "StatefulSet"):
            assert selects(d["spec"]["selector"]["matchLabels"],
                           d["spec"]["template"]["metadata"]["labels"]), d["metadata"]["name"]


@overlays
def test_gateway_config_is_the_example_and_points_at_the_cluster(overlay: str) -> None:
    overlay_dir = K8S / "overlays" / overlay
    copy_path = overlay_dir / "modgate.yaml"
    assert copy_path.read_text() == OVERLAYS[overlay].read_text(), (
        f"{copy_path} differs from {OVERLAYS[overlay]}: cp {OVERLAYS[overlay].relative_to(ROOT)} "
        f"{copy_path.relative_to(ROOT)}")
    docs = build(overlay)
    cm = next(d for d in by_kind(docs, "ConfigMap")
              if d["metadata"]["name"].startswith("modgate-config-"))
    assert cm["data"]["modgate.yaml"] == copy_path.read_text()
    cfg = load_config(copy_path)
    assert cfg.serving.mode == "http"
    assert cfg.registry.store == "redis"
    assert cfg.data_dir.is_absolute() and Path(cfg.registry.seed_dir or "").is_absolute()
    rs = one(docs, "RayService", "modgate-llm")
    # KubeRay names the serve Service <RayService name>-serve-svc.
    meta = rs["metadata"]
    expected = f"http://{meta['name']}-serve-svc.{meta['namespace']}.svc:8000/v1"
    assert cfg.serving.resolved_base_url() == expected


@overlays
def test_prompt_seeds_are_the_repository_prompts_on_the_overlay_model(overlay: str) -> None:
    from prompt_registry.loader import load_prompt_file

    cfg = load_config(OVERLAYS[overlay])
    served = {m.name for m in cfg.serving.models}
    seeds = sorted((K8S / "overlays" / overlay / "prompts").glob("*.yaml"))
    originals = sorted((ROOT / "configs" / "prompts").glob("*.yaml"))
    assert [p.name for p in seeds] == [p.name for p in originals]
    for seed, original in zip(seeds, originals, strict=True):
        ours, theirs = yaml.safe_load(seed.read_text()), yaml.safe_load(original.read_text())
        assert ours["model"] in served, f"{seed}: model {ours['model']} is not served"
        ours.pop("model"), theirs.pop("model")
        assert ours == theirs, (f"{seed.relative_to(ROOT)} drifted from "
                                f"{original.relative_to(ROOT)}; copy it again and set `model:`")
        load_prompt_file(seed)
    cm = next(d for d in by_kind(build(overlay), "ConfigMap")
              if d["metadata"]["name"].startswith("modgate-prompts-"))
    assert sorted(cm["data"]) == [p.name for p in seeds]


# -- Ray ---------------------------------------------------------------------------------------

@overlays
def test_ray_cluster_shape(overlay: str) -> None:
    rs = one(build(overlay), "RayService", "modgate-llm")
    spec, rc = rs["spec"], rs["spec"]["rayClusterConfig"]
    assert spec["upgradeStrategy"]["type"] in UPGRADE_TYPES
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["rayVersion"] == importlib.metadata.version("ray")

    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"]["num-cpus"] == "0"
    hc = head["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in hc["ports"]} >= {6379, 8265, 10001, 8000}
    for kind in ("requests", "limits"):
        assert GPU not in hc["resources"][kind]
        assert {"cpu", "memory"} <= hc["resources"][kind].keys()

    images = {c["image"] for _, g in ray_groups(rs) for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, f"head and workers must run the same Ray image: {images}"
    assert rc["workerGroupSpecs"], "no worker group: the model replicas would have nowhere to run"
    for g in rc["workerGroupSpecs"]:
        assert 1 <= g["minReplicas"] <= g["maxReplicas"]


@overlays
def test_model_replicas_fit_the_worker_groups(overlay: str) -> None:
    """Every model replica's placement bundle fits one worker pod, and the worker groups can
    hold the configured minimum and maximum number of replicas (GPUs are the constraint)."""
    rs = one(build(overlay), "RayService", "modgate-llm")
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    workers = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]

    def quantity(v: str) -> float:
        return float(v[:-1]) / 1000 if str(v).endswith("m") else float(v)

    pods = [(g, g["template"]["spec"]["containers"][0]["resources"]["limits"]) for g in workers]
    need_min = need_max = 0.0
    for app in serve["applications"]:
        for llm in app["args"]["llm_configs"]:
            (bundle,) = llm["placement_group_config"]["bundles"]
            scaling = llm["deployment_config"]["autoscaling_config"]
            assert any(bundle["CPU"] <= quantity(lim["cpu"])
                       and bundle.get("GPU", 0) <= quantity(lim.get(GPU, "0")) for _, lim in pods)
            need_min += bundle.get("GPU", 0) * scaling["min_replicas"]
            need_max += bundle.get("GPU", 0) * scaling["max_replicas"]
    have_min = sum(g["minReplicas"] * quantity(lim.get(GPU, "0")) for g, lim in pods)
    have_max = sum(g["maxReplicas"] * quantity(lim.get(GPU, "0")) for g, lim in pods)
    assert have_min >= need_min and have_max >= need_max


def test_prod_gpu_workers_request_gpus_on_gpu_nodes() -> None:
    rs = one(build("prod-gpu"), "RayService", "modgate-llm")
    (group,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"][GPU] == "1" and res["requests"][GPU] == "1"
    assert any(t["key"] == GPU and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert any(k.startswith("nvidia.com/gpu") for k in pod["nodeSelector"])
    assert "-cu" in pod["containers"][0]["image"], "GPU workers need a CUDA Ray image"


def test_dev_cpu_asks_for_no_gpu() -> None:
    docs = build("dev-cpu")
    assert GPU not in json.dumps(docs)
    serve = yaml.safe_load(one(docs, "RayService", "modgate-llm")["spec"]["serveConfigV2"])
    for llm in serve["applications"][0]["args"]["llm_configs"]:
        assert llm["placement_group_config"]["bundles"] == [{"CPU": 4.0}]


# -- Redis -------------------------------------------------------------------------------------

@overlays
def test_redis_is_durable_and_private(overlay: str) -> None:
    docs = build(overlay)
    sts = one(docs, "StatefulSet", "modgate-redis")
    pod = sts["spec"]["template"]["spec"]
    c = container(pod, "redis")
    assert c["image"].startswith("redis:7.4")
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    cm_name = next(v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v)
    conf = one(docs, "ConfigMap", cm_name)["data"]["redis.conf"]
    directives = {line.split()[0]: line.split(None, 1)[1] for line in conf.splitlines()
                  if line.strip() and not line.lstrip().startswith("#")}
    assert directives["appendonly"] == "yes"
    assert directives["appendfsync"] in ("everysec", "always")
    assert directives["maxmemory-policy"] == "noeviction"
    assert "redis.conf" in c["args"][0] and "requirepass" in c["args"][0]
    (pvc,) = sts["spec"]["volumeClaimTemplates"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert {m["name"] for m in c["volumeMounts"]} >= {pvc["metadata"]["name"]}
    svc = one(docs, "Service", "modgate-redis")
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == "modgate-redis"


# -- NetworkPolicies -----------------------------------------------------------------------------

@overlays
def test_network_policies_select_existing_pods(overlay: str) -> None:
    docs = build(overlay)
    pods = pod_templates(docs)
    for np in by_kind(docs, "NetworkPolicy"):
        name = np["metadata"]["name"]
        sel = np["spec"]["podSelector"]
        assert "matchExpressions" not in sel, f"{name}: only matchLabels is checked here"
        if sel.get("matchLabels"):
            assert any(selects(sel["matchLabels"], labels) for _, labels, _ in pods), (
                f"NetworkPolicy {name} selects no pod")
        for rule in np["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "namespaceSelector" in peer:
                    continue  # pods of another namespace (the KubeRay operator)
                ml = peer["podSelector"].get("matchLabels", {})
                assert ml and any(selects(ml, labels) for _, labels, _ in pods), (
                    f"NetworkPolicy {name}: peer {ml} matches no pod")


def _allowed_sources(docs: list[Doc], target: dict[str, str], port: int) -> list[Doc]:
    """Peers allowed to reach *port* on pods labelled *target* (None = from anywhere)."""
    out = []
    for np in by_kind(docs, "NetworkPolicy"):
        if not selects(np["spec"]["podSelector"].get("matchLabels", {}), target):
            continue
        for rule in np["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            if ports and port not in ports:
                continue
            out.extend(rule.get("from") or [None])
    return out


@overlays
def test_network_policies_isolate_redis_and_ray(overlay: str) -> None:
    docs = build(overlay)
    deny = one(docs, "NetworkPolicy", "default-deny-ingress")
    assert deny["spec"]["podSelector"] == {} and deny["spec"]["policyTypes"] == ["Ingress"]
    assert "ingress" not in deny["spec"]
    labels = {owner: lab for owner, lab, _ in pod_templates(docs)}
    gateway = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "modgate-gateway"}}}
    ray_pods = {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "llm-serving"}}}

    assert _allowed_sources(docs, labels["StatefulSet/modgate-redis"], 6379) == [gateway]
    head, worker = labels["RayService/modgate-llm/head"], labels["RayService/modgate-llm/worker"]
    for port in (6379, 8265, 10001):
        peers = _allowed_sources(docs, head, port)
        assert None not in peers and gateway not in peers and ray_pods in peers
    assert all("namespaceSelector" in p for p in _allowed_sources(docs, head, 8265)
               if p != ray_pods), "only Ray pods and the KubeRay operator reach the dashboard"
    for target in (head, worker):
        assert sorted(map(json.dumps, _allowed_sources(docs, target, 8000))) == sorted(
            map(json.dumps, [ray_pods, gateway]))


# -- serveConfigV2 -------------------------------------------------------------------------------

@overlays
def test_committed_serve_config_is_generated_from_the_example(overlay: str) -> None:
    path = K8S / "overlays" / overlay / "serve-config.yaml"
    cfg = load_config(OVERLAYS[overlay])
    expected = render_serve_config_yaml(cfg.serving, app_name=cfg.serving.ray.app_name)
    assert path.read_text() == expected, (
        f"{path.relative_to(ROOT)} is stale: modgate deploy serve-config --config "
        f"{OVERLAYS[overlay].relative_to(ROOT)} --out {path.relative_to(ROOT)}")
    rs = one(build(overlay), "RayService", "modgate-llm")
    assert rs["spec"]["serveConfigV2"] == expected
    assert not [d for d in build(overlay) if d["metadata"]["name"] == "modgate-serve-config"]


def _block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access during validation: {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@overlays
def test_serve_config_imports_the_real_serving_app_and_its_args_validate(
        overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Import each application's import_path and validate its args with Ray Serve LLM's own
    models (what `build_openai_app` does first), without starting Ray or Serve. The model
    sources are Hugging Face ids; the validators do not fetch them (sockets are blocked)."""
    serve = yaml.safe_load((K8S / "overlays" / overlay / "serve-config.yaml").read_text())
    _block_network(monkeypatch)
    llm = importlib.import_module("ray.serve.llm")
    for app in serve["applications"]:
        module_name, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module_name), attr)
        assert builder is llm.build_openai_app and callable(builder)
        configs = [llm.LLMConfig(**c) for c in app["args"]["llm_configs"]]
        args = llm.LLMServingArgs(llm_configs=configs)
        assert [c.model_id for c in args.llm_configs] == [
            c["model_loading_config"]["model_id"] for c in app["args"]["llm_configs"]]
        llm.LLMServingArgs.model_validate(app["args"])  # the dict form build_openai_app gets
    with pytest.raises(Exception, match="Invalid deployment config"):
        bad = copy.deepcopy(serve["applications"][0]["args"]["llm_configs"][0])
        bad["deployment_config"]["max_ongoing_requests"] = "lots"
        llm.LLMConfig(**bad)


def _models(*models: ModelConfig) -> ServingConfig:
    return ServingConfig(mode="http", base_url="http://x:8000/v1", models=list(models))


def test_build_serve_config_shape_and_rejections() -> None:
    gpu = ModelConfig(name="m1", source="org/m1", deployment={"replica_gpus": 1, "max_replicas": 3})
    doc = build_serve_config(_models(gpu), app_name="app")
    (app,) = doc["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == (
        "app", "/", "ray.serve.llm:build_openai_app")
    (llm,) = app["args"]["llm_configs"]
    assert llm["model_loading_config"] == {"model_id": "m1", "model_source": "org/m1"}
    assert llm["placement_group_config"] == {"bundles": [{"CPU": 1.0, "GPU": 1.0}]}
    assert llm["engine_kwargs"] == {"enable_prefix_caching": True, "enable_prompt_tokens_details": True,
                                    "scheduling_policy": "priority"}, \
        "CPU-only engine defaults must not reach a GPU model"
    assert llm["deployment_config"]["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3}
    assert render_serve_config_yaml(_models(gpu)).startswith(HEADER)

    with pytest.raises(ValueError, match="'tiny-llama'.*tiny models"):
        build_serve_config(_models(gpu, ModelConfig(name="tiny-llama", source="tiny:models/t")))
    with pytest.raises(ValueError, match="'m1' is configured twice"):
        build_serve_config(_models(gpu, gpu))


def test_serve_config_and_deploy_cli_do_not_import_ray() -> None:
    code = ("import sys, serving.serve_config, gateway.cli.deploy, gateway.cli.main\n"
            "print(','.join(m for m in ('ray', 'vllm', 'torch') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == ""


# -- `modgate deploy` ----------------------------------------------------------------------------

runner = CliRunner()


@overlays
def test_cli_serve_config_check_passes_on_committed_files(overlay: str) -> None:
    out = K8S / "overlays" / overlay / "serve-config.yaml"
    result = runner.invoke(deploy_app, ["serve-config", "--config", str(OVERLAYS[overlay]),
                                        "--out", str(out), "--check"])
    assert result.exit_code == 0, result.output
    assert "up to date" in result.stdout


def test_cli_serve_config_writes_then_check_catches_a_change(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "serve-config.yaml"
    args = ["serve-config", "--config", str(OVERLAYS["prod-gpu"]), "--out", str(out)]
    assert runner.invoke(deploy_app, args).exit_code == 0
    assert out.read_text() == (K8S / "overlays" / "prod-gpu" / "serve-config.yaml").read_text()
    out.write_text(out.read_text().replace("max_replicas: 8", "max_replicas: 9"))
    result = runner.invoke(deploy_app, [*args, "--check"])
    assert result.exit_code == 1
    assert "-          max_replicas: 9" in result.stdout
    assert "+          max_replicas: 8" in result.stdout
    assert "out of date" in result.stderr and "modgate deploy serve-config" in result.stderr
    out.unlink()
    result = runner.invoke(deploy_app, [*args, "--check"])
    assert result.exit_code == 1 and "is missing" in result.stderr


def test_cli_serve_config_rejects_tiny_models_and_bad_configs(tmp_path: Path) -> None:
    out = tmp_path / "serve-config.yaml"
    result = runner.invoke(deploy_app, ["serve-config", "--config",
                                        str(ROOT / "configs" / "modgate.yaml"), "--out", str(out)])
    assert result.exit_code == 2
    assert result.stderr.startswith("modgate: error: model 'tiny-llama'")
    assert "tiny" in result.stderr and not out.exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("serving:\n  models: []\n")
    result = runner.invoke(deploy_app, ["serve-config", "-c", str(bad), "-o", str(out)])
    assert result.exit_code == 2 and "modgate: error:" in result.stderr
    assert "serving.models" in result.stderr


def test_cli_json_schema_is_committed_and_check_catches_a_change(tmp_path: Path) -> None:
    committed = ROOT / "configs" / "modgate.schema.json"
    result = runner.invoke(deploy_app, ["json-schema", "--out", str(committed), "--check"])
    assert result.exit_code == 0, result.output
    stale = tmp_path / "schema.json"
    stale.write_text(committed.read_text().replace('"ray"', '"rayy"'))
    result = runner.invoke(deploy_app, ["json-schema", "--out", str(stale), "--check"])
    assert result.exit_code == 1 and "modgate deploy json-schema" in result.stderr
    assert runner.invoke(deploy_app, ["json-schema", "--out", str(stale)]).exit_code == 0
    assert stale.read_text() == render_json_schema()


@pytest.mark.parametrize("path", sorted([*(ROOT / "configs" / "examples").glob("*.yaml"),
                                         ROOT / "configs" / "modgate.yaml"]), ids=lambda p: p.name)
def test_configs_validate_against_the_json_schema(path: Path) -> None:
    schema = json.loads((ROOT / "configs" / "modgate.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    assert [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))] == []
    load_config(path)  # and the real loader agrees
    typo = {"gatewey": {}, "serving": {"models": [{"name": "m", "source": "s"}]}}
    assert list(validator.iter_errors(typo)), "the schema must reject unknown keys"


def test_deploy_is_a_modgate_subcommand() -> None:
    from gateway.cli.main import app

    result = runner.invoke(app, ["deploy", "--help"])
    assert result.exit_code == 0
    assert "serve-config" in result.stdout and "json-schema" in result.stdout
    result = runner.invoke(app, ["deploy", "serve-config", "--help"])
    assert "--check" in result.stdout and "serveConfigV2" in result.stdout


def test_app_config_schema_has_no_internal_fields() -> None:
    schema = json.loads(render_json_schema())
    assert "base_dir" not in schema["properties"]
    assert set(schema["properties"]) == set(AppConfig.model_fields) - {"base_dir"}


# -- Secrets and image ---------------------------------------------------------------------------

def test_secrets_example_is_valid_unreferenced_and_covers_every_reference() -> None:
    example = K8S / "base" / "secrets.example.yaml"
    secrets = [d for d in yaml.safe_load_all(example.read_text()) if d]
    for s in secrets:
        kubernetes_validate.validate(s, K8S_VERSION, strict=True)
    keys = {(s["metadata"]["name"], k) for s in secrets for k in s["stringData"]}
    for kustomization in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kustomization.read_text())
        listed = [*k.get("resources", []), *k.get("components", []),
                  *(p.get("path", "") for p in k.get("patches", []))]
        assert not [r for r in listed if "secret" in r], kustomization
    for overlay in OVERLAYS:
        for owner, _, spec in pod_templates(build(overlay)):
            for c in spec["containers"]:
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert (ref["name"], ref["key"]) in keys, f"{owner}: {ref}"


def test_dockerfile_matches_the_deployment() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.startswith("#")]
    assert any(line.startswith("ARG PYTHON_IMAGE=python:3.11-slim") for line in lines)
    assert "USER 10001:10001" in lines
    assert 'ENTRYPOINT ["modgate"]' in lines
    installs = [line for line in lines if "pip install" in line or "pip wheel" in line]
    assert installs and not any("[cpu" in i or "[gpu" in i or "vllm" in i for i in installs)
    pod = one(build("prod-gpu"), "Deployment", "modgate-gateway")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001 == pod["securityContext"]["runAsGroup"]


# -- alerts (components/monitoring) ------------------------------------------------------------

MONITORING = K8S / "components" / "monitoring"
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                   "unless", "offset", "bool", "inf", "nan"}
PROMQL_FUNCTIONS = {"sum", "max", "min", "avg", "count", "rate", "increase", "irate", "delta",
                    "time", "abs", "clamp_min", "clamp_max", "histogram_quantile", "absent",
                    "changes", "max_over_time", "min_over_time", "avg_over_time", "vector"}


def _promql_refs(expr: str) -> tuple[dict[str, set[str]], set[str], set[str]]:
    """(metric name -> label names its selectors match on, grouping labels of by/on/...,
    functions called) of a PromQL expression. A small lexer for the constructs the rules use,
    not a full parser: what it cannot read ends up as an unknown metric or function name."""
    import re

    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\[[^\]]*\]", " ", text)                      # range selectors
    text = re.sub(r"\boffset\s+\w+", " ", text)
    grouping: set[str] = set()

    def _group(m: re.Match[str]) -> str:
        grouping.update(x.strip() for x in m.group(2).split(",") if x.strip())
        return " "

    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", _group, text)
    metrics: dict[str, set[str]] = {}

    def _selector(m: re.Match[str]) -> str:
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)))
        metrics.setdefault(m.group(1), set()).update(labels)
        return " "

    text = re.sub(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}", _selector, text)
    functions = {f for f in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(", text)
                 if f.lower() not in PROMQL_KEYWORDS}
    for name in re.findall(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", text):
        if name.lower() not in PROMQL_KEYWORDS:
            metrics.setdefault(name, set())
    return metrics, grouping, functions


@functools.cache
def _exported_metrics() -> dict[str, frozenset[str]]:
    """Every sample name the gateway exports at /metrics, with its label names: the telemetry
    Metrics, plus the rollout gauges and webhook metrics of gateway/webhooks.py on the same
    registry (as the app wires them)."""
    import tempfile

    from prometheus_client.metrics import MetricWrapperBase

    from gateway.telemetry import Metrics
    from gateway.webhooks import (
        RolloutMetrics,
        WebhookDispatcher,
        WebhookSettings,
        WebhookSubscriber,
    )
    from prompt_registry.loader import seed_store
    from prompt_registry.rollouts import GateConfig, ShadowSpec, new_rollout
    from prompt_registry.sqlite_store import SqlitePromptStore

    metrics = Metrics()
    rollouts = RolloutMetrics(metrics.registry)
    with tempfile.TemporaryDirectory() as tmp:
        store = SqlitePromptStore(Path(tmp) / "r.db")
        try:
            seed_store(store, ROOT / "configs" / "prompts")
            # a rollout with every kind of evidence, so every rollout gauge has samples
            spec = store.get_version("listing-moderation", 1).spec
            store.publish(spec.model_copy(update={"description": "v2"}), actor="t")
            store.publish(spec.model_copy(update={"description": "v3"}), actor="t")
            r = new_rollout("listing-moderation", stable_version=1, canary_version=2, steps=[5],
                            shadows=[ShadowSpec(version=3, sample_rate=0.5)], step_hold_s=0,
                            gates=GateConfig(), auto=False, subject_key="seller_id", started_by="t")
            store.put_rollout(r, expected_revision=None, actor="t")
            store.add_rollout_stats(r.id, {"pair:3:n": 2, "pair:3:agree": 1})
            rollouts.refresh(store)
            hooks = WebhookDispatcher(
                WebhookSettings(subscribers=[WebhookSubscriber(name="h", url="http://127.0.0.1:9/h",
                                                               secret_env="S")]),
                store, Path(tmp), registry=metrics.registry, environ={"S": "x" * 32})
        finally:
            store.close()
    # labelled metrics export nothing before their first child: make one of each
    for owner in (metrics, hooks):
        for metric in vars(owner).values():
            if isinstance(metric, MetricWrapperBase) and metric._labelnames:  # noqa: SLF001
                metric.labels(*["x"] * len(metric._labelnames))  # noqa: SLF001
    out: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(k for k in sample.labels if k != "le")
    return {k: frozenset(v) for k, v in out.items()}


def _rule_problems(expr: str, annotations: dict[str, str]) -> list[str]:
    import re

    exported = _exported_metrics()
    metrics, grouping, functions = _promql_refs(expr)
    problems = [f"unknown function {f}()" for f in sorted(functions - PROMQL_FUNCTIONS)]
    if not metrics:
        problems.append("no metric in the expression")
    known_labels: set[str] = set()
    for name, labels in sorted(metrics.items()):
        if name not in exported:
            problems.append(f"{name} is not exported by the gateway")
            continue
        known_labels |= exported[name]
        problems += [f"{name} has no label {label!r}" for label in sorted(labels - exported[name])]
    problems += [f"grouping by unknown label {label!r}" for label in sorted(grouping - known_labels)]
    for text in annotations.values():
        for label in re.findall(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)", text):
            if label not in grouping:
                problems.append(f"annotation uses $labels.{label}, which the alert does not carry")
    if expr.count("(") != expr.count(")") or expr.count("{") != expr.count("}"):
        problems.append("unbalanced brackets")
    return problems


def _alert_rules() -> list[Doc]:
    (rule,) = by_kind(build("prod-gpu"), "PrometheusRule")
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


def test_monitoring_component_builds_into_prod_with_the_alerts_asked_for() -> None:
    docs = build("prod-gpu")
    rule = one(docs, "PrometheusRule", "modgate-alerts")
    assert monitoring_errors(rule) == []
    groups = [g["name"] for g in rule["spec"]["groups"]]
    assert len(groups) == len(set(groups))
    alerts = {r["alert"]: r for r in _alert_rules()}
    assert len(alerts) == sum(len(g["rules"]) for g in rule["spec"]["groups"]), "alert names repeat"
    # what issue 16 asks for: an aborted or paused rollout, a jump in the review rate, a
    # parse-failure spike
    assert {"ModgateRolloutAborted", "ModgateRolloutPaused", "ModgateReviewRateJump",
            "ModgateParseFailureSpike"} <= alerts.keys()
    assert 'state="aborted"' in alerts["ModgateRolloutAborted"]["expr"]
    assert 'state="paused"' in alerts["ModgateRolloutPaused"]["expr"]
    assert 'decision="needs_review"' in alerts["ModgateReviewRateJump"]["expr"]
    assert "modgate_verdict_failures_total" in alerts["ModgateParseFailureSpike"]["expr"]
    for name, r in alerts.items():
        assert r["labels"]["severity"] in ("critical", "warning", "info"), name
        assert r["annotations"]["summary"] and r["annotations"]["description"], name

    monitor = one(docs, "PodMonitor", "modgate-gateway")
    dep = one(docs, "Deployment", "modgate-gateway")
    pod = dep["spec"]["template"]
    assert selects(monitor["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"] for p in container(pod["spec"], "gateway")["ports"]}
    assert endpoint["port"] in ports
    assert endpoint["path"] == pod["metadata"]["annotations"]["prometheus.io/path"]
    # dev-cpu leaves it out (clusters without the Prometheus Operator's CRDs)
    assert not by_kind(build("dev-cpu"), "PrometheusRule")


def test_alert_rules_only_use_metrics_and_labels_the_gateway_exports() -> None:
    problems = {r["alert"]: _rule_problems(str(r["expr"]), r.get("annotations", {}))
                for r in _alert_rules()}
    assert {k: v for k, v in problems.items() if v} == {}


def test_the_alert_rule_check_catches_mistakes() -> None:
    assert _rule_problems('sum by (prompt) (rate(modgate_verdicts_total{arm!="shadow"}[5m]))', {}) == []
    assert _rule_problems("rate(modgate_verdict_failure_total[5m])", {}) == [
        "modgate_verdict_failure_total is not exported by the gateway"]
    assert _rule_problems('modgate_rollout_state{stage="paused"}', {}) == [
        "modgate_rollout_state has no label 'stage'"]
    assert _rule_problems("max by (promt) (modgate_rollout_weight_percent)", {}) == [
        "grouping by unknown label 'promt'"]
    assert _rule_problems("rat(modgate_requests_total[5m])", {}) == ["unknown function rat()"]
    assert _rule_problems("max(modgate_rollout_weight_percent)", {"summary": "{{ $labels.prompt }}"}) == [
        "annotation uses $labels.prompt, which the alert does not carry"]
    assert _rule_problems("sum(rate(modgate_requests[5m])", {}) == [
        "modgate_requests is not exported by the gateway", "unbalanced brackets"]
