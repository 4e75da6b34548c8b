"""Orbax checkpoints of parameters and statistics: round trips, atomic writes, clear errors."""

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from reference import augment

import jaxmerge as jm
from jaxmerge import (
    LayerStats,
    combine_saved_stats,
    init_stats,
    layer_stats,
    load_params,
    load_stats,
    save_params,
    save_stats,
    solve_layer,
    update_stats,
)


def _params(seed=0):
    r = np.random.default_rng(seed)
    return {
        "params": {
            "Dense_0": {
                "kernel": jnp.asarray(r.standard_normal((4, 3)), jnp.float32),
                "bias": jnp.asarray(r.standard_normal(3), jnp.float32),
            },
            "Embed_0": {"embedding": jnp.asarray(r.standard_normal((5, 2)), jnp.bfloat16)},
            "layers": [{"scale": jnp.arange(3, dtype=jnp.int32)}],
        }
    }


def _identical(a, b) -> bool:
    same = jax.tree.map(
        lambda x, y: x.dtype == y.dtype and x.shape == y.shape and bool(jnp.array_equal(x, y)),
        a,
        b,
    )
    return jax.tree.structure(a) == jax.tree.structure(b) and all(jax.tree.leaves(same))


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _hidden(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def test_params_round_trip_with_and_without_template(tmp_path):
    params = _params()
    path = save_params(tmp_path / "base", params)
    assert _identical(load_params(path), params)
    assert _identical(load_params(path, template=params), params)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    assert _identical(load_params(path, template=abstract), params)
    numpy_template = jax.tree.map(np.asarray, params)
    assert _identical(load_params(path, template=numpy_template), params)
    # a template dtype other than the stored one casts
    as_f32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
    got = load_params(path, template=as_f32)
    np.testing.assert_array_equal(
        got["params"]["Embed_0"]["embedding"],
        np.asarray(params["params"]["Embed_0"]["embedding"], np.float32),
    )
    assert _hidden(tmp_path) == []


def test_params_template_mismatch_names_every_path(tmp_path):
    params = _params()
    path = save_params(tmp_path / "base", params)
    wrong = jax.tree.map(lambda x: x, params)
    wrong["params"]["Dense_0"]["kernel"] = jnp.zeros((4, 5))
    wrong["params"]["Dense_1"] = {"kernel": jnp.zeros((2, 2))}
    del wrong["params"]["Embed_0"]
    with pytest.raises(ValueError) as e:
        load_params(path, template=wrong)
    msg = str(e.value)
    assert "params/Dense_0/kernel: stored shape (4, 3), template shape (4, 5)" in msg
    assert "missing from the checkpoint: params/Dense_1/kernel" in msg
    assert "in the checkpoint but not the template: params/Embed_0/embedding" in msg


def test_params_missing_or_foreign_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_params(tmp_path / "absent")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not an Orbax checkpoint"):
        load_params(tmp_path / "plain")
    with pytest.raises(ValueError, match="no array leaves"):
        save_params(tmp_path / "empty", {})


def test_overwrite_is_explicit_and_inputs_are_untouched(tmp_path):
    base = save_params(tmp_path / "base", _params(0))
    before = _digest(base)
    merged = jax.tree.map(lambda x: x + 1, load_params(base))
    out = save_params(tmp_path / "merged", merged)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_params(out, _params(1))
    assert _identical(load_params(out), merged)
    save_params(out, _params(1), overwrite=True)
    assert _identical(load_params(out), _params(1))
    assert _digest(base) == before
    assert _hidden(tmp_path) == []


def test_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_params(tmp_path / "ckpt", _params(0))
    before = _digest(path)
    with pytest.raises(TypeError, match=r"params/bad is a object"):
        save_params(path, {"w": jnp.ones(2), "bad": object()}, overwrite=True)
    real_save = ocp.StandardCheckpointer.save

    def save_then_fail(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)
        self.wait_until_finished()
        assert any(Path(directory).iterdir())  # the new checkpoint was (partly) written
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_params(path, _params(1), overwrite=True)
    assert _digest(path) == before
    assert _identical(load_params(path), _params(0))
    assert _hidden(tmp_path) == []


def test_overwrite_killed_between_renames_is_recovered(tmp_path):
    path = save_params(tmp_path / "ckpt", _params(0))
    os.rename(path, tmp_path / ".ckpt.old-0123abcd")  # a kill after the first rename
    assert _identical(load_params(path), _params(0))
    with pytest.raises(FileExistsError):
        save_params(path, _params(1))
    save_params(path, _params(1), overwrite=True)
    assert _identical(load_params(path), _params(1))
    assert _hidden(tmp_path) == []


_OVERWRITER = textwrap.dedent(
    """
    import sys
    import jax.numpy as jnp
    from jaxmerge import save_params
    for i in range(1, 10_000):
        save_params(sys.argv[1], {"a": jnp.full((64, 64), i), "b": jnp.full(9, i)}, overwrite=True)
        print(i, flush=True)
    """
)


def test_killed_overwrites_leave_a_complete_checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    save_params(path, {"a": jnp.zeros((64, 64), jnp.int32), "b": jnp.zeros(9, jnp.int32)})
    proc = subprocess.Popen(
        [sys.executable, "-c", _OVERWRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        for line in proc.stdout:
            if int(line) >= 3:  # the next save is under way: kill it
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=120)
        proc.stdout.close()
    got = load_params(path)
    assert int(got["a"][0, 0]) >= 3
    assert all(bool((leaf == got["a"][0, 0]).all()) for leaf in jax.tree.leaves(got))
    save_params(path, {"a": jnp.ones(2)}, overwrite=True)  # a rerun completes and cleans up
    assert _hidden(tmp_path) == []


_SHARDED = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxmerge import load_params, save_params
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    w = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("data", "model")))
    path = save_params(sys.argv[1] + "/sharded", {"w": w})
    other = NamedSharding(mesh, P(None, "data"))
    got = load_params(path, {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=other)})
    assert got["w"].sharding == other, got["w"].sharding
    assert np.array_equal(np.asarray(got["w"]), np.arange(64.0).reshape(8, 8))
    print("ok")
    """
)


def test_restore_uses_the_template_shardings(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    run = subprocess.run(
        [sys.executable, "-c", _SHARDED, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def _stats(rows, n_in=3, n_out=2, tasks=2, seed=0, dtype=None):
    """Plain-sum statistics and the raw rows: ``rows[k]`` rows of task ``k``."""
    r = np.random.default_rng(seed)
    s = init_stats(n_in, n_out, tasks, dtype=dtype)
    data = []
    for k, n in enumerate(rows):
        x, y = r.standard_normal((n, n_in)), r.standard_normal((n, n_out))
        data.append((x, y))
        if n:
            s = update_stats(s, x, y, k)
    return s, data


@pytest.mark.parametrize("wide", [False, True])
def test_stats_round_trip_is_exact(tmp_path, request, wide):
    if wide:
        request.getfixturevalue("x64")
    a, _ = _stats([5, 3], dtype=jnp.float64 if wide else None)
    b, _ = _stats([0, 4], n_in=2, n_out=6, seed=1, dtype=jnp.float64 if wide else None)
    stats = {"encoder/dense": a, ("decoder", "layers", 0, "out"): b}
    save_stats(tmp_path / "s", stats, tasks=["mnist", "fashion"])
    saved = load_stats(tmp_path / "s")
    assert saved.tasks == ("mnist", "fashion")
    assert list(saved.stats) == list(stats)
    for key in stats:
        assert isinstance(saved.stats[key], LayerStats)
        assert _identical(saved.stats[key], stats[key])
    meta = json.loads(next((tmp_path / "s" / "metadata").rglob("*metadata*")).read_text())
    assert (meta["format"], meta["version"], meta["per_task"]) == ("jaxmerge.stats", 2, False)
    entry = meta["entries"][1]
    assert entry["key"] == ["decoder", "layers", 0, "out"] and entry["count"] == [0.0, 4.0]
    assert entry["container"] == "LayerStats" and entry["layers"] == []
    assert entry["fields"]["cross"] == {"shape": [3, 6], "dtype": "float64" if wide else "float32"}


def _write_record(path, arrays, meta):
    """A statistics checkpoint with this record, as jaxmerge 0.1 wrote them (Orbax Composite)."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(path, args=ocp.args.Composite(stats=ocp.args.StandardSave(arrays),
                                                 metadata=ocp.args.JsonSave(meta)))  # fmt: skip
    return path


