"""Client media from http(s) URLs (OpenAI-style ``image_url`` / ``video_url`` / audio URLs), fetched safely.

A URL from a client makes the server a client of whatever that URL names, so every fetch is checked
before a byte leaves the machine, and checked again on every redirect:

- Off unless ``server.remote_media.enabled`` (REMOTE_MEDIA=1). Only GET, only http and https, no user
  names or passwords in the URL, only hosts on the allow-list when one is set (exact names and
  ``*.example.com`` patterns; a pattern matches sub-domains, not the bare domain).
- The host is resolved once and EVERY address it resolves to must be allowed: never loopback,
  private, carrier-grade NAT, link-local, unique-local, multicast, unspecified, reserved or cloud
  metadata addresses (``DEFAULT_BLOCKED_NETWORKS``), nor those wrapped in IPv6 (IPv4-mapped, NAT64,
  6to4). The socket is then connected to one of those checked addresses by this module itself, so a
  second DNS answer (DNS rebinding) never gets a say; https wraps that socket with TLS, verifying the
  certificate against the host NAME (``server_hostname``), and the Host header carries the name.
- Redirects (301, 302, 303, 307, 308) are followed by hand, at most ``max_redirects``, each hop going
  through the same scheme, allow-list and address checks.
- One deadline (``timeout`` seconds) covers resolution, connection, TLS, every redirect and the
  reading; each read waits only what is left of it, so a server trickling bytes cannot stretch it.
- A Content-Length over ``max_bytes`` is refused before reading; any body is cut off one byte past it.
- No proxies: the module speaks HTTP/1.1 over its own socket (http.client only parses the response),
  so HTTP(S)_PROXY and friends from the environment are never read.

Every refusal is an ``InvalidInput`` (400, ``error="url refused"``) naming the request field and the
reason, or a ``PayloadTooLarge`` (413) for size. ``blocked_networks`` and ``resolve`` are injectable so
tests can run the fetch mechanics against a loopback server; the server always uses the defaults.
"""
from __future__ import annotations

import http.client
import io
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import quote, urljoin, urlsplit

from utils.errors import InvalidInput, PayloadTooLarge
from utils.config.settings import RemoteMediaSettings

__all__ = ["DEFAULT_BLOCKED_NETWORKS", "RemoteFetcher", "RemoteMediaSettings", "classify_address", "host_allowed",
           "resolve_host"]

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Iterable[str]]

