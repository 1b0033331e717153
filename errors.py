"""The errors neomesh raises for a user's mistake or bad data. Each message names the file, key
or value and what would be accepted; the command lines print it as one `error:` line and exit 2.

They live apart from the stages that raise them, so that any stage (configs, mesh, data, the
model, export) can raise any of them without importing another stage.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config mistake: the message names the file or key, the value and what is accepted."""


class DataError(ValueError):
    """Bad data on disk: the message names the file and, where it helps, the byte offset."""


class ExportError(ConfigError):
    """A model HF GPTNeo cannot express, or an HF folder neomesh cannot read: names what and why."""


class StorageError(OSError):
    """A path neomesh cannot read or write as asked (a protocol it cannot use there, a folder it
    could not delete): names the path and why."""


# What a command line reports as one `error:` line and exit code 2: a user's mistake or bad data,
# each message naming what and why. FileNotFoundError: a path the user gave; FloatingPointError: a
# run that diverged, naming the step. Anything else is a bug in neomesh, and keeps its traceback.
USER_ERRORS = (ConfigError, DataError, StorageError, FileNotFoundError, FloatingPointError)
USER_ERROR_EXIT_CODE = 2  # argparse's code for a bad command line, so every mistake exits alike


def report_user_error(err: BaseException) -> int:
    """Print `err` as the one `error:` line of every neomesh command line; return its exit code."""
    import sys

    print(f"error: {err}", file=sys.stderr)
    return USER_ERROR_EXIT_CODE


def run_command(main, argv: list[str] | None = None) -> int:
    """Exit code of a command line's `main(argv)`: 0, or for a user error its one `error:` line and 2.
    The data tools end with `sys.exit(run_command(main))`; main.py and export.py catch USER_ERRORS
    around their own work the same way."""
    try:
        main(argv)
    except USER_ERRORS as err:
        return report_user_error(err)
    return 0
