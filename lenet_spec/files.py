"""Specs as users name them: a preset's name, JSON text, or a JSON file."""

from __future__ import annotations

import json
from pathlib import Path

from lenet_spec.layers import SpecError
from lenet_spec.presets import PRESETS
from lenet_spec.spec import Spec

SPEC_FILE_LIMIT = 2**20
"""The largest spec file read (a spec of a hundred layers is under 10 KB)."""


def parse_spec_json(text: str, source: str = "<string>") -> Spec:
    """Parse a spec from JSON text; errors name ``source`` (and line and column for bad JSON)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise SpecError(f"{source}: invalid JSON at {where}: {e.msg}") from None
    except RecursionError:
        raise SpecError(f"{source}: JSON nested too deeply") from None
    except ValueError:  # an integer of more digits than Python converts
        raise SpecError(f"{source}: invalid JSON: a number too long to read") from None
    try:
        return Spec.from_dict(data)
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None


def load_spec(name_or_path: str | Path | Spec) -> Spec:
    """A preset by name, or a spec read from a JSON file."""
    if isinstance(name_or_path, Spec):
        return name_or_path
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key]
    path = Path(key)
    if path.is_file():
        try:
            size = path.stat().st_size
            if size > SPEC_FILE_LIMIT:
                raise SpecError(f"{path}: {size:,} bytes; a spec file is a few kilobytes (at "
                                f"most {SPEC_FILE_LIMIT:,} bytes read)")
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"{path}: cannot read spec file: {e}") from None
        return parse_spec_json(text, str(path))
    if path.exists():
        raise SpecError(f"{path}: is not a file")
    if path.suffix or "/" in key or "\\" in key:
        raise SpecError(f"{path}: no such spec file")
    raise SpecError(
        f"unknown spec {key!r}: not a preset ({', '.join(PRESETS)}) nor a path to a JSON file"
    )
