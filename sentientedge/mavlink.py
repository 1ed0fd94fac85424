"""MAVLink and the router, the pure part: telemetry, presence, events, commands and their results.

Rules for this module:
- Pure: no sockets, no threads, no event loop. pymavlink message objects come in; JSON-ready
  maps and descriptions of the MAVLink messages to send come out. Time comes from an injected
  clock (seconds, monotonic). The I/O shell is :mod:`sentientedge.mavlink_bridge`.
- Units out are SI and degrees, whatever MAVLink carried (1e-7 degrees, millimetres,
  centimetres per second, radians, millivolts, centiamperes). An unknown value is ``None``
  (JSON null), never MAVLink's "unknown" sentinel (UINT16_MAX, -1, 255) nor NaN: JSON has no
  NaN, and a sentinel looks like data.
- One vehicle counts: the system of the first autopilot HEARTBEAT heard. A ground station, a
  gimbal or a companion computer on the same link is not it; other systems are ignored.

Telemetry (``drone/{id}/telemetry``): one shape, every key always present, null until known::

    {
      "system": 1,                   the vehicle's MAVLink system id
      "autopilot": "ardupilotmega",  MAV_AUTOPILOT, lower case: "px4", "generic", ...
      "vehicle_type": "quadrotor",   MAV_TYPE, lower case
      "mode": "GUIDED",              flight mode, as the autopilot's own ground station names it
      "armed": true,
      "system_status": "active",     MAV_STATE, lower case: "standby", "critical", ...
      "position": {"lat": deg, "lon": deg, "alt": m above mean sea level,
                   "relative_alt": m above home},
      "attitude": {"roll": deg, "pitch": deg, "yaw": deg (-180..180),
                   "rollspeed": deg/s, "pitchspeed": deg/s, "yawspeed": deg/s},
      "velocity": {"north": m/s, "east": m/s, "down": m/s},
      "heading": deg (0..360),
      "groundspeed": m/s, "airspeed": m/s, "climb": m/s (up), "throttle": %,
      "battery": {"voltage": V, "current": A, "remaining": %},
      "gps": {"fix": "3d", "satellites": 12, "hdop": 0.8, "vdop": 1.2}
    }

From: HEARTBEAT (autopilot, vehicle_type, mode, armed, system_status); GLOBAL_POSITION_INT
(position, velocity, heading); ATTITUDE; VFR_HUD (speeds, climb, throttle; heading when
GLOBAL_POSITION_INT has none);
SYS_STATUS, or BATTERY_STATUS of battery 0 once one is heard (per-cell, the more precise);
GPS_RAW_INT (gps: fix is one of no_gps, no_fix, 2d, 3d, dgps, rtk_float, rtk_fixed, static,
ppp).

Commands (``drone/{id}/cmd``, a map ``{"command": NAME, ...parameters}``)::

    arm      [force]                 COMMAND_LONG MAV_CMD_COMPONENT_ARM_DISARM 1
    disarm   [force]                 COMMAND_LONG MAV_CMD_COMPONENT_ARM_DISARM 0
    takeoff  alt (m above home)      COMMAND_LONG MAV_CMD_NAV_TAKEOFF
    land                             COMMAND_LONG MAV_CMD_NAV_LAND, where the vehicle is
    rtl                              COMMAND_LONG MAV_CMD_NAV_RETURN_TO_LAUNCH
    goto     lat, lon (deg), alt (m above home)   SET_POSITION_TARGET_GLOBAL_INT
    set_mode mode (a name)           COMMAND_LONG MAV_CMD_DO_SET_MODE (ArduPilot, PX4)

A COMMAND_LONG is sent again until a COMMAND_ACK answers it (:class:`RetryPolicy`); its result
is the MAV_RESULT in lower case ("accepted", "denied", ...), or "timeout". MAVLink has no
answer to SET_POSITION_TARGET_GLOBAL_INT: a goto's result is "sent". A command that cannot be
translated has the result "error" and says why.

Errors (every one a :class:`sentientedge.errors.SentientEdgeError`):

- MavlinkError
    - CommandError          a command cannot be translated; its message says why
        - UnknownCommand    no such command
        - BadParameter      a parameter is missing, of the wrong type or out of range
        - UnknownMode       set_mode: a mode this autopilot does not have
        - NotReady          the vehicle has not told enough yet (its autopilot, its home)
    - BridgeFailed          the bridge cannot go on (credentials refused, a bad setting)
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pymavlink import mavutil
from pymavlink.dialects.v20 import common as mav

from sentientedge.errors import (
    BadParameter,
    NotReady,
    UnknownCommand,
    UnknownMode,
)
from sentientedge.ratelimit import TokenBucket

Clock = Callable[[], float]

HEARTBEAT_TIMEOUT_S = 3.0
UINT16_MAX = 65535
STATUSTEXT_CHUNK = 50  # characters in one STATUSTEXT; a shorter chunk ends a long text

# What a GCS is on the link: this bridge's identity (MAVLink reserves 255 for ground stations).
GCS_SYSTEM = 255
GCS_COMPONENT = mav.MAV_COMP_ID_MISSIONPLANNER

# MAV_RESULT (https://mavlink.io/en/messages/common.html#MAV_RESULT): spelled out rather than
# read from pymavlink's enum table, which misses some values in some releases (6, 9).
MAV_RESULTS = {
    0: "accepted",
    1: "temporarily_rejected",
    2: "denied",
    3: "unsupported",
    4: "failed",
    5: "in_progress",
    6: "cancelled",
    7: "command_long_only",
    8: "command_int_only",
    9: "command_unsupported_mav_frame",
}
RESULT_TIMEOUT = "timeout"
RESULT_ERROR = "error"
RESULT_SENT = "sent"  # a goto: MAVLink defines no answer to SET_POSITION_TARGET_GLOBAL_INT

GPS_FIX = {
    0: "no_gps",
    1: "no_fix",
    2: "2d",
    3: "3d",
    4: "dgps",
    5: "rtk_float",
    6: "rtk_fixed",
    7: "static",
    8: "ppp",
}

# Position only: velocity, acceleration, yaw and yaw rate ignored, so the autopilot flies there
# its own way (ArduPilot in GUIDED, PX4 in OFFBOARD).
POSITION_ONLY = (
    mav.POSITION_TARGET_TYPEMASK_VX_IGNORE
    | mav.POSITION_TARGET_TYPEMASK_VY_IGNORE
    | mav.POSITION_TARGET_TYPEMASK_VZ_IGNORE
    | mav.POSITION_TARGET_TYPEMASK_AX_IGNORE
    | mav.POSITION_TARGET_TYPEMASK_AY_IGNORE
    | mav.POSITION_TARGET_TYPEMASK_AZ_IGNORE
    | mav.POSITION_TARGET_TYPEMASK_YAW_IGNORE
    | mav.POSITION_TARGET_TYPEMASK_YAW_RATE_IGNORE
)
FORCE_ARM = 21196.0  # MAV_CMD_COMPONENT_ARM_DISARM param2: arm or disarm despite checks
MAX_ALT_M = 10_000.0  # a bound on takeoff and goto altitudes: a typo, not a flight plan

COMMANDS = ("arm", "disarm", "takeoff", "land", "rtl", "goto", "set_mode")


def _enum_name(enum: str, value: int, prefix: str) -> str | None:
    entry = mav.enums.get(enum, {}).get(value)
    if entry is None or entry.name.endswith("_ENUM_END"):
        return None
    return str(entry.name).removeprefix(prefix).lower()


def _finite(value: float, scale: float = 1.0, digits: int = 3) -> float | None:
    number = float(value) * scale
    return round(number, digits) if math.isfinite(number) else None


def _known(value: int, unknown: int, scale: float, digits: int) -> float | None:
    return None if value == unknown else round(value * scale, digits)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).split("\x00", 1)[0]


def is_vehicle_heartbeat(msg: Any) -> bool:
    """Whether a HEARTBEAT is an autopilot's (as pymavlink's ``probably_vehicle_heartbeat``)."""
    if msg.get_type() != "HEARTBEAT" or msg.get_srcComponent() == mav.MAV_COMP_ID_GIMBAL:
        return False
    not_vehicles = (
        mav.MAV_TYPE_GCS,
        mav.MAV_TYPE_GIMBAL,
        mav.MAV_TYPE_ADSB,
        mav.MAV_TYPE_ONBOARD_CONTROLLER,
    )
    return msg.type not in not_vehicles and msg.autopilot != mav.MAV_AUTOPILOT_INVALID


# Telemetry


@dataclass(frozen=True)
class Vehicle:
    """Who the vehicle is, as far as commands need it."""

    system: int
    component: int
    autopilot: int | None = None
    mav_type: int | None = None
    home_alt: float | None = None  # m above mean sea level, from GLOBAL_POSITION_INT


def empty_telemetry() -> dict[str, Any]:
    return {
        "system": None,
        "autopilot": None,
        "vehicle_type": None,
        "mode": None,
        "armed": None,
        "system_status": None,
        "position": {"lat": None, "lon": None, "alt": None, "relative_alt": None},
        "attitude": {
            "roll": None,
            "pitch": None,
            "yaw": None,
            "rollspeed": None,
            "pitchspeed": None,
            "yawspeed": None,
        },
        "velocity": {"north": None, "east": None, "down": None},
        "heading": None,
        "groundspeed": None,
        "airspeed": None,
        "climb": None,
        "throttle": None,
        "battery": {"voltage": None, "current": None, "remaining": None},
        "gps": {"fix": None, "satellites": None, "hdop": None, "vdop": None},
    }


class Telemetry:
    """The vehicle's last known state, accumulated message by message."""

    def __init__(self) -> None:
        self.state = empty_telemetry()
        self.system: int | None = None
        self.component: int | None = None
        self._autopilot: int | None = None
        self._mav_type: int | None = None
        self._home_alt: float | None = None
        self._battery_status_seen = False
        self._heading_from_position = False
        self._handlers: dict[str, Callable[[Any], None]] = {
            "HEARTBEAT": self._heartbeat,
            "GLOBAL_POSITION_INT": self._global_position,
            "ATTITUDE": self._attitude,
            "VFR_HUD": self._vfr_hud,
            "SYS_STATUS": self._sys_status,
            "BATTERY_STATUS": self._battery_status,
            "GPS_RAW_INT": self._gps_raw,
        }

    def update(self, msg: Any) -> bool:
        """Take in ``msg``; returns whether it came from the vehicle (of any type: a
        STATUSTEXT or COMMAND_ACK is the vehicle's too, for the caller to act on)."""
        if self.system is None:
            if not is_vehicle_heartbeat(msg):
                return False  # nothing counts before the vehicle has said who it is
            self.system, self.component = msg.get_srcSystem(), msg.get_srcComponent()
            self.state["system"] = self.system
        if msg.get_srcSystem() != self.system:
            return False
        kind = msg.get_type()
        if kind == "HEARTBEAT" and not self.is_beat(msg):
            return True  # another component of the vehicle (a camera, say): not its state
        handler = self._handlers.get(kind)
        if handler is not None:
            handler(msg)
        return True

    def is_beat(self, msg: Any) -> bool:
        """Whether ``msg`` is the vehicle's own heartbeat (its autopilot's)."""
        return (
            msg.get_type() == "HEARTBEAT"
            and msg.get_srcSystem() == self.system
            and msg.get_srcComponent() == self.component
            and is_vehicle_heartbeat(msg)
        )

    @property
    def vehicle(self) -> Vehicle | None:
        if self.system is None or self.component is None:
            return None
        return Vehicle(self.system, self.component, self._autopilot, self._mav_type, self._home_alt)

    def snapshot(self) -> dict[str, Any]:
        """A copy to publish: later updates do not change what was handed out."""
        return {k: dict(v) if isinstance(v, dict) else v for k, v in self.state.items()}

    def _heartbeat(self, msg: Any) -> None:
        self._autopilot, self._mav_type = msg.autopilot, msg.type
        state = self.state
        state["autopilot"] = _enum_name("MAV_AUTOPILOT", msg.autopilot, "MAV_AUTOPILOT_")
        state["vehicle_type"] = _enum_name("MAV_TYPE", msg.type, "MAV_TYPE_")
        state["mode"] = mavutil.mode_string_v10(msg)
        state["armed"] = bool(msg.base_mode & mav.MAV_MODE_FLAG_SAFETY_ARMED)
        state["system_status"] = _enum_name("MAV_STATE", msg.system_status, "MAV_STATE_")

    def _global_position(self, msg: Any) -> None:
        position = self.state["position"]
        position["lat"] = round(msg.lat * 1e-7, 7)
        position["lon"] = round(msg.lon * 1e-7, 7)
        position["alt"] = round(msg.alt * 1e-3, 3)
        position["relative_alt"] = round(msg.relative_alt * 1e-3, 3)
        # Home is where relative altitude is 0: what PX4's takeoff needs (it wants AMSL).
        self._home_alt = round((msg.alt - msg.relative_alt) * 1e-3, 3)
        velocity = self.state["velocity"]
        velocity["north"] = round(msg.vx * 0.01, 2)
        velocity["east"] = round(msg.vy * 0.01, 2)
        velocity["down"] = round(msg.vz * 0.01, 2)
        if msg.hdg != UINT16_MAX:
            self.state["heading"] = round(msg.hdg * 0.01, 2)
            self._heading_from_position = True

    def _attitude(self, msg: Any) -> None:
        attitude = self.state["attitude"]
        degrees = math.degrees(1.0)
        for name in ("roll", "pitch", "yaw", "rollspeed", "pitchspeed", "yawspeed"):
            attitude[name] = _finite(getattr(msg, name), degrees, 2)

    def _vfr_hud(self, msg: Any) -> None:
        state = self.state
        state["airspeed"] = _finite(msg.airspeed, digits=2)
        state["groundspeed"] = _finite(msg.groundspeed, digits=2)
        state["climb"] = _finite(msg.climb, digits=2)
        state["throttle"] = int(msg.throttle)
        if not self._heading_from_position:  # GLOBAL_POSITION_INT's is 100 times finer
            state["heading"] = float(msg.heading % 360)

    def _sys_status(self, msg: Any) -> None:
        if self._battery_status_seen:
            return
        battery = self.state["battery"]
        battery["voltage"] = _known(msg.voltage_battery, UINT16_MAX, 1e-3, 3)
        battery["current"] = _known(msg.current_battery, -1, 0.01, 2)
        battery["remaining"] = None if msg.battery_remaining < 0 else int(msg.battery_remaining)

    def _battery_status(self, msg: Any) -> None:
        if msg.id != 0:
            return  # the main battery only: one number per field, not a sum of packs
        self._battery_status_seen = True
        cells = [v for v in msg.voltages if v != UINT16_MAX]
        cells += [v for v in getattr(msg, "voltages_ext", ()) if v not in (0, UINT16_MAX)]
        battery = self.state["battery"]
        battery["voltage"] = round(sum(cells) * 1e-3, 3) if cells else None
        battery["current"] = _known(msg.current_battery, -1, 0.01, 2)
        battery["remaining"] = None if msg.battery_remaining < 0 else int(msg.battery_remaining)

    def _gps_raw(self, msg: Any) -> None:
        gps = self.state["gps"]
        gps["fix"] = GPS_FIX.get(msg.fix_type, f"fix_{msg.fix_type}")
        gps["satellites"] = None if msg.satellites_visible == 255 else int(msg.satellites_visible)
        gps["hdop"] = _known(msg.eph, UINT16_MAX, 0.01, 2)
        gps["vdop"] = _known(msg.epv, UINT16_MAX, 0.01, 2)


