"""The browser ground station (``GET /console``) in headless Chromium, driven by Playwright.

Debian's ``chromium`` (``scripts/setup`` installs it) is the browser; Playwright's own downloads
are not used. Drones fly in this process with :class:`sentientedge.client.Client`; every wait is
on a condition with a deadline. Screenshots go to ``test-output/`` at the repository's root.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, WebSocketRoute, async_playwright, expect

from sentientedge.client import Client
from sentientedge.fleet import telemetry
from tests.e2e.support import Router
from tests.helpers import REPO

CHROMIUM = Path("/usr/bin/chromium")
OUTPUT = REPO / "test-output"
RATE_HZ = 10
FLIGHT_S = 120  # the longest a drone flies, whatever happens to the test
WAIT_MS = 30_000  # Playwright's deadline for each condition (2 cores, Ray and a browser)
DEGREES = re.compile(r"^-?\d{1,3}\.\d{6}$")
HERTZ = re.compile(r"^([5-9]|1[0-5])\.\d Hz$")  # about RATE_HZ, as the page measures it


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"chromium is not installed at {CHROMIUM}; scripts/setup installs it")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox"]
        )
        try:
            yield launched
        finally:
            await launched.close()


def demo_shape(drone_id: str, seq: int, lat: float, lon: float, armed: bool) -> dict[str, Any]:
    """What the demo fleet and the load generator publish (``pos``, ``att``, ``vel``, ...)."""
    data = telemetry(drone_id, seq, time.time())
    data["pos"].update(lat=lat, lon=lon)
    return data


def bridge_shape(drone_id: str, seq: int, lat: float, lon: float, armed: bool) -> dict[str, Any]:
    """The MAVLink bridge's shape (``sentientedge/mavlink.py``), the keys the console reads."""
    return {
        "position": {"lat": lat, "lon": lon, "alt": 42.5, "relative_alt": 40.0},
        "attitude": {"roll": 0.6, "pitch": -1.1, "yaw": 53.1},
        "velocity": {"north": 3.0, "east": 4.0, "down": 0.0},
        "heading": 53.1,
        "groundspeed": 5.0,
        "battery": {"voltage": 15.8, "remaining": 87},
        "mode": "GUIDED",
        "armed": armed,
    }


class Drone:
    """A drone flying north-east in a straight line at ``RATE_HZ``, answering its commands."""

    def __init__(self, client: Client, drone_id: str, shape: Callable[..., Any], n: int) -> None:
        self.client = client
        self.id = drone_id
        self.shape = shape
        self.origin = (52.0 + 0.002 * n, 4.3 + 0.003 * n)
        self.armed = False
        self.commands: list[dict[str, Any]] = []

    async def fly(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FLIGHT_S
        seq = 0
        while not stop.is_set() and loop.time() < deadline:
            lat = self.origin[0] + 0.00002 * seq
            lon = self.origin[1] + 0.00003 * seq
            data = self.shape(self.id, seq, lat, lon, self.armed)
            await self.client.publish(f"drone/{self.id}/telemetry", data)
            seq += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1 / RATE_HZ)

    async def answer(self) -> None:
        """``arm`` and ``disarm`` are accepted, anything else denied (no home position)."""
        topic = f"drone/{self.id}/cmd"
        async for message in self.client.messages():
            if message.topic != topic or not isinstance(message.data, dict):
                continue
            command = message.data
            self.commands.append(command)
            name = command.get("command")
            result: dict[str, Any] = {"command": name, "id": command.get("id")}
            if name in ("arm", "disarm"):
                self.armed = name == "arm"
                result["result"] = "accepted"
            else:
                result.update(result="denied", reason="no home position")
            await self.client.publish(f"drone/{self.id}/cmd/result", result, qos=1)


def drone_row(page: Page, drone_id: str) -> Any:
    return page.locator(f'#drones tbody tr[data-drone="{drone_id}"]')


def watch_origins(page: Page, router: Router) -> list[str]:
    """Every request and WebSocket the page opens that is not to the router itself."""
    foreign: list[str] = []
    origins = (f"{router.http}/", f"ws://127.0.0.1:{router.port}/")

    def check(url: str) -> None:
        if not url.startswith(origins) and not url.startswith("data:"):
            foreign.append(url)

    page.on("request", lambda request: check(request.url))
    page.on("websocket", lambda ws: check(ws.url))
    return foreign


def screenshot_path(name: str) -> Path:
    OUTPUT.mkdir(exist_ok=True)
    return OUTPUT / name


