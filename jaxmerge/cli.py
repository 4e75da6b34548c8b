"""The ``jaxmerge`` command line.

Subcommands:
    demo    merge fine-tuned digit classifiers on data that installs with the package and print a
            table of methods, accuracies and captured energy ρ.

Exit codes: 0 success, 1 a failed run, 2 bad usage.
"""

import argparse
import json
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxmerge",
        description="Merge fine-tuned JAX/Flax models by output-space projection.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run the embedded example (scikit-learn digits) and print a table of methods",
        description="Pretrain a digit classifier, fine-tune it on digits 0-4 and 5-9, merge the "
        "two fine-tunes with every basis and print accuracies and captured energy.",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of split and initialisation")
    demo.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    demo.add_argument("--quiet", action="store_true", help="print nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    Examples:
        >>> main(["demo", "--quiet"])
        0
    """
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        result = run_demo(seed=args.seed, quiet=args.quiet)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
