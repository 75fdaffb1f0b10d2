"""models.yaml from disk to a YAML document: every way the file can be unreadable is a ConfigError
naming the problem, and the file by its name only (reload errors go to HTTP clients: the folders
are the operator's business). utils/config/settings.py validates what is in it.

A mapping that names a key twice is refused, at every level, naming the key and both lines: YAML
itself keeps the last one silently (a second `flux:` turned flux into a text model).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from utils.errors import ConfigError

_MERGE_TAG = "tag:yaml.org,2002:merge"


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys in a mapping (merge keys `<<:` excepted: their
    keys may be overridden, that is what they are for)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:  # an unhashable key: SafeLoader says so below
                    continue
                if seen:
                    raise ConstructorError("while constructing a mapping", node.start_mark,
                                           f"found duplicate key {key!r} (first on line {first[key]})",
                                           key_node.start_mark)
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_document(path: Path) -> Any:
    """The parsed YAML of `path` ({} for an empty file)."""
    name = path.name
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {name}") from None
    except IsADirectoryError:
        raise ConfigError(f"{name}: is a directory, not a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{name}: not UTF-8 text (byte {raw[exc.start]:#04x} on line {line})") from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader) or {}
    except RecursionError:
        raise ConfigError(f"{name}: nested too deeply to read (lists or mappings thousands of levels deep)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: not valid YAML: {exc}") from None
