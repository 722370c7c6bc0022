"""The ingest index: git's index for ingest, kept in the store under ``ingest-index/``.

Re-ingesting unchanged data reads no file: a file whose size, times and inode are those recorded
keeps its recorded sha256 (its content decides whenever they change; an s3:// source is judged by
ETag), and a version's objects are checked the same way against the store's own stat or ETag. Only a
cache: whatever does not match is read and hashed again.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

from pneumonia_kfp.image_reader import FileResult
from pneumonia_kfp.manifest import Manifest, canonical_json
from pneumonia_kfp.sources import ImageFile, LocalSource
from pneumonia_kfp.storage import Store

log = logging.getLogger(__name__)
FORMAT = 2
# a file changed this close before the scan may change again within the same clock tick, unseen by
# its stat: its hash is not cached (git's "racy" entries)
RACY_NS = 100_000_000


@dataclass
class Index:
    """Per source, {relpath: [*stat, sha256]} of its files; for the whole store, {key: stat or ETag} of
    the objects whose sha256 was last verified."""

    store: Store
    key: str
    files: dict = field(default_factory=dict)
    objects: dict = field(default_factory=dict)
    dirty: set = field(default_factory=set)

    OBJECTS = "ingest-index/objects.json"

    @classmethod
    def load(cls, root: Store, source_uri: str) -> Index:
        index = cls(root, f"ingest-index/{hashlib.sha256(source_uri.encode()).hexdigest()[:16]}.json")
        index.files, index.objects = index._read(index.key), index._read(cls.OBJECTS)
        return index

    def _read(self, key: str) -> dict:
        try:
            if self.store.exists(key):
                saved = json.loads(self.store.get_bytes(key))
                if saved.get("format") == FORMAT:  # a cache: another format is started again, not an error
                    return saved["entries"]
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("ingest index %s is unreadable: starting it again", self.store.uri_of(key))
        return {}

    def known(self, files: list[ImageFile], source) -> list[str | None]:
        """Each file's sha256 from the cache (a name that cannot be read: its reason); None: read it."""
        out = []
        for f in files:
            if f.problem:
                out.append(f"!{f.problem}")
                continue
            sig, cached = source.signature(f), self.files.get(f.relpath)
            out.append(cached[-1] if sig is not None and cached and list(sig) == cached[:-1] else None)
        return out

    def record(self, files: list[ImageFile], results: list[FileResult], source, scan_start: int) -> None:
        for f, r in zip(files, results, strict=True):
            sig = source.signature(f, r)
            racy = isinstance(source, LocalSource) and sig is not None and max(sig[1], sig[2]) > scan_start - RACY_NS
            if r.sha and sig is not None and not racy:
                self.files[f.relpath] = [*sig, r.sha]
            else:
                self.files.pop(f.relpath, None)
        self.dirty.add(self.key)

    def damaged(self, root: Store, sha: str, manifest: Manifest, current: dict) -> list[str]:
        """Keys of the version's objects that are missing or whose bytes are not the manifest's sha256;
        an object whose stat (or ETag) is the one recorded when it was last verified is not read."""
        bad = []
        for name, want in manifest["objects"].items():
            key = f"datasets/{sha}/{name}"
            sig = current.get(key)
            if sig is None:
                bad.append(key)
            elif self.objects.get(key) != list(sig):
                if root.sha256(key) == want:
                    self.verified(key, sig)
                else:
                    bad.append(key)
        return bad

    def verified(self, key: str, signature) -> None:
        """Record that the object ``key``, as its ``signature`` shows it now, has been checked."""
        if self.objects.get(key) != list(signature):
            self.objects[key] = list(signature)
            self.dirty.add(self.OBJECTS)

    def verified_now(self, root: Store, sha: str, manifest: Manifest) -> None:
        """Record the signatures of a version's objects, just written and hashed as they were."""
        current = root.signatures(f"datasets/{sha}")
        for name in [*manifest["objects"], "manifest.json"]:
            key = f"datasets/{sha}/{name}"
            if key in current:
                self.verified(key, current[key])

    def save(self) -> None:
        for key in sorted(self.dirty):
            entries = self.objects if key == self.OBJECTS else self.files
            self.store.put_chunks(key, canonical_json({"format": FORMAT, "entries": entries}))
        self.dirty.clear()
