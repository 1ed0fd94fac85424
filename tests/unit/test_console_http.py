"""The browser console's routes on the ingress (no sockets): its files, their headers, whoami."""

from __future__ import annotations

import collections
import html.parser
import json
import re
import time
from types import SimpleNamespace
from typing import Any

import pytest

from sentientedge import auth
from sentientedge.errors import StoreUnavailable
from sentientedge.ingress.http import (
    CONSOLE_FILES,
    HttpEndpoints,
    console_file,
    console_policy,
    parse_request,
)

SECRET = "console-unit-test-secret-0123456789abcdef"


class FakeStore:
    """Revocation as the tests set it; ``down`` stands for Redis being away."""

    def __init__(self) -> None:
        self.revoked: set[str] = set()
        self.down = False

    async def is_revoked(self, identity: auth.Identity) -> bool:
        if self.down:
            raise StoreUnavailable("redis away")
        return identity.credential_id in self.revoked


def endpoints() -> HttpEndpoints:
    server = SimpleNamespace(
        counters=SimpleNamespace(handshakes=collections.Counter()),
        verifier=auth.Verifier.of(SECRET),
        store=FakeStore(),
    )
    return HttpEndpoints(server)  # type: ignore[arg-type]


def request(target: str, method: str = "GET", headers: dict[str, str] | None = None) -> Any:
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:4000\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    parsed = parse_request((head + "\r\n").encode("latin-1"))
    assert parsed is not None
    return parsed[0]


def split(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(": ")
        headers[name.lower()] = value
    assert int(headers["content-length"]) == len(body)
    return int(lines[0].split(" ")[1]), headers, body


async def get(target: str, **options: Any) -> tuple[int, dict[str, str], bytes]:
    return split(await endpoints().answer(request(target, **options)))


@pytest.mark.parametrize(
    "path, content_type",
    [
        ("/console", "text/html; charset=utf-8"),
        ("/console/", "text/html; charset=utf-8"),
        ("/console/console.js", "text/javascript; charset=utf-8"),
        ("/console/console.css", "text/css; charset=utf-8"),
    ],
)
async def test_the_console_files_are_served_with_their_type_and_a_strict_policy(path, content_type):
    status, headers, body = await get(path)
    assert status == 200 and headers["content-type"] == content_type
    assert body == console_file(CONSOLE_FILES[path][0]) and body
    policy = headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy and "style-src 'self'" in policy
    assert "connect-src 'self' ws://127.0.0.1:4000 wss://127.0.0.1:4000" in policy
    assert "frame-ancestors 'none'" in policy and "form-action 'none'" in policy
    assert "unsafe" not in policy
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"


async def test_the_page_asked_for_with_a_token_is_never_stored():
    _, headers, _ = await get("/console?token=abc")
    assert headers["cache-control"] == "no-store"
    _, headers, _ = await get("/console/console.js")
    assert headers["cache-control"] == "no-cache"


@pytest.mark.parametrize(
    "path",
    [
        "/console/nope",
        "/console/index.html",  # served as /console only
        "/console/../ingress/http.py",
        "/console/%2e%2e/ingress/http.py",
        "/console/console.js/",
        "/consolex",
    ],
)
async def test_unknown_paths_under_console_are_404(path):
    status, headers, body = await get(path)
    assert status == 404 and json.loads(body)["error"] == "not_found"
    assert headers["content-type"] == "application/json"


async def test_only_get_loads_the_console():
    status, headers, _ = await get("/console", method="POST")
    assert status == 405 and headers["allow"] == "GET"


@pytest.mark.parametrize(
    "host, allowed",
    [
        ("example.org", True),
        ("example.org:8443", True),
        ("[::1]:4000", True),
        ("evil.org; script-src *", False),
        ("a b", False),
        ("", False),
        (None, False),
    ],
)
def test_only_a_plain_host_is_named_in_the_policy(host, allowed):
    policy = console_policy(host)
    assert ("ws://" in policy) is allowed
    assert policy.count(";") == 7  # nothing from the Host header adds a directive
    if allowed:
        assert f"connect-src 'self' ws://{host} wss://{host};" in policy


class _Page(html.parser.HTMLParser):
    """Every URL the page loads, and anything a strict policy would block."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        for name in ("src", "href", "action"):
            if found.get(name):
                self.urls.append(found[name] or "")
        if tag == "script" and not found.get("src"):
            self.inline.append("inline script")
        if tag == "style":
            self.inline.append("style element")
        for name in found:
            if name == "style" or name.startswith("on"):
                self.inline.append(f"{name}= on <{tag}>")


def test_the_page_loads_nothing_from_elsewhere_and_runs_under_its_policy():
    page = _Page()
    page.feed(console_file("index.html").decode())
    assert sorted(page.urls) == ["/console/console.css", "/console/console.js", "data:,"]
    assert page.inline == []


def test_the_script_keeps_its_rules():
    script = console_file("console.js").decode()
    # Relayed data reaches the page as text only; the token is never stored or logged.
    for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert banned not in script
    for banned in ("localStorage", "sessionStorage", "document.cookie", "console.log"):
        assert banned not in script
    # Every request goes to the page's own origin.
    assert not re.search(r"https?://", script)
    assert '"se1.json"' in script
    assert "history.replaceState" in script


def token(role: str = "operator", ttl: float = 600, **claims: Any) -> str:
    return auth.mint_jwt(SECRET, "pilot-1", role, ttl, **claims)


FOREIGN = auth.mint_jwt("another-secret-0123456789abcdef", "x", "observer", 60)


async def test_whoami_says_whose_token_it_is():
    before = time.time()
    status, headers, body = await get(
        "/console/whoami", headers={"Authorization": f"Bearer {token()}"}
    )
    assert status == 200 and headers["cache-control"] == "no-store"
    answer = json.loads(body)
    assert (answer["sub"], answer["role"]) == ("pilot-1", "operator")
    assert before + 590 < answer["exp"] < time.time() + 610


@pytest.mark.parametrize(
    "headers, reason",
    [
        ({}, "no token: send Authorization: Bearer <token>"),
        ({"Authorization": "Bearer not-a-token"}, "token malformed"),
        ({"Authorization": "Basic abc"}, "authorization header must be 'Bearer <token>'"),
        ({"Authorization": f"Bearer {token(ttl=-5)}"}, "token expired"),
        ({"Authorization": f"Bearer {FOREIGN}"}, "token signature invalid"),
    ],
)
async def test_whoami_refuses_a_bad_token_with_the_reason(headers, reason):
    status, _, body = await get("/console/whoami", headers=headers)
    assert status == 401
    answer = json.loads(body)
    assert answer["error"] == "unauthorized" and answer["reason"].startswith(reason)


async def test_whoami_reads_the_header_only_never_the_query_string():
    status, _, body = await get(f"/console/whoami?token={token()}")
    assert status == 401 and "no token" in json.loads(body)["reason"]


async def test_whoami_refuses_a_revoked_token_and_says_when_it_cannot_tell():
    ends = endpoints()
    minted = token()
    jti = auth.token_claims_unverified(minted)["jti"]
    ends.server.store.revoked.add(jti)
    bearer = {"Authorization": f"Bearer {minted}"}
    status, _, body = split(await ends.answer(request("/console/whoami", headers=bearer)))
    assert status == 401 and json.loads(body)["reason"] == "token revoked"
    ends.server.store.down = True
    status, _, _ = split(await ends.answer(request("/console/whoami", headers=bearer)))
    assert status == 503


async def test_whoami_is_get_only():
    status, headers, _ = await get("/console/whoami", method="POST")
    assert status == 405 and headers["allow"] == "GET"
