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


# ---- joining a cluster: the trial's shape against the node types, shared storage, reachable tracking ----

from orchestrator.config.spec import Resources  # noqa: E402
from orchestrator.errors import ConfigError  # noqa: E402
from orchestrator.ray.cluster import (Autoscaling, autoscaling_from_config, check_cluster_fits,  # noqa: E402
                                      check_joined_cluster, filesystem_type)

G5_12XLARGE = {"CPU": 48, "GPU": 4}  # what `ray up` fills into the bootstrap config for cluster.yaml's gpu_worker
MOUNTS = """overlay / overlay rw 0 0
tmpfs /tmp tmpfs rw 0 0
fs-1.efs.us-west-2.amazonaws.com:/ /mnt/efs nfs4 rw,vers=4.1 0 0
"""


def trial(workers: int, gpus_per_worker: float = 1, use_gpu: bool = True, cpus_per_worker: float = 1) -> Resources:
    return Resources(num_workers=workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
                     gpus_per_worker=gpus_per_worker, strategy="fsdp", max_failures=0, keep_checkpoints=None)


def bootstrapped(cluster: dict[str, Any]) -> Autoscaling:
    """cluster.yaml as the head's ~/ray_bootstrap_config.yaml holds it (instance resources filled in)."""
    filled = yaml.safe_load(yaml.safe_dump(cluster))
    filled["available_node_types"]["gpu_worker"]["resources"] = dict(G5_12XLARGE)
    filled["available_node_types"]["head_cpu"]["resources"] = {"CPU": 8}
    return autoscaling_from_config(filled, "ray_bootstrap_config.yaml")


def test_a_trial_waits_for_the_autoscaler_instead_of_failing_on_an_empty_cluster(cluster) -> None:
    """Right after `ray up` (min_workers: 0) the cluster has the head's 8 CPUs and no GPU: a 4-GPU trial is
    accepted because up to 8 g5.12xlarge (4 GPUs each) may join; 40 GPUs, or 64 CPUs per worker, never fit."""
    autoscaling = bootstrapped(cluster)
    assert autoscaling.most("GPU") == 8 * 4 and autoscaling.most("CPU") == 8 * 48
    empty = {"CPU": 8.0}
    message = check_cluster_fits(trial(4), empty, autoscaling)
    assert message and "0 GPUs now" in message and "gpu_worker (up to 8 x {CPU: 48, GPU: 4})" in message
    with pytest.raises(ConfigError, match=r"use_gpu: 40 GPUs needed, the cluster has 0 and its autoscaler can add 32"):
        check_cluster_fits(trial(40), empty, autoscaling)
    with pytest.raises(ConfigError, match=r"one worker \(resources.cpus_per_worker: 64, resources.gpus_per_worker: 1\) "
                                          r"fits on no node type"):
        check_cluster_fits(trial(1, cpus_per_worker=64), empty, autoscaling)
    assert check_cluster_fits(trial(4), {"CPU": 56.0, "GPU": 4.0}, autoscaling) is None  # fits now: nothing to say
    with pytest.raises(ConfigError, match=r"4 GPUs needed, the cluster has 0$"):  # a local Ray: its size is final
        check_cluster_fits(trial(4), empty, None)


def test_a_cluster_without_readable_node_types_gets_a_warning_not_a_refusal(cluster, caplog) -> None:
    unknown = autoscaling_from_config(cluster, "cluster.yaml")  # resources: {} = from the instance type, unknown here
    assert unknown.source is None
    message = check_cluster_fits(trial(4), {"CPU": 8.0}, unknown)
    assert "declares no node types" in message and "declares no node types" in caplog.text


def test_the_autoscalers_global_cap_bounds_what_it_can_add() -> None:
    config = {"max_workers": 2, "head_node_type": "head",
              "available_node_types": {"head": {"resources": {"CPU": 4}, "max_workers": 0},
                                       "big": {"resources": {"CPU": 8, "GPU": 8}, "max_workers": 5},
                                       "small": {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 5}}}
    assert autoscaling_from_config(config, "x").most("GPU") == 16  # 2 nodes at most, the 8-GPU type first


