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

import os

from orchestrator.config.spec import Resources
from orchestrator.errors import ConfigError


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
    check_cluster_fits(resources, ray.cluster_resources())


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


def check_cluster_fits(resources: Resources, cluster: dict[str, float]) -> None:
    """More workers, CPUs or GPUs than the cluster has is a config error before any trial starts."""
    need_cpu, need_gpu = resources.cpus, resources.gpus
    problems = []
    if need_cpu > cluster.get("CPU", 0):
        problems.append(f"resources.num_workers x resources.cpus_per_worker = {need_cpu:g} CPUs, the cluster has {cluster.get('CPU', 0):g}")
    if need_gpu > cluster.get("GPU", 0):
        problems.append(f"resources.use_gpu: {need_gpu:g} GPUs needed, the cluster has {cluster.get('GPU', 0):g}")
    if problems:
        raise ConfigError("the trial does not fit the cluster:\n  " + "\n  ".join(problems))


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
