"""An endpoint file parsed entry by entry: an edit costs what it changed.

A file of 10,000 services is 2.8 MB of YAML, and an edit usually changes one of them. `split` cuts the
file into its `services` entries with C-speed searches; `parse_changed` parses only the entries whose
text differs from the last parse (reusing the services of the others), and the rest of the file on its
own. Lines are looked up only when there is a problem (`_EntryLines`), so the hot path is a few dict
operations per unchanged entry. Any layout `split` does not know (flow style, an anchor used across
entries, YAML an entry alone cannot say) is parsed whole (`parse_whole`), which is also the reference
the parse entry by entry is tested against. The fields and their rules are
meshplane/discovery/filemodel.py's; the file source (meshplane/discovery/filesource.py) decides when to
parse, and where (on the event loop, or off it when many entries changed).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meshplane import problems, yamlpos
from meshplane.discovery import filemodel, model


class EndpointFileError(ValueError):
    """A broken endpoint file: str() is every problem, one `file:line: field: reason` a line."""

    def __init__(self, message: str | None = None, *, found: Sequence[problems.Problem] = ()) -> None:
        self.problems = tuple(found)
        super().__init__(message if message is not None else "\n".join(map(str, self.problems)))


class Parsed:
    """An endpoint file as last parsed: its cluster and region, its services, and each service entry's
    text -> the service's key (empty when the file was parsed whole)."""

    def __init__(self, cluster: str, region: str, services: dict[model.ServiceKey, model.ServiceInCluster],
                 entries: dict[str, model.ServiceKey] | None = None) -> None:
        self.cluster, self.region, self.services = cluster, region, services
        self.entries = entries or {}


