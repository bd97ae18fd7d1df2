"""What the values of `meshplane status | explain` look like: checked where they are typed, before the
control plane is asked (a usage error, naming the flag), and where the /debug pages read them (400,
naming the parameter: scripts read the pages directly). One check for both, so that the command and
the page never disagree; the caller names the flag or the parameter, the message says the rest.

Standard library only: the client commands import this, and start without the server (pyproject's
import-linter contract). What only the catalog can say (a zone that does not exist) is the server's.
"""

from __future__ import annotations

import ipaddress

DOWN_KINDS = ("zone", "cluster", "region", "endpoint")


class FormError(ValueError):
    """A value of the wrong form; the message quotes it and says what is wrong, without naming the flag
    or parameter it came with."""


def down(text: str) -> tuple[str, str]:
    """`zone=Z`, `cluster=C`, `region=R` or `endpoint=ADDR[:PORT]` -> (what, value); an endpoint's value
    written back the one way it is matched (`[ADDR]:PORT` for IPv6)."""
    what, sep, value = text.partition("=")
    if not sep or what not in DOWN_KINDS or not value:
        raise FormError(f"{text!r}: write zone=Z, cluster=C, region=R or endpoint=ADDR[:PORT]")
    if what != "endpoint":
        return what, value
    try:
        address, port = address_and_port(value)
    except FormError as exc:
        raise FormError(f"{text!r}: {exc}") from None
    if port is not None and not 1 <= port <= 65535:
        raise FormError(f"{text!r}: {port} is not a port number (1-65535)")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise FormError(f"{text!r}: {address!r} is not an IP address "
                        "(endpoint=10.1.0.2 or endpoint=10.1.0.2:8080)") from None
    return what, address if port is None else f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def address_and_port(text: str) -> tuple[str, int | None]:
    """ADDR, ADDR:PORT, or an IPv6 address bare or as [ADDR]:PORT; a port that is not a number is refused."""
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") if rest.startswith(":") else None
    elif text.count(":") == 1:
        address, _, port = text.partition(":")
    else:
        address, port = text, None
    if port is None:
        return address, None
    if not port.isdigit():
        raise FormError(f"{port!r} is not a port number (1-65535)")
    return address, int(port)


def origin(text: str) -> list[str]:
    """A client's locality for `explain`: REGION/ZONE/CLUSTER, fewer parts, or a zone alone ->
    [region, zone, cluster], "" where not given (the catalog may know a zone's region)."""
    parts = [*text.split("/"), "", ""][:3] if "/" in text else ["", text, ""]
    if text.count("/") > 2 or not (parts[0] or parts[1]):
        raise FormError(f"{text!r} is not REGION/ZONE/CLUSTER (or a zone alone)")
    return parts


def locality_prefix(text: str) -> str:
    """A locality to filter clients by (`status --locality`): REGION, REGION/ZONE or REGION/ZONE/CLUSTER."""
    parts = text.rstrip("/").split("/")
    if len(parts) > 3 or not all(parts):
        raise FormError(f"{text!r} is not REGION[/ZONE[/CLUSTER]]")
    return text
