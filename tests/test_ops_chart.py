"""The Helm chart, checked with the real tools (helm, kubeconform, promtool; installed and
cached by scripts/ops_tools.sh): it lints and renders with the default values and with every
optional feature on, the manifests validate against Kubernetes schemas, bad values are refused
by values.schema.json, and the config files it renders are accepted by the components' own
config classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "rlhf"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
KUBE_VERSION = "1.27.0"


@pytest.fixture(scope="session")
def ops_env() -> dict[str, str]:
    """Installs (first run) or finds the tools; the OPS_* settings scripts/ops_tools.sh prints."""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "ops_tools.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "OPS_PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    settings = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return {k: v.strip('"') for k, v in settings.items()}


@pytest.fixture(scope="session")
def helm(ops_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    binary = str(Path(ops_env["OPS_BIN"]) / "helm")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([binary, *args], capture_output=True, text=True, cwd=ROOT)

    return run


def render(
    helm: Callable[..., subprocess.CompletedProcess[str]], *args: str
) -> list[dict[str, Any]]:
    done = helm(
        "template", "rlhf", str(CHART), "--namespace", "rlhf", "--kube-version", KUBE_VERSION, *args
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def test_ops_check_passes(ops_env: dict[str, str], tmp_path: Path) -> None:
    """The whole CI check: lint, template + kubeconform for two Kubernetes versions, promtool."""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "ops_check.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "OPS_OUT": str(tmp_path), "OPS_PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    # Every rendered resource was validated, none skipped except the KafkaTopics (no schema);
    # the multi-node trainer's PyTorchJob against the training-operator's CRD schema.
    assert out.count("Invalid: 0, Errors: 0") == 6, out
    assert out.count("Valid: 20, Invalid: 0, Errors: 0, Skipped: 0") == 4, out
    assert out.count("Valid: 26, Invalid: 0, Errors: 0, Skipped: 8") == 2, out
    assert "skipping KafkaTopic" in out
    assert "SUCCESS: 13 rules found" in out
    all_features = yaml.safe_load_all((tmp_path / "all-features-k8s-1.27.0.yaml").read_text())
    kinds = sorted({doc["kind"] for doc in all_features if doc})
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "KafkaTopic",
        "PersistentVolumeClaim",
        "Pod",
        "PodDisruptionBudget",
        "PrometheusRule",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        ("policy.grpcPort=70000", "policy/grpcPort"),
        ("kafka.bootstrapServers=", "kafka/bootstrapServers"),
        ("kafka.bootstrapServers=no-port-here", "kafka/bootstrapServers"),
        ("kafka.securityProtocol=SASL_SSL", "kafka"),
        ("kafka.securityProtocol=TLS", "kafka/securityProtocol"),
        ("image.pullPolicy=Sometimes", "image/pullPolicy"),
        ("trainer.gpu.count=-1", "trainer/gpu/count"),
        ("policy.replicaz=3", "replicaz"),
        ("reward.resources.limits.memory=lots", "reward/resources/limits/memory"),
        ("feedback.autoscaling.targetCPUUtilizationPercentage=150", "feedback/autoscaling"),
        ("registry.mountPath=relative/path", "registry/mountPath"),
        ("metrics.serviceMonitor.interval=often", "metrics/serviceMonitor/interval"),
    ],
)
def test_bad_values_are_refused(
    helm: Callable[..., subprocess.CompletedProcess[str]], override: str, complaint: str
) -> None:
    args = ["--namespace", "rlhf", "--kube-version", KUBE_VERSION, "--set", override]
    template = helm("template", "rlhf", str(CHART), *args)
    lint = helm("lint", str(CHART), "--kube-version", KUBE_VERSION, "--set", override)
    for done in (template, lint):
        assert done.returncode != 0, f"{override} was accepted"
        output = done.stdout + done.stderr
        assert "values don't meet the specifications of the schema" in output, output
        assert complaint in output, output


def test_sasl_needs_its_secret(helm: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    sasl = ["--set", "kafka.securityProtocol=SASL_SSL", "--set", "kafka.saslMechanism=PLAIN"]
    refused = helm("template", "rlhf", str(CHART), "--kube-version", KUBE_VERSION, *sasl)
    assert refused.returncode != 0
    assert "existingSecret" in refused.stderr
    docs = render(helm, *sasl, "--set", "kafka.existingSecret=kafka-user")
    env = find(docs, "Deployment", "rlhf-policy")["spec"]["template"]["spec"]["containers"][0][
        "env"
    ]
    password = next(e for e in env if e["name"] == "RLHF_KAFKA_SASL_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"] == {"name": "kafka-user", "key": "password"}


# The config class each component parses its --config file with (rlhf/config.py).
CONFIG_CLASSES = {
    "policy": ("services.policy.config", "PolicyServerConfig"),
    "reward": ("services.reward.config", "RewardServerConfig"),
    "feedback": ("services.feedback.server", "FeedbackServerConfig"),
    "trainer": ("trainer.config", "TrainerConfig"),
}


def _config_class(component: str) -> type:
    module_name, class_name = CONFIG_CLASSES[component]
    module = __import__(module_name, fromlist=[class_name])
    return getattr(module, class_name)


@pytest.mark.parametrize("values", ["default", "all-features"])
@pytest.mark.parametrize("component", sorted(CONFIG_CLASSES))
def test_rendered_config_is_accepted_by_the_component(
    helm: Callable[..., subprocess.CompletedProcess[str]],
    tmp_path: Path,
    component: str,
    values: str,
) -> None:
    """The ConfigMap and the container args, parsed exactly as the process parses them."""
    docs = render(helm, *([] if values == "default" else ["-f", str(ALL_FEATURES)]))
    name = f"rlhf-{component}"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(find(docs, "ConfigMap", name)["data"]["config.yaml"])
    pod = find(docs, "Deployment", name)["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    # Drop the subcommand ("serve policy" / "train"); point --config at the rendered file.
    flags = args[args.index("--config") :]
    flags[1] = str(config_file)
    config = parse_config(
        _config_class(component), flags, prog=component, description="", env_prefix="RLHF_TEST_"
    )

    values_file = CHART / "values.yaml" if values == "default" else ALL_FEATURES
    bootstrap = yaml.safe_load(values_file.read_text())["kafka"]["bootstrapServers"]
    ports = pod["containers"][0]["ports"]
    metrics_port = next(p["containerPort"] for p in ports if p["name"] == "metrics")
    if component == "trainer":
        assert config.metrics_port == metrics_port
        assert str(config.registry) == "/var/lib/rlhf/registry"
        assert config.bootstrap_servers == bootstrap
    else:
        grpc_port = next(p["containerPort"] for p in ports if p["name"] == "grpc")
        assert (config.runtime.port, config.runtime.metrics_port) == (grpc_port, metrics_port)
        http_port = next((p["containerPort"] for p in ports if p["name"] == "http"), -1)
        assert config.runtime.http_port == http_port
        service = find(docs, "Service", name)["spec"]["ports"]
        assert ("http" in {p["name"] for p in service}) == (http_port != -1)
        assert bool(config.runtime.api_keys_file) == (values == "all-features")
        tls = config.runtime.tls
        if values == "all-features":
            assert (tls.cert_file, tls.key_file, tls.client_ca_file) == (
                "/etc/rlhf/tls/tls.crt", "/etc/rlhf/tls/tls.key", "/etc/rlhf/tls/ca.crt"
            )  # fmt: skip
            assert tls.require_client_cert
        else:
            assert not tls.enabled
        # Pods are reached through their IP: every port binds all interfaces.
        assert {config.runtime.host, config.runtime.metrics_host, config.runtime.http_host} == {
            "0.0.0.0"
        }
        assert config.runtime.grace_s < pod["terminationGracePeriodSeconds"]
    if component == "policy":
        assert config.publish.bootstrap_servers == bootstrap
        assert config.model.registry == "/var/lib/rlhf/registry"
        if values == "all-features":
            assert (config.engine.max_batch_size, config.model.dtype) == (32, "bfloat16")
    if component in ("policy", "reward"):
        # The models topic decides what is served; the servers follow it.
        assert config.follow.bootstrap_servers == bootstrap
    if component == "reward":
        assert config.model.registry == "/var/lib/rlhf/registry"
    if component == "feedback":
        assert config.kafka.bootstrap_servers == bootstrap
        if values == "all-features":
            assert config.runtime.http_cors_origins == ("https://label.example.com",)


def test_pods_are_locked_down(helm: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    docs = render(helm, "-f", str(ALL_FEATURES))
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
    pods += [d["spec"] for d in docs if d["kind"] == "Pod"]
    assert len(pods) == 5
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


def test_servers_probe_grpc_health_and_mount_checkpoints_read_only(
    helm: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    docs = render(helm)
    services = {
        "policy": "rlhf.v1.InferenceService",
        "reward": "rlhf.v1.RewardService",
        "feedback": "rlhf.v1.FeedbackService",
    }
    for component, service in services.items():
        container = find(docs, "Deployment", f"rlhf-{component}")["spec"]["template"]["spec"][
            "containers"
        ][0]
        assert container["args"][:2] == ["serve", component]
        assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": service}
        assert container["livenessProbe"]["grpc"] == {"port": 50051, "service": ""}
        registry = [m for m in container["volumeMounts"] if m["name"] == "registry"]
        assert registry == (
            []
            if component == "feedback"
            else [{"name": "registry", "mountPath": "/var/lib/rlhf/registry", "readOnly": True}]
        )
    trainer = find(docs, "Deployment", "rlhf-trainer")
    assert trainer["spec"]["strategy"] == {"type": "Recreate"}
    container = trainer["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "registry", "mountPath": "/var/lib/rlhf/registry"} in container["volumeMounts"]
    assert find(docs, "PersistentVolumeClaim", "rlhf-registry")["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]


def test_existing_claim_and_cpu_trainer(
    helm: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    docs = render(
        helm, "--set", "registry.existingClaim=checkpoints", "--set", "trainer.gpu.count=0"
    )
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    for component in ("policy", "reward", "trainer"):
        volumes = find(docs, "Deployment", f"rlhf-{component}")["spec"]["template"]["spec"][
            "volumes"
        ]
        claim = next(v for v in volumes if v["name"] == "registry")["persistentVolumeClaim"]
        assert claim["claimName"] == "checkpoints"
    trainer = find(docs, "Deployment", "rlhf-trainer")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in trainer["containers"][0]["resources"].get("limits", {})
    assert "dshm" not in [v["name"] for v in trainer["volumes"]]


def test_kafka_topics_match_the_code(helm: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    """The optional Strimzi topics are rlhf/topics.py's, plus a dead-letter topic each."""
    from rlhf import topics

    docs = render(helm, "-f", str(ALL_FEATURES))
    rendered = {d["spec"]["topicName"]: d for d in docs if d["kind"] == "KafkaTopic"}
    expected = {t.name for t in topics.ALL} | {topics.dead_letter(t.name) for t in topics.ALL}
    assert set(rendered) == expected
    for topic in topics.ALL:
        spec = rendered[topic.name]["spec"]
        assert spec["partitions"] == topic.partitions
        assert spec["config"]["cleanup.policy"] == ("compact" if topic.compacted else "delete")
        if not topic.compacted:
            assert spec["config"]["retention.ms"] == topic.retention_ms
        assert rendered[topic.name]["metadata"]["labels"]["strimzi.io/cluster"] == "prod"
        assert rendered[topic.name]["metadata"]["namespace"] == "kafka"


