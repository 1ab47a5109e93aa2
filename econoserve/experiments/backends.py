"""Where an experiment's tasks run: a local process pool (the default) or a Ray cluster.

A *backend* maps a function over tasks and returns the results in task order. Any search that
runs many independent simulations (the rate sweep, the sensitivity runs, placement and GPU-count
searches) takes a :class:`Backend` and calls :meth:`Backend.map`; it never creates processes
itself. Two implementations:

``pool``  :class:`PoolBackend`: ``jobs`` worker processes on this machine (one job: in this
          process). Needs nothing beyond the core install.
``ray``   :class:`RayBackend`: tasks on a Ray cluster (``address="auto"`` or ``HOST:PORT``), or on
          a Ray instance it starts on this machine (``address=None``: ``jobs`` CPUs, no
          dashboard). Needs the ``ray`` extra (``pip install econoserve[ray]``); ``ray`` is imported
          only when this backend is made, so the default path never imports it.

Shipping inputs once: :meth:`Backend.share` returns a :class:`Shared` handle for a large input (a
trace); a task names its shared inputs in :attr:`Task.inputs` and the function receives their
values as extra positional arguments. Ray puts each shared value in its object store once
(``ray.put``) and every task reads it from there; the pool pickles it with each task (cheap on one
machine, where there is no network to cross).

Resumption and fault tolerance: with a :class:`TaskStore` (a directory), every finished task's
result is written there atomically under the task's key, as soon as it arrives; a later
:meth:`~Backend.map` over the same tasks loads those and computes only the missing ones. Keys
must name everything that determines a result (:func:`content_key`). A task whose worker dies is
retried (Ray: ``max_retries``; the pool: a broken pool is rebuilt, at most ``max_retries`` times,
and the unfinished tasks are submitted again); a result is recorded once per key, so a retried
task is never counted twice. An exception raised *by* a task is not retried: it stops the map
and is raised in the caller (results already stored are kept).

A search that is sequential inside (a goodput bisection) is parallel across its independent
instances: make one task per instance (a module-level function of ``(item, trace)``, the item
holding everything else it needs), e.g.::

    shared = backend.share(trace, trace_digest(trace))
    tasks = [Task(content_key("unit_goodput", unit_columns(u), settings, objective, hardware, shared.digest),
                  (u, hardware, objective, settings), (shared,)) for u in units]
    rows = backend.map(_unit_goodput, tasks, store=TaskStore(output_dir / "tasks"), desc="placement")

Plain simulations go through :func:`~econoserve.experiments.runner.run_jobs` (jobs -> rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from econoserve.errors import UserError

BACKENDS: tuple[str, ...] = ("pool", "ray")
#: Times a task is retried after its worker died (Ray's ``max_retries``; pool rebuilds).
DEFAULT_MAX_RETRIES = 3


@dataclass(frozen=True)
class Shared:
    """A handle to an input shipped once (see :meth:`Backend.share`); ``ref`` is backend-specific
    (the value itself for the pool, an ``ObjectRef`` for Ray)."""

    ref: Any
    digest: str  # content digest of the value, for task keys


@dataclass(frozen=True)
class Task:
    """One call ``fn(item, *values of inputs)``; ``key`` names its result in a :class:`TaskStore`."""

    key: str
    item: Any
    inputs: tuple[Shared, ...] = ()


class TaskStore:
    """Finished tasks' results, one pickle per key under ``directory``, written atomically (a
    temporary file in the same directory, then ``os.replace``): a file is either absent or whole."""

    SUFFIX = ".pkl"

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}{self.SUFFIX}"

    def keys(self) -> set[str]:
        if not self.directory.is_dir():
            return set()
        return {p.name[: -len(self.SUFFIX)] for p in self.directory.glob(f"*{self.SUFFIX}")}

    def get(self, key: str) -> Any:
        with self.path(key).open("rb") as handle:
            return pickle.load(handle)

    def put(self, key: str, value: Any) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                pickle.dump(value, out, protocol=pickle.HIGHEST_PROTOCOL)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path(key))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


@runtime_checkable
class Backend(Protocol):
    """Runs tasks somewhere; see the module docstring. Use as a context manager (or :meth:`close`)."""

    name: str

    def share(self, value: Any, digest: str | None = None) -> Shared:
        """Ship ``value`` once; the same object shared twice gives the same handle. ``digest``:
        a content digest of ``value`` for task keys (default: SHA-256 of its pickle)."""

    def map(self, fn: Callable[..., Any], tasks: Sequence[Task], store: TaskStore | None = None,
            desc: str = "tasks", progress: bool = True) -> list[Any]:
        """``[fn(t.item, *t.inputs' values) for t in tasks]``, computed in parallel; with a
        ``store``, results already there are loaded and new ones written as they finish."""

    def close(self) -> None:
        """Release workers (and a Ray instance this backend started)."""


def content_key(*parts: Any) -> str:
    """A task key: SHA-256 (hex, 24 characters) of ``parts`` as sorted JSON, plus the package's
    source (:func:`code_digest`), so results of other code are never reused."""
    text = json.dumps([code_digest(), *parts], sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 of every ``.py`` file of the econoserve package (paths and contents)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def make_backend(name: str = "pool", jobs: int = 2, address: str | None = None,
                 max_retries: int = DEFAULT_MAX_RETRIES) -> Backend:
    """The backend ``name`` (``pool`` or ``ray``) with ``jobs`` workers on this machine;
    ``address`` (Ray only): ``auto``, ``HOST:PORT`` or ``None`` (start a local instance)."""
    if name == "pool":
        if address is not None:
            raise UserError(f"--address {address!r} is for the ray backend; the pool runs on this machine")
        return PoolBackend(jobs, max_retries)
    if name == "ray":
        return RayBackend(address, jobs, max_retries)
    raise UserError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


# --------------------------------------------------------------------- shared plumbing
def _call(fn: Callable[..., Any], item: Any, *values: Any) -> Any:
    return fn(item, *values)


def _progress(total: int, done: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit="task", disable=not enabled)


class _Collector:
    """Results of one map: those already in the store, and each new one stored once, in order."""

    def __init__(self, tasks: Sequence[Task], store: TaskStore | None, desc: str, progress: bool) -> None:
        self.tasks, self.store = tasks, store
        known = store.keys() if store is not None else set()
        self.results: dict[str, Any] = {t.key: store.get(t.key) for t in tasks if t.key in known}
        self.copies = Counter(t.key for t in tasks)
        # one computation per distinct key (identical tasks share it)
        self.todo = list({t.key: t for t in tasks if t.key not in self.results}.values())
        done = sum(self.copies[key] for key in self.results)
        self.bar = _progress(len(tasks), done, desc, progress)

    def add(self, task: Task, result: Any) -> None:
        if task.key in self.results:
            return
        if self.store is not None:
            self.store.put(task.key, result)
        self.results[task.key] = result
        self.bar.update(self.copies[task.key])

    def ordered(self) -> list[Any]:
        self.bar.close()
        return [self.results[t.key] for t in self.tasks]


def _digest_of(value: Any) -> str:
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).hexdigest()


# --------------------------------------------------------------------- pool
@dataclass
class PoolBackend:
    """``jobs`` worker processes on this machine (``jobs`` <= 1: run in this process)."""

    jobs: int = 2
    max_retries: int = DEFAULT_MAX_RETRIES
    name: str = field(default="pool", init=False)
    _shared: dict[int, tuple[Any, Shared]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise UserError(f"jobs must be >= 1, got {self.jobs}")

    def share(self, value: Any, digest: str | None = None) -> Shared:
        if id(value) not in self._shared:
            self._shared[id(value)] = (value, Shared(value, digest or _digest_of(value)))
        return self._shared[id(value)][1]

    def map(self, fn, tasks, store=None, desc="tasks", progress=True):
        collector = _Collector(tasks, store, desc, progress)
        workers = min(self.jobs, len(collector.todo), os.cpu_count() or 1)
        if workers <= 1:
            for task in collector.todo:
                collector.add(task, fn(task.item, *(s.ref for s in task.inputs)))
        elif collector.todo:
            self._run_in_pool(fn, collector, workers)
        return collector.ordered()

    def _run_in_pool(self, fn, collector: _Collector, workers: int) -> None:
        rebuilds = 0
        while True:
            remaining = [t for t in collector.todo if t.key not in collector.results]
            if not remaining:
                return
            try:
                with ProcessPoolExecutor(max_workers=min(workers, len(remaining))) as pool:
                    for task, result in _completed(pool, fn, remaining):
                        collector.add(task, result)
            except BrokenProcessPool:
                rebuilds += 1  # a worker died (killed, out of memory): rebuild, resubmit the rest
                if rebuilds > self.max_retries:
                    raise RuntimeError(f"worker processes died {rebuilds} times; giving up with "
                                       f"{len(remaining)} tasks unfinished (finished ones are stored)") from None

    def close(self) -> None:
        self._shared.clear()

    def __enter__(self) -> PoolBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _completed(pool: ProcessPoolExecutor, fn, tasks: Sequence[Task]) -> Iterator[tuple[Task, Any]]:
    futures = {pool.submit(_call, fn, t.item, *(s.ref for s in t.inputs)): t for t in tasks}
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield futures[future], future.result()  # re-raises a task's exception
    finally:
        for future in pending:
            future.cancel()


# --------------------------------------------------------------------- ray
class RayBackend:
    """Tasks on Ray: a cluster at ``address`` (``auto``, ``HOST:PORT``), a Ray instance already
    initialised in this process, or one started here (``address=None``: ``jobs`` CPUs, no
    dashboard; shut down by :meth:`close`). Each task asks for one CPU; a task whose worker dies
    is retried up to ``max_retries`` times by Ray.

    Network: Ray cannot be confined to loopback (it maps 127.0.0.1 to the machine's address, and
    its gRPC servers listen on every interface); Ray's token authentication (on by default in Ray
    2.60, the version tested here) is what keeps other hosts out, so keep it on.

    On a multi-node cluster every node needs this package installed (same version): tasks are
    pickled functions of ``econoserve``."""

    name = "ray"

    def __init__(self, address: str | None = None, jobs: int = 2, max_retries: int = DEFAULT_MAX_RETRIES) -> None:
        try:
            import ray
        except ImportError:
            raise UserError("the ray backend needs Ray: pip install 'econoserve[ray]'") from None
        self._ray = ray
        self.max_retries = max_retries
        self._started = False
        if not ray.is_initialized():
            if address is None:
                if jobs < 1:
                    raise UserError(f"jobs must be >= 1, got {jobs}")
                ray.init(num_cpus=jobs, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
            else:
                try:
                    ray.init(address=address, logging_level="WARNING")
                except (ConnectionError, ValueError, RuntimeError) as exc:
                    raise UserError(f"--address {address}: cannot connect to a Ray cluster: "
                                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
            self._started = True
        self._remote = ray.remote(_call).options(num_cpus=1, max_retries=max_retries, retry_exceptions=False)
        self._shared: dict[int, tuple[Any, Shared]] = {}

    def share(self, value: Any, digest: str | None = None) -> Shared:
        if id(value) not in self._shared:  # the value is kept, so its id is never reused
            self._shared[id(value)] = (value, Shared(self._ray.put(value), digest or _digest_of(value)))
        return self._shared[id(value)][1]

    def map(self, fn, tasks, store=None, desc="tasks", progress=True):
        ray = self._ray
        collector = _Collector(tasks, store, desc, progress)
        pending = {self._remote.remote(fn, t.item, *(s.ref for s in t.inputs)): t for t in collector.todo}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    task = pending.pop(ref)
                    collector.add(task, self._get(ref))
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
        return collector.ordered()

    def _get(self, ref):
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None
            raise

    def close(self) -> None:
        self._shared.clear()
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

