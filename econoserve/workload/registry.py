"""The dataset registry: every data and tokenizer file, its public source, sha256 and licence.

The registry itself is ``data/registry.toml`` in the repository (``ECONOSERVE_REGISTRY``
overrides the path). Files are looked up, in order, in

1. the cache directory ``data/cache/`` (``ECONOSERVE_DATA_CACHE`` overrides), where
   :func:`fetch` puts downloads and copies, checked against their sha256;
2. the local mirror directory of the entry's ``mirror``, read in place: ``data`` entries in
   ``ECONOSERVE_DATA_MIRROR``; ``peers`` entries (measured GPU profiles from other projects,
   e.g. ``distserve/profiler-a100-80g.distserve.json``) in ``ECONOSERVE_PEERS_MIRROR``, which
   defaults to the folder ``peers`` beside the data mirror (``$ECONOSERVE_DATA_MIRROR/../peers``).

Nothing here downloads implicitly: :func:`dataset_path` only resolves local files and says how
to get a missing one. :func:`fetch` prefers the mirror (offline, fast) and falls back to the
public URL when the entry's URL serves exactly the registered bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from econoserve.errors import DataError

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
_DEFAULT_REGISTRY = REPOSITORY_ROOT / "data" / "registry.toml"
_DEFAULT_CACHE = REPOSITORY_ROOT / "data" / "cache"
_DOWNLOAD_CHUNK_BYTES = 1 << 20
_DOWNLOAD_TIMEOUT_S = 60.0
MIRRORS: tuple[str, ...] = ("data", "peers")
_MIRROR_VARIABLES = {"data": "ECONOSERVE_DATA_MIRROR", "peers": "ECONOSERVE_PEERS_MIRROR (or ECONOSERVE_DATA_MIRROR)"}


@dataclass(frozen=True)
class DatasetEntry:
    """One registered file (see the header of ``data/registry.toml`` for each field)."""

    name: str
    kind: str
    file: str
    sha256: str
    size_bytes: int
    url: str
    url_is_file: bool
    license: str
    parser: str
    records: int
    origin: str
    mirror: str = "data"
    """Which mirror holds the file: ``data`` or ``peers`` (see :func:`mirror_dir`)."""


@dataclass(frozen=True)
class LocalStatus:
    """Where a registered file is on this machine, if anywhere."""

    entry: DatasetEntry
    path: Path | None
    location: str  # "cache", "mirror" or "missing"


# --------------------------------------------------------------------- registry
def registry_path() -> Path:
    return Path(os.environ.get("ECONOSERVE_REGISTRY", _DEFAULT_REGISTRY))


def load_registry(path: Path | None = None) -> dict[str, DatasetEntry]:
    """All entries of the registry file, by name, in file order."""
    path = path or registry_path()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: dataset registry not found (set ECONOSERVE_REGISTRY)") from None
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{path}: malformed dataset registry: {exc}") from None
    entries = {}
    for name, fields in raw.items():
        try:
            entries[name] = DatasetEntry(name=name, **fields)
        except TypeError as exc:
            raise DataError(f"{path}: entry [{name}]: {exc}") from None
        if entries[name].mirror not in MIRRORS:
            raise DataError(f"{path}: entry [{name}]: mirror must be one of {', '.join(MIRRORS)}")
    return entries


def get_entry(name: str) -> DatasetEntry:
    registry = load_registry()
    if name not in registry:
        raise DataError(f"unknown dataset or tokenizer file {name!r}; registered: {', '.join(registry)}")
    return registry[name]


# --------------------------------------------------------------------- local files
def cache_dir() -> Path:
    return Path(os.environ.get("ECONOSERVE_DATA_CACHE", _DEFAULT_CACHE))


def mirror_dir(mirror: str = "data") -> Path | None:
    """The local mirror folder of ``data`` entries (``ECONOSERVE_DATA_MIRROR``) or ``peers``
    entries (``ECONOSERVE_PEERS_MIRROR``, else ``peers`` beside the data mirror); None if unset."""
    data = os.environ.get("ECONOSERVE_DATA_MIRROR")
    if mirror == "data":
        return Path(data) if data else None
    peers = os.environ.get("ECONOSERVE_PEERS_MIRROR")
    if peers:
        return Path(peers)
    return Path(data).parent / "peers" if data else None


def local_status(entry: DatasetEntry) -> LocalStatus:
    cached = cache_dir() / entry.file
    if cached.is_file():
        return LocalStatus(entry, cached, "cache")
    mirror = mirror_dir(entry.mirror)
    if mirror is not None and (mirror / entry.file).is_file():
        return LocalStatus(entry, mirror / entry.file, "mirror")
    return LocalStatus(entry, None, "missing")


def dataset_path(name: str) -> Path:
    """The local path of a registered file; :class:`DataError` saying how to get it if missing."""
    status = local_status(get_entry(name))
    if status.path is None:
        raise DataError(
            f"{name}: {status.entry.file} is not available locally; run 'econoserve data fetch {name}' "
            f"or set {_MIRROR_VARIABLES[status.entry.mirror]} to a directory that holds it"
        )
    return status.path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_DOWNLOAD_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(name: str) -> Path:
    """Check the local copy of ``name`` against its registered sha256; return its path."""
    path = dataset_path(name)
    entry = get_entry(name)
    actual = file_sha256(path)
    if actual != entry.sha256:
        raise DataError(
            f"{path}: sha256 mismatch for {name}: expected {entry.sha256}, found {actual} "
            f"(corrupt or different file; delete it and fetch again)"
        )
    return path


# --------------------------------------------------------------------- fetching
def fetch(name: str, progress: bool = True) -> Path:
    """Put a verified copy of ``name`` into the cache directory and return its path.

    Copies from the mirror when one holds the file, else downloads from the public URL when that
    URL serves exactly the registered bytes. The file lands under a temporary name and is moved
    into place only after its sha256 matches.
    """
    entry = get_entry(name)
    target = cache_dir() / entry.file
    if target.is_file() and file_sha256(target) == entry.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    mirror = mirror_dir(entry.mirror)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        if mirror is not None and (mirror / entry.file).is_file():
            shutil.copyfile(mirror / entry.file, tmp_path)
            origin = str(mirror / entry.file)
        elif entry.url_is_file:
            _download(entry, tmp_path, progress)
            origin = entry.url
        else:
            raise DataError(
                f"{name}: {entry.file} is a re-packaging of {entry.url} ({entry.origin}); it cannot be "
                f"downloaded byte for byte, so set {_MIRROR_VARIABLES[entry.mirror]} to a directory that holds it"
            )
        actual = file_sha256(tmp_path)
        if actual != entry.sha256:
            raise DataError(
                f"{origin}: sha256 mismatch for {name}: expected {entry.sha256}, found {actual}; not installed"
            )
        tmp_path.replace(target)
        return target
    finally:
        tmp_path.unlink(missing_ok=True)


def _download(entry: DatasetEntry, destination: Path, progress: bool) -> None:
    try:
        with urllib.request.urlopen(entry.url, timeout=_DOWNLOAD_TIMEOUT_S) as response, open(
            destination, "wb"
        ) as out, tqdm(
            total=entry.size_bytes, unit="B", unit_scale=True, desc=entry.name, disable=not progress
        ) as bar:
            for chunk in iter(lambda: response.read(_DOWNLOAD_CHUNK_BYTES), b""):
                out.write(chunk)
                bar.update(len(chunk))
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"{entry.name}: cannot download {entry.url} ({reason}) and no mirror holds {entry.file}; "
            f"set {_MIRROR_VARIABLES[entry.mirror]} to a directory that holds it"
        ) from None
