"""The real process at its edges: what gunicorn answers itself, request bodies that are too big, short,
slow or badly framed, control characters in log lines, and SIGTERM while requests are in flight."""
from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest
import requests

from tests.conftest import wait_for

CAP_MB = 1
CAP = CAP_MB * 2**20


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(BODY_TIMEOUT=2, MAX_CONTENT_LENGTH_MB=CAP_MB)


def exchange(server, data: bytes, *, half_close: bool = False, timeout: float = 30.0) -> tuple[int, dict, bytes]:
    """Sends raw bytes, reads until the server closes; (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:  # the server may answer (and close) before it read everything
            pass
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        raw = b""
        try:
            while chunk := sock.recv(65536):
                raw += chunk
        except ConnectionResetError:
            pass
    return parse_response(raw)


def parse_response(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body


def post_head(path: str = "/generate/deepseek", **headers) -> bytes:
    fields = {"Host": "test", "Content-Type": "application/json", **headers}
    return (f"POST {path} HTTP/1.1\r\n" + "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in fields.items())
            + "\r\n").encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def assert_json_error(status, headers, body, expected_status, error=None):
    assert status == expected_status, body[:300]
    assert headers["content-type"].startswith("application/json"), headers
    parsed = json.loads(body)
    assert parsed["details"] and (error is None or parsed["error"] == error), parsed
    assert len(headers["x-request-id"]) >= 16
    return parsed


# ---- what gunicorn answers itself ----------------------------------------------------------------------------

@pytest.mark.parametrize("request_bytes, expected", [
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),                       # limit_request_line
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),        # field size
    (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(120)) + b"\r\n", 431),
    (b"NOT A REQUEST LINE\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400),
    (b"POST /generate/deepseek HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: bogus, chunked\r\n\r\n0\r\n\r\n", 501),
])
def test_errors_gunicorn_answers_itself_are_json(server, request_bytes, expected):
    status, headers, body = exchange(server, request_bytes)
    parsed = assert_json_error(status, headers, body, expected)
    assert headers["connection"] == "close" and "<html" not in body.decode()
    assert parsed["error"] == {400: "bad request", 414: "uri too long", 431: "request header fields too large",
                               501: "not implemented"}[expected]


@pytest.mark.parametrize("path,shape", [("/health", "status"), ("/admin/jobs", "counts"), ("/jobs", "next")])
def test_a_script_name_header_neither_fails_nor_reroutes(server, path, shape):
    """gunicorn honours a SCRIPT_NAME header from loopback (forwarder_headers): /health answered 500
    (the path does not start with it), /admin/jobs was served as /jobs. A proxy's path rules (block
    /admin, /metrics) could be sidestepped that way."""
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nSCRIPT_NAME: /admin\r\nConnection: close\r\n\r\n".encode()
    status, _, body = exchange(server, request)
    assert status == 200 and shape in json.loads(body), body[:300]


def test_the_control_socket_belongs_to_this_instance(server):
    """gunicorn's control socket defaulted to one path per user ($XDG_RUNTIME_DIR or ~/.gunicorn): a
    second instance took it over, and removed it when it stopped."""
    path = server.tmp / "logs" / f"gunicorn-{server.port}.ctl"
    assert wait_for(path.is_socket, timeout=10), sorted(p.name for p in (server.tmp / "logs").iterdir())


# ---- request bodies -------------------------------------------------------------------------------------------

def test_a_chunked_body_over_the_cap_is_413_not_cut(server):
    prompt = json.dumps({"prompt": "hi", "max_new_tokens": 2}).encode()
    padding = b" " * (CAP // 4)
    over = post_head(Transfer_Encoding="chunked") + chunk(prompt) + chunk(padding) * 5 + b"0\r\n\r\n"
    status, headers, body = exchange(server, over)
    assert_json_error(status, headers, body, 413, "payload too large")
    assert "MAX_CONTENT_LENGTH_MB" in json.loads(body)["details"] and headers["connection"] == "close"
    # ...while a chunked body just under the cap is served whole
    under = post_head(Transfer_Encoding="chunked", Connection="close") + chunk(prompt) + \
        chunk(b" " * (CAP - len(prompt) - 1)) + b"0\r\n\r\n"
    status, _, body = exchange(server, under)
    assert status == 200, body[:300]


def test_a_content_length_beyond_the_bytes_sent_is_400(server):
    body = json.dumps({"prompt": "hi", "max_new_tokens": 2}).encode()
    request = post_head(Content_Length=len(body) + 100) + body
    status, headers, answer = exchange(server, request, half_close=True)  # the client's end of stream
    parsed = assert_json_error(status, headers, answer, 400, "incomplete body")
    assert f"after {len(body)} of the {len(body) + 100} bytes" in parsed["details"]


def test_a_body_that_does_not_arrive_in_time_is_408_and_frees_its_thread(server):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as slow:
        slow.sendall(post_head(Content_Length=200) + b'{"prompt": "wai')  # ...and nothing more
        time.sleep(0.5)
        # the server serves others meanwhile
        assert requests.post(server.url + "/generate/deepseek", json={"prompt": "hi", "max_new_tokens": 2},
                             timeout=30).status_code == 200
        raw = b""
        while chunk_ := slow.recv(65536):
            raw += chunk_
    elapsed = time.monotonic() - started
    status, headers, body = parse_response(raw)
    parsed = assert_json_error(status, headers, body, 408, "body timeout")
    assert "BODY_TIMEOUT (2 s)" in parsed["details"] and headers["connection"] == "close"
    assert 1.5 < elapsed < 15, elapsed


def test_invalid_chunk_framing_is_400(server):
    for framing in (b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabcXY0\r\n\r\n", b"3;bad ext\r\nabc\r\n0\r\n\r\n"):
        status, headers, body = exchange(server, post_head(Transfer_Encoding="chunked") + framing)
        parsed = assert_json_error(status, headers, body, 400, "invalid chunked encoding")
        assert "invalid chunked body" in parsed["details"]
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def test_uploads_spooled_to_disk_pass_the_guard_by_length_and_chunked(server):
    from urllib3 import encode_multipart_formdata

    from tests import media_samples as ms
    clip = ms.wav(seconds=4.0)  # ~700 KB: over the 512 KB spool threshold, under the 1 MB cap
    body, content_type = encode_multipart_formdata({"prompt": "what is said?", "max_new_tokens": "2",
                                                    "audio": ("clip.wav", clip, "audio/wav")})
    url = server.url + "/generate/qwen_audio"
    by_length = requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=120)
    assert by_length.status_code == 200, by_length.text
    chunked = requests.post(url, data=iter([body[:300_000], body[300_000:]]), timeout=120,
                            headers={"Content-Type": content_type})
    assert chunked.status_code == 200, chunked.text
    assert [p for p in (server.tmp / "tmp").rglob("*") if p.is_file()] == []


# ---- log lines --------------------------------------------------------------------------------------------------

def test_a_newline_in_the_path_does_not_forge_a_log_line(server):
    forged = "2026-11-28 17:00:00,000 INFO model_server.access: GET /admin/forged 200 1.0ms"
    path = "/nothing%0a" + forged.replace(" ", "%20") + "%1b[2J"
    status, _, _ = exchange(server, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status == 404
    assert wait_for(lambda: "/nothing" in server.log_text(), timeout=10)
    text = server.log_path.read_text(errors="replace")
    assert not any(line.startswith("2026-11-28 17:00:00,000") for line in text.splitlines())
    (line,) = [line for line in text.splitlines() if "/nothing" in line]
    assert "/nothing\\n2026-11-28" in line and "\\x1b[2J 404" in line and "\x1b" not in text
    records = [json.loads(x) for x in (server.tmp / "logs" / "server.log").read_text().splitlines()]
    (access,) = [r for r in records if r.get("path", "").startswith("/nothing")]
    assert access["path"] == "/nothing\n" + forged + "\x1b[2J"


# ---- SIGTERM ---------------------------------------------------------------------------------------------------

LONG = {"prompt": "hello there", "max_new_tokens": 300, "temperature": 1.0, "seed": 1}  # runs to 300 tokens


def tmp_files(server) -> list:
    return [p for p in (server.tmp / "tmp").rglob("*") if p.is_file()]


def test_sigterm_lets_the_request_in_flight_finish_refuses_new_ones_and_exits_clean(start_server, extra_config):
    server = start_server(MODELS_CONFIG=extra_config, SHUTDOWN_GRACE=120)
    assert requests.post(server.url + "/admin/models/big/load", timeout=120).status_code == 200
    leftover = server.tmp / "tmp" / ("ab" * 16)  # a temp entry a crashed request left behind
    leftover.mkdir()
    (leftover / "upload.bin").write_bytes(b"x" * 1000)

    answer = {}

    def long_request():
        answer["response"] = requests.post(server.url + "/generate/big", json=LONG, timeout=300)

    in_flight = threading.Thread(target=long_request)
    in_flight.start()
    assert wait_for(lambda: requests.get(server.url + "/admin/model_status", timeout=10)
                    .json()["models"]["big"]["in_flight"] == 1, timeout=30)
    # The status poll itself counts as in flight until the server closes it, a moment after its answer
    # reached us (seen in CI: "2 in flight"); the long request runs for seconds more.
    time.sleep(0.5)
    server.process.send_signal(signal.SIGTERM)
    assert wait_for(lambda: requests.get(server.url + "/ready", timeout=10).status_code == 503, timeout=10)
    ready = requests.get(server.url + "/ready", timeout=10).json()
    assert ready["status"] == "draining" and ready["checks"]["draining"] is True

    refused = requests.post(server.url + "/generate/deepseek", json={"prompt": "hi", "max_new_tokens": 2}, timeout=10)
    assert in_flight.is_alive()  # still generating while new requests are turned away
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"] == "shutting down" and refused.headers["Connection"] == "close"
    assert requests.get(server.url + "/health", timeout=10).status_code == 200

    in_flight.join(300)
    response = answer["response"]
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] > 0  # 300 here (seed 1 runs past it)
    assert server.process.wait(timeout=60) == 0
    log_text = server.log_text()
    assert "draining: no new requests; 1 in flight" in log_text and "shutdown: unload the models" in log_text
    assert "grace over" not in log_text
    assert tmp_files(server) == [] and not leftover.exists()
    assert not (server.tmp / "logs" / "server.json").exists()


def test_sigterm_past_the_grace_ends_a_stream_with_a_last_event(start_server, extra_config):
    server = start_server(MODELS_CONFIG=extra_config, SHUTDOWN_GRACE=1)
    assert requests.post(server.url + "/admin/models/big/load", timeout=120).status_code == 200
    stream = requests.post(server.url + "/generate/big", stream=True, timeout=120,
                           json={"prompt": "hello there", "max_new_tokens": 2000, "temperature": 1.0, "seed": 0,
                                 "stream": True})
    lines = stream.iter_lines()
    first = next(line for line in lines if line)
    assert first.startswith(b"data: {\"text\"")
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    rest = [line for line in lines if line]
    assert rest[-1] == b"data: [DONE]"
    assert json.loads(rest[-2][6:]) == {"error": "shutting down",
                                        "details": "the server is shutting down; the answer is incomplete"}
    assert len(rest) < 1500  # cut, not run to its end
    assert server.process.wait(timeout=60) == 0
    assert time.monotonic() - signalled < 20
    assert "shutdown: unload the models" in server.log_text()