def test_joining_several_nodes_refuses_node_local_storage_and_loopback_tracking() -> None:
    shared = dict(storage_path="/mnt/efs/ray_results", reference_cache_dir="/mnt/efs/reference-cache",
                  tracking_uri="http://10.0.1.5:5000", tracking_embedded=False, multi_node=True, mounts=MOUNTS)
    assert filesystem_type("/mnt/efs/ray_results/x", MOUNTS) == "nfs4" and filesystem_type("/tmp/x", MOUNTS) == "tmpfs"
    check_joined_cluster(**shared)  # everything shared: accepted
    check_joined_cluster(**{**shared, "storage_path": "s3://bucket/ray_results"})
    cases = {
        "storage_path": ({"storage_path": "/home/ubuntu/ray_results"}, r"storage_path: /home/ubuntu/ray_results is on this node's own disk"),
        "reference.cache_dir": ({"reference_cache_dir": "/tmp/cache"}, r"reference.cache_dir: /tmp/cache is on this node's own disk"),
        "loopback": ({"tracking_uri": "http://127.0.0.1:5000"}, r"tracking.uri: http://127.0.0.1... is a loopback address"),
        "localhost": ({"tracking_uri": "https://localhost:5000"}, r"tracking.uri: https://localhost... is a loopback address"),
        "embedded": ({"tracking_uri": None, "tracking_embedded": True}, r"tracking.uri: unset, so the sweep would start"),
        "file store": ({"tracking_uri": "file:///home/ubuntu/mlruns"}, r"tracking.uri: file store on this node's own disk"),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            check_joined_cluster(**{**shared, **change})
    local = {**shared, "storage_path": "/home/ubuntu/r", "tracking_uri": "http://127.0.0.1:5000", "multi_node": False}
    check_joined_cluster(**local)  # a single-node cluster keeps everything on its own disk


def test_workers_install_the_lora_extra_the_heads_torch_and_get_an_instance_profile(cluster) -> None:
    setup = " ".join(cluster["setup_commands"])  # run on head and workers alike
    assert re.search(r"TORCH_VERSION=2\.13\.0 bash scripts/install\.sh lora\b", setup), setup
    install = (CLUSTER_YAML.parent / "scripts" / "install.sh").read_text()
    assert 'pip install "torch==${TORCH_VERSION}"' in install  # the CUDA path is pinned too, not pip's latest
    profile = cluster["available_node_types"]["gpu_worker"]["node_config"].get("IamInstanceProfile", {})
    assert profile.get("Arn", "").startswith("arn:aws:iam::"), "gpu_worker needs an instance profile for s3:// storage"


# ---- Ray's fake multi-node autoscaler: a sweep's trial placed once the autoscaler adds GPU nodes -------

def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def fake_autoscaling_cluster(tmp_path, monkeypatch):
    """A head with 1 CPU and no GPU whose autoscaler (Ray's fake_multinode provider: nodes are local raylets)
    may add one `gpu_worker` node of {CPU: 2, GPU: 2}, as cluster.yaml's gpu_worker starts at min_workers 0.

    Started like ray.cluster_utils.AutoscalingCluster, but on a free port and in its own process group, which
    is stopped by its id: AutoscalingCluster runs `ray stop --force`, which would stop every Ray on the machine.
    """
    import os
    import signal
    import time

    import ray

    from orchestrator.ray import cluster as cluster_module
    from orchestrator.ray.cluster import bind_local_ray_to_loopback

    port = _free_port()
    config = {
        "cluster_name": "fake", "max_workers": 1, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "disable_launch_config_check": True, "disable_node_updaters": True,
                     "gcs_address": f"127.0.0.1:{port}"},
        "auth": {"ssh_user": "ubuntu"}, "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 2, "GPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 1}},
        **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter", *COMMAND_KEYS[:4],
                                "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"  # where `ray up` leaves it on a real head
    bootstrap.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(cluster_module, "BOOTSTRAP_CONFIG", bootstrap)
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
         "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", f"--autoscaling-config={bootstrap}"],
        env=env, start_new_session=True, stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT)
    try:
        bind_local_ray_to_loopback()  # the driver's address stays 127.0.0.1, as the head's
        deadline = time.monotonic() + 60
        while not (tmp_path / "head.log").read_text().count("Ray runtime started"):
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(3)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(head.pid, signal.SIGKILL)  # the head's processes and the fake nodes share its group


