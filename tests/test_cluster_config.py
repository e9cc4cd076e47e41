"""Checks of cluster.yaml: Ray's own validation, and that nothing is opened to the internet.

Offline: Ray's prepare_config/validate_config fill in and check the config against Ray's schema
without calling AWS. Run with `python -m pytest tests/test_cluster_config.py -q`.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from ray.autoscaler._private.aws.config import _create_default_ssh_inbound_rules
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
WORLD_CIDRS = {"0.0.0.0/0", "::/0"}
COMMAND_KEYS = (
    "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
    "head_start_ray_commands", "worker_start_ray_commands",
)


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def all_commands(cluster: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for key in COMMAND_KEYS:
        for command in cluster.get(key, []):
            yield key, command


def ingress_rules(node: Any) -> Iterator[dict[str, Any]]:
    """Every IpPermissions entry anywhere in the config."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "IpPermissions":
                yield from value
            else:
                yield from ingress_rules(value)
    elif isinstance(node, list):
        for item in node:
            yield from ingress_rules(item)


def test_ray_accepts_the_config(cluster) -> None:
    prepared = prepare_config(cluster)  # merges Ray's AWS defaults, as `ray up` does before launching
    validate_config(prepared)  # raises jsonschema.ValidationError / ValueError on a bad config
    assert prepared["head_node_type"] == "head_cpu"
    gpu_worker = prepared["available_node_types"]["gpu_worker"]
    assert gpu_worker["min_workers"] == 0 and gpu_worker["max_workers"] >= 1
    assert gpu_worker["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4d.", "p5."))
    assert prepared["available_node_types"]["head_cpu"]["node_config"]["InstanceType"].startswith("m5.")


def test_every_node_type_uses_the_prepared_security_group(cluster) -> None:
    # Without SecurityGroupIds, Ray creates a group whose default rules include SSH from anywhere:
    assert {"CidrIp": "0.0.0.0/0"} in _create_default_ssh_inbound_rules()[0]["IpRanges"]
    for name, node_type in cluster["available_node_types"].items():
        groups = node_type["node_config"].get("SecurityGroupIds")
        assert groups, f"cluster.yaml: node type {name} has no SecurityGroupIds; Ray would open SSH to 0.0.0.0/0"
        assert node_type["node_config"].get("SubnetIds"), f"cluster.yaml: node type {name} needs SubnetIds"


def test_no_ingress_rule_opens_a_port_to_the_world(cluster) -> None:
    for rule in ingress_rules(cluster):
        cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])} | {
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        }
        assert not cidrs & WORLD_CIDRS, f"cluster.yaml: ingress rule {rule} is open to the internet"
    text = CLUSTER_YAML.read_text()
    ssh_rule = re.search(r"authorize-security-group-ingress .*--port 22 --cidr (\S+)", text)
    assert ssh_rule, "cluster.yaml: the documented SSH rule (--port 22 --cidr <your CIDR>) is missing"
    assert ssh_rule.group(1) not in WORLD_CIDRS


def test_dashboard_binds_localhost_and_no_service_binds_all_interfaces(cluster) -> None:
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert re.search(r"ray start --head\b.*--dashboard-host[= ]127\.0\.0\.1", head_start), (
        "cluster.yaml: the head must start Ray with --dashboard-host=127.0.0.1"
    )
    for key, command in all_commands(cluster):
        assert "0.0.0.0" not in command, f"cluster.yaml {key}: {command!r} binds all interfaces"
    mlflow_host = re.search(r"mlflow server --host (\S+)", head_start)
    assert mlflow_host and mlflow_host.group(1) != "0.0.0.0"


def test_mlflow_tracking_uri_reaches_every_node(cluster) -> None:
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "export MLFLOW_TRACKING_URI=http://" in " ".join(cluster[key]), key
    assert "$RAY_HEAD_IP:5000" in " ".join(cluster["worker_start_ray_commands"])
    assert "postgresql" not in CLUSTER_YAML.read_text().split("head_start_ray_commands:")[1], (
        "cluster.yaml: the MLflow database URI must come from a secret, not be written in the file"
    )


def test_setup_installs_this_project_and_shares_storage(cluster) -> None:
    setup = " ".join(cluster["setup_commands"])
    assert "git clone" in setup and "scripts/install.sh" in setup  # pip install -e ., torch kept / CUDA on GPU
    assert any("mount -t nfs4" in command for command in cluster["initialization_commands"])
    assert "-v /mnt/efs:/mnt/efs" in cluster["docker"]["run_options"]


def test_every_command_is_valid_bash(cluster) -> None:
    for key, command in all_commands(cluster):
        check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert check.returncode == 0, f"cluster.yaml {key}: {command!r}: {check.stderr}"
