"""Where runs are recorded: the tracking URI, the embedded local `mlflow server`, and the reachability check.

Precedence of the tracking URI: the config's `tracking.uri`, then MLFLOW_TRACKING_URI, then the embedded
default: one `mlflow server` bound to 127.0.0.1 with a SQLite backend and artifacts under
`<storage_path>/mlflow/` (mlflow.db, artifacts/, server.json, server.log). Trial processes log to it over
HTTP, so only the server process touches the SQLite file (no "database is locked" from concurrent trials).
A second `dpo` call with the same storage path finds server.json, checks the pid and GET /health, and
reuses the running server instead of starting another. The server is started detached (its own session)
and stopped by its recorded process group only.
Start or show it: `dpo ui CONFIG`; tests: `python -m pytest tests/test_tracking.py -m mlflow -q`.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from orchestrator.config.layout import mlflow_root, resolve_storage
from orchestrator.errors import TrackingConfigError, TrackingUnavailableError
from trainables.processes import pid_alive

logger = logging.getLogger(__name__)

DEFAULT_PORT = 5000
STATE_FILE = "server.json"  # {"pid", "pgid", "url", "port", "backend_store_uri"} of the running server
LOG_FILE = "server.log"
# The embedded server needs neither MLflow's GenAI job runner (7 extra processes) nor telemetry.
SERVER_ENVIRONMENT = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}


def resolve_tracking_uri(config_uri: str | None, storage_path: str) -> tuple[str, bool]:
    """(uri, is_embedded): tracking.uri, else MLFLOW_TRACKING_URI, else the embedded server's root as a path.

    For the embedded case the returned string is the root folder; start it with `EmbeddedServer(root)`
    (or call `prepare_tracking_uri`, which does both).
    """
    for uri in (config_uri, os.environ.get("MLFLOW_TRACKING_URI")):
        if uri and uri.strip():
            uri = uri.strip()
            if uri.startswith("sqlite:"):
                logger.warning("tracking URI %s: many trial processes writing one SQLite file can fail with 'database "
                               "is locked'; leave tracking.uri unset to use the embedded server in front of it",
                               redact_uri(uri))
            return uri, False
    return str(mlflow_root(storage_path)), True


def _free_port(host: str, preferred: int, *, required: bool = False, wait_s: float = 10.0) -> int:
    """`preferred` if it can be bound, else any free port; required: wait up to wait_s for it, then fail."""
    deadline = time.monotonic() + (wait_s if required else 0.0)
    while True:
        for port in ((preferred,) if required else (preferred, 0)):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                # As uvicorn does: sockets of a stopped server left in TIME_WAIT do not block; a listener does.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((host, port))
                except OSError:
                    continue
                return probe.getsockname()[1]
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    raise TrackingUnavailableError(f"port {preferred} on {host} is in use; the embedded MLflow server cannot start there"
                                   if required else f"no free TCP port on {host} for the embedded MLflow server")


def _port_owned_by_group(port: int, pgid: int) -> bool | None:
    """Whether a process of group `pgid` holds the listening TCP socket of `port` (Linux /proc); None when
    this cannot be told (no /proc, or no listener found)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            for descriptor in (entry / "fd").iterdir():
                link = os.readlink(descriptor)
                if link.startswith("socket:[") and link[len("socket:["):-1] in inodes:
                    return True
        except OSError:
            continue
    return False


def health_ok(url: str, timeout_s: float = 2.0) -> bool:
    """True when GET <url>/health answers 200."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _is_our_server(pid: int, root: Path) -> bool:
    """The pid still runs `mlflow server` for this root (guards against a recycled pid)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return pid_alive(pid)  # no /proc (macOS): trust the pid
    return "mlflow" in command and str(root) in command