@pytest.mark.ray
@pytest.mark.integration
def test_a_sweep_joining_an_empty_autoscaling_cluster_gets_its_trial_placed_once_gpu_nodes_join(fake_autoscaling_cluster, tmp_path):
    """The cluster has 0 GPUs when the sweep joins; the trial's check passes on the declared node types (it
    used to fail with '2 GPUs needed, the cluster has 0'), and the trial's placement group (one bundle per
    Ray Train worker, as Ray Train asks) is placed once the autoscaler has added a gpu_worker node."""
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from orchestrator.ray.cluster import cluster_is_multi_node, declared_autoscaling, start_ray

    start_ray(fake_autoscaling_cluster, trial(2))  # joins: no ConfigError although the cluster has no GPU yet
    assert ray.cluster_resources().get("GPU", 0) == 0
    autoscaling = declared_autoscaling()
    assert autoscaling.source.endswith("ray_bootstrap_config.yaml") and autoscaling.most("GPU") == 2
    with pytest.raises(ConfigError, match=r"4 GPUs needed, the cluster has 0 and its autoscaler can add 2"):
        check_cluster_fits(trial(4), ray.cluster_resources(), autoscaling)
    with pytest.raises(ConfigError, match=r"storage_path: .* is on this node's own disk"):  # other nodes may join
        check_joined_cluster(storage_path=str(tmp_path), reference_cache_dir=None, tracking_uri=None,
                             tracking_embedded=False, multi_node=cluster_is_multi_node(autoscaling))
    started = time.monotonic()
    group = placement_group([{"CPU": 1, "GPU": 1}] * 2, strategy="PACK")
    assert group.wait(timeout_seconds=90), "the autoscaler never added a gpu_worker node"
    assert ray.cluster_resources()["GPU"] == 2 and sum(n["Alive"] for n in ray.nodes()) == 2
    print(f"placed after {time.monotonic() - started:.1f} s")
    remove_placement_group(group)


def test_gpus_per_worker_is_one_whole_gpu_or_a_fraction_for_one_worker_trials(tmp_path) -> None:
    """A worker trains on one GPU: more per worker would sit idle, a fraction only for single-worker trials."""
    from orchestrator.config.loading import load_config

    (tmp_path / "model").mkdir()
    (tmp_path / "train.jsonl").write_text("")
    config = tmp_path / "gpus.yaml"
    config.write_text(yaml.safe_dump({"name": "gpus", "model": {"path": str(tmp_path / "model")},
                                      "data": {"train": str(tmp_path / "train.jsonl")},
                                      "resources": {"use_gpu": True}}))
    assert load_config(config, ["resources.gpus_per_worker=0.5"]).resources.gpus_per_worker == 0.5  # trials share a GPU
    assert load_config(config, ["resources.num_workers=4"]).resources.gpus_per_worker == 1
    refusals = {
        ("resources.gpus_per_worker=2", "resources.num_workers=2"): r"gpus_per_worker: 2, but a worker trains on one GPU.*num_workers to 4",
        ("resources.gpus_per_worker=0.5", "resources.num_workers=2"): r"gpus_per_worker: 0.5 is a fraction of a GPU",
        ("resources.gpus_per_worker=0",): r"gpus_per_worker: 0 with resources.use_gpu: true",
    }
    for overrides, message in refusals.items():
        with pytest.raises(ConfigError, match=message):
            load_config(config, list(overrides))
    assert load_config(config, ["resources.use_gpu=false", "resources.gpus_per_worker=4"])  # ignored without GPUs


def test_a_study_joining_several_nodes_refuses_node_local_storage_naming_the_key(tmp_path, monkeypatch) -> None:
    """`dpo study --address ...`: its stages and evaluations may run on other nodes, so the same refusal as
    a sweep's, before any stage trains."""
    import ray

    from orchestrator.config.schema import ExperimentConfig
    from orchestrator.ray import cluster as cluster_module
    from orchestrator.workflows.study import Study

    config = ExperimentConfig.model_validate({
        "name": "study", "model": {"path": str(tmp_path)}, "data": {"train": "t.jsonl"},
        "storage_path": str(tmp_path / "runs"), "tracking": {"uri": "http://127.0.0.1:5000"}})
    monkeypatch.setattr(cluster_module, "start_ray", lambda address, resources: None)  # joined, as far as Ray goes
    monkeypatch.setattr(cluster_module, "cluster_is_multi_node", lambda autoscaling: True)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ConfigError, match=r"storage_path: .* is on this node's own disk(.|\n)*tracking.uri: "
                                          r"http://127.0.0.1... is a loopback address"):
        Study(config, None, address="ray://head:10001").ensure_ray()