class _NeedsPositions(Exception):
    """A mapping with a key twice (or merged keys): only yamlpos can say which, and where."""


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """libyaml's loader (plain values, no lines), refusing what yamlpos refuses: a key given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        value: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        if len(value) != len(node.value):
            raise _NeedsPositions
        return value


def _load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain values only


_SERVICES = re.compile(r"^services:[ \t]*(?:#.*)?$", re.MULTILINE)
# The first line that is neither blank nor a comment; group 2: it is a list item.
_FIRST = re.compile(r"^( *)(?:(-)(?: |$)|[^ \t\r\n#])", re.MULTILINE)


# An anchor (`&name`), or something like one: PyYAML refuses an anchor defined twice in one document, which
# two entries parsed apart cannot see, so a file with anchors is parsed whole.
_ANCHOR = re.compile(r"(?:^|[\s\[{,])&[^\s\[\]{},]")
# Line breaks to YAML besides "\n" (a lone "\r" ends a line there too).
_OTHER_BREAKS = re.compile("[\r\x85\u2028\u2029]")


@dataclass(frozen=True)
class Layout:
    """A file cut into its `services` entries: `rest` is the file without them, `entries` each entry's text
    (a whole list item's lines); `text[body:end]` is the list, its first item starting at `first`."""

    text: str
    rest: str
    entries: list[str]
    body: int
    end: int
    first: int


def split(text: str) -> Layout | None:
    """The file cut into its `services` entries (a block-style list, as written by hand or by yaml.safe_dump);
    None for any other layout (then the file is parsed whole). Found with C-speed searches (a file of 10,000
    services is 2.8 MB): a literal-prefixed regex for where the list ends, str.split for the items."""
    found = _SERVICES.search(text)
    if found is None:
        return None
    body = found.end() + 1
    first = _FIRST.search(text, body)
    if first is None or first.group(2) is None:
        return None  # `services:` followed by something else than a block list
    pad = first.group(1)
    indent = len(pad)
    # The list ends at the first line, neither blank nor a comment, indented less than its items (or as
    # much, but not an item).
    ends = re.compile(rf"\n(?: {{0,{indent - 1}}}[^ \t\r\n#]| {{{indent}}}[^ \t\r\n#-])" if indent else
                      r"\n[^ \t\r\n#-]")
    stop = ends.search(text, first.start())
    end = stop.start() + 1 if stop is not None else len(text)
    item = pad + "- "
    pieces = text[first.start() + len(item):end].split("\n" + item)
    entries = [f"{item}{piece}\n" for piece in pieces[:-1]] + [item + pieces[-1]]  # each a whole item's lines
    return Layout(text=text, rest=text[:body] + text[end:], entries=entries, body=body, end=end, first=first.start())


def parse(text: str, *, path: str) -> tuple[model.ClusterId, dict[model.ServiceKey, model.ServiceInCluster]]:
    """The file's cluster and services; EndpointFileError lists every problem."""
    cluster, parsed, _, _ = parse_changed(text, path=path, last=None)
    return cluster, parsed.services


def read(path: Path) -> tuple[model.ClusterId, dict[model.ServiceKey, model.ServiceInCluster], str]:
    """Read and parse a file once (`meshplane validate`): its cluster, its services and its text. OSError if
    it cannot be read."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise EndpointFileError(found=[problems.Problem(
            str(path), line, "(file)", f"not UTF-8 text: {exc.reason}")]) from None
    cluster, services = parse(text, path=str(path))
    return cluster, services, text


def parse_changed(
    text: str, *, path: str, last: Parsed | None, whole: bool = True, layout: Layout | None = None
) -> tuple[model.ClusterId, Parsed, dict[model.ServiceKey, model.ServiceInCluster], set[model.ServiceKey]]:
    """Parse `text`, reusing `last` for the service entries whose text is unchanged: the cluster, the file
    as parsed, the services that are new or changed, and the keys no longer in the file. Any layout
    `split` does not know, or YAML the entries alone cannot say (broken, or an anchor of one entry used in
    another), parses the whole file; with `whole` False it raises Whole instead (the caller parses it
    whole elsewhere: that takes seconds for 10,000 services). `layout`: `split(text)`, if the caller has it."""
    old = last.services if last is not None else {}
    layout = layout if layout is not None else split(text)
    if layout is not None:
        try:
            parsed, changed = _parse_parts(layout, path=path, last=last)
        except Whole:
            pass
        else:
            return model.ClusterId(parsed.cluster), parsed, changed, old.keys() - parsed.services.keys()
    if not whole:
        raise Whole
    cluster, services = parse_whole(text, path=path)
    changed = {k: v for k, v in services.items() if old.get(k) != v}
    return cluster, Parsed(cluster, "", services), changed, old.keys() - services.keys()


def fresh(layout: Layout, *, last: Parsed | None) -> int:
    """How many of the file's service entries a parse would parse anew (their text is not `last`'s): found
    without parsing, a few milliseconds for 10,000 services."""
    known = last.entries if last is not None else {}
    return sum(entry not in known for entry in layout.entries)


class Whole(Exception):
    """The entries alone cannot say what the file holds: parse it whole."""


def _parse_parts(
    layout: Layout, *, path: str, last: Parsed | None
) -> tuple[Parsed, dict[model.ServiceKey, model.ServiceInCluster]]:
    """The file parsed entry by entry, reusing `last`'s services for the entries it has word for word;
    and the services of the entries parsed anew."""
    if _ANCHOR.search(layout.rest):
        raise Whole
    try:
        doc = _load(layout.rest)
    except (yaml.YAMLError, _NeedsPositions):
        raise Whole from None
    if not isinstance(doc, dict) or "services" not in doc or doc["services"] is not None:
        raise Whole  # not the layout split() expects
    report = filemodel.Report()
    place = filemodel.cluster_and_region(doc, report)
    cluster, region = place or ("", "")
    known = last.entries if last is not None and place is not None and (last.cluster, last.region) == place else {}
    reused = last.services if last is not None else {}
    services: dict[model.ServiceKey, model.ServiceInCluster] = {}
    fresh: dict[model.ServiceKey, model.ServiceInCluster] = {}
    keys: dict[str, model.ServiceKey] = {}
    broken: dict[model.ServiceKey, int] = {}  # entries with a problem, by the service they name

    def twice(key: model.ServiceKey | None, i: int) -> bool:
        """Whether entry `i` names a service an entry before it named (reported if so)."""
        if key is None or (key not in services and key not in broken):
            return False
        j = broken[key] if key in broken else next(j for j, e in enumerate(layout.entries) if keys.get(e) == key)
        _duplicate(key, i, j, report)
        return True

    for i, entry in enumerate(layout.entries):
        key = known.get(entry)
        if key is not None:  # unchanged: the hot path of an edit, kept to a few dict operations
            if key in services or (broken and key in broken):
                twice(key, i)
            else:
                services[key] = reused[key]
                keys[entry] = key
            continue
        if _ANCHOR.search(entry):
            raise Whole
        try:
            items = _load(entry)
        except (yaml.YAMLError, _NeedsPositions):
            raise Whole from None
        if not isinstance(items, list) or len(items) != 1:
            raise Whole  # an entry that is not one list item
        svc = filemodel.service(items[0], loc=("services", i), cluster=cluster, region=region, report=report)
        key = filemodel.key_of(items[0])
        if twice(key, i):
            continue
        if svc is not None:
            services[svc.key] = fresh[svc.key] = svc
            keys[entry] = svc.key
        elif key is not None:
            broken[key] = i
    if report.found:
        if _OTHER_BREAKS.search(layout.text):
            raise Whole  # lines YAML counts and str.count("\n") does not: let yamlpos count them all
        raise _rejected(report, path=path, line=_EntryLines(layout).line)
    return Parsed(cluster, region, services, keys), fresh


def parse_whole(text: str, *, path: str) -> tuple[model.ClusterId, dict[model.ServiceKey, model.ServiceInCluster]]:
    """The whole document at once, with its lines: any layout (flow style, an anchor used across entries),
    and the reference the parse entry by entry is tested against."""
    try:
        located = yamlpos.load(text, fast=True)
    except yamlpos.YamlError as exc:
        raise EndpointFileError(found=[problems.Problem(path, exc.line, yamlpos.render_loc(exc.loc), exc.reason)]
                                ) from None
    report = filemodel.Report()
    place = filemodel.cluster_and_region(located.value, report)
    cluster, region = place or ("", "")
    services: dict[model.ServiceKey, model.ServiceInCluster] = {}
    first: dict[model.ServiceKey, int] = {}
    entries = filemodel.services_of(located.value, report) if isinstance(located.value, dict) else []
    for i, raw in enumerate(entries):
        svc = filemodel.service(raw, loc=("services", i), cluster=cluster, region=region, report=report)
        if _first(filemodel.key_of(raw), i, first, report) and svc is not None:
            services[svc.key] = svc
    if report.found:
        raise _rejected(report, path=path, line=located.line_for)
    return model.ClusterId(cluster), services


def _first(key: model.ServiceKey | None, i: int, first: dict[model.ServiceKey, int], report: filemodel.Report) -> bool:
    """Whether entry `i` is the first of its service (reported if not)."""
    if key is None or first.setdefault(key, i) == i:
        return True
    _duplicate(key, i, first[key], report)
    return False


def _duplicate(key: model.ServiceKey, i: int, first: int, report: filemodel.Report) -> None:
    report.error(("services", i, "name"), f"duplicate service {key}", first=("services", first, "name"))


def _rejected(report: filemodel.Report, *, path: str, line: Callable[[yamlpos.Loc], int]) -> EndpointFileError:
    found = []
    for f in report.found:
        reason = f.reason if f.first is None else f"{f.reason} (first at line {line(f.first)})"
        found.append(problems.Problem(path, line(f.loc), yamlpos.render_loc(f.loc), reason))
    return EndpointFileError(found=sorted(found, key=lambda p: (p.line, p.field)))


class _EntryLines:
    """Where each problem of a file parsed entry by entry is: an entry is parsed again with its lines only
    when it has a problem, and its lines shifted to where it starts in the file; the rest of the file has
    its own lines up to the list, and is shifted by the list's length after it."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._entries: dict[int, tuple[int, yamlpos.Located]] = {}
        self._rest: yamlpos.Located | None = None

    def line(self, loc: yamlpos.Loc) -> int:
        if len(loc) >= 2 and loc[0] == "services" and isinstance(loc[1], int):
            start, located = self._entry(loc[1])
            return start + located.line_for((0, *loc[2:])) - 1
        layout = self.layout
        if self._rest is None:
            self._rest = _located(layout.rest)
        line = self._rest.line_for(loc)
        head = layout.text.count("\n", 0, layout.body)
        return line if line <= head else line + layout.text.count("\n", layout.body, layout.end)

    def _entry(self, i: int) -> tuple[int, yamlpos.Located]:
        if i not in self._entries:
            entries = self.layout.entries
            start = self.layout.text.count("\n", 0, self.layout.first) + 1 + sum(e.count("\n") for e in entries[:i])
            self._entries[i] = (start, _located(entries[i]))
        return self._entries[i]


def _located(text: str) -> yamlpos.Located:
    try:
        return yamlpos.load(text, fast=True)
    except yamlpos.YamlError:
        raise Whole from None  # what libyaml read and yamlpos refuses (a key that is not a string)
