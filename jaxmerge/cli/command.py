"""The ``jaxmerge`` command line.

Subcommands:
    merge   merge fine-tuned checkpoints as a configuration file says; write the merged
            parameters and the report.
    stats   compute calibration statistics once and save them (merge later with ``stats = ...``).
    report  print a merge report's per-layer table; optionally draw ρ per layer as a PNG.
    demo    merge fine-tuned digit classifiers on data that installs with the package and print a
            table of methods, accuracies and captured energy ρ.

Outputs are written atomically (the whole output directory or file appears at once, or nothing),
an existing output is replaced only with ``--overwrite``, and inputs are only read: an output that
is, contains or lies inside an input, or is or contains the working directory, is refused before
any work is done.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

__all__ = ["main"]

EXIT_CODES = """exit codes:
  0  success
  1  the run failed (bad data, a failed solve, unreadable checkpoint contents)
  2  bad usage: unknown option, invalid configuration (the message names the key), a missing
     input, or an output that exists without --overwrite"""

CONFIG_HELP = """configuration file (TOML; paths relative to it):
  model = "pkg.module:factory"   callable() -> flax.linen or flax.nnx Module
  base = "DIR"                   Orbax parameter checkpoint (jaxmerge.save_params)
  finetuned = ["DIR", ...]       one checkpoint per fine-tuned model
  tasks = ["name", ...]          optional task names (of the statistics; checked against
                                 `stats`)
  calibration = "pkg.mod:fn"     fn() -> K iterables of batches, one per fine-tune
  heldout = "pkg.mod:fn"         optional held-out batches, same form (scores the merge)
  stats = ["DIR", ...]           merge from `jaxmerge stats` outputs (summed: runs over
                                 disjoint data) instead of calibration (not both)
  pythonpath = ["DIR", ...]      directories searched for the modules above
  mask_key = "mask"              padding-mask key of dict batches
  call_kwargs = {...}            static keyword arguments of every forward call
  [merge]
  method = "qp"                  qp | regmean | soup | task_arithmetic | ties | dare
  algorithm = "parallel"         parallel | sequential (qp, regmean)
  basis = "full"                 scalar | diagonal | full | lowrank:R | ties | dare (qp), or a
                                 table {"glob" = basis} (first match wins)
  ridge = 0.0                    λ >= 0 toward the prior, or a table {"glob" = λ} (qp, regmean)
  alpha = 1.0                    RegMean's α in [0, 1] (qp; regmean default 0.9)
  fallback = "mean"              mean | base | λ: parameters not solved by output matching
  strict = false                 fail instead of warning when parameters the fine-tunes
                                 changed are not solved by output matching (qp, regmean;
                                 or --strict)
  scale = 1.0                    λ of task_arithmetic, ties, dare (and the ties/dare bases)
  density = 0.2, trim = "tensor", aggregate = "mean"   ties options
  drop_rate = P, seed = 0, rescale = "expectation"     dare options (drop_rate required;
                                 rescale "l1" keeps each tensor's L1 norm, as mergekit)
Unknown keys, options of another method, and keys that would have no effect (calibration
beside stats, mask_key or call_kwargs where no batch is run, scale of a ties/dare basis
without a ridge) are errors. `jaxmerge stats` ignores [merge] and heldout."""


class UsageError(Exception):
    """Bad usage: exit code 2."""


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=88)


def _add_output(parser, what: str) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help=f"directory to write {what}")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (default: refuse)"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="print nothing but warnings and errors"
    )


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="jaxmerge",
        description=_wrap("Merge fine-tuned JAX/Flax models by output-space projection."),
        epilog=EXIT_CODES,
        formatter_class=formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    merge = sub.add_parser(
        "merge",
        help="merge checkpoints as CONFIG says; write DIR/params and DIR/report.json",
        description=_wrap(
            "Load the base and fine-tuned checkpoints and the calibration data (or saved "
            "statistics) named in CONFIG, merge them, and write DIR/params (an Orbax "
            "checkpoint, load with jaxmerge.load_params), DIR/report.json (methods qp and "
            "regmean; read it with `jaxmerge report`) and DIR/config.toml (a copy of CONFIG). "
            "DIR appears complete or not at all."
        ),
        epilog=CONFIG_HELP + "\n\n" + EXIT_CODES,
        formatter_class=formatter,
    )
    merge.add_argument("config", metavar="CONFIG", help="the TOML configuration file")
    _add_output(merge, "the merged checkpoint and the report to")
    merge.add_argument(
        "--accept-other-finetunes",
        action="store_true",
        help="merge from saved statistics (`stats = DIR`) even when the fine-tuned checkpoints "
        "are not those the statistics were computed from (default: refuse, naming the task)",
    )
    merge.add_argument(
        "--strict",
        action="store_true",
        help="fail (exit 1, nothing written) when parameters the fine-tunes changed are not "
        "solved by output matching, instead of warning on stderr (methods qp and regmean; "
        "as `strict = true` in [merge])",
    )
    stats = sub.add_parser(
        "stats",
        help="compute and save the calibration statistics of CONFIG",
        description=_wrap(
            "Run every fine-tuned model of CONFIG on its calibration data and save the "
            "per-task sums of every layer's statistics to DIR (jaxmerge.load_model_stats). Set "
            "`stats = DIR` in a configuration to merge without the data. Partial sums are saved "
            "every --save-every batches in a hidden .DIR.resume directory next to DIR: an "
            "interrupted run, started again with the same arguments and data, resumes there and "
            "gives the same statistics as an uninterrupted run. A resume with other "
            "fine-tuned checkpoints, data or options is refused (delete .DIR.resume to start "
            "over), and DIR records the fingerprints of the checkpoints and data it came from."
        ),
        epilog=CONFIG_HELP + "\n\n" + EXIT_CODES,
        formatter_class=formatter,
    )
    stats.add_argument("config", metavar="CONFIG", help="the TOML configuration file")
    _add_output(stats, "the statistics checkpoint to")
    stats.add_argument(
        "--save-every",
        type=int,
        default=10,
        metavar="N",
        help="save the partial sums every N batches of a task (default 10)",
    )
    report = sub.add_parser(
        "report",
        help="print a merge report's per-layer table; optionally write a PNG of ρ per layer",
        description=_wrap(
            "Print the per-layer table (basis, E0, L*, ρ, held-out ρ, condition, solver "
            "status, time) of REPORT, a report.json or a `jaxmerge merge` output directory."
        ),
        epilog=EXIT_CODES,
        formatter_class=formatter,
    )
    report.add_argument("report", metavar="REPORT", help="report.json or a merge output directory")
    report.add_argument(
        "--png", metavar="PATH", help="write a bar chart of ρ per layer (matplotlib)"
    )
    report.add_argument(
        "--overwrite", action="store_true", help="replace --png if it exists (default: refuse)"
    )
    demo = sub.add_parser(
        "demo",
        help="run the embedded example (scikit-learn digits) and print a table of methods",
        description=_wrap(
            "Pretrain a small MLP digit classifier, fine-tune it on several digit tasks, "
            "merge the fine-tunes with every method and print per-task accuracies and captured "
            "energy ρ (on the calibration data and on held-out data)."
        ),
        epilog=EXIT_CODES,
        formatter_class=formatter,
    )
    demo.add_argument("--quick", action="store_true", help="fewer steps and methods (< 30 s)")
    demo.add_argument("--seed", type=int, default=0, help="seed of split and initialisation")
    demo.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    demo.add_argument(
        "--overwrite", action="store_true", help="replace --json if it exists (default: refuse)"
    )
    demo.add_argument("--quiet", action="store_true", help="print nothing")
    return parser


def _check_output(path, overwrite: bool, *, inputs=(), places=()) -> Path:
    """The absolute output path, after refusing every output that could destroy an input.

    ``inputs`` are ``(name, path)`` pairs of files and directories that are read (checkpoints,
    statistics, the configuration): the output may not be one, contain one or lie inside one.
    ``places`` are directories the run works in (the working directory, the import path): the
    output may not be one or contain one. Symbolic links are followed on both sides. An output
    whose parent path runs through a file is refused too. All before any work is done.
    """
    out = Path(os.path.abspath(path))
    checks = [(name, where, True) for name, where in inputs]
    checks += [(name, where, False) for name, where in places]
    for name, where, read in checks:
        where = Path(os.path.abspath(where))
        for a, b in ((out, where), (Path(os.path.realpath(out)), Path(os.path.realpath(where)))):
            if a == b:
                raise UsageError(f"--out {path}: is the {name} ({where}); choose another path.")
            if b.is_relative_to(a):
                raise UsageError(f"--out {path}: contains the {name} ({where}), which --overwrite "
                                 "would delete; choose another path.")  # fmt: skip
            if read and a.is_relative_to(b):
                raise UsageError(f"--out {path}: lies inside the {name} ({where}), which is only "
                                 "read; choose a path outside it.")  # fmt: skip
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"--out {path}: {parent} is a file, not a directory.")
    if (out.exists() or out.is_symlink() or any(out.parent.glob(f".{out.name}.old-*"))) and (
        not overwrite
    ):
        raise UsageError(f"{out} exists; pass --overwrite to replace it.")
    return out


def _protected(config) -> tuple[list, list]:
    """The ``inputs`` and ``places`` of :func:`_check_output` for a configuration."""
    inputs = [("configuration file", config.source), ("base checkpoint", config.base)]
    inputs += [(f"fine-tuned checkpoint {k}", p) for k, p in enumerate(config.finetuned)]
    inputs += [(f"statistics directory {k}", p) for k, p in enumerate(config.stats or ())]
    places = [("working directory", Path.cwd())]
    places += [(f"pythonpath directory {k}", p) for k, p in enumerate(config.pythonpath)]
    return inputs, places


def _write_file(path: Path, write) -> None:
    """Write a file atomically: ``write(temporary path)``, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_inputs(config, *, need_finetuned=True):
    from ..io.checkpoint import load_params
    from .config import import_object

    for key, path in [("base", config.base)] + [
        (f"finetuned[{k}]", p) for k, p in enumerate(config.finetuned)
    ]:
        if not path.is_dir():
            raise UsageError(f"config key {key!r}: no checkpoint directory at {path}.")
    for path in config.stats or ():
        if not path.is_dir():
            raise UsageError(f"config key 'stats': no statistics directory at {path}.")
    model = import_object(config, "model")()
    base = load_params(config.base)
    finetuned = [load_params(p, base) for p in config.finetuned]
    return model, base, finetuned


def _data(config, key):
    from .config import import_object

    if getattr(config, key) is None:
        return None
    return import_object(config, key)()


def _basis(name):
    from ..core.bases import LowRank

    return LowRank(int(name[8:])) if name.startswith("lowrank:") else name


def _run_merge(config, *, quiet: bool, check_source: bool = True, strict: bool = False):
    import jax

    from ..io.model_stats import combine_model_stats, load_model_stats
    from ..methods import arithmetic, dare, ties
    from ..methods.reweighted import dare_basis, ties_basis
    from ..model import collect_stats, merge, solve_stats

    opts = config.merge
    method = opts["method"]
    model, base, finetuned = _load_inputs(config)
    if method == "soup":
        return arithmetic.soup(base, finetuned), None
    if method == "task_arithmetic":
        return arithmetic.task_arithmetic(base, finetuned, scale=opts["scale"]), None
    ties_opts = {k: opts[k] for k in ("density", "trim", "aggregate") if k in opts}
    dare_opts = {k: opts[k] for k in ("drop_rate", "rescale") if k in opts}
    if method == "ties":
        return ties.ties(base, finetuned, scale=opts["scale"], **ties_opts), None
    if method == "dare":
        key = jax.random.key(opts["seed"])
        return dare.dare(base, finetuned, key, scale=opts["scale"], **dare_opts), None
    basis, prior = opts["basis"], None
    if basis == "ties":
        basis, prior = ties_basis(base, finetuned, scale=opts["scale"], **ties_opts)
    elif basis == "dare":
        key = jax.random.key(opts["seed"])
        basis, prior = dare_basis(base, finetuned, key, scale=opts["scale"], **dare_opts)
    elif isinstance(basis, dict):
        basis = {glob: _basis(b) for glob, b in basis.items()}
    else:
        basis = _basis(basis)
    common = dict(
        basis=basis,
        prior=prior,
        ridge=opts["ridge"],
        alpha=opts["alpha"],
        fallback=opts["fallback"],
        progress=not quiet,
        strict=strict or opts["strict"],
    )
    heldout = _data(config, "heldout")
    if config.stats is None:
        merged, report = merge(
            model,
            base,
            finetuned,
            _data(config, "calibration"),
            algorithm=opts["algorithm"],
            heldout=heldout,
            mask_key=config.mask_key,
            call_kwargs=config.call_kwargs,
            **common,
        )
    else:
        saved = combine_model_stats(*(load_model_stats(p) for p in config.stats))
        if saved.tasks != config.tasks:
            raise UsageError(
                f"config key 'stats': the statistics hold tasks {list(saved.tasks)}, the "
                f"configuration names {list(config.tasks)} (key 'tasks')."
            )
        held = None
        if heldout is not None:
            held = collect_stats(model, finetuned, heldout, mask_key=config.mask_key,
                                 call_kwargs=config.call_kwargs, progress=not quiet)  # fmt: skip
        merged, report = solve_stats(saved, base, finetuned, heldout=held,
                                     check_source=check_source, **common)  # fmt: skip
    return merged, report


def _merge_command(args) -> None:
    from ..io.checkpoint import atomic_directory, save_params
    from ..model import OptionPatternError, UnsolvedParametersError, UnsolvedParametersWarning
    from .config import ConfigError, load_config

    config = load_config(args.config)
    if args.accept_other_finetunes and config.stats is None:
        raise UsageError(
            "--accept-other-finetunes applies to a merge from saved statistics (config key "
            "'stats'); this configuration merges from calibration data, so it has no effect."
        )
    if args.strict and config.merge["method"] not in ("qp", "regmean"):
        raise UsageError(
            f"--strict applies to methods qp and regmean (which solve layers by output "
            f"matching); method {config.merge['method']!r} solves none, so it has no effect."
        )
    inputs, places = _protected(config)
    out = _check_output(args.out, args.overwrite, inputs=inputs, places=places)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnsolvedParametersWarning)
            merged, report = _run_merge(config, quiet=args.quiet, strict=args.strict,
                                        check_source=not args.accept_other_finetunes)  # fmt: skip
    except OptionPatternError as error:  # a [merge] table naming no layer: a config mistake
        raise ConfigError(f"config key 'merge.{error.option}': {error}") from None
    except UnsolvedParametersError as error:
        error.add_note("(command line: without --strict and `strict = true` in [merge], the "
                       "merge goes on with a warning)")  # fmt: skip
        raise
    _show_warnings(caught)
    with atomic_directory(out, overwrite=args.overwrite, what="jaxmerge merge") as tmp:
        tmp.mkdir()
        save_params(tmp / "params", merged)
        shutil.copyfile(config.source, tmp / "config.toml")
        if report is not None:
            (tmp / "report.json").write_text(report.to_json())
    if not args.quiet:
        if report is not None:
            print(report)
        else:
            print(f"{config.merge['method']} merge of {len(config.finetuned)} models (no data).")
        print(f"wrote {out}")


