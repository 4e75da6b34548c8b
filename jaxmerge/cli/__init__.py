"""The ``jaxmerge`` command line: :mod:`.command` (the subcommands, ``main``), :mod:`.config` (its
TOML configuration) and :mod:`.demo` (``jaxmerge demo``)."""

from .command import main

__all__ = ["main"]
