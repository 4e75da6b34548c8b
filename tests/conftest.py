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
waits for a job's result. Jobs start longest first (``Job.expected``, seconds), so that the longest
one does not finish last; a job a test waits for starts next in that process (unless a worker has
already claimed it), so that the test's process does not run longer jobs first.

Parallel runs (``pytest -n 2``, pytest-xdist): every worker collects the same jobs; each job runs
once, in the worker that claims it first (a file in the session's shared temporary folder), and its
result is a file there that any worker's test reads. The first worker starts claiming with the
session; another claims jobs only while one of its tests waits for one, and a worker whose tests
are done finishes the jobs it started before it exits.
"""

import dataclasses
import json
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
# The session's cache folder as the controller of a parallel run hands it to its workers: under a
# name JAX does not read, so that the workers' own `import jax` keeps no persistent cache either.
SHARED_CACHE_VARIABLE = "JAXMERGE_TESTS_XLA_CACHE_DIR"
_cache_dir = None


def pytest_configure(config):
    global _cache_dir
    config.addinivalue_line(
        "markers", "background(jobs): the test checks subprocess jobs run in the background"
    )
    # `import jax` above ran first, so this process's configuration already has no cache dir.
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        folder = os.environ.get(SHARED_CACHE_VARIABLE)
        if folder is None:  # this process owns the session (a plain run, or xdist's controller)
            folder = _cache_dir = tempfile.mkdtemp(prefix="jaxmerge-tests-xla-cache-")
            os.environ[SHARED_CACHE_VARIABLE] = folder
        os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


def pytest_unconfigure(config):
    if _cache_dir is not None:
        for name in (*CACHE_VARIABLES, SHARED_CACHE_VARIABLE):
            os.environ.pop(name, None)
        shutil.rmtree(_cache_dir, ignore_errors=True)


def fresh_env(**extra) -> dict:
    """This process's environment without the tests' compilation cache, plus ``extra``: for
    subprocesses that must compile everything themselves (determinism, timings, a user's run)."""
    drop = (*CACHE_VARIABLES, SHARED_CACHE_VARIABLE)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def pytest_collection_modifyitems(items):
    """Background tests last (stable order otherwise), so that their jobs overlap the rest."""
    items[:] = [i for i in items if not i.get_closest_marker("background")] + [
        i for i in items if i.get_closest_marker("background")
    ]


@dataclasses.dataclass
class Job:
    """One subprocess: ``argv`` run in ``cwd`` with ``env``; ``data`` is kept for the test.
    ``expected``: roughly how many seconds it runs (jobs start longest first)."""

    argv: list
    cwd: str | None = None
    env: dict | None = None
    timeout: float = 900.0
    data: dict = dataclasses.field(default_factory=dict)
    expected: float = 0.0
    result: subprocess.CompletedProcess | None = None
    error: BaseException | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class Background:
    """Runs the jobs, longest first, one at a time while the in-process tests run and two at a
    time once a test waits for one (this process is then idle); ``result(name)`` waits for a job.

    ``folder`` holds the jobs' output and, shared by the workers of a parallel run, their claims
    and results: a job runs in the process that claims it first. Only the ``primary`` process
    starts claiming with the session; every process claims while one of its tests waits."""

    def __init__(self, jobs: dict, folder, primary: bool = True):
        self.jobs, self.folder = jobs, folder
        self._stem = {name: f"job{i}" for i, name in enumerate(jobs)}
        order = sorted(jobs, key=lambda name: -jobs[name].expected)  # stable: ties keep order
        self._queue = [(self._stem[name], jobs[name]) for name in order]
        self._stop = threading.Event()
        self._waiting = threading.Event()
        self._procs = set()
        self._lock = threading.Lock()
        for sub in ("claims", "results"):
            (folder / sub).mkdir(exist_ok=True)
        gates = (None, self._waiting) if primary else (self._waiting,)
        self._threads = [
            threading.Thread(target=self._run_all, args=(gate,), daemon=True) for gate in gates
        ]
        for thread in self._threads:
            thread.start()

    def _claim(self, stem) -> bool:
        try:
            os.close(os.open(self.folder / "claims" / stem, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def _next(self):
        with self._lock:
            while not self._stop.is_set() and self._queue:
                stem, job = self._queue.pop(0)
                if self._claim(stem):
                    return stem, job
            return None

    def _run_all(self, gate):
        while gate is not None and not gate.wait(1.0):
            if self._stop.is_set():
                return
        while (entry := self._next()) is not None:
            stem, job = entry
            error = None
            try:
                job.result = self._run(stem, job)
            except BaseException as e:  # reported by result(), in the test's thread
                job.error = error = e
            finally:
                job.done.set()
                record = {"error": None if error is None else f"{type(error).__name__}: {error}"}
                if job.result is not None:
                    record["returncode"] = job.result.returncode
                path = self.folder / "results" / f"{stem}.json"
                path.with_suffix(".tmp").write_text(json.dumps(record))
                path.with_suffix(".tmp").replace(path)

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
        job, stem = self.jobs[name], self._stem[name]
        path = self.folder / "results" / f"{stem}.json"
        with self._lock:  # the job waited for starts next here, if no worker has claimed it
            self._queue.sort(key=lambda entry: entry[0] != stem)  # stable: the rest keep order
        self._waiting.set()
        started = time.monotonic()
        while not job.done.wait(1.0) and not path.exists():
            # Jobs queued before this one may run long; give up only well after every job's
            # own timeout could have passed.
            limit = sum(j.timeout for j in self.jobs.values()) + 60
            if time.monotonic() - started > limit:
                raise TimeoutError(f"background job {name!r} did not finish")
        if job.done.is_set():  # run by this process
            if job.error is not None:
                raise job.error
            return job.result
        record = json.loads(path.read_text())  # run by another worker of a parallel run
        if record["error"] is not None:
            raise RuntimeError(f"background job {name!r} failed: {record['error']}")
        out, err = (self.folder / f"{stem}.{part}" for part in ("out", "err"))
        text = out.read_bytes().decode(), err.read_bytes().decode()
        return subprocess.CompletedProcess(job.argv, record["returncode"], *text)

    def close(self, finish: bool = False):
        """Stops claiming; ``finish``: lets the jobs this process runs end (another worker may be
        waiting for them), else kills them."""
        with self._lock:
            self._stop.set()
            if not finish:
                for proc in self._procs:
                    proc.kill()
        for thread in self._threads:
            thread.join(timeout=None if finish else 60)


class _SharedTmp:
    """``mktemp(name)`` in a folder every worker of a parallel run shares: the same path for the
    same name, so that a job's folders are the same whichever worker built it."""

    def __init__(self, folder):
        self.folder = folder

    def mktemp(self, basename, numbered=True):
        path = self.folder / basename
        path.mkdir(parents=True, exist_ok=True)
        return path


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory):
    """The selected background tests' jobs, started with the session's first test."""
    worker = getattr(request.config, "workerinput", None)  # a pytest-xdist worker
    if worker is None:
        factory, folder, primary = tmp_path_factory, None, True
    else:  # the workers' temporary folders lie side by side in the session's own
        shared = tmp_path_factory.getbasetemp().parent / "shared"
        factory, folder = _SharedTmp(shared / "tmp"), shared / "background"
        primary = worker["workerid"] == "gw0"
    jobs = {}
    for item in request.session.items:
        marker = item.get_closest_marker("background")
        if marker is not None:
            for name, job in (marker.args[0](item, factory) or {}).items():
                jobs.setdefault(name, job)
    if not jobs:
        yield None
        return
    if folder is None:
        folder = tmp_path_factory.mktemp("background")
    folder.mkdir(parents=True, exist_ok=True)
    runner = Background(jobs, folder, primary=primary)
    try:
        yield runner
    finally:
        runner.close(finish=worker is not None and not request.session.shouldfail)


@pytest.fixture
def x64():
    """Run a test with 64-bit JAX types."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)