async def test_console_watches_the_fleet_and_commands_a_drone(router: Router, browser: Browser):
    tag = uuid.uuid4().hex[:6]
    shapes = [bridge_shape, demo_shape, demo_shape]
    drones = [
        Drone(await router.drone(f"con-{tag}-{n}"), f"con-{tag}-{n}", shape, n)
        for n, shape in enumerate(shapes)
    ]
    commanded = drones[0]
    await commanded.client.subscribe(f"drone/{commanded.id}/cmd")
    stop = asyncio.Event()
    tasks = [asyncio.create_task(d.fly(stop)) for d in drones]
    tasks.append(asyncio.create_task(commanded.answer()))
    page = await browser.new_page(viewport={"width": 1400, "height": 1100})
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    foreign = watch_origins(page, router)
    try:
        token = router.token("operator", f"pilot-{tag}")
        await page.goto(f"{router.http}/console?token={token}")
        await expect(page.locator("#conn-state")).to_have_text("online", timeout=WAIT_MS)
        assert "token" not in page.url, "the token stays in the address bar"
        await expect(page.locator("#who-role")).to_have_text("operator")

        # Every drone listed, online, with a position; the bridge's shape and the demo's read.
        for drone in drones:
            row = drone_row(page, drone.id)
            await expect(row.locator('[data-field="status"]')).to_have_text(
                "online", timeout=WAIT_MS
            )
            await expect(row.locator('[data-field="lat"]')).to_have_text(DEGREES, timeout=WAIT_MS)
        bridge_row = drone_row(page, commanded.id)
        headings = await page.locator("#drones thead th").all_text_contents()
        assert len(headings) == await bridge_row.locator("td").count(), headings
        await expect(bridge_row.locator('[data-field="alt"]')).to_have_text("42.5")
        await expect(bridge_row.locator('[data-field="speed"]')).to_have_text("5.0")
        await expect(bridge_row.locator('[data-field="heading"]')).to_have_text("53°")
        await expect(bridge_row.locator('[data-field="battery"]')).to_have_text("87% 15.8 V")
        await expect(bridge_row.locator('[data-field="mode"]')).to_have_text("GUIDED")
        await expect(bridge_row.locator('[data-field="armed"]')).to_have_text("disarmed")
        demo_row = drone_row(page, drones[1].id)
        await expect(demo_row.locator('[data-field="alt"]')).to_have_text("120.0")
        await expect(demo_row.locator('[data-field="speed"]')).to_have_text("5.0")  # vel vx, vy
        await expect(demo_row.locator('[data-field="mode"]')).to_have_text("AUTO")
        await expect(demo_row.locator('[data-field="battery"]')).to_have_text("100%")

        # Telemetry is live: the position moves, the rates count.
        for drone in drones:
            cell = drone_row(page, drone.id).locator('[data-field="lat"]')
            before = await cell.text_content()
            await expect(cell).not_to_have_text(before or "", timeout=WAIT_MS)
        await expect(page.locator("#msg-rate")).not_to_have_text("0.0", timeout=WAIT_MS)
        await expect(demo_row.locator('[data-field="rate"]')).to_have_text(HERTZ, timeout=WAIT_MS)

        # A command from a button, its result shown; the drone's telemetry follows.
        await bridge_row.click()
        await expect(page.locator("#selected-id")).to_have_text(commanded.id)
        await expect(page.locator("#fields [data-field='position.lat']")).to_be_visible()
        latest = page.locator("#commands tbody tr").first
        await page.locator('button[data-command="arm"]').click()
        await expect(latest.locator('[data-field="command"]')).to_have_text("arm")
        await expect(latest.locator('[data-field="result"]')).to_have_text(
            "accepted", timeout=WAIT_MS
        )
        await expect(bridge_row.locator('[data-field="armed"]')).to_have_text(
            "armed", timeout=WAIT_MS
        )
        await page.locator("#takeoff-alt").fill("25")
        await page.locator('button[data-command="takeoff"]').click()
        await expect(latest.locator('[data-field="command"]')).to_have_text("takeoff 25 m")
        await expect(latest.locator('[data-field="result"]')).to_have_text(
            "denied", timeout=WAIT_MS
        )
        await expect(latest.locator('[data-field="detail"]')).to_have_text("no home position")
        arm, takeoff = commanded.commands[:2]
        assert arm["command"] == "arm" and arm["id"]
        assert takeoff == {"command": "takeoff", "id": takeoff["id"], "alt": 25}

        # A drone that lands and disconnects is reported offline (presence).
        leaving = drones[2]
        await leaving.client.close()
        await expect(drone_row(page, leaving.id).locator('[data-field="status"]')).to_have_text(
            "offline", timeout=WAIT_MS
        )

        shot = screenshot_path("console.png")
        await page.screenshot(path=str(shot), full_page=True)
        print(f"console screenshot: {shot}")
        assert not page_errors, page_errors
        assert not foreign, f"the page reached other origins: {foreign}"
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for drone in drones:
            await drone.client.close()
        await page.close()