# The pace of telemetry

# The vehicle's rate is that of its position stream. A vehicle that sends no position (no GPS,
# the stream turned off) is paced by the next stream in this list that it does send.
PACE_ORDER = ("GLOBAL_POSITION_INT", "ATTITUDE", "VFR_HUD", "HEARTBEAT")
PACE_STALE_S = 2.0  # a stream not heard for this long no longer sets the pace


class TelemetryGate:
    """When a telemetry snapshot goes out: once per message of the pacing stream (the vehicle's
    rate), and at most ``max_rate`` a second on average (bursts of 2 let a vehicle's jitter
    through when its rate is the cap). ``max_rate`` None: no cap."""

    def __init__(self, max_rate: float | None, clock: Clock = time.monotonic) -> None:
        if max_rate is not None and not max_rate > 0:
            raise ValueError(f"max_rate must be positive, not {max_rate!r}")
        self._clock = clock
        self._bucket = None if max_rate is None else TokenBucket(max_rate, 2.0, clock)
        self._last_seen: dict[str, float] = {}

    def offer(self, kind: str) -> bool:
        """A message of type ``kind`` came from the vehicle: publish a snapshot now?"""
        if kind not in PACE_ORDER:
            return False
        now = self._clock()
        self._last_seen[kind] = now
        pacer = next(
            (k for k in PACE_ORDER if now - self._last_seen.get(k, -math.inf) <= PACE_STALE_S),
            kind,
        )
        if kind != pacer:
            return False
        return self._bucket is None or self._bucket.take(now=now)


