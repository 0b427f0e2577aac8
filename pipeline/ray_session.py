"""Starting or joining Ray, the same way for a laptop and a cluster."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future
from pathlib import Path

import grpc
import ray
from ray._private.services import canonicalize_bootstrap_address
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc, ray_client_pb2, ray_client_pb2_grpc

from kd.errors import StageError


# Workers iterate small datasets every epoch; their progress bars would drown the driver's display.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
              # Ray Train's controller learns that a worker's loop has ended by polling, every 2 s by default; each
              # student's end waited for it. A poll is a few actor calls.
              "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
RAY_CLIENT_SCHEME = "ray://"
# Ray starts its workers at niceness 15 and its driver, raylet and dashboard at 0. Every forward and training step
# runs in a worker, so on a machine with few cores each tick of those daemons preempts one of torch's threads and
# the others wait at its barrier: the label stage's forward passes ran 1.5x slower in an actor than in a bare
# process (benchmarks/bench_augment.py, 2 cores). A cluster's nodes need the same setting at `ray start`
# (cluster.yaml).
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}
# ray.init retries an unreachable head for minutes (over five for a GCS address, 30 s for ray://, measured here);
# a live head answers in milliseconds.
CONNECT_TIMEOUT_S = 5.0


def cluster_address(address: str | None) -> str | None:
    """The host:port that ``ray.init(address)`` would connect to, or None when it would start a local Ray.

    Ray's own resolution (RAY_ADDRESS, which ``ray job submit`` sets for its entrypoint, then the last
    ``ray start`` on this machine for 'auto'), so that what is checked is what ray.init uses."""
    if address is not None and address.startswith(RAY_CLIENT_SCHEME):
        return address.removeprefix(RAY_CLIENT_SCHEME)
    try:
        return canonicalize_bootstrap_address(None if address in (None, "local") else address)
    except (ConnectionError, ValueError) as error:
        raise StageError(f"ray.address {address!r}: {error}") from None


def check_reachable(address: str, host_port: str, client: bool) -> None:
    """One RPC to the head, bounded by CONNECT_TIMEOUT_S, or one clear error instead of a long hang. A TCP
    connect is not enough: a proxy or firewall in between may accept it (one here even answers HTTP/2)."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # the probe's plain channel cannot speak to a TLS head; ray.init will
    with grpc.insecure_channel(host_port) as channel:
        try:
            if client:
                ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(
                    ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING), timeout=CONNECT_TIMEOUT_S)
            else:
                gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                    gcs_service_pb2.GetClusterIdRequest(), timeout=CONNECT_TIMEOUT_S)
        except grpc.RpcError as error:
            code = error.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise StageError(f"cannot reach Ray at {address!r}: no answer from {host_port} ({error.details()}; "
                                 f"waited up to {CONNECT_TIMEOUT_S:g} s)") from None
            if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                server = "Ray client server" if client else "Ray head (GCS)"
                raise StageError(f"cannot reach Ray at {address!r}: {host_port} answered, but not as a {server} "
                                 f"({error.details()})") from None
            # Any other status (e.g. UNAUTHENTICATED without the cluster's token) came from a live Ray head.


def check_ray(ray_cfg) -> str | None:
    """Fails fast when the configured cluster does not answer; returns its host:port (None: Ray starts here)."""
    target = cluster_address(ray_cfg.address)
    if target is not None:
        explicit = ray_cfg.address not in (None, "local", "auto")
        check_reachable(ray_cfg.address if explicit else f"{target} (from RAY_ADDRESS or this machine's last "
                        "`ray start`)", target, client=explicit and ray_cfg.address.startswith(RAY_CLIENT_SCHEME))
    return target


