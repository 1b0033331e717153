"""Every path neomesh reads or writes: local folders, `gs://` buckets and `memory://`, through fsspec.

A stage never calls `open`, `os.path` or `pathlib` on a path a user gave; it calls these helpers,
so that a model_path, a dataset, a tokenizer or an export folder on `gs://bucket/...` takes the
same code path as a local one. Checkpoints are the one exception: orbax writes them itself
(tensorstore for the arrays, etils.epath, which uses gcsfs without TensorFlow, for the folders);
`configure()` below points those at the same endpoint as fsspec.

A GCS emulator (for tests, or a local fake bucket): set the standard `STORAGE_EMULATOR_HOST`
(e.g. `http://localhost:9023`) and nothing else. At import this module translates it for the
parts that do not read it themselves:

  gcsfs (fsspec, etils.epath)  reads STORAGE_EMULATOR_HOST itself; told to use anonymous
                               credentials, and its bucket-type probe (a Storage Control API call
                               that no emulator answers) is switched off
                               (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false)
  tensorstore (orbax arrays)   TENSORSTORE_GCS_HTTP_URL is set to the emulator's address, and
                               GOOGLE_AUTH_TOKEN_FOR_TESTING to a dummy token, so that it neither
                               looks for Google credentials nor asks a metadata server
  tensorboardX                 event files go through fsspec (`tensorboard_writer_factory`)

One difference remains: gcp-storage-emulator sends no `x-goog-generation` header with a
download, which tensorstore's OCDBT format needs for its conditional manifest writes ("Malformed
StorageGeneration"); so against an emulator orbax writes one zarr folder per array instead
(`checkpoints.py`, via `emulator()`); either format restores.

A variable the user already set is left as it is. Without STORAGE_EMULATOR_HOST nothing is
changed: real buckets use the default endpoints and Application Default Credentials.

`memory://` lives in this process only (another process sees an empty store); orbax cannot write
checkpoints there, so a model_path on memory:// is refused by checkpoints.py.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import posixpath
import socket
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import fsspec

from errors import StorageError

EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"
_EMULATOR_SETTINGS = {  # what configure() set, so that it can undo exactly that
    "environment": {},
    "fsspec": False,
}


def configure() -> str | None:
    """Point gcsfs, tensorstore and etils.epath at STORAGE_EMULATOR_HOST when it is set (see the
    module's docstring); undo this module's own settings when it is not. Returns the emulator's
    address or None. Runs at import; call it again after changing the variable in-process."""
    emulator = os.environ.get(EMULATOR_VARIABLE, "")
    for name, value in _EMULATOR_SETTINGS["environment"].items():
        if os.environ.get(name) == value:
            del os.environ[name]
    _EMULATOR_SETTINGS["environment"] = {}
    gcs_defaults = fsspec.config.conf.setdefault("gcs", {})
    if _EMULATOR_SETTINGS["fsspec"]:
        gcs_defaults.pop("token", None)
        _EMULATOR_SETTINGS["fsspec"] = False
    if emulator in ("", "default"):
        _clear_gcs_instances()
        return None
    if not emulator.startswith(("http://", "https://")):
        emulator = f"http://{emulator}"
    wanted = {
        "TENSORSTORE_GCS_HTTP_URL": emulator,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    for name, value in wanted.items():
        if name not in os.environ:
            os.environ[name] = value
            _EMULATOR_SETTINGS["environment"][name] = value
    if "token" not in gcs_defaults:
        gcs_defaults["token"] = "anon"
        _EMULATOR_SETTINGS["fsspec"] = True
    _clear_gcs_instances()
    return emulator


def emulator() -> str | None:
    """The GCS emulator's address when STORAGE_EMULATOR_HOST names one, else None."""
    value = os.environ.get(EMULATOR_VARIABLE, "")
    return None if value in ("", "default") else value


def forget_listings() -> None:
    """Drop every cached folder listing of every remote filesystem instance (gcsfs keeps them, and
    orbax's etils.epath has an instance of its own): after a folder was deleted or another process
    wrote, a listing must come from the store."""
    for fs in list(getattr(fsspec.AbstractFileSystem, "_cache", {}).values()):
        if protocol_of(fs) != "file":
            fs.invalidate_cache()
    import sys

    gcsfs = sys.modules.get("gcsfs")
    for fs in list(getattr(getattr(gcsfs, "GCSFileSystem", None), "_cache", {}).values()):
        fs.invalidate_cache()


def _clear_gcs_instances() -> None:
    """gcsfs caches one filesystem per set of arguments; one made before configure() would keep
    the old endpoint."""
    import sys

    gcsfs = sys.modules.get("gcsfs")  # not imported yet: no instance to forget
    if gcsfs is not None:
        gcsfs.GCSFileSystem.clear_instance_cache()


# --- paths ---------------------------------------------------------------------------------------


def protocol(path: str) -> str:
    """'gs', 'memory', ... for a URL; 'file' for a local path."""
    return str(path).split("://", 1)[0] if "://" in str(path) else "file"


def is_remote(path: str) -> bool:
    return protocol(path) != "file"


def join(base: str, *parts: str) -> str:
    base = str(base)
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def absolute(path: str) -> str:
    return str(path) if is_remote(path) else str(Path(path).resolve())


def name(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/"))


def parent(path: str) -> str:
    path = str(path).rstrip("/")
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def filesystem(path: str):
    """(fsspec filesystem, the path as that filesystem spells it)."""
    if protocol(path) == "gs":
        require_reachable(path)
    try:
        return fsspec.core.url_to_fs(str(path))
    except (ImportError, ValueError) as err:
        raise StorageError(f"{path}: cannot open this location ({err})") from None


def _url(fs, fs_path: str) -> str:
    return fs_path if protocol_of(fs) == "file" else fs.unstrip_protocol(fs_path)


def protocol_of(fs) -> str:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" if "file" in protocols or "local" in protocols else protocols[0]


# --- failures -----------------------------------------------------------------------------------

RESUME_ADVICE = "then run the same command again (training resumes from its newest complete checkpoint)"
# seconds within which a gs:// endpoint must accept a connection: gcsfs alone retries each request
# six times with backoff (about 90 s for a run's first few requests) before a raw aiohttp traceback
REACHABLE_WITHIN_SECONDS = 10.0
_reachable: set[str] = set()


def out_of_space(err: BaseException) -> bool:
    """A full disk or quota, however the library spelled it (tensorstore: RESOURCE_EXHAUSTED)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "RESOURCE_EXHAUSTED" in text or "Disk quota exceeded" in text


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def write_error(path: str, err: BaseException, note: str = "") -> StorageError:
    """A failed write as one line: the path, what the system said, (a note on what was kept,) and
    what to do about it."""
    if out_of_space(err):
        advice = f"the disk is full: free space there, {RESUME_ADVICE}"
    elif is_remote(path):
        advice = f"check that the bucket exists, is reachable and writable, {RESUME_ADVICE}"
    else:
        advice = f"check that the folder is writable, {RESUME_ADVICE}"
    # tensorstore's report of a full disk runs to hundreds of characters of its own paths
    reason = "no space left on device" if out_of_space(err) else first_line(err)
    return StorageError(f"{path}: could not write ({reason}){note}; {advice}")


def endpoint(path: str) -> str:
    """The address a gs:// path is served from: STORAGE_EMULATOR_HOST, or Google's endpoint."""
    address = emulator()
    if address is None:
        return "https://storage.googleapis.com"
    return address if address.startswith(("http://", "https://")) else f"http://{address}"


def require_reachable(path: str) -> None:
    """Refuse, in one line and within REACHABLE_WITHIN_SECONDS, a gs:// path whose endpoint takes
    no connection (a name that does not resolve, a closed port, no network). Checked once per
    endpoint and process; behind an HTTP(S) proxy the endpoint is not dialled directly, so there
    the check is left to the proxy."""
    address = endpoint(path)
    if address in _reachable or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return
    url = urlparse(address)
    port = url.port or (443 if url.scheme == "https" else 80)
    started, pause, tries = time.monotonic(), 0.5, 0
    while True:
        tries += 1
        try:
            socket.create_connection((url.hostname, port), timeout=3).close()
            _reachable.add(address)
            return
        except OSError as err:
            reason = first_line(err)
        waited = time.monotonic() - started
        if waited + pause > REACHABLE_WITHIN_SECONDS:
            variable = f" (set by {EMULATOR_VARIABLE})" if emulator() else ""
            raise StorageError(f"{path}: cannot reach the storage endpoint {address}{variable}: {reason} "
                               f"({tries} tries over {waited:.0f} s); check the network and the address, then run "
                               "the same command again")
        time.sleep(pause)
        pause *= 2


# --- queries -------------------------------------------------------------------------------------


def exists(path: str) -> bool:
    fs, fs_path = filesystem(path)
    return fs.exists(fs_path)


def isdir(path: str) -> bool:
    fs, fs_path = filesystem(path)
    return fs.isdir(fs_path)


def isfile(path: str) -> bool:
    fs, fs_path = filesystem(path)
    return fs.isfile(fs_path)


def listdir(path: str) -> list[str]:
    """The names (not paths) in a folder, sorted; [] when it does not exist."""
    fs, fs_path = filesystem(path)
    if not fs.isdir(fs_path):
        return []
    return sorted({name(entry) for entry in fs.ls(fs_path, detail=False)} - {""})


def glob(pattern: str) -> list[str]:
    """The paths a glob matches, sorted, spelled like the pattern (URLs stay URLs)."""
    fs, fs_pattern = filesystem(pattern)
    return sorted(_url(fs, match) for match in fs.glob(fs_pattern))


def size(path: str) -> int:
    fs, fs_path = filesystem(path)
    return int(fs.size(fs_path))


# --- reading and writing -------------------------------------------------------------------------


def open(path: str, mode: str = "rb", **kwargs):  # noqa: A001 (the module is used as storage.open)
    """A file object for any path; a folder for writing is created first when the filesystem has folders."""
    if any(m in mode for m in "wa") and not is_remote(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return fsspec.open(str(path), mode, **kwargs).open()


def read_bytes(path: str) -> bytes:
    fs, fs_path = filesystem(path)
    try:
        return fs.cat_file(fs_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> str:
    """Write a whole file so that a reader sees the old file or the new one, never half of one:
    locally a temporary file renamed over the target; an object store's upload is atomic already."""
    fs, fs_path = filesystem(path)
    if protocol_of(fs) == "file":
        temporary = f"{fs_path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(fs_path)), exist_ok=True)
            with builtins.open(temporary, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, fs_path)
        except OSError as err:
            if os.path.exists(temporary):  # what did fit is no use to anyone and holds the space
                os.remove(temporary)
            raise write_error(path, err) from None
    else:
        try:
            fs.pipe_file(fs_path, data)
        except StorageError:
            raise
        except Exception as err:  # noqa: BLE001 - gcsfs raises HttpError, aiohttp errors and OSErrors alike
            raise write_error(path, err) from None
    return str(path)


def append_line(path: str, line: str) -> None:
    """Append one line to a local file with one write call, so that a crash or a full disk leaves
    whole lines, or at most one torn last line (which read_metrics drops), never a line split."""
    data = line.encode("utf-8")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):  # the disk filled within the line
            raise OSError(errno.ENOSPC, f"No space left on device (wrote {written} of {len(data)} bytes)")
    except OSError as err:
        raise write_error(path, err) from None


def create_exclusive(path: str, data: bytes) -> bool:
    """Create a file only if none exists (on a bucket: an upload conditional on the object's
    generation being 0), so that of two writers exactly one succeeds. False if it existed."""
    fs, fs_path = filesystem(path)
    try:
        if protocol_of(fs) == "file":
            os.makedirs(os.path.dirname(os.path.abspath(fs_path)), exist_ok=True)
        fs.pipe_file(fs_path, data, mode="create")
    except FileExistsError:
        return False
    except Exception as err:  # noqa: BLE001 - a full disk, a lost bucket: see write_bytes
        if protocol_of(fs) == "file" and os.path.exists(fs_path) and os.path.getsize(fs_path) < len(data):
            os.remove(fs_path)  # a half-written file would read as a lock of nobody's
        raise write_error(path, err) from None
    forget_listings()
    return True


def write_text(path: str, text: str) -> str:
    return write_bytes(path, text.encode("utf-8"))


def makedirs(path: str) -> None:
    """Create a folder (and its parents); object stores have no folders, so there it does nothing."""
    fs, fs_path = filesystem(path)
    if protocol_of(fs) in ("file", "memory"):
        try:
            fs.makedirs(fs_path, exist_ok=True)
        except OSError as err:
            raise write_error(path, err) from None


def rm(path: str) -> None:
    fs, fs_path = filesystem(path)
    fs.rm(fs_path)


def move(source: str, target: str) -> None:
    """Move a file or folder (every object under the prefix, on a bucket) to another path."""
    fs, source_path = filesystem(source)
    _, target_path = filesystem(target)
    fs.mv(source_path, target_path, recursive=True)
    forget_listings()


def rm_tree(path: str) -> None:
    """Delete a folder and everything under it (every object under the prefix, on a bucket)."""
    fs, fs_path = filesystem(path)
    if fs.exists(fs_path):
        fs.rm(fs_path, recursive=True)
    forget_listings()
    if fs.exists(fs_path):
        raise StorageError(f"{path}: could not delete everything in it")


def copy_to_local(path: str, local_dir: str) -> str:
    """Download a remote folder (or file) into local_dir; returns the local path. A local path is
    returned as it is."""
    if not is_remote(path):
        return str(path)
    fs, fs_path = filesystem(path)
    target = os.path.join(local_dir, name(path))
    if fs.isdir(fs_path):
        os.makedirs(target, exist_ok=True)
        for entry in fs.ls(fs_path, detail=False):
            if fs.isfile(entry):
                fs.get_file(entry, os.path.join(target, name(entry)))
    else:
        fs.get_file(fs_path, target)
    return target


# --- TensorBoard event files ---------------------------------------------------------------------


class RewriteOnFlush:
    """A write-only file on an object store: what was written is uploaded, whole, at every flush
    (an object cannot be appended to). TensorBoard event files of scalars stay small. It has no
    fileno, so tensorboardX does not try to fsync it."""

    def __init__(self, path: str):
        self.path = path
        self.buffer = io.BytesIO()
        self.uploaded = -1
        self.closed = False

    def write(self, data) -> int:
        return self.buffer.write(data)

    def flush(self) -> None:
        if not self.closed and self.buffer.tell() != self.uploaded:
            write_bytes(self.path, self.buffer.getvalue())
            self.uploaded = self.buffer.tell()

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


class _EventFileFactory:
    def open(self, path: str):
        return RewriteOnFlush(path)

    def directory_check(self, path: str) -> None:
        makedirs(path)


def tensorboard_writer_factory(path: str) -> None:
    """Make tensorboardX write event files under `path`'s protocol through fsspec (its own gs://
    writer uses google-cloud-storage's client and credentials, its memory:// none at all)."""
    if not is_remote(path):
        return
    from tensorboardX import record_writer

    record_writer.register_writer_factory(protocol(path), _EventFileFactory())


configure()
