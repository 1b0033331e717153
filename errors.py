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
