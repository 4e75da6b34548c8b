"""accumulate_resumable: a killed run resumes to the uninterrupted result, bit for bit."""

import functools
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import resumable_worker as worker

from jaxmerge import LayerStats, accumulate_resumable

WORKER = str(Path(worker.__file__).resolve())


def _fold(n):
    return functools.reduce(worker.update, worker.batches(n), worker.initial_state())


def _same_bits(a, b):
    return all(
        np.asarray(u).dtype == np.asarray(v).dtype and np.array_equal(u, v, equal_nan=True)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_killed_subprocess_resumes_to_the_uninterrupted_result(tmp_path):
    n, every = 40, 4
    expected = _fold(n)
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, WORKER, str(ckpt), str(tmp_path / "out.npz"), str(n), str(every)]
    proc = subprocess.Popen([*cmd, "0.05"], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "batch 13":  # three checkpoints written, mid-interval
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=120)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "out.npz").exists()

    # the checkpoints written before the kill are complete and hold the fold of their batches
    steps = _steps(ckpt)
    assert steps and steps[-1] >= 12 and all(s % every == 0 for s in steps), steps
    target = {"state": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), expected)}
    with ocp.CheckpointManager(ckpt) as manager:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
        restored = manager.restore(steps[-1], args=args)["state"]["state"]
    assert _same_bits(restored, _fold(steps[-1]))

    rerun = subprocess.run([*cmd, "0"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    done = rerun.stdout.split()
    assert done[:2] == ["batch", str(steps[-1])]  # resumed after the last checkpoint
    result = LayerStats(**np.load(tmp_path / "out.npz"))
    assert _same_bits(result, expected)
    assert float(result.count.sum()) == 16 * n


def test_resume_after_an_exception_and_after_completion(tmp_path):
    calls = []

    def update(state, batch):
        calls.append(batch[0])
        return worker.update(state, batch)

    def failing(n, at):
        for b in worker.batches(n):
            if b[0] == at:
                raise RuntimeError("data source went away")
            yield b

    init = worker.initial_state()
    with pytest.raises(RuntimeError, match="went away"):
        accumulate_resumable(update, init, failing(20, at=11), tmp_path, save_every=3)
    assert _steps(tmp_path) == [6, 9]  # keep=2
    calls.clear()
    state = accumulate_resumable(update, init, worker.batches(20), tmp_path, save_every=3)
    assert calls == list(range(9, 20))
    assert _same_bits(state, _fold(20))
    assert _steps(tmp_path)[-1] == 20  # the final state is saved even off the save interval
    calls.clear()
    again = accumulate_resumable(update, init, worker.batches(20), tmp_path, save_every=3)
    assert calls == [] and _same_bits(again, state)


def test_bad_arguments_are_named(tmp_path):
    def add(state, b):
        return jax.tree.map(lambda a: a + b, state)

    accumulate_resumable(add, {"s": jnp.zeros(())}, [1.0] * 5, tmp_path / "a", save_every=2)
    with pytest.raises(ValueError, match="after 5 batches but batches yields only 3"):
        accumulate_resumable(add, {"s": jnp.zeros(())}, [1.0] * 3, tmp_path / "a")
    with pytest.raises(TypeError, match="state leaves must be jax arrays"):
        accumulate_resumable(add, {"s": np.zeros(())}, [1.0], tmp_path / "b")
    with pytest.raises(ValueError, match="save_every"):
        accumulate_resumable(add, jnp.zeros(()), [1.0], tmp_path / "c", save_every=0)
    with pytest.raises(
        ValueError, match=r"update changed the state: \['s'\] float32\[\] became float32\[2\]"
    ):
        accumulate_resumable(
            lambda s, b: {"s": jnp.ones(2)}, {"s": jnp.zeros(())}, [1], tmp_path / "d"
        )
    with pytest.raises(ValueError, match="update changed the state's structure"):
        accumulate_resumable(lambda s, b: [s], {"s": jnp.zeros(())}, [1], tmp_path / "e")


def test_a_resume_from_other_inputs_is_refused(tmp_path):
    def add(state, b):
        return state + b

    zero = jnp.zeros(())
    data = [jnp.float32(i) for i in range(6)]
    source = {"params": "a" * 64, "tasks": ("t0",)}
    accumulate_resumable(add, zero, data[:4], tmp_path / "a", save_every=2, source=source)
    # the same inputs (the tuple reads back as a list) resume and extend
    assert accumulate_resumable(add, zero, data, tmp_path / "a", source=source).item() == 15.0
    with pytest.raises(ValueError, match=r"other inputs \(params: recorded aaaaaaaaaaaa, now bbb"):
        accumulate_resumable(add, zero, data, tmp_path / "a", source={**source, "params": "b" * 64})
    with pytest.raises(ValueError, match=r"tasks: recorded \['t0'\], now \['t1'\]"):
        accumulate_resumable(add, zero, data, tmp_path / "a", source={**source, "tasks": ["t1"]})

    # the same number of batches, one of them different: the data changed
    accumulate_resumable(add, zero, data[:4], tmp_path / "b", save_every=2)
    other = [*data[:2], jnp.float32(9.0), *data[3:]]
    with pytest.raises(ValueError, match="the first 4 batches differ from those the state"):
        accumulate_resumable(add, zero, other, tmp_path / "b")
    # without the data check, only the source and the batch count are compared
    resumed = accumulate_resumable(add, zero, other, tmp_path / "b", check_data=False)
    assert resumed.item() == 0 + 1 + 2 + 3 + 4 + 5  # the saved sum of the original four, then 4, 5

    # a checkpoint without a record (an older format) is not trusted
    with ocp.CheckpointManager(tmp_path / "c") as manager:
        manager.save(3, args=ocp.args.StandardSave({"state": zero}))
    with pytest.raises(ValueError, match="without a record of its inputs"):
        accumulate_resumable(add, zero, data, tmp_path / "c")
    with pytest.raises(TypeError, match="no stable bytes to fingerprint"):
        accumulate_resumable(add, zero, [object()], tmp_path / "d")
