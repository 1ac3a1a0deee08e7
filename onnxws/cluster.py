"""Scoring on a Ray cluster (``--ray ADDRESS``, ``compress(..., ray=ADDRESS)``).

The driver (this process) keeps the search, the score cache and the report; the cluster only
measures candidates. ``RayExecutor`` is the executor interface of ``onnxws.executors`` on Ray
actors: each actor is a ``WorkerMeasurer`` built once from the scorer's ``worker_builder``
(prepared model, evaluation data, metric, subsets, batches and engine), which goes into the
object store once (``ray.put``) and reaches each worker once; per scoring, only the candidate's
arrays travel to the worker and one ``Measurement`` (four numbers) comes back. The search submits
the same batches of independent candidates as locally, and the measurements come back in
submission order, so the scorings and the answer do not depend on the executor.

Addresses, with Ray's own meanings: ``local`` starts a cluster on this machine (stopped at the
end), ``auto`` connects to the running one (``RAY_ADDRESS`` or the one ``ray start`` left),
``HOST:PORT`` and ``ray://HOST:PORT`` a remote one. When this process is already connected
(``ray.init`` called by the caller), that connection is used whatever the address. An address
that cannot be reached, or a cluster without a CPU (or a GPU for ``--device cuda``), is an
``InputError`` before any work starts.

Faults: an actor that dies is restarted by Ray (``max_restarts``) and the scorings it had not
finished are re-run (``max_task_retries``); a restarted actor builds its measurer again and
rejoins at the driver's current search-subset size. What was finished is in the driver's score
cache. Ctrl-C stops the actors (``close``).

Ray is imported only here, and only when an address is given (the ``[ray]`` extra).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from onnxws.errors import InputError, one_line
from onnxws.executors import Candidate, Measurement, Measurer, WorkerDied, WorkerExecutor, WorkerMeasurer

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
"""Seconds a HOST:PORT address gets to accept a TCP connection before the run is refused
(ray.init itself would wait minutes on an address where nothing listens)."""
MAX_RESTARTS = 3
"""Times Ray restarts a scoring actor that died; its unfinished scorings are retried as often."""


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise InputError("--ray needs Ray: pip install \"onnxws[ray]\"") from exc
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``HOST:PORT`` or ``ray://HOST:PORT`` address, None for local/auto."""
    if address in ("local", "auto"):
        return None
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputError(f"--ray {address}: expected local, auto, HOST:PORT or ray://HOST:PORT")
    return host.strip("[]"), int(port)


def _check_reachable(address: str) -> None:
    where = _host_port(address)
    if where is None:
        return
    try:
        with socket.create_connection(where, timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise InputError(f"--ray {address}: cannot reach the cluster ({exc.strerror or exc}); "
                         "check the address and that the cluster is up (ray status)") from exc


class Cluster:
    """A connection to a Ray cluster for one run; ``close`` ends what this object started.

    Args:
        address: ``local``, ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT`` (module docstring).
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.ray = _import_ray()
        self._started = False
        if not self.ray.is_initialized():
            _check_reachable(address)
            try:
                self.ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise InputError(f"--ray {address}: cannot connect ({type(exc).__name__}: {one_line(exc)})") from exc
            self._started = True
        resources = self.ray.cluster_resources()
        self.cpus = int(resources.get("CPU", 0))
        if self.cpus < 1:
            raise InputError(f"--ray {address}: the cluster has no CPU to score on (resources: {sorted(resources)})")
        self.gpus = int(resources.get("GPU", 0))
        logger.info("ray: %s, %d CPU(s), %d GPU(s)", address, self.cpus, self.gpus)

    def executor(self, build: Callable[[], Measurer], jobs: int | None = None, gpu: bool = False) -> RayExecutor:
        """A ``RayExecutor`` of ``jobs`` actors, each with one CPU and, with ``gpu``, one GPU
        (default: one actor per CPU of the cluster, or per GPU)."""
        if gpu and self.gpus < 1:
            raise InputError(f"--ray {self.address}: scoring on CUDA needs a GPU per worker and the cluster has none; "
                             "add GPU nodes or use --device cpu")
        if jobs is None:
            jobs = self.gpus if gpu else self.cpus
        return RayExecutor(self.ray, build, max(jobs, 1), 1 if gpu else 0)

    def close(self) -> None:
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
        self._started = False


class _RayWorker(WorkerMeasurer):
    """A Ray actor: fetches the scorer's builder from the object store (a reference in a list, so
    Ray does not resolve it into the constructor's arguments) and builds its measurer once."""

    def __init__(self, shipped: list) -> None:
        import ray

        super().__init__(ray.get(shipped[0]))


class RayExecutor(WorkerExecutor):
    """Measures candidates on Ray actors (``WorkerMeasurer``s), one CPU (and ``gpus`` GPUs) each."""

    name = "ray"

    def __init__(self, ray: Any, build: Callable[[], Measurer], jobs: int, gpus: float = 0) -> None:
        super().__init__(jobs)
        self._ray = ray
        actor = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=MAX_RESTARTS,
                           max_task_retries=MAX_RESTARTS)(_RayWorker)
        # The model and the data go into the object store once; the driver holds the reference for
        # the executor's life, so an actor Ray restarts can fetch them again.
        self._shipped = ray.put(build)
        self._actors = [actor.remote([self._shipped]) for _ in range(jobs)]

    def _submit(self, worker: int, candidate: Candidate, subset: str, n_search: int | None,
                reject_below: float | None) -> Any:
        return self._actors[worker].measure.remote(dict(candidate), subset, n_search, reject_below)

    def _result(self, worker: int, handle: Any) -> Measurement:
        exceptions = self._ray.exceptions
        try:
            return self._ray.get(handle)
        except exceptions.RayTaskError as exc:  # the measurement itself raised: re-raise what it raised
            cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
            if cause is not None:
                raise cause from None
            raise
        except (exceptions.RayActorError, exceptions.WorkerCrashedError, exceptions.ObjectLostError) as exc:
            raise WorkerDied(f"Ray scoring worker {worker + 1} of {self.jobs} died {MAX_RESTARTS + 1} times "
                             f"({type(exc).__name__})") from exc

    def _cancel(self, handle: Any) -> None:
        try:
            self._ray.cancel(handle)
        except Exception as exc:  # noqa: BLE001 - cancelling a finished or lost task is no error
            logger.debug("cancel: %s", one_line(exc))

    def close(self) -> None:
        for actor in self._actors:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception as exc:  # noqa: BLE001 - the cluster may be gone already
                logger.debug("kill: %s", one_line(exc))
        self._actors = []
        self._shipped = None
