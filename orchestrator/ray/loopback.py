"""Keep the server that torch.distributed starts inside a local Ray on 127.0.0.1.

Ray Train sets up a torch process group in every trial, even with one worker: rank 0 hosts a c10d
TCPStore on MASTER_ADDR:MASTER_PORT. torch binds that store's listening socket to every interface
(`::`), whatever MASTER_ADDR says, and the store has no authentication. On the single-machine Ray that
`dpo sweep` starts itself, MASTER_ADDR is 127.0.0.1, and this module makes the store listen there only:
it hands TCPStore a socket already bound to the loopback address (TCPStore's public `master_listen_fd`
argument). Hosts that are not loopback (a real cluster) are left alone.
`orchestrator.ray.cluster.start_ray` installs `bind_torch_to_loopback` as the runtime_env
`worker_process_setup_hook` of a local Ray, so it runs in every Ray worker process. It imports nothing
heavy: the patch is applied when (and if) the process imports torch.distributed.rendezvous.
Tested by `python -m pytest tests/test_reliability_ray.py -q` (every listening socket is on 127.0.0.1).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import socket
import sys

RENDEZVOUS_MODULE = "torch.distributed.rendezvous"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def bind_torch_to_loopback() -> None:
    """Runs once in each Ray worker process: loopback-only TCPStore servers and Gloo connections."""
    loopback_interface = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    if loopback_interface:  # lo on Linux, lo0 on macOS
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface)
    if RENDEZVOUS_MODULE in sys.modules:
        _patch(sys.modules[RENDEZVOUS_MODULE])
    elif not any(isinstance(finder, _PatchAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())


def _patch(rendezvous) -> None:
    if not getattr(rendezvous.TCPStore, "binds_loopback", False):
        rendezvous.TCPStore = _loopback_store_factory(rendezvous.TCPStore)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds torch.distributed.rendezvous as usual, then patches the module right after it has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != RENDEZVOUS_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module) -> None:
            run_module(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _loopback_store_factory(tcp_store):
    """A drop-in for TCPStore(...) whose server, for a loopback host, listens on that host only."""

    def create(host_name, port, world_size=None, is_master=False, *args, **kwargs):
        if is_master and host_name in LOOPBACK_HOSTS and port and kwargs.get("master_listen_fd") is None:
            family = socket.AF_INET6 if host_name == "::1" else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", port))
            listener.listen(512)
            kwargs["master_listen_fd"] = listener.detach()  # the store serves on this socket from here on
        return tcp_store(host_name, port, world_size, is_master, *args, **kwargs)

    create.binds_loopback = True
    return create