def test_statistics_of_the_earlier_formats_still_load(tmp_path):
    """The per-layer format version 1 and the whole-model format "jaxmerge.model_stats" (both
    replaced by the one format of jaxmerge.io.store) are read, each by its own loader."""
    import flax.linen as nn

    a, _ = _stats([5, 3])
    layer = {"path": ["enc", 0], "n_in": a.n_in, "n_out": a.n_out, "dtype": "float32",
             "count": [5.0, 3.0]}  # fmt: skip
    old = _write_record(tmp_path / "v1", [a._asdict()], {"format": "jaxmerge.stats", "version": 1,
                        "tasks": ["a", "b"], "layers": [layer]})  # fmt: skip
    saved = load_stats(old)
    assert saved.tasks == ("a", "b") and _identical(saved.stats[("enc", 0)], a)

    model, x = nn.Dense(2), jnp.arange(6.0).reshape(2, 3)
    params = model.init(jax.random.key(0), x)["params"]
    ms = jm.accumulate_model_stats(model, [params, params], [[x], [x + 1]], progress=False)
    group = ms.sums[""]
    record = {"format": "jaxmerge.model_stats", "version": 2, "tasks": list(ms.tasks),
              "source": ms.source, "groups": [{"key": "", "dtype": "float32",
              "layers": [dataclasses.asdict(spec) for spec in group.layers]}]}  # fmt: skip
    old = _write_record(tmp_path / "model", [group.stats._asdict()], record)
    back = jm.load_model_stats(old)
    assert back.tasks == ms.tasks and back.source == ms.source
    assert back.sums[""].layers == group.layers and _identical(back.sums[""].stats, group.stats)
    with pytest.raises(ValueError, match="holds the per-task sums of a whole model"):
        load_stats(old)