def _show_warnings(caught) -> None:
    """Show the warnings of a merge on stderr: the unsolved parameters as jaxmerge's own
    message (with the command line's way to make it an error), others as Python shows them."""
    from ..model import UnsolvedParametersWarning

    for w in caught:
        if issubclass(w.category, UnsolvedParametersWarning):
            print(f"jaxmerge: warning: {w.message}\n  (command line: --strict, or "
                  "`strict = true` in [merge], makes this an error)", file=sys.stderr)  # fmt: skip
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _stats_command(args) -> None:
    from ..io.model_stats import accumulate_model_stats, save_model_stats
    from .config import load_config

    config = load_config(args.config)
    if config.calibration is None:
        raise UsageError("config key 'calibration': required by `jaxmerge stats`.")
    if args.save_every < 1:
        raise UsageError(f"--save-every must be >= 1, got {args.save_every}.")
    inputs, places = _protected(config)
    out = _check_output(args.out, args.overwrite, inputs=inputs, places=places)
    resume = out.parent / f".{out.name}.resume"
    model, _, finetuned = _load_inputs(config)
    stats = accumulate_model_stats(
        model,
        finetuned,
        _data(config, "calibration"),
        tasks=config.tasks,
        directory=resume,
        save_every=args.save_every,
        mask_key=config.mask_key,
        call_kwargs=config.call_kwargs,
        progress=not args.quiet,
    )
    save_model_stats(out, stats, overwrite=args.overwrite)
    shutil.rmtree(resume, ignore_errors=True)
    if not args.quiet:
        rows = {t: int(stats.sums[next(iter(stats.sums))].stats.count[k][k])
                for k, t in enumerate(stats.tasks)}  # fmt: skip
        print(f"statistics of {len(stats.sums)} layer groups, rows per task {rows}")
        print(f"wrote {out}")