class EmbeddedServer:
    """The local `mlflow server` of one storage path: start, reuse, stop (by its recorded process group)."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", workers: int = 1) -> None:
        self.root = Path(root).expanduser().resolve()
        self.host = host
        self.workers = workers

    @property
    def backend_store_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def state(self) -> dict | None:
        """The recorded server (pid, url, ...) if its file exists and parses."""
        try:
            return json.loads((self.root / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def running_url(self) -> str | None:
        """The URL of a live, healthy server of this root, or None."""
        state = self.state()
        if state and pid_alive(int(state["pid"])) and _is_our_server(int(state["pid"]), self.root) and health_ok(state["url"]):
            return state["url"]
        return None

    def start_or_reuse(self, port: int | None = None, timeout_s: float = 180.0) -> str:
        """URL of this root's server, started if none is running. A file lock serialises concurrent callers."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "server.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            url = self.running_url()
            if url:
                logger.info("reusing the MLflow server at %s (pid %s)", url, self.state()["pid"])
                return url
            self._stop_recorded()  # a stale or unhealthy one
            return self._start(port, timeout_s)

    def _start(self, port: int | None, timeout_s: float, attempts: int = 3) -> str:
        required = bool(port)
        port = _free_port(self.host, port, required=True) if port else _free_port(self.host, DEFAULT_PORT)
        url = f"http://{self.host}:{port}"
        (self.root / "artifacts").mkdir(exist_ok=True)
        command = [sys.executable, "-m", "mlflow", "server", "--host", self.host, "--port", str(port),
                   "--backend-store-uri", self.backend_store_uri,
                   "--artifacts-destination", str(self.root / "artifacts"), "--workers", str(self.workers)]
        started = time.monotonic()
        with open(self.root / LOG_FILE, "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       cwd=self.root, env={**os.environ, **SERVER_ENVIRONMENT}, start_new_session=True)
        state = {"pid": process.pid, "pgid": process.pid, "url": url, "port": port,
                 "backend_store_uri": self.backend_store_uri, "started_at": time.time()}
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=1))
        while time.monotonic() - started < timeout_s:
            if process.poll() is not None:
                raise TrackingUnavailableError(
                    f"the embedded MLflow server exited with status {process.returncode} while starting "
                    f"(command: {' '.join(command)}); last log lines:\n{self.log_tail()}")
            if health_ok(url, timeout_s=1.0):
                if _port_owned_by_group(port, process.pid) is False:
                    # Another server took the port between our probe and our server's bind (two sweeps
                    # starting at once): its answer is not ours, and ours will fail to bind. Never use it.
                    self.stop()
                    if required or attempts <= 1:
                        raise TrackingUnavailableError(f"port {port} on {self.host} was taken by another server while "
                                                       f"the embedded MLflow server of {self.root} started")
                    logger.warning("port %d was taken by another server while ours started; trying another port", port)
                    return self._start(None, timeout_s, attempts - 1)
                logger.info("MLflow server started at %s in %.1f s (pid %d, root %s)", url,
                            time.monotonic() - started, process.pid, self.root)
                return url
            time.sleep(0.25)
        self.stop()
        raise TrackingUnavailableError(f"the embedded MLflow server at {url} was not healthy after {timeout_s:.0f} s; "
                                       f"see {self.root / LOG_FILE}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.root / LOG_FILE).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _stop_recorded(self, grace_s: float = 10.0) -> bool:
        state = self.state()
        if not state:
            return False
        pid, pgid = int(state["pid"]), int(state.get("pgid", state["pid"]))
        stopped = False
        if pid_alive(pid) and _is_our_server(pid, self.root):
            try:
                os.killpg(pgid, signal.SIGTERM)
                stopped = True
                # Wait for the whole group: the uvicorn child outlives the `mlflow server` leader for a moment.
                if not _wait_group_gone(pid, pgid, grace_s):
                    os.killpg(pgid, signal.SIGKILL)
                    _wait_group_gone(pid, pgid, 5.0)
            except ProcessLookupError:
                pass
        _reap(pid)
        (self.root / STATE_FILE).unlink(missing_ok=True)
        return stopped

    def stop(self) -> bool:
        """Stop the recorded server of this root (its whole process group). True if one was running."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self._stop_recorded()


def _wait_group_gone(pid: int, pgid: int, timeout_s: float) -> bool:
    """True once no process of the group is left (the leader reaped if it is our child)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pid)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _reap(pid: int) -> None:
    """Collect a child that exited (when this process started it) so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def ensure_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Raise TrackingUnavailableError (naming the URI) unless the tracking backend answers within timeout_s."""
    shown = redact_uri(uri)
    if uri.startswith(("http://", "https://")):
        try:
            request = health_request(uri)
        except ValueError as error:  # e.g. a port that is not a number
            raise TrackingConfigError(f"tracking URI {shown} is not a valid URL ({redact_uri(str(error))[:200]}); "
                                      "write it as http://host:port") from None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(request, timeout=max(0.5, min(5.0, deadline - time.monotonic()))):
                    return
            except ValueError as error:  # http.client.InvalidURL: a space or control character in the host
                raise TrackingConfigError(f"tracking URI {shown} is not a valid URL ({redact_uri(str(error))[:200]}); "
                                          "write it as http://host:port") from None
            except urllib.error.HTTPError as error:
                if error.code in (401, 403):
                    raise TrackingUnavailableError(
                        f"MLflow tracking server {shown} refused the credentials (HTTP {error.code}): set "
                        "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN") from error
                return  # it answers (an older server without /health, or a proxy): reachable
            except (urllib.error.URLError, OSError) as error:
                if time.monotonic() >= deadline:
                    raise TrackingUnavailableError(
                        f"MLflow tracking server {shown} is unreachable ({redact_uri(str(getattr(error, 'reason', error)))[:200]}); start it, "
                        "fix tracking.uri / MLFLOW_TRACKING_URI, or unset both to use the embedded local server") from error
                time.sleep(0.5)
    _check_store(uri, shown, timeout_s)


