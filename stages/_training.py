"""The one Ray Train launcher, for every training stage (train_connector, train_vpit, train_decoder).

    python -m pytest tests/integration/test_training_stages.py -q -m integration

``fit(ctx, worker_fn, job, scaling)`` runs ``worker_fn(job)`` on every worker of a
``TorchTrainer`` group (gloo on CPU, nccl on GPU) with the worker's output sent to the stage's
log, and returns Ray's ``Result``. Restarts are the loop's business: it resumes from the newest
complete checkpoint under ``{ctx.checkpoint_dir}/loop``, a path that is the same for every
worker-group restart (``FailureConfig.max_failures``) and, because the engine keeps the
checkpoint dir of a ``resumable`` stage whose key did not change, for a rerun of the stage too.
``Scaling`` (the worker group's shape) is a field of each training stage's config. The workers:
``stages._llm.llm_worker`` (the LLM stages), ``stages.train_decoder.decoder_worker``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipelines.logs import capture_output
from pipelines.stage import StageContext, operational


@dataclass(kw_only=True)
class Scaling:
    """The Ray Train worker group of a training stage (``stages.<stage>.scaling``)."""

    num_workers: int = 2  # Ray Train workers (one process each; one GPU each when use_gpu)
    # CPUs reserved per worker, also its torch thread count (min 1). Fractional on purpose: on a
    # 2-core box two workers at 1.0 would take every CPU and starve the Ray driver/Data tasks
    # (Ray Train then hangs waiting for them).
    cpus_per_worker: float = field(default=0.5, metadata=operational())
    use_gpu: bool = False  # nccl + one device per worker (bf16 there); False: CPU with gloo
    gpus_per_worker: float = field(default=1.0, metadata=operational())  # only read when use_gpu
    max_failures: int = field(default=2, metadata=operational())  # worker-group restarts before the stage fails

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"scaling.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"scaling.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ValueError("scaling.gpus_per_worker must be > 0 when scaling.use_gpu is true")
        if self.max_failures < -1:
            raise ValueError("scaling.max_failures must be >= 0, or -1 for unlimited restarts")

    def resources(self) -> dict[str, float]:
        """Peak Ray resources of the worker group (for ``metamorph run --dry-run``)."""
        need = {"CPU": self.num_workers * self.cpus_per_worker}
        if self.use_gpu:
            need["GPU"] = self.num_workers * self.gpus_per_worker
        return need


def fit(ctx: StageContext, worker_fn: Callable[[Any], None], job: Any, scaling: Scaling) -> Any:
    """Run ``worker_fn(job)`` on every worker of a TorchTrainer group until it finishes (each
    restart resumes from the job's checkpoints); return Ray Train's ``Result``. ``worker_fn`` must
    be a module-level function; ``job`` a small picklable dataclass with a ``log_path``."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.tracking import system_metrics

    ckpt_dir = Path(ctx.checkpoint_dir).resolve()
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"fn": worker_fn, "job": job},
        torch_config=torch_config("nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=f"{ctx.stage}-{ctx.key}",
            storage_path=str(ckpt_dir / "ray"),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
        ),
    )
    with system_metrics(ctx.tracking):  # this host's CPU/memory (and GPU) while the workers train
        return trainer.fit()  # raises ray.train.TrainingFailedError once max_failures is spent


def ray_is_up() -> bool:
    """Inside a pipeline run (Ray started or joined before any stage runs); not when a stage runs
    on its own (``pipelines.testing.run_stage``), which must not start Ray for a side task."""
    import ray

    return ray.is_initialized()


