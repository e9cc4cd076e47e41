"""Starting or joining Ray, and checking that a trial fits the cluster before any trial starts.

`dpo sweep` and `dpo study` join a running cluster with `--address` (auto, ray://host:10001) or start a
local Ray bound to 127.0.0.1 (loopback.py), sized to this machine. Every Ray worker gets the same small
environment (worker_environment).

Two commands started on one machine without `--address` are isolated: each starts its own local Ray
(`ray.init(address="local")`, never the Ray another command started), and every worker of that Ray is
told its own cluster's address (setup_local_worker), because Ray's own helpers that look a cluster up
(Ray Train's placement-group cleaner, through the state API) otherwise fail with "Found multiple active
Ray instances" when two are running. docs/sweeps.md#two-sweeps-on-one-machine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from orchestrator.config.spec import Experiment, Resources
from orchestrator.errors import ConfigError

logger = logging.getLogger(__name__)


def start_ray(address: str | None, resources: Resources) -> None:
    """Join a cluster (auto / ray://...) or start a local Ray bound to 127.0.0.1, sized to this machine."""
    import ray

    runtime_env = {"env_vars": worker_environment(local_cluster=not address)}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        bind_local_ray_to_loopback()
        runtime_env["worker_process_setup_hook"] = "orchestrator.ray.cluster.setup_local_worker"
        # address="local": a Ray of our own even when another command's local Ray runs on this machine
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=os.cpu_count(),
                 runtime_env=runtime_env, log_to_driver=True)
    check_cluster_fits(resources, ray.cluster_resources(), declared_autoscaling() if address else None)


def setup_local_worker() -> None:
    """Runs in every worker process of the local Ray that start_ray starts, once connected.

    - torch.distributed's store (one per Ray Train trial) listens on 127.0.0.1 (loopback.py);
    - RAY_ADDRESS names this worker's own cluster: Ray's helpers that look a cluster up by address
      (the state API behind Ray Train's placement-group cleaner) would otherwise scan the machine's
      processes and fail when another local Ray runs next to this one.
    """
    import ray

    from orchestrator.ray.loopback import bind_torch_to_loopback

    bind_torch_to_loopback()
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def bind_local_ray_to_loopback() -> None:
    """Make a local Ray listen on 127.0.0.1 only.

    Ray 2.60 replaces `_node_ip_address="127.0.0.1"` with the machine's routable address (so GCS and
    raylet listen on every interface) unless its single-machine mode is on; that mode is what
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 selects. The constant is read at import, so set it directly too.
    """
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def local_resources() -> dict[str, float]:
    """What the local Ray of start_ray offers: every CPU core of this machine and every GPU torch sees."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


@dataclass(frozen=True)
class NodeType:
    """A node type the cluster's autoscaler may launch: what one node offers and how many it may run."""

    name: str
    resources: dict[str, float]
    max_workers: int


@dataclass(frozen=True)
class Autoscaling:
    """What a joined cluster may grow to: its declared node types (none known: `source` is None)."""

    node_types: tuple[NodeType, ...]
    max_workers: int | None  # the cluster's cap on worker nodes of all types together (None: no cap)
    source: str | None  # where the node types were read (the GCS, or the autoscaler's config file)

    def most(self, resource: str) -> float:
        """The most of `resource` the autoscaler can add: the richest node types first, up to max_workers nodes."""
        left = self.max_workers if self.max_workers is not None else sum(t.max_workers for t in self.node_types)
        total = 0.0
        for node_type in sorted(self.node_types, key=lambda t: -t.resources.get(resource, 0.0)):
            count = min(node_type.max_workers, left)
            total += count * node_type.resources.get(resource, 0.0)
            left -= count
        return total


