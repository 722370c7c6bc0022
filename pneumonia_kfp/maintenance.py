"""Keeping a store sound: ``verify`` (every object against its manifest) and ``gc`` (what no version uses).

Writers never delete what another writer may still need (see ``ingest``), so objects nobody
references pile up: packs of a writer that lost the race to publish, a killed ingest's objects,
a repaired version's damaged ones, and the uploads killed writers never finished (``.partial-*``
files, incomplete multipart uploads). ``gc`` removes them, but only those older than a grace period:
a writer still running has written its objects more recently than that, and it publishes them.
Published manifests are never removed, nor anything they reference, nor a version whose manifest
cannot be read (gc cannot know what it references).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from pneumonia_kfp import manifest as manifests
from pneumonia_kfp.documents import DocumentError
from pneumonia_kfp.errors import PneumoniaKfpError
from pneumonia_kfp.manifest import IntegrityError, Manifest, repair_hint
from pneumonia_kfp.storage import StorageError, Store, open_store

DATASETS = "datasets"
MANIFEST = manifests.NAME
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class DurationError(PneumoniaKfpError):
    pass


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``7d``, ``1w`` or plain seconds, as seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise DurationError(f"duration {text!r}: use a number with s, m, h, d or w (e.g. 1d, 12h, 90s)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _versions(keys) -> dict[str, list[str]]:
    """{sha: [its keys]} of ``datasets/<sha>/...`` keys."""
    out: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[0] == DATASETS:
            out.setdefault(parts[1], []).append(key)
    return out


def _manifest(store: Store, sha: str) -> Manifest:
    """A version's manifest, checked against its own checksum and its format; IntegrityError or
    DocumentError (one line naming it) when it cannot be trusted."""
    manifest = manifests.load(store, f"{DATASETS}/{sha}/{MANIFEST}")
    if manifest is None:
        raise IntegrityError(f"{store.uri_of(f'{DATASETS}/{sha}/{MANIFEST}')} is missing")
    return manifest


# --- gc ------------------------------------------------------------------------------------------------

@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)  # objects, partial files and aborted uploads (keys)
    kept_young: int = 0  # unreferenced, but younger than the grace period
    skipped: list[str] = field(default_factory=list)  # one line per version left alone, and why


def gc(storage: str, older_than: float, dry_run: bool = False, now: float | None = None) -> GcReport:
    """Remove the objects under ``datasets/`` that no published manifest references, and unfinished
    uploads anywhere in the store, of those older than ``older_than`` seconds. Safe while ingests
    run, as long as none runs longer than the grace period."""
    store = open_store(storage)
    cutoff = (time.time() if now is None else now) - older_than
    report = GcReport()
    modified = store.modified(DATASETS)  # listed before the manifests are read, so none is missed
    for sha, keys in sorted(_versions(modified).items()):
        manifest_key = f"{DATASETS}/{sha}/{MANIFEST}"
        referenced = _referenced(store, sha, report)  # read after the listing
        if referenced is None:
            continue
        for key in keys:
            if key == manifest_key or key.split("/", 2)[2] in referenced:
                continue
            if modified[key] >= cutoff:
                report.kept_young += 1
                continue
            if not dry_run:
                store.delete(key)
            report.removed.append(key)
    for upload in store.unfinished():
        if upload.started < cutoff:
            if not dry_run:
                store.discard(upload)
            report.removed.append(upload.key + (f" (upload {upload.upload_id})" if upload.upload_id else ""))
        else:
            report.kept_young += 1
    return report


def _referenced(store: Store, sha: str, report: GcReport) -> set[str] | None:
    """Names in a version that its published manifest references; None: leave the version alone."""
    if not store.exists(f"{DATASETS}/{sha}/{MANIFEST}"):
        return set()  # unpublished: an ingest that failed, was killed, or (younger) is still writing
    try:
        return set(_manifest(store, sha)["objects"])
    except (IntegrityError, DocumentError, StorageError) as e:
        report.skipped.append(f"{store.uri_of(f'{DATASETS}/{sha}')}: left alone, {e}")
        return None


# --- verify --------------------------------------------------------------------------------------------

@dataclass
class VerifyReport:
    versions: int = 0  # published versions checked
    objects: int = 0  # objects checked
    problems: list[str] = field(default_factory=list)  # one line each, saying what to do
    notes: list[str] = field(default_factory=list)  # not problems: what gc would remove, and such


def verify(storage: str, version: str | None = None) -> VerifyReport:
    """Check every published version (or only ``version``): its manifest against its own checksum, and
    every object it references against the sha256 it gives, by reading it whole."""
    store = open_store(storage)
    report = VerifyReport()
    listed = store.modified(DATASETS if version is None else f"{DATASETS}/{version}")
    versions = _versions(listed)
    if version is not None and f"{DATASETS}/{version}/{MANIFEST}" not in listed:
        known = sorted(sha for sha, keys in _versions(store.modified(DATASETS)).items()
                       if f"{DATASETS}/{sha}/{MANIFEST}" in keys)
        raise StorageError(f"{store.uri_of(f'{DATASETS}/{version}')} is no published dataset version (no "
                           f"{MANIFEST}); published: {', '.join(known) or 'none'}")
    unreferenced = 0
    for sha, keys in sorted(versions.items()):
        if f"{DATASETS}/{sha}/{MANIFEST}" not in keys:
            unreferenced += len(keys)
            continue
        report.versions += 1
        uri = store.uri_of(f"{DATASETS}/{sha}")
        try:
            manifest = _manifest(store, sha)
        except (IntegrityError, DocumentError) as e:
            report.problems.append(str(e))  # it says how to repair it
            continue
        hint = repair_hint(uri, manifest)
        for name, want in sorted(manifest["objects"].items()):
            key = f"{DATASETS}/{sha}/{name}"
            report.objects += 1
            if key not in listed:
                report.problems.append(f"{store.uri_of(key)} is missing. {hint}")
                continue
            got = store.sha256(key)
            if got != want:
                report.problems.append(f"{store.uri_of(key)} is damaged: its sha256 is {got[:16]}..., the manifest "
                                       f"says {want[:16]}.... {hint}")
        packs = {e["pack"] for e in manifest["files"]} - set(manifest["objects"])
        for pack in sorted(packs):
            report.problems.append(f"{uri}/{MANIFEST} names the pack {pack}, which it gives no sha256: {hint}")
        unreferenced += sum(1 for k in keys if k.split("/", 2)[2] not in manifest["objects"]
                            and not k.endswith(f"/{MANIFEST}"))
    if not report.versions:  # a mistyped --storage finds nothing: say so rather than pass quietly
        report.notes.append(f"{store.uri} holds no published dataset version")
    unfinished = len(store.unfinished()) if version is None else 0
    if unreferenced or unfinished:
        report.notes.append(f"{unreferenced} object(s) no published version references and {unfinished} unfinished "
                            f"upload(s) (an ingest in flight, killed or superseded): `pneumonia-kfp gc --storage "
                            f"{storage} --older-than 1d` removes those older than a day")
    return report

