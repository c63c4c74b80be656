"""Reading the JSON files a user may hand us (manifest.json, calibration.json, UNet and scheduler
configs, the stage ledger): one reader, one-line errors.

`read_json` turns every way a file can be unreadable (missing, not UTF-8, not JSON, nested
deep enough to exhaust the parser, a top level of the wrong type) into an AdpdmError naming
the file. `JsonFields` reads typed fields from a decoded object, so a wrong type anywhere
(a string in a group table, a list where an object belongs) is one line naming the field,
never a TypeError or KeyError from deep inside the code that uses it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from engines.errors import AdpdmError


def read_json(path: str | os.PathLike, what: str, kind: type = dict) -> Any:
    """The decoded JSON of `path` (of type `kind`; dict by default), or one AdpdmError line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AdpdmError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise AdpdmError(f"{what} {path} is a folder, not a file") from None
    except UnicodeDecodeError:
        raise AdpdmError(f"{what} {path} is not UTF-8 text") from None
    except OSError as e:
        raise AdpdmError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdpdmError(f"{what} is not valid JSON: {path} ({e})") from None
    except RecursionError:
        raise AdpdmError(f"{what} {path} nests too deeply to be a valid file") from None
    if kind is not None and not isinstance(doc, kind):
        raise AdpdmError(f"{what} {path} must hold a JSON {_kind_name(kind)}, got {_kind_name(type(doc))}")
    return doc


def _kind_name(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean",
            type(None): "null"}.get(kind, kind.__name__)


class JsonFields:
    """Typed access to the fields of one decoded JSON object; errors name `where` and the field."""

    def __init__(self, d: Any, where: str, prefix: str = ""):
        if not isinstance(d, Mapping):
            raise AdpdmError(f"{prefix}{where} must be an object, got {_kind_name(type(d))}")
        self.d, self.where, self.prefix = d, where, prefix

    def _fail(self, key: str, message: str) -> AdpdmError:
        return AdpdmError(f"{self.prefix}{self.where}.{key} {message}")

    def get(self, key: str, kind: Any, optional: bool = False, default: Any = None) -> Any:
        if key not in self.d or self.d[key] is None:
            if optional:
                return default
            raise self._fail(key, "is missing")
        v = self.d[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if bool in kinds or not isinstance(v, bool):  # bool is an int subclass: only accept it where asked
            if isinstance(v, kinds):
                return v
        raise self._fail(key, f"must be {'/'.join(_kind_name(k) for k in kinds)}, got {_kind_name(type(v))}")

    def int_(self, key: str, optional: bool = False, default: Any = None, minimum: Optional[int] = None) -> Any:
        v = self.get(key, int, optional, default)
        if v is not None and minimum is not None and v < minimum:
            raise self._fail(key, f"must be >= {minimum}, got {v}")
        return v

    def str_(self, key: str, optional: bool = False, default: Any = None) -> Any:
        return self.get(key, str, optional, default)

    def int_list(self, key: str, length: Optional[int] = None, minimum: Optional[int] = None) -> list[int]:
        v = self.get(key, list)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise self._fail(key, "must be a list of integers")
        if length is not None and len(v) != length:
            raise self._fail(key, f"must have {length} entries, got {len(v)}")
        if minimum is not None and any(x < minimum for x in v):
            raise self._fail(key, f"entries must be >= {minimum}")
        return list(v)

    def str_map(self, key: str) -> dict[str, str]:
        v = self.get(key, dict)
        if not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
            raise self._fail(key, "must map names to file names")
        return dict(v)

    def objects(self, key: str) -> list["JsonFields"]:
        """A list of objects, each as JsonFields (`key[i]` in errors)."""
        v = self.get(key, list)
        return [JsonFields(x, f"{self.where}.{key}[{i}]", self.prefix) for i, x in enumerate(v)]

    def obj(self, key: str, optional: bool = False) -> Optional["JsonFields"]:
        v = self.get(key, dict, optional)
        return None if v is None else JsonFields(v, f"{self.where}.{key}", self.prefix)