def health_request(uri: str) -> urllib.request.Request:
    """GET <uri>/health with the credentials MLflow itself would send: user:password inside the URI (moved
    out of the URL into a Basic header, which urllib cannot take from the URL), else
    MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD, else MLFLOW_TRACKING_TOKEN as a Bearer token."""
    parts = urllib.parse.urlsplit(uri)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else (parts.hostname or "")
    netloc = host + (f":{parts.port}" if parts.port else "")
    url = urllib.parse.urlunsplit((parts.scheme, netloc, f"{parts.path.rstrip('/')}/health", "", ""))
    request = urllib.request.Request(url)
    if parts.username is not None:
        user, password = urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")
    else:
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    if user is not None:
        basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        request.add_header("Authorization", f"Basic {basic}")
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    return request


def _check_store(uri: str, shown: str, timeout_s: float) -> None:
    """Non-HTTP stores (file:, sqlite:, postgresql:, databricks): one cheap query in a thread with a deadline."""
    import threading

    outcome: list[BaseException | None] = []

    def query() -> None:
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - reported to the caller below
            outcome.append(error)

    worker = threading.Thread(target=query, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        raise TrackingUnavailableError(f"MLflow tracking store {shown} did not answer within {timeout_s:.0f} s")
    if outcome[0] is not None:
        detail = redact_uri(str(outcome[0]).replace(uri, shown))[:400]
        raise TrackingUnavailableError(f"MLflow tracking store {shown} is unusable: {detail}") from None


def redact_uri(uri: str) -> str:
    """The URI (or any text holding one) with passwords and tokens replaced by ***."""
    from orchestrator.redaction import redact_text

    return redact_text(str(uri))


def prepare_tracking_uri(config_uri: str | None, storage_path: str, *, timeout_s: float = 10.0) -> str:
    """The URI trials should log to, with the embedded server started (or reused) and everything checked.

    Call on the driver before any Ray work; raises TrackingUnavailableError / TrackingConfigError.
    """
    uri, embedded = resolve_tracking_uri(config_uri, storage_path)
    if embedded:
        uri = EmbeddedServer(uri).start_or_reuse()
    ensure_reachable(uri, timeout_s=timeout_s)
    announced = (uri, config_uri, resolve_storage(str(storage_path)))  # ./runs and /abs/runs are one storage
    if announced not in _ANNOUNCED:  # once per process: quickstart prepares it for the sweep and for the analysis
        _ANNOUNCED.add(announced)
        print(f"MLflow tracking: {redact_uri(uri)}" + (" (embedded local server)" if embedded else ""), flush=True)
    return uri


_ANNOUNCED: set[tuple[str, str | None, str]] = set()