async def test_console_shows_no_commands_to_an_observer(router: Router, browser: Browser):
    page = await browser.new_page()
    try:
        token = router.token("observer", f"watcher-{uuid.uuid4().hex[:6]}")
        await page.goto(f"{router.http}/console#token={token}")  # the fragment is never sent
        await expect(page.locator("#conn-state")).to_have_text("online", timeout=WAIT_MS)
        assert "token" not in page.url
        await expect(page.locator("#who-role")).to_have_text("observer")
        await expect(page.locator("#commands-panel")).to_be_hidden()
        await expect(page.locator("#observer-note")).to_be_visible()
    finally:
        await page.close()


async def test_console_reconnects_after_a_drop_and_signs_out_on_4001(
    router: Router, browser: Browser
):
    """The page's WebSocket runs through Playwright, which can cut it from the page's side."""
    tag = uuid.uuid4().hex[:6]
    drone = Drone(await router.drone(f"con-{tag}-r"), f"con-{tag}-r", bridge_shape, 0)
    stop = asyncio.Event()
    flight = asyncio.create_task(drone.fly(stop))
    page = await browser.new_page()
    sockets: list[WebSocketRoute] = []

    def through_playwright(route: WebSocketRoute) -> None:
        route.connect_to_server()
        sockets.append(route)

    await page.route_web_socket(lambda url: "/ws?" in url, through_playwright)
    state, detail = page.locator("#conn-state"), page.locator("#conn-detail")
    lat = drone_row(page, drone.id).locator('[data-field="lat"]')
    try:
        await page.goto(f"{router.http}/console?token={router.token('observer', f'w-{tag}')}")
        await expect(state).to_have_text("online", timeout=WAIT_MS)
        await expect(lat).to_have_text(DEGREES, timeout=WAIT_MS)
        assert len(sockets) == 1

        # Dropped (a restart): the page says so, comes back on its own, resumes its session.
        await sockets[0].close(code=1012, reason="restart")
        await expect(state).to_have_text("reconnecting", timeout=WAIT_MS)
        await expect(detail).to_contain_text("the router is restarting")
        await expect(state).to_have_text("online", timeout=WAIT_MS)
        await expect(detail).to_contain_text("session resumed")
        assert len(sockets) == 2
        before = await lat.text_content()
        await expect(lat).not_to_have_text(before or "", timeout=WAIT_MS)

        # Closed for good with 4001 (token expired or revoked): signed out, and told why.
        await sockets[1].close(code=4001, reason="credentials expired")
        await expect(page.locator("#sign-in-message")).to_contain_text(
            "the token expired or was revoked", timeout=WAIT_MS
        )
        await expect(page.locator("#station")).to_be_hidden()
        assert len(sockets) == 2, "the page reconnected with a token the router closed"
    finally:
        stop.set()
        await flight
        await drone.client.close()
        await page.close()


async def test_console_says_clearly_when_the_token_is_refused(router: Router, browser: Browser):
    page = await browser.new_page()
    try:
        # Typed in.
        await page.goto(f"{router.http}/console")
        await page.locator("#token").fill("not-a-token")
        await page.locator("#sign-in-button").click()
        message = page.locator("#sign-in-message")
        await expect(message).to_have_text(
            "Sign-in failed: the token was refused (token malformed).", timeout=WAIT_MS
        )
        await expect(page.locator("#conn-state")).to_have_text("refused")
        await expect(page.locator("#station")).to_be_hidden()
        # In the address: an expired token.
        expired = router.token("operator", "late-pilot", ttl=-60)
        await page.goto(f"{router.http}/console?token={expired}")
        await expect(message).to_have_text(
            "Sign-in failed: the token was refused (token expired).", timeout=WAIT_MS
        )
        assert "token" not in page.url
        shot = screenshot_path("console-refused.png")
        await page.screenshot(path=str(shot))
        print(f"refused sign-in screenshot: {shot}")
    finally:
        await page.close()