# Presence


class Presence(Enum):
    ONLINE = "online"
    OFFLINE = "offline"


class HeartbeatWatch:
    """The vehicle is online while its HEARTBEAT is heard: offline once none came for
    ``timeout_s`` (MAVLink's own rule of thumb for a lost link), online again at the next."""

    def __init__(self, timeout_s: float = HEARTBEAT_TIMEOUT_S, clock: Clock = time.monotonic):
        self.timeout_s = timeout_s
        self._clock = clock
        self._last: float | None = None
        self.online = False

    def beat(self) -> Presence | None:
        """A heartbeat: ``ONLINE`` if it brings the vehicle (back) online, else None."""
        self._last = self._clock()
        if self.online:
            return None
        self.online = True
        return Presence.ONLINE

    def check(self) -> Presence | None:
        """``OFFLINE`` once, when the last heartbeat is ``timeout_s`` old; else None."""
        if self.online and self.silent_for() >= self.timeout_s:
            self.online = False
            return Presence.OFFLINE
        return None

    def silent_for(self) -> float:
        return math.inf if self._last is None else self._clock() - self._last


# Events


class StatusTexts:
    """STATUSTEXT to event payloads, joining a long text's chunks (MAVLink 2: ``id`` and
    ``chunk_seq``; the last chunk is the one shorter than 50 characters)."""

    MAX_PENDING = 16  # texts whose end never came are dropped, oldest first

    def __init__(self) -> None:
        self._pending: OrderedDict[int, dict[int, str]] = OrderedDict()

    def add(self, msg: Any) -> dict[str, Any] | None:
        text, ident = _text(msg.text), getattr(msg, "id", 0)
        if ident:
            chunks = self._pending.setdefault(ident, {})
            chunks[getattr(msg, "chunk_seq", 0)] = text
            if len(text) >= STATUSTEXT_CHUNK:
                while len(self._pending) > self.MAX_PENDING:
                    self._pending.popitem(last=False)
                return None
            del self._pending[ident]
            text = "".join(chunks[k] for k in sorted(chunks))
        return statustext_event(msg.severity, text)