def ensure_ray(ray_cfg, log_to_driver: bool = True) -> None:
    """Start or join Ray. ``log_to_driver=False`` keeps what workers print (execution plans, progress lines, Ray's
    own notices) in Ray's log files instead of the terminal, where concurrent stages would interleave it."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = None if ray_cfg.address in (None, "local") else ray_cfg.address
    # Inside a submitted job this runtime_env is merged with the job's, whose working_dir the workers import.
    kwargs = dict(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver,
                  runtime_env={"env_vars": WORKER_ENV})
    local = check_ray(ray_cfg) is None
    if local:
        # Only a Ray started here is ours to size and configure.
        kwargs.update(num_cpus=ray_cfg.num_cpus, _system_config=LOCAL_SYSTEM_CONFIG)
    try:
        if local:
            init_on_lasting_thread(kwargs)
        else:
            ray.init(**kwargs)
    except Exception as error:  # a local start that times out raises a bare Exception
        where = "start a local Ray" if local else f"reach Ray at {ray_cfg.address!r}"
        raise StageError(f"cannot {where}: {type(error).__name__}: {error}") from None


def init_on_lasting_thread(kwargs: dict) -> None:
    """``ray.init(**kwargs)`` for a local start, from a thread that lives as long as this process.

    A local Ray's GCS, raylet and dashboard share the fate of the thread that started them (Linux
    ``PR_SET_PDEATHSIG``: the kernel kills them when that thread, not the process, ends). The runner starts Ray
    inside the first stage that needs it, on a stage thread, and its thread pool ends those threads once every stage
    is done: two cold benchmark runs lost their Ray then, as the summary timed the models."""
    started: Future = Future()

    def start_and_stay() -> None:
        try:
            ray.init(**kwargs)
        except BaseException as error:  # noqa: BLE001  (handed to the caller, which reports it)
            started.set_exception(error)
            return
        started.set_result(None)
        threading.Event().wait()  # never set: this thread is the local Ray's parent until the process exits

    threading.Thread(target=start_and_stay, name="ray-parent", daemon=True).start()
    started.result()


CONSOLE_NOTICES = {
    # Fires whenever a small read (a row count) starts while the run's other stages hold every CPU, which the stage
    # scheduler allows on purpose; the read waits its turn.
    "ray.data": ("does not have any available CPUs",),
    # The scheduler starts Ray from one of its threads; the run handles its own interrupts. Token authentication is
    # Ray's default for a new local cluster, announced on every start. (Setting RAY_AUTH_MODE=token instead does not
    # work once Ray is imported: its cached config still says 'disabled' and the start fails.)
    "ray": ("SIGTERM handler is not set", "Token authentication is enabled for this Ray cluster"),
}


class ConsoleFilter(logging.Filter):
    """What of Ray's logging reaches the terminal of a run without ``-v``: warnings and errors, less the notices
    (substrings of the message) that ``CONSOLE_NOTICES`` names for the record's logger or a logger above it.

    Every notice is checked on every handler: one handler can serve several of these loggers (a test harness, or
    a user's logging setup, may attach one to both), and a handler keeps only the first ConsoleFilter it gets."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        message = record.getMessage()
        return not any(notice in message for logger, notices in CONSOLE_NOTICES.items()
                       if record.name == logger or record.name.startswith(logger + ".") for notice in notices)


def quiet_console() -> None:
    """Keep library chatter off the terminal of a run without ``-v``, where the stage table says what runs.

    - Ray Data's INFO lines (each execution's plan, and on a terminal without progress bars its per-operator
      progress every few seconds: hundreds of lines per stage) stay in its log file, ``ray-data.log`` in the
      session's logs (``WORKDIR/logs/ray``), whose handler keeps everything.
    - Ray's and Ray Data's notices in ``CONSOLE_NOTICES`` are dropped.
    - transformers' warnings and progress bars from loading and saving models in the driver (every stage writes a
      ``save_pretrained`` folder) are dropped; its errors still show."""
    import ray.data  # noqa: F401  (configures the ray.data logger and its handlers on import)
    from transformers.utils import logging as transformers_logging

    for name in CONSOLE_NOTICES:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not any(
                    isinstance(existing, ConsoleFilter) for existing in handler.filters):
                handler.addFilter(ConsoleFilter())
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def link_worker_logs(workdir: Path) -> Path | None:
    """``WORKDIR/logs/ray``: a link to this Ray session's log folder (every worker's output), or None on a Ray
    client connection, whose logs stay on the cluster."""
    try:
        logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    except AttributeError:
        return None
    link = workdir / "logs" / "ray"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(logs, target_is_directory=True)
    return link
