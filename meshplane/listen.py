"""The addresses `serve` listens on (`--ads`, `--ads-plaintext`, `--http`): parsed, and checked before
anything binds, so a mistake is one line naming the flag, the address and what is wrong.

gRPC binds with SO_REUSEPORT unless told not to (meshplane tells it not to): a second control plane
on the port of a running one would start, and proxies would be split between the two. A port that
is taken is found here first, by binding it without SO_REUSEPORT, so whoever holds it (another
meshplane, with or without SO_REUSEPORT, or any other program) makes `serve` refuse to start.
`bind` is how meshplane binds where gRPC does not (the TLS relay of `--client-cert optional`, the HTTP
port), so that every port takes the same addresses as gRPC's would. Only the standard library: the
command line imports this before anything else.
"""

from __future__ import annotations

import errno
import ipaddress
import socket


class ListenError(OSError):
    """An address that cannot be listened on; the message names the flag, the address and why."""


def parse(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` (127.0.0.1) or `[V6]:PORT` -> (host, port), the host without brackets;
    ValueError saying what is wrong. Port 0 picks a free port."""
    host, colon, port_text = text.rpartition(":")
    if not colon:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if not port_text.isdigit():
        raise ValueError(f"{text!r}: the port {port_text!r} is not a number (HOST:PORT)")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{text!r}: port {port} is out of range (0-65535; 0 picks a free port)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: an IPv6 address goes in brackets ([{host}]:{port})")
    return host or "127.0.0.1", port


def join(host: str, port: int) -> str:
    """The address as gRPC and the log write it (an IPv6 host in brackets)."""
    try:
        v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        v6 = False
    return f"[{host}]:{port}" if v6 else f"{host}:{port}"


def bind(flag: str, host: str, port: int) -> list[socket.socket]:
    """Sockets bound (not listening) on the addresses `host` resolves to, at `port`, as gRPC binds them;
    ListenError naming the flag, the address and why not.

    As gRPC does, an address that cannot be bound because the machine lacks it (`localhost` listing
    ::1 where IPv6 is off, common in containers) is left out as long as another is bound; a port in
    use on any of them is refused. With port 0 every address gets the port the first one got. `[::]`
    takes IPv4 too (dual stack), as with gRPC."""
    where = f"{flag} {join(host, port)}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"{where}: cannot resolve {host!r} ({exc.strerror}): give an IP address "
                          "(0.0.0.0 for every interface) or a name this machine resolves") from None
    # The IPv6 wildcard takes IPv4 too, unless the IPv4 wildcard is bound on its own.
    dual = not any(family == socket.AF_INET and address[0] == "0.0.0.0" for family, _, _, _, address in infos)
    bound: list[socket.socket] = []
    missing: OSError | None = None  # an address this machine lacks, left out
    seen: set[tuple[int, str | int]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address[0]) in seen:  # /etc/hosts may list an address twice
                continue
            seen.add((family, address[0]))
            if bound and port == 0:
                address = (address[0], bound[0].getsockname()[1], *address[2:])
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:  # no IPv6 at all here
                missing = missing or exc
                continue
            try:
                # As gRPC and aiohttp bind: SO_REUSEADDR (a port left in TIME_WAIT is free), no SO_REUSEPORT.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual and address[0] == "::" else 1)
                sock.bind(address)
            except OSError as exc:
                sock.close()
                if exc.errno not in _MISSING:
                    raise failed(flag, host, port, exc) from None
                missing = missing or exc
                continue
            bound.append(sock)
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    if not bound:
        raise failed(flag, host, port, missing or OSError(errno.EADDRNOTAVAIL, "no address to bind")) from None
    return bound


_MISSING = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT)
"""A bind that fails because the machine lacks the address (or its family), not because of the port."""


def check(flag: str, host: str, port: int) -> None:
    """Raise ListenError unless `host` can be listened on at `port` now, as `bind` says."""
    for sock in bind(flag, host, port):
        sock.close()


def failed(flag: str, host: str, port: int, exc: OSError) -> ListenError:
    """The error for a bind that failed with `exc`, in the words of `check`."""
    where = f"{flag} {join(host, port)}"
    if exc.errno == errno.EADDRINUSE:
        return ListenError(f"{where}: port {port} is in use (another meshplane, or another program, listens "
                           "there): stop it, or choose another port")
    if exc.errno == errno.EACCES:
        return ListenError(f"{where}: not allowed to listen on port {port} (ports below 1024 need privileges)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ListenError(f"{where}: {host} is not an address of this machine")
    return ListenError(f"{where}: cannot listen: {exc.strerror or exc}")
