"""Deployment files checked with real tools where they install here
(promtool from Debian's prometheus package, kubernetes-validate's bundled
schemas, yamllint, dockerfile-parse), otherwise parsed and checked."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from feather_vllm.kv import seams

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def test_prometheus_config_and_rules_pass_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/setup.sh installs Debian's prometheus package as root)")
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    shutil.copy(DEPLOY / "prometheus/rules.yml", tmp_path / "rules.yml")
    config["rule_files"] = [str(tmp_path / "rules.yml")]  # the container path, made local
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    for args in (["check", "config", str(tmp_path / "prometheus.yml")],
                 ["check", "rules", str(DEPLOY / "prometheus/rules.yml")]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout + result.stderr


def test_kubernetes_manifests_validate_against_schemas():
    import kubernetes_validate

    for name in ("deployment.yaml", "service.yaml", "pvc.yaml", "pdb.yaml"):
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()):
            kubernetes_validate.validate(doc, "1.30", strict=True)
    deployment = yaml.safe_load((DEPLOY / "k8s/deployment.yaml").read_text())
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
    kustomization = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())
    assert all((DEPLOY / "k8s" / r).exists() for r in kustomization["resources"])
    assert "pdb.yaml" in kustomization["resources"]
    labels = deployment["spec"]["selector"]["matchLabels"]
    pdb = yaml.safe_load((DEPLOY / "k8s/pdb.yaml").read_text())
    assert pdb["kind"] == "PodDisruptionBudget" and pdb["spec"]["selector"]["matchLabels"] == labels
    assert pdb["spec"]["maxUnavailable"] >= 1  # a single replica can still be evicted (node drains)
    spread = pod["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} >= {"kubernetes.io/hostname"}
    assert all(c["labelSelector"]["matchLabels"] == labels for c in spread)
    monitor = yaml.safe_load((DEPLOY / "k8s/servicemonitor.yaml").read_text())
    service = yaml.safe_load((DEPLOY / "k8s/service.yaml").read_text())
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["selector"]["matchLabels"] == service["metadata"]["labels"]
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


def test_kubernetes_grace_period_covers_prestop_and_drain():
    """KServe's pattern: a preStop sleep lets endpoint removal propagate
    before SIGTERM; the gateway's drain (--shutdown-timeout, as
    `python -m server` parses it) then fits in the grace period with room
    for the aborts and the engine's teardown."""
    from server.app import ABORT_GRACE_S
    from server.settings import build_parser

    pod = yaml.safe_load((DEPLOY / "k8s/deployment.yaml").read_text())["spec"]["template"]["spec"]
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
    import re

    def filled(args: list[str]) -> list[str]:
        return [re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(a)) for a in args]

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    cpu = yaml.safe_load((DEPLOY / "docker-compose.cpu.yml").read_text().replace("!reset", ""))
    deployment = yaml.safe_load((DEPLOY / "k8s/deployment.yaml").read_text())
    return {"compose": filled(compose["services"]["gateway"]["command"]),
            "compose-cpu": filled(cpu["services"]["gateway"]["command"]),
            "k8s": filled(deployment["spec"]["template"]["spec"]["containers"][0]["args"])}


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
    deployment = yaml.safe_load((DEPLOY / "k8s/deployment.yaml").read_text())
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
