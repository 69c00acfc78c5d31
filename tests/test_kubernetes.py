"""deploy/kubernetes/ (docs/operations.md, "Kubernetes"): every manifest valid against the
Kubernetes schemas (kubernetes-validate, strict: no unknown field), the ConfigMap's TOML a
configuration `scheduler serve` accepts (with the Secret's keys in its environment), and
the pieces that must agree do: probes on the admin port's real paths, a grace period longer
than preStop plus the drain, Services and the PDB selecting the Deployment's pods."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from scheduler.ops.admin import OPEN_PATHS

DIR = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
VERSION = "1.30.0"


def _docs() -> list[dict]:
    return [doc for path in sorted(DIR.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def _one(kind: str) -> dict:
    (doc,) = [d for d in _docs() if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("doc", _docs(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_is_valid_against_the_kubernetes_schemas(doc):
    kubernetes_validate.validate(doc, VERSION, strict=True)


def test_the_configmap_is_a_configuration_serve_accepts(tmp_path):
    config = tmp_path / "scheduler.toml"
    config.write_text(_one("ConfigMap")["data"]["scheduler.toml"])
    secret = _one("Secret")["stringData"]
    env = {"PATH": "/usr/bin:/bin", "SCHEDULER_REDIS_URL": secret["redis_url"], "SCHEDULER_NODE_TOKEN": "n" * 24,
           "SCHEDULER_ADMIN_TOKEN": "a" * 24}
    done = subprocess.run([sys.executable, "-m", "scheduler", "config", "check", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "max_sessions = 150" in done.stdout and 'ws_host = "0.0.0.0"' in done.stdout


def test_probes_grace_period_and_selectors_agree():
    deployment, config = _one("Deployment"), _one("ConfigMap")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" and "/readyz" in OPEN_PATHS
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" and "/healthz" in OPEN_PATHS
    drain_s = int(next(line.split("=")[1] for line in config["data"]["scheduler.toml"].splitlines()
                       if line.startswith("drain_timeout_ms"))) / 1000
    pre_stop_s = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop_s + drain_s
    labels = pod["metadata"]["labels"]
    for doc in _docs():
        selector = doc["spec"].get("selector") if doc["kind"] in ("Service", "PodDisruptionBudget", "Deployment") else None
        if selector is not None:
            wanted = selector.get("matchLabels", selector)
            assert wanted.items() <= labels.items(), (doc["kind"], doc["metadata"]["name"])
    secret_keys = set(_one("Secret")["stringData"])
    used = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert used == secret_keys
