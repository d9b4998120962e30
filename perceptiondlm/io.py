"""Small file helpers shared by loading, processing and evaluation: JSON reading with clear errors, and
atomic writes (temporary file + rename), so an interrupted job never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from perceptiondlm.errors import PerceptionDLMError


def read_json(path: Path, what: str) -> Any:
    """Parsed JSON of `path`; a missing or malformed file raises naming the file and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise PerceptionDLMError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PerceptionDLMError(f"{what} is not valid JSON: {path} ({err})") from err


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` atomically (indented, UTF-8, a final newline)."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