def check_cluster_fits(resources: Resources, cluster: dict[str, float], autoscaling: Autoscaling | None = None) -> str | None:
    """More workers, CPUs or GPUs than the cluster has, or can ever have, is a config error before any trial.

    cluster: what the cluster has now (ray.cluster_resources()).
    autoscaling: None for a cluster of fixed size (the local Ray of start_ray): the trial must fit now.
    For a joined cluster, what its autoscaler may add (cluster.yaml starts with min_workers: 0, so right
    after `ray up` there are no GPUs yet): a trial that fits once nodes are added is accepted, and its
    placement waits for them; one worker's CPUs and GPUs must also fit on one node of a declared type.
    With no node types known (a cluster started without the launcher), the check warns and lets the
    autoscaler (or nothing) add nodes. Returns the line logged when the trial waits for nodes, else None.
    """
    needs = {"CPU": (resources.cpus, "resources.num_workers x resources.cpus_per_worker = {need:g} CPUs"),
             "GPU": (resources.gpus, "resources.use_gpu: {need:g} GPUs needed")}
    short = {name: (need, what) for name, (need, what) in needs.items() if need > cluster.get(name, 0)}
    if not short:
        return None
    if autoscaling is None:
        raise ConfigError("the trial does not fit the cluster:\n  " + "\n  ".join(
            f"{what.format(need=need)}, the cluster has {cluster.get(name, 0):g}" for name, (need, what) in short.items()))
    now = ", ".join(f"{cluster.get(name, 0):g} {name}s" for name in short)
    if autoscaling.source is None:
        message = (f"the cluster has {now} now, fewer than one trial needs, and declares no node types this sweep "
                   "can read (no autoscaler config): trials wait until nodes join")
        logger.warning(message)
        return message
    declared = ", ".join(f"{t.name} (up to {t.max_workers} x {_shape(t.resources)})" for t in autoscaling.node_types)
    problems = [f"{what.format(need=need)}, the cluster has {cluster.get(name, 0):g} and its autoscaler can add "
                f"{autoscaling.most(name):g}" for name, (need, what) in short.items()
                if need > cluster.get(name, 0) + autoscaling.most(name)]
    worker = {"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker if resources.use_gpu else 0.0}
    if not any(all(t.resources.get(k, 0.0) >= v for k, v in worker.items() if v) for t in autoscaling.node_types):
        problems.append(f"one worker (resources.cpus_per_worker: {worker['CPU']:g}, resources.gpus_per_worker: "
                        f"{worker['GPU']:g}) fits on no node type")
    if problems:
        raise ConfigError(f"the trial does not fit the cluster, even once its autoscaler adds every node it may "
                          f"(node types from {autoscaling.source}: {declared or 'none'}):\n  " + "\n  ".join(problems))
    message = (f"the cluster has {now} now; its autoscaler adds nodes for the trials (node types from "
               f"{autoscaling.source}: {declared}); trials wait until they join")
    logger.info(message)
    return message


def _shape(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU")) + "}"


BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")  # where `ray up` puts the autoscaler's config on the head


def declared_autoscaling() -> Autoscaling:
    """The node types the connected cluster's autoscaler may launch.

    Read from the GCS's cluster config when the autoscaler publishes one (autoscaler v2, KubeRay), else
    from the autoscaler config that `ray up` writes on the head (~/ray_bootstrap_config.yaml, with the
    resources of each instance type filled in), else unknown (source None).
    """
    import ray._private.state

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS without the key: fall back to the file
        config = None
    if config is not None and config.node_group_configs:
        types = tuple(NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, g.max_count if g.max_count >= 0 else 10**6)
                      for g in config.node_group_configs)
        return Autoscaling(types, None, "the cluster's GCS")
    path = BOOTSTRAP_CONFIG.expanduser()
    if path.is_file():
        return autoscaling_from_config(yaml.safe_load(path.read_text()) or {}, str(path))
    return Autoscaling((), None, None)


def autoscaling_from_config(config: dict[str, Any], source: str) -> Autoscaling:
    """The worker node types of a Ray cluster launcher config (cluster.yaml's `available_node_types`).

    A node type whose `resources` are empty (to be detected from the instance type) has unknown size; when
    no node type has a known size, the result is unknown (source None), and the check only warns.
    """
    head = config.get("head_node_type")
    types = tuple(NodeType(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()
                                  if isinstance(v, (int, float))}, int(spec.get("max_workers", 0)))
                  for name, spec in (config.get("available_node_types") or {}).items() if name != head)
    if not any(t.resources for t in types):
        return Autoscaling((), None, None)
    cap = config.get("max_workers")
    return Autoscaling(tuple(t for t in types if t.resources and t.max_workers > 0), int(cap) if cap is not None else None,
                       source)


# File systems every node of a cluster mounts alike (a path on them names the same files on every node).
SHARED_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "fuse.s3fs",
                      "fuse.gcsfuse", "fuse.juicefs", "fuse.mountpoint-s3", "fuse.sshfs", "fuse.ceph-fuse")


