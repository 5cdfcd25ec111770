"""Where trials pass files between nodes: a folder (one machine, or a mount every node shares) or an object store.

``storage.path`` is either a folder or a URI that pyarrow opens (``s3://bucket/prefix``, ``gs://...``,
``abfs://...``, ``hdfs://...``; credentials and endpoints from the usual environment, e.g. AWS_ACCESS_KEY_ID,
AWS_ENDPOINT_URL). Everything a trial's remote work reads or writes there goes through a :class:`Store`: the
training data (written by the data task, read by every Ray Train worker), Ray Train's checkpoints and the adapter
(Ray Train persists them itself through the same pyarrow filesystem) and copies of the evaluation records. A
location is a plain string, so it travels in Ray task arguments and Train loop configs: a local path, or the URI.

A folder is used in place (no copies). An object store is reached through local copies: :func:`local_copy`
downloads a location into a temporary folder on the node that needs it; :meth:`Store.upload` sends a local folder.
The sweep's own state (Tune experiment, Optuna study, MLflow database, trial configs) lives on the head, which runs
every trial's driver: see docs/CLUSTER.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")  # what pyarrow.fs.FileSystem.from_uri opens


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a synced temporary file in the same folder and a rename (never half-written)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def uri_problem(location: str) -> str | None:
    """Why ``location`` is not a URI crl_ray can use (None when it is): an unknown scheme or no bucket."""
    scheme, _, rest = str(location).partition("://")
    if scheme not in SCHEMES:
        return f"unknown scheme {scheme!r}; supported: {', '.join(s + '://' for s in SCHEMES)} or a folder"
    if not rest.strip("/"):
        return "no bucket or path after the scheme"
    return None


def join(location: str | Path, *parts: str) -> str:
    """``location`` / parts, for folders and URIs alike."""
    text = str(location)
    for part in parts:
        text = text.rstrip("/") + "/" + str(part).strip("/")
    return text


def parent(location: str | Path) -> str | Path:
    """The folder holding ``location`` (a Path stays a Path)."""
    if isinstance(location, Path):
        return location.parent
    return str(location).rstrip("/").rsplit("/", 1)[0]


class Store:
    """One storage location (folder or URI) and the few file operations trials need there."""

    def __init__(self, location: str | Path) -> None:
        import pyarrow.fs as pafs

        self.location = str(location)
        self.remote = is_uri(location)
        if self.remote:
            self.fs, self.root = pafs.FileSystem.from_uri(self.location)
            self.root = self.root.rstrip("/")
        else:
            self.fs = pafs.LocalFileSystem()
            self.root = str(Path(location).expanduser().resolve())
            self.location = self.root

    def __reduce__(self):  # pyarrow filesystems pickle, but re-opening from the location is simpler and portable
        return (Store, (self.location,))

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    # ------------------------------------------------------------------------------------ names
    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` (what ``self.fs`` takes; no scheme)."""
        return join(self.root, *parts) if parts else self.root

    def uri(self, *parts: str) -> str:
        """The location of ``parts``: a local path, or the URI with its scheme."""
        return join(self.location, *parts) if parts else self.location

    def child(self, *parts: str) -> Store:
        return Store(self.uri(*parts))

    def located(self, *parts: str) -> str | Path:
        """The location of ``parts`` as callers pass it on: a Path for a folder store, the URI for an object
        store."""
        return self.uri(*parts) if self.remote else Path(self.path(*parts))

    # ------------------------------------------------------------------------------------ files
    def exists(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def is_file(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(*parts)).type == pafs.FileType.File

    def read_text(self, *parts: str) -> str:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read().decode("utf-8")

    def write_text(self, text: str, *parts: str) -> None:
        """Write a small file (an object store writes it whole; a folder through :func:`atomic_write`)."""
        target = self.path(*parts)
        if not self.remote:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(Path(target), text.encode("utf-8"))
            return
        with self.fs.open_output_stream(target) as f:
            f.write(text.encode("utf-8"))

    def delete(self, *parts: str) -> None:
        """Remove a file or a folder; nothing there is fine."""
        import pyarrow.fs as pafs

        target = self.path(*parts)
        kind = self.fs.get_file_info(target).type
        if kind == pafs.FileType.File:
            self.fs.delete_file(target)
        elif kind == pafs.FileType.Directory:
            self.fs.delete_dir(target)

    def list(self, *parts: str) -> list[str]:
        """Names directly under ``parts`` (files and folders; [] when there is nothing)."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path(*parts), allow_not_found=True))
        return sorted(info.base_name for info in infos)

    def upload(self, local: Path, *parts: str) -> str:
        """Copy the local folder ``local`` to ``parts`` (replacing what was there); returns its location."""
        import pyarrow.fs as pafs

        target = self.path(*parts)
        self.delete(*parts)
        if self.remote:
            pafs.copy_files(str(Path(local).resolve()), target, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(local, target)
        return self.uri(*parts)

    def download(self, local: Path, *parts: str) -> Path:
        """Copy the file or folder at ``parts`` to ``local``; returns ``local``. Object stores have no folders
        (only keys with slashes), so every file's folder is created here."""
        import pyarrow.fs as pafs

        local = Path(local)
        if local.exists():
            shutil.rmtree(local) if local.is_dir() else local.unlink()
        source = self.path(*parts)
        kind = self.fs.get_file_info(source).type
        if kind == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{self.uri(*parts)} does not exist")
        if kind == pafs.FileType.File:
            files = [(source, local)]
        else:
            local.mkdir(parents=True)
            infos = self.fs.get_file_info(pafs.FileSelector(source, recursive=True))
            files = [(info.path, local / info.path[len(source):].lstrip("/")) for info in infos
                     if info.type == pafs.FileType.File]
        for remote, target in files:
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(remote) as f, open(target, "wb") as out:
                shutil.copyfileobj(f, out, length=1 << 22)
        return local


def fetch(location: str | Path, local: Path) -> Path:
    """A local path with the contents of ``location``: the folder itself for a folder store, else a copy in
    ``local`` (replaced if it exists)."""
    if not is_uri(location):
        return Path(location)
    return Store(location).download(local)


@contextlib.contextmanager
def local_copy(location: str | Path | None) -> Iterator[Path | None]:
    """``location`` as a local path for the duration of the block: the folder itself, or a temporary download
    removed afterwards (None stays None)."""
    if location is None or not is_uri(location):
        yield None if location is None else Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="crl_ray_fetch_") as tmp:
        yield Store(location).download(Path(tmp) / Path(str(location).rstrip("/")).name)