def statustext_event(severity: int, text: str) -> dict[str, Any]:
    name = _enum_name("MAV_SEVERITY", severity, "MAV_SEVERITY_") or f"severity_{severity}"
    return {"type": "statustext", "severity": name, "text": text}


def heartbeat_lost_event(silent_s: float) -> dict[str, Any]:
    return {"type": "heartbeat_lost", "silent_s": round(silent_s, 1)}


# Commands


@dataclass(frozen=True)
class CommandLong:
    """A COMMAND_LONG to send: ``command`` is the MAV_CMD, ``params`` its seven parameters."""

    command: int
    params: tuple[float, float, float, float, float, float, float]


@dataclass(frozen=True)
class PositionTarget:
    """A SET_POSITION_TARGET_GLOBAL_INT to send (position only)."""

    lat_int: int  # degrees * 1e7
    lon_int: int
    alt: float  # m, in ``frame``
    frame: int = mav.MAV_FRAME_GLOBAL_RELATIVE_ALT_INT
    type_mask: int = POSITION_ONLY


@dataclass(frozen=True)
class Command:
    name: str
    message: CommandLong | PositionTarget


def command_name(data: Any) -> str | None:
    """The command's name as sent (for the result), or None when there is none."""
    if isinstance(data, Mapping) and isinstance(data.get("command"), str):
        return str(data["command"])
    return None


