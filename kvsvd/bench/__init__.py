"""Benchmarks: scripts that measure methods side by side in one run and write JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def load_or_measure(path: Path, force: bool, measure: Callable[[], dict]) -> dict:
    """The payload saved at ``path`` (JSON) unless ``force``; else ``measure()``'s, written through a ``.tmp``
    file and renamed, so an interrupted run leaves no partial result and a resumed one skips what is saved."""
    if path.exists() and not force:
        return json.loads(path.read_text())
    payload = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return payload
