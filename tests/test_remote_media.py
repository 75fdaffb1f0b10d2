"""Remote media: the address policy, and the fetch mechanics against loopback servers only.

The production policy blocks loopback, so the mechanics (bytes, limits, timeouts, redirects) run with a
policy that is the default less 127.0.0.0/8; every other test uses the default. No test leaves the
machine: names are resolved by injected resolvers that answer loopback or addresses that are refused
before any connection. Every server waits at most a few seconds and stops at teardown.
"""
from __future__ import annotations

import ipaddress
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from utils.errors import InvalidInput, PayloadTooLarge
from utils.media.remote import DEFAULT_BLOCKED_NETWORKS, RemoteFetcher, RemoteMediaSettings, classify_address

FIELD = "messages[0].content[1].image_url"
BODY = b"\x89PNG not really, but bytes all the same"
LOOPBACK_ALLOWED = tuple((net, kind) for net, kind in DEFAULT_BLOCKED_NETWORKS
                         if net != ipaddress.ip_network("127.0.0.0/8"))


class SpyFetcher(RemoteFetcher):
    """Records every address it connects to."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connects: list[str] = []

    def _connect(self, address, port, timeout):
        self.connects.append(str(address))
        return super()._connect(address, port, timeout)


def loopback_fetcher(resolve=None, **settings) -> SpyFetcher:
    return SpyFetcher(RemoteMediaSettings(**{"enabled": True, **settings}), blocked_networks=LOOPBACK_ALLOWED,
                      resolve=resolve)


def default_fetcher(resolve=None, **settings) -> SpyFetcher:
    return SpyFetcher(RemoteMediaSettings(**{"enabled": True, **settings}), resolve=resolve)


def refused(fetcher, url, kind=InvalidInput):
    with pytest.raises(kind) as info:
        fetcher.fetch(url, FIELD)
    error = info.value
    assert error.field == FIELD and type(error) is kind
    if kind is InvalidInput:
        assert error.status == 400 and error.error == "url refused"
    return error.details


# ---------------------------------------------------------------- a loopback server

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5  # server-side socket reads

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        self.server.seen.append((self.path, self.headers.get("Host")))
        route, _, rest = self.path.lstrip("/").partition("/")
        query = parse_qs(urlsplit(self.path).query)
        try:
            getattr(self, "route_" + urlsplit(route).path.replace("-", "_"), self.route_missing)(rest, query)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass

    def send(self, status, body=b"", headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if not any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def route_ok(self, rest, query):
        self.send(200, BODY)

    def route_missing(self, rest, query):
        self.send(404, b"no such thing")

    def route_redirect(self, rest, query):
        self.send(302, headers=[("Location", query["to"][0]), ("Content-Length", "0")])

    def route_hop(self, rest, query):  # /hop/N -> /hop/N+1 -> ... for ever
        self.send(302, headers=[("Location", f"/hop/{int(rest) + 1}"), ("Content-Length", "0")])

    def route_chain(self, rest, query):  # /chain/N -> ... -> /chain/0 -> 200
        if int(rest) == 0:
            self.send(200, BODY)
        else:
            self.send(302, headers=[("Location", f"/chain/{int(rest) - 1}"), ("Content-Length", "0")])

    def route_huge(self, rest, query):  # announces a gigabyte, sends nothing
        self.send(200, headers=[("Content-Length", str(2**30))])

    def route_chunked(self, rest, query):  # no Content-Length: up to 200 KB in 1 KB chunks
        self.send(200, headers=[("Transfer-Encoding", "chunked")])
        for _ in range(200):
            if self.server.stop.is_set():
                return
            self.wfile.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def route_unsized(self, rest, query):  # no Content-Length, no chunking: the body runs to the close
        self.close_connection = True
        self.send(200, headers=[("Connection", "close"), ("Transfer-Encoding", "identity")])
        for _ in range(200):
            self.wfile.write(b"y" * 1024)

    def route_slow(self, rest, query):  # answers nothing for 3 s
        self.server.stop.wait(3)
        self.send(200, BODY)

    def route_trickle(self, rest, query):  # one byte each 50 ms, each read well inside any timeout
        self.send(200, headers=[("Content-Length", "1000")])
        for _ in range(1000):
            if self.server.stop.wait(0.05):
                return
            self.wfile.write(b"z")
            self.wfile.flush()


class LoopbackServer:
    def __init__(self, tls: ssl.SSLContext | None = None):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.seen = []
        self.httpd.stop = threading.Event()
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def seen(self):
        return self.httpd.seen

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def close(self):
        self.httpd.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server():
    srv = LoopbackServer()
    yield srv
    srv.close()


@pytest.fixture
def listener():
    """A loopback port that accepts nothing by itself: a connection would wait in its backlog."""
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


def assert_no_connection(sock: socket.socket):
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.accept()


# ---------------------------------------------------------------- the address policy

@pytest.mark.parametrize("address,kind", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
    ("172.31.255.255", "private"), ("192.168.1.1", "private"), ("100.64.0.1", "carrier-grade NAT"),
    ("169.254.169.254", "cloud metadata"), ("169.254.1.1", "link-local"), ("100.100.100.200", "cloud metadata"),
    ("::1", "loopback"), ("fe80::1", "link-local"), ("fc00::1", "unique-local"), ("fd12:3456::1", "unique-local"),
    ("fd00:ec2::254", "cloud metadata"), ("::ffff:127.0.0.1", "loopback (IPv4-mapped)"),
    ("::ffff:169.254.169.254", "cloud metadata (IPv4-mapped)"), ("64:ff9b::a00:1", "private (NAT64)"),
    ("2002:c0a8:101::1", "private (6to4)"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"), ("192.0.2.7", "reserved (documentation)"),
])
def test_blocked_addresses_are_named(address, kind):
    assert classify_address(address) == kind


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "2a00:1450:4001::200e",
                                     "::ffff:8.8.8.8", "172.32.0.1", "100.128.0.1"])
def test_public_addresses_are_allowed(address):
    assert classify_address(address) is None


# ---------------------------------------------------------------- refusals before any connection

def test_disabled_refuses_every_url(listener):
    fetcher = SpyFetcher(RemoteMediaSettings())
    details = refused(fetcher, f"http://127.0.0.1:{listener.getsockname()[1]}/x")
    assert details == "remote media URLs are turned off (REMOTE_MEDIA=1 enables them)"
    assert fetcher.connects == []
    assert_no_connection(listener)


@pytest.mark.parametrize("host,kind", [
    ("127.0.0.1", "loopback"), ("[::1]", "loopback"), ("[::ffff:127.0.0.1]", "loopback (IPv4-mapped)"),
    ("localhost", "loopback"), ("127.1", "loopback"), ("2130706433", "loopback"), ("0.0.0.0", "unspecified"),
])
def test_loopback_is_refused_by_the_default_policy_before_connecting(listener, host, kind):
    fetcher = default_fetcher()
    details = refused(fetcher, f"http://{host}:{listener.getsockname()[1]}/image.png")
    assert f"blocked address ({kind})" in details
    assert fetcher.connects == []
    assert_no_connection(listener)


@pytest.mark.parametrize("answer,kind", [
    (["10.0.0.7"], "private"), (["169.254.169.254"], "cloud metadata"), (["fd00:ec2::254"], "cloud metadata"),
    (["8.8.8.8", "192.168.0.10"], "private"),  # every address must be allowed, not just the first
    (["2606:4700::1111", "::1"], "loopback"),
])
def test_a_name_that_resolves_to_a_blocked_address_is_refused(answer, kind):
    asked = []
    fetcher = default_fetcher(resolve=lambda host, port: asked.append((host, port)) or answer)
    details = refused(fetcher, "https://media.example.com/cat.jpg")
    assert asked == [("media.example.com", 443)]
    assert f"host 'media.example.com' resolves to a blocked address ({kind})" in details
    assert not any(a in details for a in answer)  # internal addresses are not echoed to the client
    assert fetcher.connects == []


@pytest.mark.parametrize("url,needle", [
    ("ftp://127.0.0.1/x.png", "scheme 'ftp' is not allowed"),
    ("file:///etc/passwd", "scheme 'file' is not allowed"),
    ("gopher://example.com/", "scheme 'gopher'"),
    ("data:image/png;base64,AAAA", "scheme 'data'"),
    ("//example.com/x.png", "scheme '(none)'"),
    ("http://user:pw@example.com/x.png", "user name or password"),
    ("http:///x.png", "no host"),
    ("http://example.com:99999/", "not a valid URL"),
    ("http://exa mple.com/", "not a valid host name"),
    ("", "expected an http or https URL"),
])
def test_bad_urls_are_refused(url, needle):
    fetcher = default_fetcher(resolve=lambda host, port: pytest.fail("nothing may be resolved"))
    assert needle in refused(fetcher, url)
    assert fetcher.connects == []


def test_the_allow_list(server):
    answers = {"media.example.com": ["127.0.0.1"], "a.cdn.example.org": ["127.0.0.1"],
               "x.y.cdn.example.org": ["127.0.0.1"]}
    asked = []

    def resolve(host, port):
        asked.append(host)
        return answers[host]

    fetcher = loopback_fetcher(resolve=resolve, allow_hosts=("media.example.com", "*.cdn.example.org"))
    for host in ("media.example.com", "MEDIA.example.com.", "a.cdn.example.org", "x.y.cdn.example.org"):
        assert fetcher.fetch(server.url("/ok", host), FIELD) == BODY
    for host in ("example.com", "evil.com", "cdn.example.org", "xcdn.example.org", "media.example.com.evil.net",
                 "127.0.0.1"):
        assert "not on the remote media allow-list" in refused(fetcher, server.url("/ok", host))
    assert asked == ["media.example.com", "media.example.com", "a.cdn.example.org", "x.y.cdn.example.org"]
    # the connection goes to the address that was checked, and the request names the host
    assert [host for _, host in server.seen] == [f"media.example.com:{server.port}"] * 2 + [
        f"a.cdn.example.org:{server.port}", f"x.y.cdn.example.org:{server.port}"]
    assert fetcher.connects == ["127.0.0.1"] * 4


def test_the_resolver_failing_or_hanging_is_a_400():
    def broken(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    assert "could not resolve host 'nowhere.example'" in refused(default_fetcher(resolve=broken),
                                                                  "http://nowhere.example/")
    assert "did not resolve to any address" in refused(default_fetcher(resolve=lambda h, p: []),
                                                       "http://nowhere.example/")
    gate = threading.Event()
    try:
        start = time.monotonic()
        details = refused(default_fetcher(resolve=lambda h, p: gate.wait(3) and [], timeout=0.3),
                          "http://slow-dns.example/")
        assert "took longer than the 0.3 s remote media timeout" in details
        assert time.monotonic() - start < 1.5
    finally:
        gate.set()


# ---------------------------------------------------------------- fetching (loopback allowed for the test)

def test_fetches_the_bytes(server):
    fetcher = loopback_fetcher()
    assert fetcher.fetch(server.url("/ok"), FIELD) == BODY
    assert fetcher.fetch(server.url("/ok/with%20space and é?q=a b"), FIELD) == BODY
    assert server.seen[0] == ("/ok", f"127.0.0.1:{server.port}")
    assert server.seen[1][0] == "/ok/with%20space%20and%20%C3%A9?q=a%20b"


def test_a_404_names_the_status(server):
    details = refused(loopback_fetcher(), server.url("/nothing-here"))
    assert "HTTP 404" in details and "Not Found" in details


def test_a_content_length_over_the_limit_is_refused_before_reading(server):
    start = time.monotonic()
    details = refused(loopback_fetcher(max_bytes=1000), server.url("/huge"), PayloadTooLarge)
    assert f"announces {2**30} bytes" in details and "limited to 1000 bytes" in details
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("path", ["/chunked", "/unsized"])
def test_a_body_without_length_is_cut_off_past_the_limit(server, path):
    error = pytest.raises(PayloadTooLarge, loopback_fetcher(max_bytes=4096).fetch, server.url(path), FIELD).value
    assert error.status == 413 and error.field == FIELD and "larger than the remote media limit" in error.details
    assert len(loopback_fetcher(max_bytes=300 * 1024).fetch(server.url(path), FIELD)) == 200 * 1024


def test_a_server_that_does_not_answer_times_out(server):
    start = time.monotonic()
    details = refused(loopback_fetcher(timeout=0.5), server.url("/slow"))
    assert "took longer than the 0.5 s remote media timeout" in details
    assert time.monotonic() - start < 1.5


def test_a_trickling_server_cannot_stretch_the_deadline(server):
    start = time.monotonic()
    details = refused(loopback_fetcher(timeout=0.6), server.url("/trickle"))
    assert "took longer than the 0.6 s remote media timeout" in details
    assert time.monotonic() - start < 1.5


def test_redirects_are_followed_up_to_the_limit(server):
    fetcher = loopback_fetcher(max_redirects=2)
    assert fetcher.fetch(server.url("/chain/2"), FIELD) == BODY
    assert [path for path, _ in server.seen] == ["/chain/2", "/chain/1", "/chain/0"]
    assert fetcher.fetch(server.url("/redirect?to=/ok"), FIELD) == BODY
    details = refused(fetcher, server.url("/hop/0"))
    assert "too many redirects (more than 2)" in details and "/hop/0" in details
    assert [path for path, _ in server.seen][-3:] == ["/hop/0", "/hop/1", "/hop/2"]
    assert "too many redirects (more than 0)" in refused(loopback_fetcher(max_redirects=0), server.url("/chain/1"))


@pytest.mark.parametrize("location,needle", [
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a blocked address (cloud metadata)"),
    ("http://10.0.0.1/", "10.0.0.1 is a blocked address (private)"),
    ("http://[fd00:ec2::254]/", "blocked address (cloud metadata)"),
    ("http://[::ffff:10.0.0.1]/", "blocked address (private (IPv4-mapped))"),
    ("http://internal.example/", "host 'internal.example' resolves to a blocked address (private)"),
    ("file:///etc/passwd", "scheme 'file' is not allowed"),
    ("ftp://127.0.0.1/x", "scheme 'ftp' is not allowed"),
])
def test_every_redirect_is_checked_again_before_connecting(server, location, needle):
    fetcher = loopback_fetcher(resolve=lambda host, port: {"internal.example": ["10.1.1.1"]}[host])
    details = refused(fetcher, server.url(f"/redirect?to={location}"))
    assert details.startswith("redirected to ") and needle in details
    assert fetcher.connects == ["127.0.0.1"]


def test_a_redirect_off_the_allow_list_is_refused(server):
    fetcher = loopback_fetcher(resolve=lambda host, port: ["127.0.0.1"], allow_hosts=("media.example.com",))
    details = refused(fetcher, server.url("/redirect?to=http://other.example/ok", "media.example.com"))
    assert "host 'other.example' is not on the remote media allow-list" in details
    assert fetcher.connects == ["127.0.0.1"]


def test_no_proxy_from_the_environment_is_used(server, monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://10.9.9.9:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    fetcher = loopback_fetcher()
    assert fetcher.fetch(server.url("/ok"), FIELD) == BODY
    assert fetcher.connects == ["127.0.0.1"]


# ---------------------------------------------------------------- https: the name is verified on the pinned socket

@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A throw-away CA and a certificate for media.test it signed (openssl CLI)."""
    root = tmp_path_factory.mktemp("tls")

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True, timeout=30)

    try:
        curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        openssl("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test ca",
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        openssl("req", *curve, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=media.test")
        (root / "leaf.ext").write_text("subjectAltName=DNS:media.test\nbasicConstraints=CA:FALSE\n"
                                       "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
                                       "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
        openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext")
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"openssl could not make test certificates: {exc}")
    return root


@pytest.fixture
def tls_server(certificates):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates / "leaf.pem", certificates / "leaf.key")
    srv = LoopbackServer(tls=context)
    yield srv
    srv.close()


def test_https_verifies_the_host_name_on_the_checked_address(tls_server, certificates):
    trusting = ssl.create_default_context(cafile=str(certificates / "ca.pem"))
    resolve = lambda host, port: ["127.0.0.1"]  # noqa: E731
    fetcher = SpyFetcher(RemoteMediaSettings(enabled=True), blocked_networks=LOOPBACK_ALLOWED, resolve=resolve,
                         ssl_context=trusting)
    assert fetcher.fetch(tls_server.url("/ok", "media.test", "https"), FIELD) == BODY
    assert tls_server.seen == [("/ok", f"media.test:{tls_server.port}")]
    # the same socket target under another name: the certificate does not match it
    assert "TLS certificate of 'other.test' did not verify" in refused(
        fetcher, tls_server.url("/ok", "other.test", "https"))
    # the system's CAs do not know the test CA
    system = SpyFetcher(RemoteMediaSettings(enabled=True), blocked_networks=LOOPBACK_ALLOWED, resolve=resolve)
    assert "TLS certificate of 'media.test' did not verify" in refused(
        system, tls_server.url("/ok", "media.test", "https"))
    with pytest.raises(ValueError):
        RemoteFetcher(RemoteMediaSettings(), ssl_context=ssl._create_unverified_context())


def test_https_to_a_plain_http_server_fails_cleanly(server):
    assert "TLS handshake" in refused(loopback_fetcher(), server.url("/ok", scheme="https"))
