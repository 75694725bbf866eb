"""Getting an exported model folder onto a worker node, verified.

* **shared**: the folder is at the same path on every node (NFS, a baked image):
  the worker reads it in place.
* **ship**: the driver reads the folder once and puts its files into Ray's object
  store in 64 MiB chunks (:func:`pack`); on each node the first worker copies them
  into the node's cache, ``<cpuflow cache>/models/<manifest sha256>/`` (the
  others wait on a file lock and find it there), through a staging folder that is
  renamed into place only after every file matched the manifest's sha256.
* **uri**: the same, but each node fetches a tar archive of the folder (``file://``,
  ``http://``, ``https://``; plain or gzip) instead of the driver sending it
  (:func:`fetch_uri`). The driver still reads the defaults from its own copy, and
  the archive must hold the same export (its manifest's sha256 is checked).

Either way the worker loads with ``verify="sha256"`` and checks that the folder's
manifest is byte-for-byte the driver's (its sha256): a node never runs a model
other than the one the driver named.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from ..errors import IntegrityError, ModelError

CHUNK = 64 * 1024 * 1024


def manifest_sha256(model_dir: Path) -> str:
    from ..manifest import MANIFEST_NAME
    return hashlib.sha256((Path(model_dir) / MANIFEST_NAME).read_bytes()).hexdigest()


def model_files(model_dir: Path) -> list[str]:
    """The manifest and every file it lists (relative paths)."""
    from ..manifest import MANIFEST_NAME, load_manifest
    m = load_manifest(model_dir, verify="size")
    return [MANIFEST_NAME, *sorted(m.files)]


def pack(model_dir: Path, put) -> dict[str, list]:
    """relpath -> list of object refs (``put(bytes)``), 64 MiB a chunk."""
    out: dict[str, list] = {}
    for rel in model_files(model_dir):
        refs = []
        with open(Path(model_dir) / rel, "rb") as f:
            while True:
                data = f.read(CHUNK)
                if not data:
                    break
                refs.append(put(data))
        out[rel] = refs
    return out


def shared_ok(model_dir: str, sha: str) -> bool:
    """True when this node sees the driver's folder at the same path (same manifest)."""
    try:
        return manifest_sha256(Path(model_dir)) == sha
    except OSError:
        return False


def node_cache_dir() -> Path:
    from ..backends.cache import default_cache_dir, ensure_private_dir
    return ensure_private_dir(default_cache_dir() / "models")


def unpack(files: dict[str, list], sha: str, get) -> Path:
    """Copy a shipped model into this node's cache once (``get(ref) -> bytes``); return its folder."""
    def fill(staging: Path) -> Path:
        for rel, refs in files.items():
            dest = (staging / rel).resolve()
            if staging.resolve() not in dest.parents:
                raise ModelError(f"shipped model file {rel!r} leaves the model folder")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "wb") as f:
                for ref in refs:
                    f.write(get(ref))
                f.flush()
                os.fsync(f.fileno())
        return staging
    return _install(sha, fill)


def fetch_uri(uri: str, sha: str) -> Path:
    """Fetch a tar archive of the model folder into this node's cache once; return its folder."""
    import tarfile
    import urllib.parse
    import urllib.request

    def fill(staging: Path) -> Path:
        scheme = urllib.parse.urlparse(uri).scheme
        if scheme not in ("file", "http", "https"):
            raise ModelError(f"model URI {uri!r}: only file://, http:// and https:// archives are supported")
        staging.mkdir(parents=True)
        archive = staging / ".archive"
        try:
            with urllib.request.urlopen(uri, timeout=60) as r, open(archive, "wb") as f:   # noqa: S310 (scheme checked)
                shutil.copyfileobj(r, f, CHUNK)
        except OSError as e:
            raise ModelError(f"cannot fetch the model from {uri}: {e}") from None
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(staging / "x", filter="data")   # no links out, no absolute paths, no devices
        except (tarfile.TarError, OSError) as e:
            raise ModelError(f"{uri} is not a readable tar archive of a model folder: {e}") from None
        archive.unlink()
        found = [p.parent for p in (staging / "x").rglob(MANIFEST)]
        if len(found) != 1:
            raise ModelError(f"{uri} must hold one exported model folder (one {MANIFEST}), found {len(found)}")
        return found[0]
    return _install(sha, fill)


MANIFEST = "cpuflow.json"


def _install(sha: str, fill) -> Path:
    """Run ``fill(staging) -> folder`` once per node under a lock, check the folder is
    the driver's model (manifest sha256, then every file's sha256), rename it into place."""
    import fcntl

    from ..manifest import load_manifest
    cache = node_cache_dir()
    final = cache / sha
    with open(cache / f"{sha}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # one copy per node; the others wait here
        if final.is_dir() and shared_ok(str(final), sha):
            return final
        staging = cache / f".{sha}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            folder = fill(staging)
            if manifest_sha256(folder) != sha:
                raise IntegrityError("the fetched model's manifest is not the driver's "
                                     "(a different export, or damaged in transfer)")
            load_manifest(folder, verify="sha256")    # every file against its recorded sha256
            shutil.rmtree(final, ignore_errors=True)
            os.replace(folder, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final