def command_id(data: Any, seq: int | None) -> Any:
    """The id a result carries: the command's own ``id`` field (a string or an integer) when it
    has one, which the operator chose and so can wait for; else the delivery's ``seq``."""
    if isinstance(data, Mapping):
        ident = data.get("id")
        if isinstance(ident, str) or (isinstance(ident, int) and not isinstance(ident, bool)):
            return ident
    return seq


def _number(params: Mapping[str, Any], name: str, command: str, low: float, high: float) -> float:
    value = params.get(name)
    if value is None:
        raise BadParameter(f"{command}: {name} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadParameter(f"{command}: {name} must be a number, not {type(value).__name__}")
    if not (math.isfinite(value) and low <= value <= high):
        raise BadParameter(f"{command}: {name} must be within {low:g}..{high:g}, not {value!r}")
    return float(value)


def _flag(params: Mapping[str, Any], name: str, command: str) -> bool:
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise BadParameter(f"{command}: {name} must be true or false")
    return value


def _long(
    command: int,
    p1: float = 0.0,
    p2: float = 0.0,
    p3: float = 0.0,
    p4: float = 0.0,
    p5: float = 0.0,
    p6: float = 0.0,
    p7: float = 0.0,
) -> CommandLong:
    return CommandLong(command, (p1, p2, p3, p4, p5, p6, p7))


def _unset(vehicle: Vehicle) -> float:
    """A parameter left to the vehicle (yaw, latitude, longitude: "where it is"): NaN in the
    MAVLink spec and PX4; ArduPilot reads 0 so and may refuse a NaN."""
    return 0.0 if vehicle.autopilot == mav.MAV_AUTOPILOT_ARDUPILOTMEGA else math.nan


def _arm(params: Mapping[str, Any], vehicle: Vehicle, name: str) -> CommandLong:
    force = FORCE_ARM if _flag(params, "force", name) else 0.0
    return _long(mav.MAV_CMD_COMPONENT_ARM_DISARM, 1.0 if name == "arm" else 0.0, force)


def _takeoff(params: Mapping[str, Any], vehicle: Vehicle, name: str) -> CommandLong:
    alt = _number(params, "alt", name, 0.0, MAX_ALT_M)
    if alt <= 0:
        raise BadParameter(f"{name}: alt must be above 0 m")
    if vehicle.autopilot == mav.MAV_AUTOPILOT_PX4:
        # PX4 reads param 7 as metres above mean sea level (ArduPilot: above home).
        if vehicle.home_alt is None:
            raise NotReady(f"{name}: the vehicle's home altitude is not known yet")
        alt += vehicle.home_alt
    unset = _unset(vehicle)
    return _long(mav.MAV_CMD_NAV_TAKEOFF, 0.0, 0.0, 0.0, unset, unset, unset, alt)


def _land(params: Mapping[str, Any], vehicle: Vehicle, name: str) -> CommandLong:
    unset = _unset(vehicle)
    return _long(mav.MAV_CMD_NAV_LAND, 0.0, 0.0, 0.0, unset, unset, unset, 0.0)


def _rtl(params: Mapping[str, Any], vehicle: Vehicle, name: str) -> CommandLong:
    return _long(mav.MAV_CMD_NAV_RETURN_TO_LAUNCH)


def _goto(params: Mapping[str, Any], vehicle: Vehicle, name: str) -> PositionTarget:
    lat = _number(params, "lat", name, -90.0, 90.0)
    lon = _number(params, "lon", name, -180.0, 180.0)
    alt = _number(params, "alt", name, -MAX_ALT_M, MAX_ALT_M)
    return PositionTarget(round(lat * 1e7), round(lon * 1e7), alt)


def _set_mode(params: Mapping[str, Any], vehicle: Vehicle, name: str) -> CommandLong:
    mode = params.get("mode")
    if not isinstance(mode, str) or not mode:
        raise BadParameter(f"{name}: mode must be a mode's name")
    wanted = mode.upper()
    if vehicle.autopilot == mav.MAV_AUTOPILOT_PX4:
        if wanted not in mavutil.px4_map:
            raise UnknownMode(f"{name}: PX4 has no mode {mode!r} ({', '.join(mavutil.px4_map)})")
        base, main, sub = mavutil.px4_map[wanted]
        return _long(mav.MAV_CMD_DO_SET_MODE, float(base), float(main), float(sub))
    if vehicle.autopilot == mav.MAV_AUTOPILOT_ARDUPILOTMEGA:
        modes = mavutil.mode_mapping_byname(vehicle.mav_type) or {}
        if wanted not in modes:
            known = ", ".join(modes) or "none known for this vehicle type"
            raise UnknownMode(f"{name}: this ArduPilot vehicle has no mode {mode!r} ({known})")
        custom = float(mav.MAV_MODE_FLAG_CUSTOM_MODE_ENABLED)
        return _long(mav.MAV_CMD_DO_SET_MODE, custom, float(modes[wanted]))
    if vehicle.autopilot is None:
        raise NotReady(f"{name}: the vehicle has not said which autopilot it runs")
    autopilot = _enum_name("MAV_AUTOPILOT", vehicle.autopilot, "MAV_AUTOPILOT_")
    raise UnknownMode(f"{name}: the modes of autopilot {autopilot!r} are not known")


_BUILDERS: dict[str, Callable[[Mapping[str, Any], Vehicle, str], CommandLong | PositionTarget]]
_BUILDERS = {
    "arm": _arm,
    "disarm": _arm,
    "takeoff": _takeoff,
    "land": _land,
    "rtl": _rtl,
    "goto": _goto,
    "set_mode": _set_mode,
}


def translate(data: Any, vehicle: Vehicle | None) -> Command:
    """The MAVLink message for the command ``data``; raises :class:`CommandError` saying why
    there is none."""
    name = command_name(data)
    if name is None:
        raise BadParameter('a command is a map with a string field "command"')
    builder = _BUILDERS.get(name)
    if builder is None:
        raise UnknownCommand(f"unknown command {name!r} (known: {', '.join(COMMANDS)})")
    if vehicle is None:
        raise NotReady(f"{name}: no vehicle heard yet")
    return Command(name, builder(data, vehicle, name))


def mav_result_name(result: int) -> str:
    """COMMAND_ACK's ``result`` in lower case: "accepted", "denied", ..."""
    return MAV_RESULTS.get(result, f"result_{result}")


def ack_matches(
    ack: Any, command: int, system: int = GCS_SYSTEM, component: int = GCS_COMPONENT
) -> bool:
    """Whether COMMAND_ACK ``ack`` answers our ``command`` (MAVLink 1 acks name no target)."""
    return (
        ack.command == command
        and getattr(ack, "target_system", 0) in (0, system)
        and getattr(ack, "target_component", 0) in (0, component)
    )


# Sending until acknowledged


@dataclass(frozen=True)
class RetryPolicy:
    """A COMMAND_LONG goes again every ``interval_s`` until a COMMAND_ACK answers it, ``tries``
    times at most, then the result is "timeout". Once the vehicle answers IN_PROGRESS it is not
    sent again; its final answer is awaited ``progress_s`` longer (else: "in_progress")."""

    interval_s: float = 1.0
    tries: int = 3
    progress_s: float = 30.0

    def __post_init__(self) -> None:
        if not (self.interval_s > 0 and self.tries >= 1 and self.progress_s >= 0):
            raise ValueError(f"a retry policy needs interval > 0 and tries >= 1: {self}")


@dataclass(frozen=True)
class Send:
    confirmation: int  # 0, then 1, 2, ...: MAVLink's count of retransmissions


@dataclass(frozen=True)
class Wait:
    seconds: float


@dataclass(frozen=True)
class Done:
    result: str
    mav_result: int | None
    tries: int


class Exchange:
    """One COMMAND_LONG's exchange with the vehicle; the shell asks :meth:`step` what to do
    next and reports answers to :meth:`acknowledge`."""

    def __init__(self, policy: RetryPolicy, clock: Clock = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self.tries = 0
        self._next_at = clock()
        self._progress_until: float | None = None
        self._final: int | None = None
        self._last: int | None = None

    def step(self) -> Send | Wait | Done:
        if self._final is not None:
            return Done(mav_result_name(self._final), self._final, self.tries)
        now = self._clock()
        if self._progress_until is not None:
            if now >= self._progress_until:
                return Done(mav_result_name(mav.MAV_RESULT_IN_PROGRESS), self._last, self.tries)
            return Wait(self._progress_until - now)
        if now >= self._next_at:
            if self.tries >= self.policy.tries:
                return Done(RESULT_TIMEOUT, None, self.tries)
            self.tries += 1
            self._next_at = now + self.policy.interval_s
            return Send(self.tries - 1)
        return Wait(self._next_at - now)

    def acknowledge(self, result: int) -> None:
        self._last = result
        if result == mav.MAV_RESULT_IN_PROGRESS:
            if self._progress_until is None:
                self._progress_until = self._clock() + self.policy.progress_s
            return
        self._final = result


# Results


def result_payload(name: str | None, ident: Any, result: str, **details: Any) -> dict[str, Any]:
    """What goes to ``drone/{id}/cmd/result``."""
    return {"command": name, "id": ident, "result": result, **details}


def done_payload(command: Command, ident: Any, done: Done, took_s: float) -> dict[str, Any]:
    extra: dict[str, Any] = {"tries": done.tries, "took_s": round(took_s, 3)}
    if done.mav_result is not None:
        extra["mav_result"] = done.mav_result
    return result_payload(command.name, ident, done.result, **extra)


def too_old(sent_ms: int, now_ms: int, max_age_s: float) -> float | None:
    """The command's age in seconds when it is older than ``max_age_s`` (0: no limit), else
    None. A command queued while the vehicle was away is not flown hours later."""
    age = (now_ms - sent_ms) / 1000.0
    return age if max_age_s > 0 and age > max_age_s else None


class RecentResults:
    """The results of the last commands, by key: a command delivered again (at least once) is
    answered with its first result instead of being flown twice."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._results: OrderedDict[Hashable, dict[str, Any]] = OrderedDict()

    def get(self, key: Hashable) -> dict[str, Any] | None:
        return self._results.get(key)

    def remember(self, key: Hashable, result: dict[str, Any]) -> None:
        self._results[key] = result
        self._results.move_to_end(key)
        while len(self._results) > self.size:
            self._results.popitem(last=False)
