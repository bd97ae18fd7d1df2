"""YAML to plain Python values, remembering the source line of every key and item.

`yaml.safe_load` forgets where values came from, so errors could only name a
field. Operators fix files by line number, so we compose the node tree (which
keeps marks) and build the values ourselves, recording a line for each path.
Building it ourselves also lets us reject what `safe_load` silently accepts:
duplicate keys (the last one would win) and non-string keys. The policy
(meshplane/policy/validate.py) and the endpoint files
(meshplane/discovery/fileparse.py) are both read through here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

Loc = tuple[str | int, ...]

_MERGE_TAG = "tag:yaml.org,2002:merge"
# libyaml's parser, where PyYAML was built with it: about 3x faster to compose a large file.
_FAST_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class YamlError(Exception):
    """The text is not YAML we accept; `line` is 1-based (0 if unknown)."""

    def __init__(self, line: int, loc: Loc, reason: str) -> None:
        super().__init__(f"{line}: {render_loc(loc)}: {reason}")
        self.line = line
        self.loc = loc
        self.reason = reason


@dataclass(frozen=True)
class Located:
    """The document's value, and the line where each mapping key / sequence item starts."""

    value: Any
    lines: Mapping[Loc, int]

    def line_for(self, loc: Sequence[str | int]) -> int:
        """The line of `loc`, or of its nearest enclosing key that exists in the file.

        Errors about a missing field (or one inside a value the validator
        unpacked further) point at the closest thing the operator wrote.
        """
        parts = tuple(loc)
        while parts:
            line = self.lines.get(parts)
            if line is not None:
                return line
            parts = parts[:-1]
        return self.lines.get((), 1)


def render_loc(loc: Sequence[str | int]) -> str:
    """("services", 0, "locality", "failover", 1, "to") -> "services[0].locality.failover[1].to"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            # Locality patterns ("cn-hangzhou/*") are keys too: quoted, the path stays readable.
            out += f'["{part}"]'
    return out or "(document)"


def load(text: str, *, fast: bool = False, anchors: bool = True) -> Located:
    """Parse one YAML document; raise YamlError with the line of the first problem.

    `fast`: compose with libyaml (a large endpoint file); its messages for broken YAML are worded
    a little differently from the pure-Python parser's, which the policy keeps. `anchors` False: an
    anchor (`&name`, and so every alias and `<<: *name` merge of it) is refused where it is defined. Aliases
    are how a few hundred bytes expand to gigabytes (each level of aliases multiplies the values built);
    a file that has no use for them refuses them, and is then built in time linear in its length.
    """
    assert anchors or not fast, "anchors are refused by the pure-Python composer"
    try:
        loader = (_FAST_LOADER if fast else yaml.SafeLoader if anchors else _AnchorsNoted)(text)  # reads ahead:
    except yaml.YAMLError as exc:  # a control character fails here
        raise syntax_error(exc, text) from None
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise syntax_error(exc, text) from None
        if node is None:
            return Located(None, {})
        builder = _Builder(loader, refused=loader.anchored if isinstance(loader, _AnchorsNoted) else None)
        value = builder.build(node, ())
        builder.lines[()] = node.start_mark.line + 1
        return Located(value, builder.lines)
    finally:
        loader.dispose()


def syntax_error(exc: yaml.YAMLError, text: str) -> YamlError:
    """PyYAML's error for `text` in one line, with the line and column of the problem (its own text
    spans several)."""
    if isinstance(exc, yaml.reader.ReaderError) and isinstance(exc.character, int):
        # A character YAML does not allow: its position is an index into the text.
        line_start = text.rfind("\n", 0, exc.position) + 1
        return YamlError(text.count("\n", 0, exc.position) + 1, (),
                         f"invalid YAML: unacceptable character #x{exc.character:04x}: {exc.reason} "
                         f"(column {exc.position - line_start + 1})")
    if not isinstance(exc, yaml.MarkedYAMLError):
        return YamlError(0, (), f"invalid YAML: {' '.join(str(exc).split())}")
    mark = exc.problem_mark or exc.context_mark
    what = " ".join(p for p in (exc.context, exc.problem) if p) or "syntax error"
    if mark is None:
        return YamlError(0, (), f"invalid YAML: {what}")
    return YamlError(mark.line + 1, (), f"invalid YAML: {what} (column {mark.column + 1})")


class _AnchorsNoted(yaml.SafeLoader):
    """The pure-Python loader, noting which nodes carry an anchor (an alias composes to the very same node)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.anchored: dict[int, str] = {}  # id(node) -> its anchor's name

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        node = super().compose_node(parent, index)
        anchor = getattr(event, "anchor", None)
        if anchor is not None and not isinstance(event, yaml.AliasEvent):
            self.anchored[id(node)] = anchor
        return node


