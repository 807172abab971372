"""``run(main)``: ``absl.app.run`` with command-line mistakes reported as one line, exit status 2,
and a quiet log (warnings and errors; ``--verbosity=0`` brings back INFO).

absl prints the module docstring and the key flags (~40 lines) before a ``UsageError``'s message;
here a mistake (a bad flag value, an unknown preset / config / field, a missing data file: what
``main`` raises as ``app.UsageError``) is one line on stderr plus a pointer to ``--helpshort``::

    train: error: unknown preset 'mambo'; valid presets: ...
    (python -m experiments.train --helpshort lists the flags)
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

USAGE_EXIT = 2
MISSING_EXIT = 3   # a prerequisite outside this project is missing (a peer venv, a system library)


def _prog() -> str:
    return os.path.splitext(os.path.basename(sys.argv[0]))[0]


def _hint() -> str:
    return f"(python -m experiments.{_prog()} --helpshort lists the flags)"


def fail(message: str) -> None:
    """Print ``<prog>: error: <message>`` and the flags hint to stderr; exit with status 2."""
    sys.stderr.write(f"{_prog()}: error: {message}\n{_hint()}\n")
    sys.exit(USAGE_EXIT)


def missing(message: str) -> None:
    """Print ``<prog>: missing prerequisite: <message>`` to stderr; exit with status 3 (``MISSING_EXIT``):
    the command is right, the machine lacks something it documents how to install."""
    sys.stderr.write(f"{_prog()}: missing prerequisite: {message}\n")
    sys.exit(MISSING_EXIT)


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(" ".join(str(e).split()))


def run(main) -> None:
    """``app.run(main)`` whose ``UsageError`` and flag-parsing errors are :func:`fail` lines; the
    log shows warnings and errors only (orbax and the JAX backends log dozens of INFO lines per
    run) unless ``--verbosity`` is given."""

    def wrapped(argv):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        try:
            return main(argv)
        except app.UsageError as e:
            fail(" ".join(str(e).split()))

    app.run(wrapped, flags_parser=_parse_flags)
