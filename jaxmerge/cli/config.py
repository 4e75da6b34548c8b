"""The merge configuration file of the ``jaxmerge`` command: TOML, validated up front.

Example (paths are relative to the configuration file)::

    pythonpath = ["src"]                       # directories searched for the modules below
    model = "mypkg.models:make_model"          # callable() -> flax.linen / flax.nnx Module
    base = "ckpt/base"                         # Orbax parameter checkpoints (save_params)
    finetuned = ["ckpt/sst2", "ckpt/mnli"]
    tasks = ["sst2", "mnli"]                   # optional names, one per fine-tune
    calibration = "mypkg.data:calibration"     # callable() -> K iterables of batches
    heldout = "mypkg.data:heldout"             # optional, same form: scores the merge
    # stats = ["stats/host0", "stats/host1"]  # or: merge from `jaxmerge stats` outputs (summed)
    mask_key = "mask"                          # padding-mask key of dict batches
    call_kwargs = { train = false }            # static keyword arguments of every call

    [merge]
    method = "qp"          # qp | regmean | soup | task_arithmetic | ties | dare
    algorithm = "parallel" # qp/regmean: parallel | sequential
    basis = "full"         # qp: scalar | diagonal | full | lowrank:R | ties | dare,
                           #     or a table { "glob" = basis } (first match; "*" = the rest)
    ridge = 0.0            # qp/regmean: λ ≥ 0, or a table { "glob" = λ }
    alpha = 1.0            # qp/regmean: RegMean's α ∈ [0, 1] (regmean default 0.9)
    fallback = "mean"      # qp/regmean: "mean" | "base" | λ for parameters not solved
    strict = false         # qp/regmean: fail (instead of warning) when parameters the
                           #     fine-tunes changed are not solved by output matching
    scale = 1.0            # task_arithmetic/ties/dare, and basis ties/dare: λ
    density = 0.2          # ties: fraction of entries kept
    trim = "tensor"        # ties: "tensor" | "model"
    aggregate = "mean"     # ties (and basis ties): "mean" | "sum"
    drop_rate = 0.9        # dare (required): drop probability p
    seed = 0               # dare: seed of the drop masks
    rescale = "expectation"  # dare: "expectation" (1/(1 − p)) | "l1" (mergekit's)

``calibration`` (and ``heldout``) name a callable taking no arguments and returning a sequence of
``K`` iterables of batches, one per fine-tuned model in order; a batch is an array (the model's
positional input) or a dict of keyword arguments (with an optional 0/1 mask under ``mask_key``).
Every key is checked: an unknown key, a wrong type or an option of another method is an error
naming the key, and so is a key that would have no effect: ``calibration`` beside ``stats`` (a
merge from saved statistics reads no calibration), ``mask_key`` or ``call_kwargs`` where no
batch is run (a merge from ``stats`` without ``heldout``, or a method without data), and
``scale`` of a ``ties``/``dare`` basis with ridge 0 everywhere (``scale`` is the ridge's prior).
``tasks`` name the statistics ``jaxmerge stats`` writes and are checked against ``stats``; a
merge from ``calibration`` does not use them. ``jaxmerge stats`` reads the model, the
fine-tunes, ``tasks``, ``calibration``, ``mask_key``, ``call_kwargs`` and ``pythonpath``; the
``[merge]`` table and ``heldout`` are for ``jaxmerge merge``.
"""

import dataclasses
import importlib
import math
import sys
import tomllib
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "MergeConfig", "load_config", "import_object"]

