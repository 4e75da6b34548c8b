"""Shared fixtures; a compilation cache for the tests' subprocesses; background subprocess jobs.

Compilation cache: the subprocesses that tests start (CLI runs, killed and resumed workers, ...)
inherit ``JAX_COMPILATION_CACHE_DIR``, a directory of this session, so that a rerun of the same
program loads what an earlier process compiled. This process imported JAX before the variables are
set and keeps no persistent cache: its results and compiled programs are what they were.

Background jobs: a test marked ``@pytest.mark.background(jobs)`` checks the result of subprocesses
(a benchmark, the notebook, a determinism run) that need nothing from this process;
``jobs(item, tmp_path_factory)`` returns ``{name: Job}`` (or None). The selected tests' jobs run
one at a time from the session's start, while the in-process tests run (mostly single-threaded XLA
compilation, which leaves the second core idle). Those tests run last; the ``background`` fixture
waits for a job's result.
"""

import dataclasses
import os
import shutil
import subprocess
import tempfile
import threading
import time

import jax
import numpy as np
import pytest

CACHE_VARIABLES = (
    "JAX_COMPILATION_CACHE_DIR",
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES",
)
_cache_dir = None


def pytest_configure(config):
    global _cache_dir
    config.addinivalue_line(
        "markers", "background(jobs): the test checks subprocess jobs run in the background"
    )
    # `import jax` above ran first, so this process's configuration already has no cache dir.
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        _cache_dir = tempfile.mkdtemp(prefix="jaxmerge-tests-xla-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


def pytest_unconfigure(config):
    if _cache_dir is not None:
        for name in CACHE_VARIABLES:
            os.environ.pop(name, None)
        shutil.rmtree(_cache_dir, ignore_errors=True)


def fresh_env(**extra) -> dict:
    """This process's environment without the tests' compilation cache, plus ``extra``: for
    subprocesses that must compile everything themselves (determinism, timings, a user's run)."""
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    env.update(extra)
    return env


def pytest_collection_modifyitems(items):
    """Background tests last (stable order otherwise), so that their jobs overlap the rest."""
    items[:] = [i for i in items if not i.get_closest_marker("background")] + [
        i for i in items if i.get_closest_marker("background")
    ]


@dataclasses.dataclass
class Job:
    """One subprocess: ``argv`` run in ``cwd`` with ``env``; ``data`` is kept for the test."""

    argv: list
    cwd: str | None = None
    env: dict | None = None
    timeout: float = 900.0
    data: dict = dataclasses.field(default_factory=dict)
    result: subprocess.CompletedProcess | None = None
    error: BaseException | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class Background:
    """Runs the jobs in order, one at a time while the in-process tests run and two at a time once
    a test waits for one (this process is then idle); ``result(name)`` waits for a job."""

    def __init__(self, jobs: dict, folder):
        self.jobs, self.folder = jobs, folder
        self._queue = list(enumerate(jobs.values()))
        self._stop = threading.Event()
        self._waiting = threading.Event()
        self._procs = set()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run_all, args=(gate,), daemon=True)
            for gate in (None, self._waiting)
        ]
        for thread in self._threads:
            thread.start()

    def _next(self):
        with self._lock:
            return None if self._stop.is_set() or not self._queue else self._queue.pop(0)

    def _run_all(self, gate):
        while gate is not None and not gate.wait(1.0):
            if self._stop.is_set():
                return
        while (entry := self._next()) is not None:
            i, job = entry
            try:
                job.result = self._run(f"job{i}", job)
            except BaseException as e:  # reported by result(), in the test's thread
                job.error = e
            finally:
                job.done.set()

    def _run(self, stem, job):
        out, err = self.folder / f"{stem}.out", self.folder / f"{stem}.err"
        with open(out, "w+b") as stdout, open(err, "w+b") as stderr:
            with self._lock:
                if self._stop.is_set():
                    raise RuntimeError("the session ended before the job started")
                proc = subprocess.Popen(
                    job.argv, cwd=job.cwd, env=job.env, stdout=stdout, stderr=stderr
                )
                self._procs.add(proc)
            with proc:
                try:
                    proc.wait(timeout=job.timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    raise subprocess.TimeoutExpired(job.argv, job.timeout) from None
                finally:
                    with self._lock:
                        self._procs.discard(proc)
            stdout.seek(0)
            stderr.seek(0)
            text = stdout.read().decode(), stderr.read().decode()
        return subprocess.CompletedProcess(job.argv, proc.returncode, *text)

    def job(self, name) -> Job:
        return self.jobs[name]

    def result(self, name) -> subprocess.CompletedProcess:
        """The finished job's process (returncode, stdout, stderr as text)."""
        job = self.jobs[name]
        self._waiting.set()
        started = time.monotonic()
        while not job.done.wait(1.0):
            # Jobs queued before this one may run long; give up only well after every job's
            # own timeout could have passed.
            limit = sum(j.timeout for j in self.jobs.values()) + 60
            if time.monotonic() - started > limit:
                raise TimeoutError(f"background job {name!r} did not finish")
        if job.error is not None:
            raise job.error
        return job.result

    def close(self):
        with self._lock:
            self._stop.set()
            for proc in self._procs:
                proc.kill()
        for thread in self._threads:
            thread.join(timeout=60)


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory):
    """The selected background tests' jobs, started with the session's first test."""
    jobs = {}
    for item in request.session.items:
        marker = item.get_closest_marker("background")
        if marker is not None:
            for name, job in (marker.args[0](item, tmp_path_factory) or {}).items():
                jobs.setdefault(name, job)
    if not jobs:
        yield None
        return
    runner = Background(jobs, tmp_path_factory.mktemp("background"))
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture
def x64():
    """Run a test with 64-bit JAX types."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)
