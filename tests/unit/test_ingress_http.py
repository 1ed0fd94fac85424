"""Request heads parsed by the ingress (no sockets): whole, partial, malformed, with a body."""

from __future__ import annotations

import http

import pytest

from sentientedge.ingress.http import (
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    HttpError,
    error_response,
    parse_request,
    scale_request_instances,
)

UPGRADE = (
    b"GET /ws?token=abc&session=s1 HTTP/1.1\r\n"
    b"Host: 127.0.0.1:4000\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_a_websocket_upgrade():
    parsed = parse_request(UPGRADE + b"\x82\x80")  # a frame sent right behind the head
    assert parsed is not None
    request, used = parsed
    assert used == len(UPGRADE) == request.head_size
    assert (request.method, request.path, request.wants_websocket) == ("GET", "/ws", True)
    assert request.query == {"token": "abc", "session": "s1"}
    assert request.headers["upgrade"] == "websocket"


def test_nothing_until_the_head_and_body_are_whole():
    body = b'{"instances": 2}'
    raw = (
        b"POST /admin/scale-up HTTP/1.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    for cut in range(len(raw)):
        assert parse_request(raw[:cut]) is None
    request, used = parse_request(raw)  # type: ignore[misc]
    assert (request.method, request.body, used) == ("POST", body, len(raw))


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GARBAGE\r\n\r\n", http.HTTPStatus.BAD_REQUEST),
        (b"GET /x HTTP/2\r\n\r\n", http.HTTPStatus.BAD_REQUEST),
        (b"GET x HTTP/1.1\r\n\r\n", http.HTTPStatus.BAD_REQUEST),
        (b"GET /x HTTP/1.1\r\nNo colon here\r\n\r\n", http.HTTPStatus.BAD_REQUEST),
        (b"POST /x HTTP/1.1\r\nContent-Length: ten\r\n\r\n", http.HTTPStatus.BAD_REQUEST),
        (
            b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            http.HTTPStatus.BAD_REQUEST,
        ),
        (
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            http.HTTPStatus.LENGTH_REQUIRED,
        ),
        (
            f"POST /x HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode(),
            http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        ),
        (
            b"GET /x HTTP/1.1\r\n" + b"X: y\r\n" * 4000,
            http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
        ),
    ],
)
def test_malformed_requests_name_their_status(raw, status):
    with pytest.raises(HttpError) as info:
        parse_request(raw)
    assert info.value.status is status


def test_a_head_without_an_end_is_bounded():
    assert parse_request(b"GET /x HTTP/1.1\r\n" + b"X: y\r\n" * 100) is None
    with pytest.raises(HttpError):
        parse_request(b"X" * (MAX_HEAD_BYTES + 1))


def test_error_answers_are_json_and_close():
    answer = error_response(
        http.HTTPStatus.SERVICE_UNAVAILABLE, "unavailable", "server full", {"Retry-After": "5"}
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Connection: close" in head and b"Retry-After: 5" in head
    assert body == b'{"error": "unavailable", "reason": "server full"}'
    assert f"Content-Length: {len(body)}".encode() in head


def test_scale_requests_read_instances_from_the_body():
    assert scale_request_instances(b"") == 1
    assert scale_request_instances(b"  ") == 1
    assert scale_request_instances(b"{}") == 1
    assert scale_request_instances(b'{"instances": 3}') == 3
    for bad, reason in (
        (b"{nope", "JSON"),
        (b"[1]", "instances"),
        (b'{"instances": 1, "x": 2}', "instances"),
        (b'{"instances": true}', "integer"),
        (b'{"instances": 1.5}', "integer"),
        (b'{"instances": 0}', "between"),
        (b'{"instances": 100000}', "between"),
        (b"\xff\xfe", "JSON"),
    ):
        with pytest.raises(ValueError, match=reason):
            scale_request_instances(bad)
