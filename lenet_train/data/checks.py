"""Checksums: what the official digests (and the cache's manifest) say about the files of a
split, and the manifest the cache keeps of what it wrote."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lenet_train.data.catalog import (
    DATASETS,
    MANIFEST,
    MNIST_MD5,
    TFDS_SHA256,
    DataError,
    Dataset,
)
from lenet_util import atomic_write_bytes


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _others_with(name: str, digest: str, file: str) -> str | None:
    """The other dataset whose official file ``file`` has this digest, if any."""
    for other, table in TFDS_SHA256.items():
        if other != name and table.get(file) == digest:
            return DATASETS[other].title
    if name != "mnist" and MNIST_MD5.get(file) == digest:
        return "MNIST"
    return None


UNOFFICIAL = "an archive that is not the official one"
"""How a manifest's ``_source`` begins for files extracted from such an archive."""


class Checks:
    """What the official checksums said about the files of one split."""

    def __init__(self, dataset: Dataset, manifest: dict[str, str] | None) -> None:
        self.dataset = dataset
        self.manifest = manifest
        self.states: list[str] = []
        self.digests: dict[str, str] = {}

    def file(self, path: Path, compressed: bytes | None, raw: bytes, official_size: bool,
             canonical: str) -> None:
        """Check one file (``canonical``: its name without .gz); raises on a mismatch."""
        d = self.dataset
        # only the digests this file needs: hashing is a visible part of a run's start-up
        md5 = hashlib.md5(raw).hexdigest() if d.format == "idx" and official_size else ""
        gz_sha = sha256(compressed) if compressed is not None and d.name != "mnist" else ""
        other = ((_others_with(d.name, md5, canonical) if md5 else None)
                 or (_others_with(d.name, gz_sha, f"{canonical}.gz") if gz_sha else None))
        if other is not None:
            raise DataError(f"{path}: is {other}'s {canonical}, not the official {d.title} "
                            f"(point --data-dir at the {d.title} files)")
        listed = self.manifest is not None and canonical in self.manifest
        sha = sha256(raw) if listed or not md5 else ""
        self.digests[canonical] = sha or md5  # what stats.json is keyed by
        if listed:
            if self.manifest[canonical] != sha:
                raise DataError(f"{path}: does not match the SHA-256 the cache recorded when it "
                                "wrote it (damaged; delete the folder to fetch it again)")
            unofficial = str(self.manifest.get("_source", "")).startswith(UNOFFICIAL)
            self.states.append("unofficial" if unofficial else "manifest")
            return
        if not official_size:
            self.states.append("subset")
            return
        if d.name == "mnist":
            if md5 != MNIST_MD5[canonical]:
                raise DataError(f"{path}: has the size of the official MNIST file but not its "
                                f"MD5 {MNIST_MD5[canonical]} (corrupted or modified; delete it "
                                "to fetch a fresh copy)")
            self.states.append("official")
            return
        official = TFDS_SHA256.get(d.name, {}).get(f"{canonical}.gz")
        if gz_sha and official is not None:
            if gz_sha != official:
                raise DataError(f"{path}: has the size of the official {d.title} file but not "
                                f"its SHA-256 {official} (TFDS's checksum of the publisher's "
                                f"file): not the official {d.title}")
            self.states.append("official")
            return
        self.states.append("unverified")

    def summary(self) -> str:
        s = set(self.states)
        if s == {"official"}:
            return "verified: the official checksums"
        if s == {"manifest"}:
            return "verified: the cache's manifest"
        if "unofficial" in s:
            return ("unverified: extracted from an archive that is not the official one (the "
                    "files are as extracted)")
        if "subset" in s:
            return "not checked: not the official number of records"
        return ("unverified: no official checksum for these files (the publisher's are of "
                "the compressed files)")


def stamp(path: Path) -> str:
    """The archive's path, size and modification time: extracted once until it changes."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def write_manifest(folder: Path, digests: dict[str, str], source: str | None) -> None:
    """Record the SHA-256 of the files just written to the cache ``folder``, and their source."""
    path = folder / MANIFEST
    manifest = read_manifest(folder) or {}
    manifest.update(digests)
    if source is not None:
        manifest["_source"] = source
        manifest.pop("_archive", None)
    atomic_write_bytes(path, json.dumps(manifest, indent=1, sort_keys=True).encode())


def read_manifest(folder: Path) -> dict[str, str] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); delete it") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a manifest; delete it")
    return data