class _Builder:
    def __init__(self, loader: Any, *, refused: dict[int, str] | None = None) -> None:  # a SafeLoader, or
        self.loader = loader  # libyaml's CSafeLoader
        self.lines: dict[Loc, int] = {}
        # Anchors may refer to themselves (`&a [*a]`); plain values cannot, so refuse them.
        self._open: set[int] = set()
        self._refused = refused  # anchored nodes, refused where first built (load's `anchors`)

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        if self._refused and id(node) in self._refused:
            raise YamlError(node.start_mark.line + 1, loc, f"YAML anchors and aliases are not accepted in this file "
                            f"(&{self._refused[id(node)]}): write the value out where it is used")
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.loader.construct_object(node, deep=True)
            except yaml.MarkedYAMLError as exc:
                line = (exc.problem_mark or node.start_mark).line + 1
                raise YamlError(line, loc, f"invalid value: {exc.problem}") from None
            except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
                # PyYAML's scalar constructors fail this way on values their pattern let through
                # (`2001-02-30`, `!!float abc`, an int of 5,000 digits).
                shown = node.value if len(node.value) <= 40 else node.value[:37] + "..."
                raise YamlError(node.start_mark.line + 1, loc,
                                f"invalid value {shown!r}{f' ({node.tag})' if '!!' in node.tag else ''}: "
                                f"{type(exc).__name__}") from None
        if id(node) in self._open:
            raise YamlError(node.start_mark.line + 1, loc, "an alias refers to itself")
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return self._sequence(node, loc)
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, loc)
        finally:
            self._open.discard(id(node))
        raise YamlError(node.start_mark.line + 1, loc, f"unsupported YAML node {node.tag}")

    def _sequence(self, node: yaml.SequenceNode, loc: Loc) -> list[Any]:
        items = []
        for i, child in enumerate(node.value):
            self.lines[(*loc, i)] = child.start_mark.line + 1
            items.append(self.build(child, (*loc, i)))
        return items

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, Any]:
        own = sum(1 for key, _ in node.value if key.tag != _MERGE_TAG)
        try:
            # Resolves `<<: *anchor` merge keys the way safe_load does: merged pairs first.
            self.loader.flatten_mapping(node)
        except yaml.MarkedYAMLError as exc:
            line = (exc.problem_mark or node.start_mark).line + 1
            raise YamlError(line, loc, f"invalid merge: {exc.problem}") from None
        split = len(node.value) - own
        out: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value[split:]:
            key, line = self._key(key_node, loc)
            if key in out:
                raise YamlError(
                    line, (*loc, key), f"duplicate key {key!r} (first at line {first_line[key]})"
                )
            first_line[key] = line
            self.lines[(*loc, key)] = line
            out[key] = self.build(value_node, (*loc, key))
        merged: dict[str, Any] = {}
        # Merged keys never count as duplicates: the mapping's own keys override them,
        # and among merged mappings the later one wins, as in safe_load.
        for key_node, value_node in node.value[:split]:
            key, line = self._key(key_node, loc)
            if key not in out:
                self.lines[(*loc, key)] = line
                merged[key] = self.build(value_node, (*loc, key))
        return {**merged, **out} if merged else out

    def _key(self, node: yaml.Node, loc: Loc) -> tuple[str, int]:
        line = node.start_mark.line + 1
        key = self.build(node, loc) if isinstance(node, yaml.ScalarNode) else None
        if not isinstance(key, str):
            kind = type(node).__name__.removesuffix("Node").lower()
            shown = repr(key) if isinstance(node, yaml.ScalarNode) else f"a {kind}"
            raise YamlError(line, loc, f"keys must be strings, got {shown}")
        return key, line