def test_stats_from_two_hosts_combine_to_the_stats_of_all_rows(tmp_path):
    r = np.random.default_rng(3)
    x, y = r.standard_normal((10, 3)), r.standard_normal((10, 2))
    tasks = [0] * 6 + [1] * 4
    for host, rows in enumerate([range(0, 5), range(5, 10)]):
        s = init_stats(3, 2, 2)
        for i in rows:
            s = update_stats(s, x[i : i + 1], y[i : i + 1], tasks[i])
        save_stats(tmp_path / f"host{host}", {"fc": s}, tasks=["a", "b"])
    total = combine_saved_stats([tmp_path / "host0", tmp_path / "host1"])
    xa, t = augment(x), np.array(tasks)
    ref = {
        "gram": xa.T @ xa,
        "cross": xa.T @ y,
        "out_sq": (y**2).sum(0),
        "task_diag": np.stack([(xa[t == k] ** 2).sum(0) for k in (0, 1)]),
        "count": np.array([6.0, 4.0]),
    }
    for field, value in ref.items():
        np.testing.assert_allclose(getattr(total.stats["fc"], field), value, rtol=1e-5, atol=1e-5)
    assert total.tasks == ("a", "b")


def test_merge_from_saved_stats_equals_merge_from_memory(tmp_path):
    r = np.random.default_rng(4)
    base = (r.standard_normal((3, 2)), r.standard_normal(2))
    tuned = [(base[0] + 0.1 * r.standard_normal((3, 2)), base[1]) for _ in range(2)]
    xs = [r.standard_normal((20, 3)) for _ in range(2)]
    ys = [x @ w + b for x, (w, b) in zip(xs, tuned, strict=True)]
    stats = layer_stats(xs, ys)
    save_stats(tmp_path / "s", {"fc": stats}, tasks=["a", "b"])
    loaded = load_stats(tmp_path / "s").stats["fc"]
    want = solve_layer(stats, base, tuned, basis="full")
    got = solve_layer(loaded, base, tuned, basis="full")
    assert _identical((got.kernel, got.bias), (want.kernel, want.bias))


def test_stats_errors_are_clear(tmp_path):
    s, _ = _stats([2, 2])
    with pytest.raises(ValueError, match=r"has 2 tasks but 3 task names"):
        save_stats(tmp_path / "s", {"fc": s}, tasks=["a", "b", "c"])
    with pytest.raises(ValueError, match="distinct strings"):
        save_stats(tmp_path / "s", {"fc": s}, tasks=["a", "a"])
    with pytest.raises(TypeError, match="not LayerStats"):
        save_stats(tmp_path / "s", {"fc": s._asdict()}, tasks=["a", "b"])
    with pytest.raises(TypeError, match="JSON-storable"):
        save_stats(tmp_path / "s", {1.5: s}, tasks=["a", "b"])
    assert not (tmp_path / "s").exists()
    save_stats(tmp_path / "s", {"fc": s}, tasks=["a", "b"])
    with pytest.raises(FileExistsError):
        save_stats(tmp_path / "s", {"fc": s}, tasks=["a", "b"])
    save_stats(tmp_path / "other", {"fc": s}, tasks=["a", "c"])
    with pytest.raises(ValueError, match=r"has tasks \['a', 'c'\]"):
        combine_saved_stats([tmp_path / "s", tmp_path / "other"])
    wide, _ = _stats([1, 1], n_in=4)
    save_stats(tmp_path / "wide", {"fc": wide}, tasks=["a", "b"])
    with pytest.raises(ValueError, match="field 'gram' differs"):
        combine_saved_stats([tmp_path / "s", tmp_path / "wide"])
    save_params(tmp_path / "params", _params())
    with pytest.raises(ValueError, match="not a jaxmerge statistics checkpoint"):
        load_stats(tmp_path / "params")
    assert _hidden(tmp_path) == []