def start_task(fn: Callable[..., Any], *args: Any, cpus: float, logger: str, nice: int = 0) -> Callable[[], Any]:
    """Run ``fn(*args)`` as a Ray task holding ``cpus`` CPUs; return a zero-argument callable that
    waits for its result. The INFO lines ``logger`` wrote in the task are replayed into this
    process's ``logger`` then (a task's output does not reach the stage's log).

    ``nice`` > 0: the task runs at that lower CPU priority, in a worker process of its own that
    exits after it (a niceness cannot be undone, and Ray reuses workers): for work off the
    critical path, so stages that others wait for keep the cores when they contend."""
    import ray

    options: dict[str, Any] = {"num_cpus": cpus}
    if nice > 0:
        options["max_calls"] = 1
    ref = ray.remote(**options)(_logged_call).remote(fn, logger, nice, *args)

    def result() -> Any:
        out, lines = ray.get(ref)
        for line in lines:
            logging.getLogger(logger).info(line)
        return out

    return result


def _logged_call(fn: Callable[..., Any], logger: str, nice: int, *args: Any) -> tuple[Any, list[str]]:
    import os

    if nice > 0:
        os.nice(nice)
    lines: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    lg = logging.getLogger(logger)
    keep, level = _Keep(logging.INFO), lg.level
    lg.addHandler(keep)
    if not lg.isEnabledFor(logging.INFO):  # a fresh Ray worker: the root logger's WARNING
        lg.setLevel(logging.INFO)
    try:
        return fn(*args), lines
    finally:
        lg.removeHandler(keep)
        lg.setLevel(level)


def _worker_entry(config: dict[str, Any]) -> None:
    """Body of every Ray Train worker (the process group is up): its output goes to the stage's log."""
    job = config["job"]
    with capture_output(job.log_path):
        config["fn"](job)


# --- the process group's rendezvous store on loopback -------------------------------------------
# Ray Train's torch backend asks torch to start the process group's TCPStore on rank 0, and
# torch's store server binds the wildcard address ("::" / 0.0.0.0) whatever host it is given.
# On a local Ray (every node on 127.0.0.1, see pipelines.runner.loopback_node) the launcher
# instead binds the store's socket to loopback itself, in rank 0's process, and hands torch the
# listening socket (``master_listen_fd``): nothing of a training stage listens beyond loopback.
# On a cluster reached by address (a routable node IP) Ray's own setup runs unchanged.

_STORE_SOCKET: Any = None  # rank 0's listening socket, kept open while the group lives


def _bind_store_socket(addr: str) -> int:
    """On rank 0: listen on ``addr`` (a loopback address) at a free port; return the port."""
    import socket

    global _STORE_SOCKET
    if _STORE_SOCKET is not None:
        _STORE_SOCKET.close()
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, 0))
    sock.listen(128)
    _STORE_SOCKET = sock
    return sock.getsockname()[1]


def _init_process_group(backend: str, rank: int, world_size: int, addr: str, port: int, timeout_s: float) -> None:
    """On every worker: the process group over a TCPStore whose server (rank 0) runs on the
    socket ``_bind_store_socket`` opened."""
    import datetime
    import os

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    fd = _STORE_SOCKET.fileno() if rank == 0 else None
    store = dist.TCPStore(addr, port, world_size, is_master=rank == 0, timeout=timeout, master_listen_fd=fd)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def _is_loopback(addr: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


def torch_config(backend: str) -> Any:
    """Ray Train's ``TorchConfig`` for ``backend``, whose process-group store listens on loopback
    when the workers' node address is loopback (a local Ray), as Ray's does otherwise."""
    import ray
    from ray.train._internal.utils import get_address_and_port
    from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

    class _LoopbackTorchBackend(_TorchBackend):
        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            addr, _ = worker_group.execute_single(0, get_address_and_port)
            if not _is_loopback(addr):
                return super().on_start(worker_group, backend_config)
            port = worker_group.execute_single(0, _bind_store_socket, addr)
            if not isinstance(worker_group, V1WorkerGroup):  # as Ray's on_start (V1 sets them at training start)
                worker_group.execute(_set_torch_distributed_env_vars)
            n = len(worker_group)
            ray.get([worker_group.execute_single_async(i, _init_process_group, backend_config.backend, i, n, addr, port,
                                                       backend_config.timeout_s) for i in range(n)])

    @dataclass
    class _LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self) -> type:
            return _LoopbackTorchBackend

    return _LoopbackTorchConfig(backend=backend)