def filesystem_type(path: str, mounts: str | None = None) -> str | None:
    """The type of the file system holding `path` (the longest mount point above it in /proc/mounts)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    target = Path(path).expanduser().absolute()
    best, kind = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = str(target) == point or str(target).startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def is_shared_location(location: str, mounts: str | None = None) -> bool:
    """A URI (s3://, gs://, ...) or a path on a file system every node mounts (NFS, EFS, Lustre, ...)."""
    if "://" in location and not location.startswith("file://"):
        return True
    path = location[len("file://"):] if location.startswith("file://") else location
    return (filesystem_type(path, mounts) or "") in SHARED_FILESYSTEMS


LOOPBACK_HOSTS = ("localhost", "127.", "::1", "[::1]", "0.0.0.0")


def check_joined_cluster(*, storage_path: str, reference_cache_dir: str | None, tracking_uri: str | None,
                         tracking_embedded: bool, multi_node: bool, mounts: str | None = None) -> None:
    """When a sweep joins a cluster of several nodes (now or once autoscaled), everything trials share must
    be reachable from every node: refuse node-local storage, a node-local reference cache and a tracking
    server on loopback, naming the key. A single-node cluster may keep everything local."""
    if not multi_node:
        return
    problems = []
    if not is_shared_location(storage_path, mounts):
        problems.append(f"storage_path: {storage_path} is on this node's own disk; trials on other nodes write "
                        "their checkpoints elsewhere. Use a shared file system mounted on every node (cluster.yaml "
                        "mounts EFS at /mnt/efs) or an s3:// URI")
    if reference_cache_dir is not None and not is_shared_location(reference_cache_dir, mounts):
        problems.append(f"reference.cache_dir: {reference_cache_dir} is on this node's own disk; trials on other nodes "
                        "would not find the reference log-probs. Point it at the shared file system "
                        "(e.g. /mnt/efs/reference-cache)")
    if tracking_embedded:
        problems.append("tracking.uri: unset, so the sweep would start its own MLflow server on 127.0.0.1, which "
                        "trials on other nodes cannot reach. Set tracking.uri (or MLFLOW_TRACKING_URI) to a server "
                        "every node reaches (cluster.yaml starts one on the head's private address, port 5000)")
    elif tracking_uri:
        host = urlsplit(tracking_uri).hostname or ""
        scheme = urlsplit(tracking_uri).scheme
        if scheme in ("http", "https") and (host.startswith(LOOPBACK_HOSTS) or host == "::1"):
            problems.append(f"tracking.uri: {scheme}://{host}... is a loopback address, which trials on other nodes "
                            "cannot reach. Use the server's private network address (cluster.yaml exports "
                            "MLFLOW_TRACKING_URI=http://<head private ip>:5000)")
        elif scheme in ("", "file", "sqlite") and not is_shared_location(urlsplit(tracking_uri).path or tracking_uri, mounts):
            problems.append(f"tracking.uri: {scheme or 'path'} store on this node's own disk; trials on other nodes "
                            "cannot write to it. Use an MLflow server every node reaches")
    if problems:
        raise ConfigError("this sweep joins a cluster of several nodes, but:\n  " + "\n  ".join(problems))


def cluster_is_multi_node(autoscaling: Autoscaling | None) -> bool:
    """Alive nodes on several machines now, or worker nodes the autoscaler may add. Nodes are told apart by
    their IP address: several Ray nodes of one machine (ray.cluster_utils, or `ray start` twice) share its
    disk, so a node-local storage path is shared by them."""
    import ray

    machines = {node.get("NodeManagerAddress") for node in ray.nodes() if node.get("Alive")}
    return len(machines) > 1 or bool(autoscaling and autoscaling.node_types)


def worker_environment(local_cluster: bool = False) -> dict[str, str]:
    """Environment every Ray worker gets (runtime_env): quiet tokenizers, no hub calls when offline.

    local_cluster: the single-machine Ray that `dpo sweep` starts itself, where no node is ever drained,
    so Ray Train's preemption watcher (one more actor process per trial) has nothing to watch.
    """
    # Train V2 workers hand each report to the controller, which collects it at every health check
    # (default every 2 s): a report blocks until then. Checking often keeps reports from stalling steps.
    # A warm trial actor is reused only when its trial's thread has ended within this many seconds of the
    # trial stopping (Tune's default 2 s); a trial stopped early (ASHA) still flushes its MLflow points.
    env = {"TOKENIZERS_PARALLELISM": "false",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"),
           "TUNE_FUNCTION_THREAD_TIMEOUT_S": os.environ.get("TUNE_FUNCTION_THREAD_TIMEOUT_S", "30")}
    if local_cluster:
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "DPO_DEMO_CACHE", "HF_HOME"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def check_storage_is_shared(experiment: Experiment) -> None:
    """check_joined_cluster for a sweep that joined the connected cluster (`dpo sweep --address ...`)."""
    check_layout_is_shared(experiment.layout, experiment.tracking.uri, experiment.tracking.enabled)


def check_layout_is_shared(layout, tracking_uri: str | None, tracking_enabled: bool) -> None:
    """check_joined_cluster for a sweep's or study's StorageLayout and tracking.uri / tracking.enabled."""
    from orchestrator.tracking.server import resolve_tracking_uri

    uri, embedded = resolve_tracking_uri(tracking_uri, layout.storage) if tracking_enabled else (None, False)
    check_joined_cluster(storage_path=layout.storage, reference_cache_dir=layout.reference_cache_dir,
                         tracking_uri=uri, tracking_embedded=embedded,
                         multi_node=cluster_is_multi_node(declared_autoscaling()))
