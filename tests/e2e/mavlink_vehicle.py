"""A simulated MAVLink 2 vehicle for the bridge's tests: an ArduCopter-like quadrotor on UDP.

It sends to the bridge (listening with ``udpin:127.0.0.1:PORT``) from a socket of its own on
127.0.0.1: HEARTBEAT at 1 Hz; GLOBAL_POSITION_INT, ATTITUDE, VFR_HUD, SYS_STATUS and GPS_RAW_INT
at ``rate_hz`` (50). It answers each COMMAND_LONG with a COMMAND_ACK: ACCEPTED, or the result
``results`` names for that MAV_CMD, or nothing for a command in ``unanswered``; and it flies
what it accepts, roughly (arm, take off and climb at 5 m/s, land and disarm on the ground).

It runs on a thread and stops by itself after ``duration_s``, so a test that fails half-way
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import math
import select
import socket
import threading
import time
from typing import Any

from pymavlink.dialects.v20 import common as mav

HOME = (52.0, 4.3, 10.0)  # lat, lon (degrees), altitude above sea level (m)
CLIMB_M_S = 5.0
ARDUCOPTER_MODES = {"STABILIZE": 0, "GUIDED": 4, "RTL": 6, "LAND": 9}


class _Datagrams:
    """The file pymavlink writes to: each packed message is one datagram to the bridge."""

    def __init__(self, sock: socket.socket, address: tuple[str, int]) -> None:
        self.sock = sock
        self.address = address

    def write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # nobody listens yet: radio links lose packets too
            self.sock.sendto(data, self.address)


class SimVehicle:
    def __init__(
        self,
        bridge_port: int,
        *,
        results: dict[int, int] | None = None,
        unanswered: frozenset[int] = frozenset(),
        rate_hz: float = 50.0,
        duration_s: float = 120.0,
        system: int = 1,
    ) -> None:
        self.results = dict(results or {})
        self.unanswered = unanswered
        self.rate_hz = rate_hz
        self.duration_s = duration_s
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        # A v20 dialect object frames everything as MAVLink 2.
        self.mav = mav.MAVLink(
            _Datagrams(self.sock, ("127.0.0.1", bridge_port)), srcSystem=system, srcComponent=1
        )
        self.parser = mav.MAVLink(None)
        self.received: list[Any] = []  # every COMMAND_LONG, as parsed
        self.armed = False
        self.mode = ARDUCOPTER_MODES["STABILIZE"]
        self.relative_alt = 0.0
        self.target_alt = 0.0
        self.climb = 0.0
        self.sent = 0
        self._silent = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sim-vehicle", daemon=True)

    # Driven by the test

    def start(self) -> SimVehicle:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def silence(self) -> None:
        """Send nothing and answer nothing, as a vehicle whose link is cut."""
        self._silent.set()

    def resume(self) -> None:
        self._silent.clear()

    def statustext(self, severity: int, text: str) -> None:
        with self._lock:
            self.mav.statustext_send(severity, text.encode())

    def commands(self) -> list[tuple[int, int]]:
        """(MAV_CMD, confirmation) of every COMMAND_LONG received."""
        return [(m.command, m.confirmation) for m in list(self.received)]

    # The vehicle

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        start = time.monotonic()
        next_tick = next_beat = start
        while not self._stop.is_set() and time.monotonic() - start < self.duration_s:
            now = time.monotonic()
            ready, _, _ = select.select([self.sock], [], [], max(0.0, min(next_tick - now, 0.05)))
            if ready:
                self._receive()
            now = time.monotonic()
            if now < next_tick:
                continue
            next_tick = max(next_tick + period, now - period)  # late: catch up, not burst
            self._fly(period)
            if self._silent.is_set():
                continue
            with self._lock:
                if now >= next_beat:
                    next_beat += 1.0
                    self._heartbeat()
                self._stream()

    def _receive(self) -> None:
        try:
            data, _ = self.sock.recvfrom(65535)
        except OSError:
            return
        for msg in self.parser.parse_buffer(data) or []:
            if msg.get_type() == "COMMAND_LONG" and not self._silent.is_set():
                self.received.append(msg)
                self._answer(msg)

    def _answer(self, msg: Any) -> None:
        if msg.command in self.unanswered:
            return
        result = self.results.get(msg.command, mav.MAV_RESULT_ACCEPTED)
        if result == mav.MAV_RESULT_ACCEPTED:
            result = self._obey(msg)
        with self._lock:
            self.mav.command_ack_send(
                msg.command, result, 0, 0, msg.get_srcSystem(), msg.get_srcComponent()
            )

    def _obey(self, msg: Any) -> int:
        if msg.command == mav.MAV_CMD_COMPONENT_ARM_DISARM:
            self.armed = msg.param1 == 1
        elif msg.command == mav.MAV_CMD_NAV_TAKEOFF:
            if not self.armed:
                return mav.MAV_RESULT_FAILED  # as ArduCopter: arm first
            self.mode, self.target_alt = ARDUCOPTER_MODES["GUIDED"], msg.param7
        elif msg.command in (mav.MAV_CMD_NAV_LAND, mav.MAV_CMD_NAV_RETURN_TO_LAUNCH):
            self.target_alt = 0.0
            rtl = msg.command == mav.MAV_CMD_NAV_RETURN_TO_LAUNCH
            self.mode = ARDUCOPTER_MODES["RTL" if rtl else "LAND"]
        elif msg.command == mav.MAV_CMD_DO_SET_MODE:
            self.mode = int(msg.param2)
        else:
            return mav.MAV_RESULT_UNSUPPORTED
        return mav.MAV_RESULT_ACCEPTED

    def _fly(self, dt: float) -> None:
        step = max(-CLIMB_M_S * dt, min(CLIMB_M_S * dt, self.target_alt - self.relative_alt))
        self.relative_alt += step
        self.climb = step / dt
        if self.armed and self.target_alt == 0 and self.relative_alt <= 0 and self.mode != 0:
            self.armed = False  # landed: disarm, as autopilots do

    def _heartbeat(self) -> None:
        base = mav.MAV_MODE_FLAG_CUSTOM_MODE_ENABLED
        if self.armed:
            base |= mav.MAV_MODE_FLAG_SAFETY_ARMED
        state = mav.MAV_STATE_ACTIVE if self.armed else mav.MAV_STATE_STANDBY
        self.mav.heartbeat_send(
            mav.MAV_TYPE_QUADROTOR, mav.MAV_AUTOPILOT_ARDUPILOTMEGA, base, self.mode, state
        )

    def _stream(self) -> None:
        lat, lon, home_alt = HOME
        t = time.monotonic()
        boot_ms = int(t * 1000) % 2**32
        yaw = (t * 0.2) % (2 * math.pi) - math.pi
        alt_mm = int((home_alt + self.relative_alt) * 1000)
        self.mav.global_position_int_send(
            boot_ms,
            int(lat * 1e7),
            int(lon * 1e7),
            alt_mm,
            int(self.relative_alt * 1000),
            0,
            0,
            int(-self.climb * 100),
            int(math.degrees(yaw) % 360 * 100),
        )
        self.mav.attitude_send(boot_ms, 0.01, -0.02, yaw, 0.0, 0.0, 0.2)
        throttle = 40 if self.armed else 0
        heading = int(math.degrees(yaw) % 360)
        self.mav.vfr_hud_send(0.0, 0.0, heading, throttle, home_alt + self.relative_alt, self.climb)
        self.mav.sys_status_send(0, 0, 0, 250, 12_600, 1_500, 87, 0, 0, 0, 0, 0, 0)
        self.mav.gps_raw_int_send(
            boot_ms * 1000, 3, int(lat * 1e7), int(lon * 1e7), alt_mm, 80, 120, 0, 0, 14
        )
        self.sent += 1