def test_dashboard_and_rules_have_one_source(
    helm: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    """dashboards/ and deploy/prometheus/ link to the chart's files, which the chart ships as is."""
    dashboard = CHART / "files" / "rlhf-dashboard.json"
    rules = CHART / "files" / "alerts.yaml"
    assert (ROOT / "dashboards" / "rlhf-dashboard.json").samefile(dashboard)
    assert (ROOT / "deploy" / "prometheus" / "alerts.yaml").samefile(rules)
    docs = render(helm, "-f", str(ALL_FEATURES))
    configmap = find(docs, "ConfigMap", "rlhf-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["rlhf-dashboard.json"]) == json.loads(dashboard.read_text())
    rule = find(docs, "PrometheusRule", "rlhf")
    assert rule["spec"] == yaml.safe_load(rules.read_text())
    monitor = find(docs, "ServiceMonitor", "rlhf")
    assert monitor["spec"]["endpoints"][0]["relabelings"][0]["targetLabel"] == "rlhf_component"


def test_helm_test_hook_runs_the_health_check(
    helm: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    docs = render(helm)
    pod = find(docs, "Pod", "rlhf-test-health")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    args = pod["spec"]["containers"][0]["args"]
    assert "rlhf-policy:50051/rlhf.v1.InferenceService" in args
    assert "http://rlhf-trainer:9090/metrics" in args
    assert "http://rlhf-policy:8080/health" in args
    script = find(docs, "ConfigMap", "rlhf-test-health")["data"]["health_check.py"]
    assert script == (CHART / "files" / "health_check.py").read_text().rstrip("\n")


def test_tls_from_a_secret_with_https_probes(
    helm: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    """cert-manager's Secret layout mounted into every server; probes and scrapes over HTTPS
    on the metrics port (Kubernetes' gRPC probes cannot do TLS); the trainer stays HTTP."""
    docs = render(helm, "-f", str(ALL_FEATURES))
    for component, service in (("policy", "rlhf.v1.InferenceService"),
                               ("feedback", "rlhf.v1.FeedbackService")):  # fmt: skip
        pod = find(docs, "Deployment", f"rlhf-{component}")["spec"]["template"]["spec"]
        container = pod["containers"][0]
        https = {"port": "metrics", "scheme": "HTTPS"}
        assert container["readinessProbe"]["httpGet"] == {**https, "path": f"/health/{service}"}
        assert container["livenessProbe"]["httpGet"] == {**https, "path": "/health"}
        assert container["startupProbe"]["httpGet"] == {**https, "path": "/health"}
        assert {"name": "tls", "mountPath": "/etc/rlhf/tls", "readOnly": True} in container[
            "volumeMounts"
        ]
        volume = next(v for v in pod["volumes"] if v["name"] == "tls")
        assert volume["secret"]["secretName"] == "rlhf-tls"
    test_pod = find(docs, "Pod", "rlhf-test-health")["spec"]
    args = test_pod["containers"][0]["args"]
    assert args[args.index("--tls-ca") + 1] == "/etc/rlhf/tls/ca.crt"
    assert "--tls-cert" in args and "https://rlhf-policy:9090/metrics" in args
    assert "http://rlhf-trainer:9090/metrics" in args
    monitors = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "ServiceMonitor"}
    assert set(monitors) == {"rlhf", "rlhf-trainer"}
    servers = monitors["rlhf"]["endpoints"][0]
    assert servers["scheme"] == "https"
    assert servers["tlsConfig"] == {
        "ca": {"secret": {"name": "rlhf-tls", "key": "ca.crt"}}, "serverName": "rlhf.rlhf.svc"
    }  # fmt: skip
    assert "scheme" not in monitors["rlhf-trainer"]["endpoints"][0]


def test_trainer_runs_torchrun_with_a_process_per_gpu(
    helm: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    docs = render(helm, "--set", "trainer.gpu.count=4")
    pod = find(docs, "Deployment", "rlhf-trainer")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["torchrun"]
    assert container["args"][:5] == [
        "--standalone",
        "--nproc-per-node=4",
        "--max-restarts=3",
        "-m",
        "rlhf",
    ]
    assert container["args"][5:8] == ["train", "--config", "/etc/rlhf/config/config.yaml"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    cpu = find(render(helm, "--set", "trainer.gpu.count=0"), "Deployment", "rlhf-trainer")
    assert "command" not in cpu["spec"]["template"]["spec"]["containers"][0]


def test_multinode_trainer_is_a_pytorchjob(
    helm: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    docs = render(helm, "-f", str(CHART / "ci" / "multinode-values.yaml"))
    assert not [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "rlhf-trainer"
    ]
    job = find(docs, "PyTorchJob", "rlhf-trainer")
    assert job["apiVersion"] == "kubeflow.org/v1" and job["spec"]["nprocPerNode"] == "8"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 3)
    master = replicas["Master"]["template"]["spec"]["containers"][0]
    worker = replicas["Worker"]["template"]["spec"]["containers"][0]
    for container in (master, worker):
        assert container["command"] == ["torchrun"]
        assert container["args"][:3] == ["--nproc-per-node=8", "-m", "rlhf"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # a store per attempt
    # Rank 0 alone serves /metrics, and the Service selects it alone.
    assert "ports" in master and "ports" not in worker and "livenessProbe" not in worker
    service = find(docs, "Service", "rlhf-trainer")
    assert service["spec"]["selector"]["training.kubeflow.org/replica-type"] == "master"
