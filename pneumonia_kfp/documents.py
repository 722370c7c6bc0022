"""The documents the steps hand each other (dataset manifest, checkpoint metadata, per-model result,
results.json): each carries an integer `format`, and a reader meeting a format it does not know says
so in one line naming the file, instead of guessing at missing fields."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pneumonia_kfp.errors import PneumoniaKfpError


class DocumentError(PneumoniaKfpError, ValueError):
    """A document of an unknown or missing format, or missing a field its writer always writes."""


def check_format(doc: Any, kind: str, version: int, where: str) -> Mapping[str, Any]:
    """`doc` as read from `where`, if it is a `kind` document of format `version`; else one line."""
    if not isinstance(doc, Mapping):
        raise DocumentError(f"{where}: not a {kind} document (a JSON object was expected, found "
                            f"{type(doc).__name__}); regenerate it with this version of pneumonia-kfp")
    found = doc.get("format")
    if found != version:
        said = "no format field" if found is None else f"format {found!r}"
        raise DocumentError(f"{where}: {kind} document with {said}, this version reads format {version}; "
                            "regenerate it with this version of pneumonia-kfp (or read it with the version "
                            "that wrote it)")
    return doc


def require(doc: Mapping[str, Any], fields: tuple[str, ...], kind: str, where: str) -> None:
    """Every field the writer always writes is there: a reader never falls back to a default for it."""
    missing = [f for f in fields if f not in doc]
    if missing:
        raise DocumentError(f"{where}: {kind} document lacks {', '.join(missing)}; it was not written by "
                            "this version of pneumonia-kfp, regenerate it")