def _report_command(args) -> None:
    from ..model.report import MergeReport

    path = Path(args.report)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise UsageError(f"no report at {path}.")
    if args.overwrite and not args.png:
        raise UsageError("--overwrite applies to --png (the only file `report` writes); give "
                         "--png PATH or drop --overwrite.")  # fmt: skip
    png = None
    if args.png:
        png = _check_output(args.png, args.overwrite, inputs=[("report", path)],
                            places=[("working directory", Path.cwd())])  # fmt: skip
    try:
        report = MergeReport.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{path} is not a jaxmerge report: {error!r}") from None
    print(report)
    if png is not None:
        _write_file(png, lambda tmp: report.plot().savefig(tmp, format="png"))
        print(f"wrote {png}")


def _demo_command(args) -> None:
    from .demo import run_demo

    if args.overwrite and not args.json:
        raise UsageError("--overwrite applies to --json (the only file `demo` writes); give "
                         "--json PATH or drop --overwrite.")  # fmt: skip
    places = [("working directory", Path.cwd())]
    out = _check_output(args.json, args.overwrite, places=places) if args.json else None
    result = run_demo(seed=args.seed, quick=args.quick, quiet=args.quiet)
    if out is not None:
        _write_file(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 1 failed run, 2 bad usage).

    Examples:
        >>> main(["report", "no-such-report.json"])  # prints the error to stderr
        2
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) and usage errors (2)
        return int(exit_.code or 0)
    from .config import ConfigError

    commands = {
        "merge": _merge_command,
        "stats": _stats_command,
        "report": _report_command,
        "demo": _demo_command,
    }
    try:
        commands[args.command](args)
    except (UsageError, ConfigError) as error:
        print(f"jaxmerge: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as error:
        notes = "".join(f"\n  {note}" for note in getattr(error, "__notes__", ()))
        print(f"jaxmerge: {args.command} failed: {type(error).__name__}: {error}{notes}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
