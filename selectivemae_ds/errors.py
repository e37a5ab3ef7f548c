"""The project's error types and the exit codes every command shares.

Three kinds of failure a user can act on, each with its own type and exit code;
anything else is a bug and propagates with its traceback (exit code 1):

| exit | type              | meaning                                                         |
|------|-------------------|-----------------------------------------------------------------|
| 0    |                   | success                                                         |
| 1    | (any other)       | internal error: a bug; the traceback is printed                 |
| 2    | ``ConfigError``   | usage or configuration: bad flag, key, value, path to create    |
| 3    | ``DataError``     | input data: images, archives, shards, labeled sets              |
| 4    | ``CheckpointError``| a checkpoint or exported weight file: missing, incomplete,      |
|      |                   | damaged, unsafe to unpickle, or from another configuration      |
| 5    | ``RunError``      | a run that started but had to stop (non-finite training, a peer |
|      |                   | rank that timed out, the output taken by another process)       |
| 128+N| (signal N)        | stopped by SIGTERM (143) / SIGINT (130) after a clean shutdown  |

argparse's own usage errors already exit 2. Commands wrap their ``main`` with
:func:`run_cli`, which prints ``<kind> error: <message>`` for these types only.

``ConfigError`` subclasses ``ValueError`` so code (and tests) written against the
validators' historical ``ValueError`` keep working; catch ``ConfigError`` itself,
never a bare ``ValueError``, when the intent is "the user's configuration is wrong".
"""
from __future__ import annotations

import sys
from typing import Callable

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_CHECKPOINT = 4
EXIT_RUN = 5


class SmaeError(Exception):
    """Base of the errors a user can act on; ``kind`` and ``exit_code`` say which."""

    kind = "error"
    exit_code = EXIT_INTERNAL


class ConfigError(SmaeError, ValueError):
    """A command-line flag, config key or value, or an output path is wrong."""

    kind = "config"
    exit_code = EXIT_CONFIG


class DataError(SmaeError):
    """Input data is missing, unreadable, corrupt or unsuitable."""

    kind = "data"
    exit_code = EXIT_DATA


class CheckpointError(SmaeError):
    """A checkpoint (or exported weights file) cannot be used."""

    kind = "checkpoint"
    exit_code = EXIT_CHECKPOINT


class RunError(SmaeError):
    """A started run had to stop for a reason outside the configuration and the data."""

    kind = "run"
    exit_code = EXIT_RUN


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Call ``main(argv)``; turn a :class:`SmaeError` into its message on stderr and its exit code.

    Other exceptions propagate unchanged (exit 1 with the traceback): they are bugs.
    """
    try:
        return int(main(argv) or 0)
    except SmaeError as e:
        print(f"{e.kind} error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