METHODS = ("qp", "regmean", "soup", "task_arithmetic", "ties", "dare")
TOP_KEYS = {
    "pythonpath",
    "model",
    "base",
    "finetuned",
    "tasks",
    "calibration",
    "heldout",
    "stats",
    "mask_key",
    "call_kwargs",
    "merge",
}
# The [merge] options each method takes (a qp merge with basis "ties"/"dare" also takes theirs).
OPTIONS = {
    "qp": ("algorithm", "basis", "ridge", "alpha", "fallback", "strict"),
    "regmean": ("algorithm", "ridge", "alpha", "fallback", "strict"),
    "soup": (),
    "task_arithmetic": ("scale",),
    "ties": ("scale", "density", "trim", "aggregate"),
    "dare": ("scale", "drop_rate", "seed", "rescale"),  # DARE by task arithmetic: no aggregate
}
KNOWN = ("method", *dict.fromkeys(o for opts in OPTIONS.values() for o in opts))
BASIS_NAMES = ("scalar", "diagonal", "full")


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key."""


ConfigError.__module__ = "jaxmerge"  # the public path in reprs and tracebacks


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """A validated configuration (paths absolute).

    Attributes:
        source: the configuration file.
        model: ``"module:attribute"`` of the model factory.
        base: base checkpoint directory.
        finetuned: fine-tuned checkpoint directories.
        tasks: task names.
        calibration: ``"module:attribute"`` of the calibration factory, or ``None``.
        heldout: ``"module:attribute"`` of the held-out factory, or ``None``.
        stats: saved statistics directories (summed), or ``None``.
        pythonpath: directories prepended to ``sys.path`` before importing.
        mask_key: padding-mask key.
        call_kwargs: static keyword arguments of every forward call.
        merge: the ``[merge]`` table with defaults filled in.
    """

    source: Path
    model: str
    base: Path
    finetuned: tuple[Path, ...]
    tasks: tuple[str, ...]
    calibration: str | None
    heldout: str | None
    stats: tuple[Path, ...] | None
    pythonpath: tuple[Path, ...]
    mask_key: str | None
    call_kwargs: dict[str, Any]
    merge: dict[str, Any]


def _fail(key: str, message: str):
    raise ConfigError(f"config key {key!r}: {message}")


def _str(data, key, *, required=False):
    value = data.get(key)
    if value is None:
        if required:
            _fail(key, "is required")
        return None
    if not isinstance(value, str) or not value:
        _fail(key, f"expected a non-empty string, got {value!r}")
    return value


def _target(data, key, *, required=False):
    value = _str(data, key, required=required)
    if value is not None and (value.count(":") != 1 or not all(value.split(":"))):
        _fail(key, f"expected 'module:attribute' (e.g. 'mypkg.models:make_model'), got {value!r}")
    return value


def _number(table, key, *, low=-math.inf, integer=False, default=None):
    value = table.get(key, default)
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value < math.inf:
        bound = "" if low == -math.inf else f" >= {low}"
        _fail(f"merge.{key}", f"expected a finite {'integer' if integer else 'number'}{bound}, "
              f"got {value!r}")  # fmt: skip
    return value


def _basis(value, key):
    if isinstance(value, str):
        if value in BASIS_NAMES or value in ("ties", "dare"):
            return value
        if value.startswith("lowrank:") and value[8:].isdigit() and int(value[8:]) > 0:
            return value
    _fail(key, f"expected one of {', '.join(BASIS_NAMES)}, 'lowrank:R' (R > 0), 'ties' or "
          f"'dare', got {value!r}")  # fmt: skip


def _merge_table(raw) -> dict[str, Any]:
    if not isinstance(raw, dict):
        _fail("merge", f"expected a table, got {raw!r}")
    for key in raw:
        if key not in KNOWN:
            _fail(f"merge.{key}", f"unknown option; known: {', '.join(KNOWN)}")
    method = raw.get("method", "qp")
    if method not in METHODS:
        _fail("merge.method", f"expected one of {', '.join(METHODS)}, got {method!r}")
    basis = raw.get("basis", "full")
    if isinstance(basis, dict):
        if not basis:
            _fail("merge.basis", "the table of glob -> basis is empty")
        for glob, value in basis.items():
            if _basis(value, f"merge.basis.{glob}") in ("ties", "dare"):
                _fail(f"merge.basis.{glob}", "ties and dare bases apply to the whole model only")
    else:
        _basis(basis, "merge.basis")
    special = basis if method == "qp" and basis in ("ties", "dare") else None
    allowed = ("method", *OPTIONS[method], *(OPTIONS[special] if special else ()))
    for key in raw:
        if key not in allowed:
            users = [m for m in METHODS if key in OPTIONS[m]]
            _fail(f"merge.{key}", f"applies to method {' / '.join(users)}, not {method!r}"
                  + (f" with basis {basis!r}" if method == "qp" else ""))  # fmt: skip
    out = {"method": method}
    if method in ("qp", "regmean"):
        algorithm = raw.get("algorithm", "parallel")
        if algorithm not in ("parallel", "sequential"):
            _fail("merge.algorithm", f"expected 'parallel' or 'sequential', got {algorithm!r}")
        ridge = raw.get("ridge", 0.0)
        for key, value in ridge.items() if isinstance(ridge, dict) else [(None, ridge)]:
            name = "merge.ridge" + (f".{key}" if key else "")
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                _fail(name, f"expected a number >= 0 (inf allowed), got {value!r}")
        alpha = _number(raw, "alpha", default=0.9 if method == "regmean" else 1.0)
        if not 0 <= alpha <= 1:
            _fail("merge.alpha", f"expected a number in [0, 1], got {alpha!r}")
        fallback = raw.get("fallback", "mean")
        if fallback not in ("mean", "base"):
            if isinstance(fallback, str):
                _fail("merge.fallback", f"expected 'mean', 'base' or a number, got {fallback!r}")
            fallback = _number(raw, "fallback")
        strict = raw.get("strict", False)
        if not isinstance(strict, bool):
            _fail("merge.strict", f"expected true or false, got {strict!r}")
        out.update(algorithm=algorithm, ridge=ridge, alpha=alpha, fallback=fallback,
                   strict=strict)  # fmt: skip
        out["basis"] = "full" if method == "regmean" else basis
    if method in ("task_arithmetic", "ties", "dare") or special:
        out["scale"] = _number(raw, "scale", default=1.0)
    if method == "ties" or special == "ties":
        out["density"] = _number(raw, "density", low=0, default=0.2)
        out["trim"] = raw.get("trim", "tensor")
        if out["trim"] not in ("tensor", "model"):
            _fail("merge.trim", f"expected 'tensor' or 'model', got {out['trim']!r}")
    if method == "ties" or special == "ties":
        out["aggregate"] = raw.get("aggregate", "mean")
        if out["aggregate"] not in ("mean", "sum"):
            _fail("merge.aggregate", f"expected 'mean' or 'sum', got {out['aggregate']!r}")
    if method == "dare" or special == "dare":
        if "drop_rate" not in raw:
            _fail("merge.drop_rate", "is required for DARE (a drop probability in [0, 1))")
        out["drop_rate"] = _number(raw, "drop_rate", low=0)
        if not out["drop_rate"] < 1:
            _fail("merge.drop_rate", f"expected a number in [0, 1), got {out['drop_rate']!r}")
        out["seed"] = _number(raw, "seed", integer=True, low=0, default=0)
        out["rescale"] = raw.get("rescale", "expectation")
        if out["rescale"] not in ("expectation", "l1"):
            _fail("merge.rescale", f"expected 'expectation' or 'l1', got {out['rescale']!r}")
    if special and "scale" in raw:
        ridges = out["ridge"].values() if isinstance(out["ridge"], dict) else [out["ridge"]]
        if not any(ridges):
            _fail("merge.scale", f"with basis {special!r}, scale is the prior the ridge pulls "
                  "toward, and ridge is 0 for every layer, so it has no effect: give a ridge "
                  f"> 0 (ridge = inf is {special} itself) or drop scale")  # fmt: skip
    return out


def load_config(path) -> MergeConfig:
    """Read and validate a merge configuration (see the module docs).

    Args:
        path: the TOML file.

    Returns:
        A :class:`MergeConfig` with absolute paths; nothing is imported or opened yet.

    Raises:
        ConfigError: the file is missing or not TOML, a key is unknown, missing or of the wrong
            type or value (the message names the key and what was expected).

    Examples:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "c.toml").write_text('model = "m:f"\\nbase = "b"\\nfinetuned = ["f1"]\\n'
        ...                               '[merge]\\nmethod = "soup"\\n')
        >>> load_config(d / "c.toml").merge
        {'method': 'soup'}
        >>> _ = (d / "c.toml").write_text('model = "m:f"\\nbase = "b"\\nfinetuned = ["f1"]\\n'
        ...                               '[merge]\\nmethod = "soup"\\ndensity = 0.5\\n')
        >>> load_config(d / "c.toml")
        Traceback (most recent call last):
        ...
        jaxmerge.ConfigError: config key 'merge.density': applies to method ties, not 'soup'
    """
    source = Path(path).absolute()
    try:
        data = tomllib.loads(source.read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file {source} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"configuration file {source} is not valid TOML: {error}") from None
    for key in data:
        if key not in TOP_KEYS:
            _fail(key, f"unknown key; known: {', '.join(sorted(TOP_KEYS))}")
    here = source.parent

    def resolve(value):
        return (here / value).absolute()

    pythonpath = data.get("pythonpath", [])
    if not isinstance(pythonpath, list) or not all(isinstance(p, str) for p in pythonpath):
        _fail("pythonpath", f"expected a list of directories, got {pythonpath!r}")
    model = _target(data, "model", required=True)
    base = _str(data, "base", required=True)
    finetuned = data.get("finetuned")
    if not isinstance(finetuned, list) or not finetuned:
        _fail(
            "finetuned", f"expected a non-empty list of checkpoint directories, got {finetuned!r}"
        )
    if not all(isinstance(f, str) and f for f in finetuned):
        _fail(
            "finetuned", f"expected a list of checkpoint directories (strings), got {finetuned!r}"
        )
    tasks = data.get("tasks", [f"task{k}" for k in range(len(finetuned))])
    if (
        not isinstance(tasks, list)
        or len(tasks) != len(finetuned)
        or not all(isinstance(t, str) and t for t in tasks)
        or len(set(tasks)) != len(tasks)
    ):
        _fail(
            "tasks", f"expected {len(finetuned)} distinct names (one per fine-tune), got {tasks!r}"
        )
    call_kwargs = data.get("call_kwargs", {})
    if not isinstance(call_kwargs, dict):
        _fail("call_kwargs", f"expected a table, got {call_kwargs!r}")
    mask_key = data.get("mask_key", "mask")
    if not isinstance(mask_key, str):
        _fail("mask_key", f"expected a string, got {mask_key!r}")
    merge = _merge_table(data.get("merge", {}))
    calibration = _target(data, "calibration")
    heldout = _target(data, "heldout")
    stats = data.get("stats")
    if isinstance(stats, str):
        stats = [stats]
    if stats is not None and (
        not isinstance(stats, list) or not stats or not all(isinstance(p, str) and p for p in stats)
    ):
        _fail("stats", f"expected a directory or a non-empty list of directories, got {stats!r}")
    if merge["method"] in ("qp", "regmean"):
        if calibration is None and stats is None:
            _fail("calibration", f"method {merge['method']!r} needs 'calibration' or 'stats'")
        if stats is not None and merge["algorithm"] == "sequential":
            _fail("stats", "saved statistics are parallel statistics; the sequential algorithm "
                  "needs 'calibration' (drop 'stats' or use algorithm = 'parallel')")  # fmt: skip
        if stats is not None and calibration is not None:
            _fail("calibration", "a merge from saved statistics ('stats') reads no calibration "
                  "data (the statistics were computed from it before); give one of "
                  "'calibration' and 'stats'")  # fmt: skip
        if stats is not None and heldout is None:
            for key in ("mask_key", "call_kwargs"):
                if key in data:
                    _fail(key, "a merge from saved statistics ('stats') without 'heldout' runs "
                          "no batches, so it has no effect")  # fmt: skip
    else:
        for key in ("stats", "heldout", "calibration", "mask_key", "call_kwargs"):
            if key in data:
                _fail(key, f"method {merge['method']!r} uses no calibration data")
    return MergeConfig(
        source=source,
        model=model,
        base=resolve(base),
        finetuned=tuple(resolve(f) for f in finetuned),
        tasks=tuple(tasks),
        calibration=calibration,
        heldout=heldout,
        stats=tuple(resolve(p) for p in stats) if stats is not None else None,
        pythonpath=tuple(resolve(p) for p in pythonpath),
        mask_key=mask_key,
        call_kwargs=call_kwargs,
        merge=merge,
    )


def import_object(config: MergeConfig, key: str):
    """Import the ``module:attribute`` named by ``config.<key>``, after ``config.pythonpath``.

    Raises:
        ConfigError: a ``pythonpath`` directory does not exist, or the module or attribute does
            not exist or is not callable (naming the key).
    """
    target = getattr(config, key)
    for k, directory in enumerate(config.pythonpath):
        if not directory.is_dir():
            _fail(f"pythonpath[{k}]", f"no directory at {directory}")
    for directory in reversed(config.pythonpath):
        if str(directory) not in sys.path:
            sys.path.insert(0, str(directory))
    module_name, attribute = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        _fail(key, f"cannot import module {module_name!r} ({error}); check 'pythonpath'")
    obj = getattr(module, attribute, None)
    if not callable(obj):
        _fail(key, f"module {module_name!r} has no callable {attribute!r}")
    return obj