# (network, what its addresses are). The most specific network that holds an address names it.
# IANA's special-purpose registries, plus the cloud metadata endpoints (AWS/GCP/Azure, AWS IPv6, Alibaba).
DEFAULT_BLOCKED_NETWORKS: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), name) for net, name in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT"),
        ("100.100.100.200/32", "cloud metadata"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("169.254.169.254/32", "cloud metadata"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "reserved (documentation)"),
        ("192.88.99.0/24", "reserved (6to4 relay)"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved (benchmarking)"),
        ("198.51.100.0/24", "reserved (documentation)"),
        ("203.0.113.0/24", "reserved (documentation)"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("255.255.255.255/32", "broadcast"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "reserved (IPv4-compatible)"),
        ("64:ff9b:1::/48", "reserved (local NAT64)"),
        ("100::/64", "reserved (discard)"),
        ("2001::/23", "reserved"),
        ("2001:db8::/32", "reserved (documentation)"),
        ("3fff::/20", "reserved (documentation)"),
        ("fc00::/7", "unique-local"),
        ("fd00:ec2::254/128", "cloud metadata"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    ))

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = {301, 302, 303, 307, 308}
_OK = {200, 203}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK = 64 * 1024
# Characters left as they are in a request target; everything else (spaces, controls, non-ASCII) is escaped.
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_QUERY_SAFE = _PATH_SAFE + "?"
_HOST_RE = re.compile(r"[a-z0-9_][a-z0-9_-]{0,62}(?:\.[a-z0-9_][a-z0-9_-]{0,62})*")  # fullmatch, <= 253


def classify_address(address: str | IPAddress,
                     blocked_networks: Iterable[tuple[IPNetwork, str]] = DEFAULT_BLOCKED_NETWORKS) -> str | None:
    """What kind of blocked address this is ("loopback", "private", ...), or None when it may be fetched.

    IPv6 forms that carry an IPv4 address (IPv4-mapped ::ffff:a.b.c.d, NAT64 64:ff9b::/96, 6to4
    2002::/16) are judged by that IPv4 address too.
    """
    addr = address if not isinstance(address, str) else ipaddress.ip_address(address)
    networks = tuple(blocked_networks)
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            inner = classify_address(addr.ipv4_mapped, networks)
            return f"{inner} (IPv4-mapped)" if inner else None
        embedded = (("NAT64", ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)) if addr in _NAT64
                    else ("6to4", addr.sixtofour) if addr.sixtofour is not None else None)
        if embedded is not None:
            inner = classify_address(embedded[1], networks)
            if inner:
                return f"{inner} ({embedded[0]})"
    best: tuple[int, str] | None = None
    for network, name in networks:
        if network.version == addr.version and addr in network and (best is None or network.prefixlen > best[0]):
            best = (network.prefixlen, name)
    return best[1] if best else None


def host_allowed(host: str, allow_hosts: Iterable[str]) -> bool:
    """True when the allow-list is empty, names the host, or holds a "*.suffix" pattern the host is under."""
    allow_hosts = tuple(allow_hosts)
    if not allow_hosts:
        return True
    for entry in allow_hosts:
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and len(host) > len(entry) - 1:
                return True
        elif host == entry:
            return True
    return False


def resolve_host(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for host (the default ``resolve``)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str              # ASCII (IDNA), lower case, no brackets, no trailing dot
    port: int
    request_target: str    # path and query, escaped
    literal: IPAddress | None  # the host when it is an IP address

    @property
    def host_header(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == _DEFAULT_PORTS[self.scheme] else f"{name}:{self.port}"


class _DeadlineReader(io.RawIOBase):
    """A socket's reading side where every read waits at most what is left until the deadline."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("remote media deadline passed")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _DeadlineSocket:
    """What http.client.HTTPResponse needs of a socket: ``makefile``, here one bounded by the deadline."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock, self._deadline = sock, deadline

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


def _refused(details: str, field: str) -> InvalidInput:
    return InvalidInput(details, field=field, error="url refused")


def _show(url: str, limit: int = 200) -> str:
    return url if len(url) <= limit else url[:limit] + "..."


class RemoteFetcher:
    """Fetches one URL's bytes under the remote media policy; safe to share between threads."""

    def __init__(self, settings: RemoteMediaSettings, *,
                 blocked_networks: Iterable[tuple[IPNetwork | str, str]] = DEFAULT_BLOCKED_NETWORKS,
                 resolve: Resolver | None = None, ssl_context: ssl.SSLContext | None = None):
        self.settings = settings
        self._blocked = tuple((ipaddress.ip_network(net), name) for net, name in blocked_networks)
        self._resolve = resolve or resolve_host
        self._allow = tuple(self._normal_allow_entry(entry) for entry in settings.allow_hosts)
        # ssl_context is for tests that trust their own CA; it must verify (CERT_REQUIRED + check_hostname).
        self._tls = ssl_context or ssl.create_default_context()
        if self._tls.verify_mode != ssl.CERT_REQUIRED or not self._tls.check_hostname:
            raise ValueError("remote media TLS must verify certificates and host names")

    # ------------------------------------------------------------ the fetch

    def fetch(self, url: str, field: str) -> bytes:
        """The body at url (after at most max_redirects checked redirects), or a 400/413 naming field."""
        if not self.settings.enabled:
            raise _refused("remote media URLs are turned off (REMOTE_MEDIA=1 enables them)", field)
        deadline = time.monotonic() + self.settings.timeout
        first = url
        redirects = 0
        prefix = ""
        while True:
            target = self._parse(url, field, prefix)
            addresses = self._checked_addresses(target, deadline, field, prefix)
            sock = self._open(target, addresses, deadline, field, prefix)
            try:
                response = self._request(sock, target, deadline, field, prefix)
                if response.status in _REDIRECTS:
                    location = response.getheader("Location")
                    if not location:
                        raise _refused(f"{prefix}the server answered HTTP {response.status} without a Location",
                                       field)
                    if redirects >= self.settings.max_redirects:
                        raise _refused(f"too many redirects (more than {self.settings.max_redirects}) "
                                       f"fetching {_show(str(first))}", field)
                    redirects += 1
                    url = urljoin(target.url, location.strip())
                    prefix = f"redirected to {_show(url)}: "
                    continue
                if response.status not in _OK:
                    status = f"HTTP {response.status} {response.reason[:100]}".rstrip()
                    raise _refused(f"{prefix}the server answered {status}", field)
                return self._body(response, target, deadline, field, prefix)
            finally:
                sock.close()

    # ------------------------------------------------------------ steps

    def _parse(self, url: str, field: str, prefix: str) -> _Target:
        if not isinstance(url, str) or not url.strip():
            raise _refused(f"{prefix}expected an http or https URL", field)
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError as exc:
            raise _refused(f"{prefix}not a valid URL ({exc})", field) from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise _refused(f"{prefix}scheme {scheme or '(none)'!r} is not allowed: only http and https", field)
        if parts.username is not None or parts.password is not None:
            raise _refused(f"{prefix}URLs with a user name or password are not accepted", field)
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise _refused(f"{prefix}the URL has no host", field)
        if port == 0:
            raise _refused(f"{prefix}port 0 is not a valid port", field)
        literal = self._literal(host)
        if literal is not None:
            host = str(literal)
        else:
            try:
                host = host.encode("idna").decode("ascii").lower()
            except UnicodeError:
                host = ""
            if len(host) > 253 or not _HOST_RE.fullmatch(host):
                raise _refused(f"{prefix}{(parts.hostname or '')[:100]!r} is not a valid host name", field)
        if not host_allowed(host, self._allow):
            raise _refused(f"{prefix}host {host!r} is not on the remote media allow-list", field)
        path = quote(parts.path or "/", safe=_PATH_SAFE)
        if not path.startswith("/"):
            path = "/" + path
        query = quote(parts.query, safe=_QUERY_SAFE)
        return _Target(url=url.strip(), scheme=scheme, host=host, port=port or _DEFAULT_PORTS[scheme],
                       request_target=path + (f"?{query}" if query else ""), literal=literal)

    def _checked_addresses(self, target: _Target, deadline: float, field: str, prefix: str) -> list[IPAddress]:
        if target.literal is not None:
            found = [target.literal]
        else:
            found = []
            for text in self._resolve_within(target, deadline, field, prefix):
                try:
                    found.append(ipaddress.ip_address(str(text)))
                except ValueError:
                    raise _refused(f"{prefix}host {target.host!r} resolved to something not an IP address",
                                   field) from None
            if not found:
                raise _refused(f"{prefix}host {target.host!r} did not resolve to any address", field)
        for address in found:
            kind = classify_address(address, self._blocked)
            if kind:
                log.info("remote media refused: %s (%s) is %s", target.host, address, kind)
                # A resolved address is not echoed: it would map the internal network for the client.
                where = f"{address} is" if target.literal is not None else f"host {target.host!r} resolves to"
                raise _refused(f"{prefix}{where} a blocked address ({kind}); remote media never fetches from "
                               f"loopback, private, link-local, metadata or reserved addresses", field)
        return found

    def _resolve_within(self, target: _Target, deadline: float, field: str, prefix: str) -> list:
        """resolve() in a helper thread, so a stuck resolver costs no more than the deadline."""
        outcome: dict = {}
        done = threading.Event()

        def work():
            try:
                outcome["addresses"] = list(self._resolve(target.host, target.port))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=work, name="remote-media-resolve", daemon=True).start()
        if not done.wait(self._left(deadline, target, field, prefix)):
            raise self._timeout(target, field, prefix)
        error = outcome.get("error")
        if isinstance(error, (OSError, UnicodeError, ValueError)):
            raise _refused(f"{prefix}could not resolve host {target.host!r}", field)
        if error is not None:
            raise error
        return outcome["addresses"]

    def _open(self, target: _Target, addresses: list[IPAddress], deadline: float, field: str,
              prefix: str) -> socket.socket:
        """A socket connected to one of the checked addresses (in resolver order), TLS-wrapped for https."""
        failure: OSError | None = None
        sock = None
        for address in addresses:
            try:
                sock = self._connect(address, target.port, self._left(deadline, target, field, prefix))
                break
            except TimeoutError:
                raise self._timeout(target, field, prefix) from None
            except OSError as exc:
                failure = exc
        if sock is None:
            log.info("remote media: connecting to %s failed: %s", target.host, failure)
            raise _refused(f"{prefix}could not connect to {target.host_header}", field)
        if target.scheme == "https":
            try:
                sock.settimeout(self._left(deadline, target, field, prefix))
                sock = self._tls.wrap_socket(sock, server_hostname=target.host)
            except TimeoutError:
                sock.close()
                raise self._timeout(target, field, prefix) from None
            except ssl.SSLCertVerificationError as exc:
                sock.close()
                raise _refused(f"{prefix}the TLS certificate of {target.host!r} did not verify "
                               f"({exc.verify_message})", field) from None
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                log.info("remote media: TLS with %s failed: %s", target.host, exc)
                raise _refused(f"{prefix}the TLS handshake with {target.host_header} failed", field) from None
            except BaseException:
                sock.close()
                raise
        return sock

    def _connect(self, address: IPAddress, port: int, timeout: float) -> socket.socket:
        """A TCP connection to exactly this address: no name is looked up again."""
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((str(address), port) if address.version == 4 else (str(address), port, 0, 0))
        except BaseException:
            sock.close()
            raise
        return sock

    def _request(self, sock: socket.socket, target: _Target, deadline: float, field: str,
                 prefix: str) -> http.client.HTTPResponse:
        request = (f"GET {target.request_target} HTTP/1.1\r\n"
                   f"Host: {target.host_header}\r\n"
                   "User-Agent: model-server-remote-media/1\r\n"
                   "Accept: */*\r\n"
                   "Accept-Encoding: identity\r\n"
                   "Connection: close\r\n\r\n")
        try:
            sock.settimeout(self._left(deadline, target, field, prefix))
            sock.sendall(request.encode("ascii"))
            response = http.client.HTTPResponse(_DeadlineSocket(sock, deadline), method="GET")
            response.begin()
        except TimeoutError:
            raise self._timeout(target, field, prefix) from None
        except http.client.HTTPException as exc:
            raise _refused(f"{prefix}{target.host_header} did not answer with valid HTTP ({type(exc).__name__})",
                           field) from None
        except OSError:
            raise _refused(f"{prefix}the connection to {target.host_header} failed", field) from None
        return response

    def _body(self, response: http.client.HTTPResponse, target: _Target, deadline: float, field: str,
              prefix: str) -> bytes:
        limit = self.settings.max_bytes
        if response.length is not None and response.length > limit:
            raise PayloadTooLarge(f"{prefix}{target.host_header} announces {response.length} bytes; remote media "
                                  f"is limited to {limit} bytes (REMOTE_MEDIA_MAX_MB)", field=field)
        body = bytearray()
        try:
            while True:
                chunk = response.read(min(_CHUNK, limit + 1 - len(body)))
                if not chunk:
                    break
                body += chunk
                if len(body) > limit:
                    raise PayloadTooLarge(f"{prefix}the body at {target.host_header} is larger than the remote "
                                          f"media limit of {limit} bytes (REMOTE_MEDIA_MAX_MB)", field=field)
        except TimeoutError:
            raise self._timeout(target, field, prefix) from None
        except http.client.IncompleteRead:
            raise _refused(f"{prefix}{target.host_header} closed the connection before the whole body came",
                           field) from None
        except (http.client.HTTPException, OSError):
            raise _refused(f"{prefix}reading the body from {target.host_header} failed", field) from None
        if not body:
            raise _refused(f"{prefix}{target.host_header} answered with an empty body", field)
        return bytes(body)

    # ------------------------------------------------------------ helpers

    def _left(self, deadline: float, target: _Target, field: str, prefix: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._timeout(target, field, prefix)
        return left

    def _timeout(self, target: _Target, field: str, prefix: str) -> InvalidInput:
        return _refused(f"{prefix}fetching from {target.host_header} took longer than the "
                        f"{self.settings.timeout:g} s remote media timeout", field)

    @staticmethod
    def _literal(host: str) -> IPAddress | None:
        try:
            return ipaddress.ip_address(host)
        except ValueError:
            return None

    @classmethod
    def _normal_allow_entry(cls, entry: str) -> str:
        text = str(entry).strip().lower().rstrip(".").removeprefix("[").removesuffix("]")
        literal = cls._literal(text)
        return str(literal) if literal is not None else text
