"""Bounded YAML for configs: a size limit read with a bounded read, no aliases, no duplicate keys.

    text = read_bounded("exp.yaml")        # OSError (EFBIG) past MAX_BYTES: /dev/zero ends at once
    d = safe_load(text)                     # yaml.YAMLError on an alias, a duplicate key, too many nodes

A config is a few hundred bytes of plain mappings; what PyYAML's ``safe_load`` accepts beyond that is a
way to exhaust memory: an alias bomb (``a: &a [*a, *a]`` nested) is small text that expands into an
exponential tree wherever the result is copied, and a duplicated key silently drops the first value.
The errors are PyYAML's own types (with ``problem`` and ``problem_mark``), so callers that report YAML
errors report these too.
"""

from __future__ import annotations

import errno
import os

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.events import AliasEvent

__all__ = ["MAX_BYTES", "MAX_NODES", "BoundedLoader", "read_bounded", "safe_load"]

MAX_BYTES = 1 << 20  # a config file; a resolved config is ~2 KB
MAX_NODES = 100_000


def read_bounded(path: str | os.PathLike, limit: int = MAX_BYTES) -> str:
    """The text of ``path`` (UTF-8), reading at most ``limit + 1`` bytes: a larger file (or an endless
    one such as ``/dev/zero``) is an ``OSError`` (EFBIG) naming the limit."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit // 1024} KiB, the limit for a config file", str(path))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OSError(errno.EINVAL, f"not UTF-8 text (byte {e.start})", str(path)) from None


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases and duplicate keys and stops past ``MAX_NODES`` nodes."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._nodes = 0

    def compose_node(self, parent, index):
        if self.check_event(AliasEvent):
            event = self.peek_event()
            raise ComposerError(None, None, "aliases (*name) are not allowed in a config", event.start_mark)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise ComposerError(None, None, f"more than {MAX_NODES} nodes", self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise ConstructorError(None, None, "merge keys (<<) are not allowed", key_node.start_mark)
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                except TypeError:  # an unhashable key: the base class reports it
                    break
                if dup:
                    raise ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str):
    """``yaml.safe_load`` with :class:`BoundedLoader` (and the size limit on ``text``)."""
    if len(text) > MAX_BYTES:
        raise ComposerError(None, None, f"more than {MAX_BYTES // 1024} KiB of YAML", None)
    return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 - a SafeLoader subclass
