"""The MAVLink bridge's logic: real pymavlink messages (packed and parsed, MAVLink 2), a
hand-moved clock, no sockets."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pymavlink import mavutil
from pymavlink.dialects.v20 import common as mav

from sentientedge import mavlink
from sentientedge.errors import BadParameter, NotReady, UnknownCommand, UnknownMode
from sentientedge.mavlink import (
    CommandLong,
    Done,
    Exchange,
    HeartbeatWatch,
    PositionTarget,
    Presence,
    RetryPolicy,
    Send,
    StatusTexts,
    Telemetry,
    TelemetryGate,
    Vehicle,
    Wait,
    translate,
)
from tests.helpers import FakeClock

ARDUCOPTER = Vehicle(1, 1, mav.MAV_AUTOPILOT_ARDUPILOTMEGA, mav.MAV_TYPE_QUADROTOR, 10.0)
PX4 = Vehicle(1, 1, mav.MAV_AUTOPILOT_PX4, mav.MAV_TYPE_QUADROTOR, 488.0)
ARMED_GUIDED = mav.MAV_MODE_FLAG_CUSTOM_MODE_ENABLED | mav.MAV_MODE_FLAG_SAFETY_ARMED


def wire(msg: Any, system: int = 1, component: int = 1) -> Any:
    """``msg`` as a ground station receives it: packed by a vehicle, parsed back."""
    sender = mav.MAVLink(None, srcSystem=system, srcComponent=component)
    parsed = mav.MAVLink(None).parse_char(msg.pack(sender))
    assert parsed is not None and parsed.get_type() == msg.get_type()
    return parsed


def heartbeat(
    autopilot: int = mav.MAV_AUTOPILOT_ARDUPILOTMEGA,
    base_mode: int = ARMED_GUIDED,
    custom_mode: int = 4,  # ArduCopter GUIDED
    kind: int = mav.MAV_TYPE_QUADROTOR,
    system: int = 1,
    component: int = 1,
) -> Any:
    beat = mav.MAVLink_heartbeat_message(
        kind, autopilot, base_mode, custom_mode, mav.MAV_STATE_ACTIVE, 3
    )
    return wire(beat, system, component)


def position(relative_alt_mm: int = 20_500, hdg: int = 9_050) -> Any:
    return wire(
        mav.MAVLink_global_position_int_message(
            1000, 521234567, 43456789, 30_500, relative_alt_mm, 250, -120, 30, hdg
        )
    )


def attitude() -> Any:
    return wire(
        mav.MAVLink_attitude_message(1000, math.radians(10), math.radians(-5), math.pi, 0, 0, 0.1)
    )


def vfr_hud(airspeed: float = 12.5) -> Any:
    return wire(mav.MAVLink_vfr_hud_message(airspeed, 11.25, 91, 55, 30.5, -0.5))


def sys_status(voltage_mv: int = 12_600, current_ca: int = 1_530, remaining: int = 87) -> Any:
    return wire(
        mav.MAVLink_sys_status_message(
            0, 0, 0, 0, voltage_mv, current_ca, remaining, 0, 0, 0, 0, 0, 0
        )
    )


def gps(fix: int = 3, satellites: int = 14, eph: int = 85, epv: int = 130) -> Any:
    return wire(
        mav.MAVLink_gps_raw_int_message(
            0, fix, 521234567, 43456789, 30_500, eph, epv, 0, 0, satellites
        )
    )


def fed(*messages: Any) -> Telemetry:
    telemetry = Telemetry()
    for msg in messages:
        telemetry.update(msg)
    return telemetry


# Telemetry


def test_each_message_lands_in_the_one_shape_in_si_units_and_degrees():
    state = fed(heartbeat(), position(), attitude(), vfr_hud(), sys_status(), gps()).snapshot()
    assert state == {
        "system": 1,
        "autopilot": "ardupilotmega",
        "vehicle_type": "quadrotor",
        "mode": "GUIDED",
        "armed": True,
        "system_status": "active",
        "position": {"lat": 52.1234567, "lon": 4.3456789, "alt": 30.5, "relative_alt": 20.5},
        "attitude": {
            "roll": 10.0,
            "pitch": -5.0,
            "yaw": 180.0,
            "rollspeed": 0.0,
            "pitchspeed": 0.0,
            "yawspeed": pytest.approx(5.73, abs=0.01),
        },
        "velocity": {"north": 2.5, "east": -1.2, "down": 0.3},
        "heading": 90.5,  # GLOBAL_POSITION_INT's, finer than VFR_HUD's 91
        "groundspeed": 11.25,
        "airspeed": 12.5,
        "climb": -0.5,
        "throttle": 55,
        "battery": {"voltage": 12.6, "current": 15.3, "remaining": 87},
        "gps": {"fix": "3d", "satellites": 14, "hdop": 0.85, "vdop": 1.3},
    }


def test_the_shape_is_whole_before_anything_is_known():
    state = fed(heartbeat()).snapshot()
    assert state.keys() == mavlink.empty_telemetry().keys()
    assert state["position"] == {"lat": None, "lon": None, "alt": None, "relative_alt": None}
    assert state["battery"] == {"voltage": None, "current": None, "remaining": None}


def test_mavlinks_unknown_markers_and_nan_become_null():
    state = fed(
        heartbeat(),
        vfr_hud(airspeed=math.nan),
        position(hdg=65535),
        sys_status(voltage_mv=65535, current_ca=-1, remaining=-1),
        gps(fix=0, satellites=255, eph=65535, epv=65535),
    ).snapshot()
    assert state["airspeed"] is None
    assert state["heading"] == 91.0  # VFR_HUD's: the position message had none
    assert state["battery"] == {"voltage": None, "current": None, "remaining": None}
    assert state["gps"] == {"fix": "no_gps", "satellites": None, "hdop": None, "vdop": None}


def test_battery_status_of_battery_0_wins_over_sys_status():
    battery = wire(
        mav.MAVLink_battery_status_message(
            0, 0, 0, 0, [4200, 4150, 4100, *[65535] * 7], 2000, 0, 0, 64
        )
    )
    other = wire(mav.MAVLink_battery_status_message(1, 0, 0, 0, [3000] + [65535] * 9, 1, 0, 0, 5))
    state = fed(heartbeat(), battery, other, sys_status()).snapshot()
    assert state["battery"] == {"voltage": 12.45, "current": 20.0, "remaining": 64}


def test_only_the_first_autopilot_counts():
    telemetry = Telemetry()
    assert not telemetry.update(position())  # nothing before a vehicle said who it is
    gcs = heartbeat(autopilot=mav.MAV_AUTOPILOT_INVALID, kind=mav.MAV_TYPE_GCS, system=255)
    assert not telemetry.update(gcs)
    assert telemetry.update(heartbeat(system=7))
    assert telemetry.system == 7 and telemetry.state["system"] == 7
    assert not telemetry.update(position())  # system 1: another vehicle
    camera = heartbeat(
        autopilot=mav.MAV_AUTOPILOT_INVALID, kind=mav.MAV_TYPE_CAMERA, system=7, component=100
    )
    assert telemetry.update(camera)  # the vehicle's, but not its heartbeat
    assert not telemetry.is_beat(camera) and telemetry.is_beat(heartbeat(system=7))
    assert telemetry.state["vehicle_type"] == "quadrotor"


def test_px4_modes_are_named_as_px4_names_them():
    px4_loiter = (4 << 16) | (3 << 24)  # main mode AUTO, sub mode LOITER
    state = fed(heartbeat(mav.MAV_AUTOPILOT_PX4, 1, px4_loiter)).snapshot()
    assert (state["autopilot"], state["mode"], state["armed"]) == ("px4", "LOITER", False)


def test_a_snapshot_is_a_copy():
    telemetry = fed(heartbeat(), position())
    first = telemetry.snapshot()
    telemetry.update(position(relative_alt_mm=99_000))
    assert first["position"]["relative_alt"] == 20.5


def test_the_vehicle_knows_its_home_altitude():
    vehicle = fed(heartbeat(), position()).vehicle
    assert vehicle == Vehicle(1, 1, mav.MAV_AUTOPILOT_ARDUPILOTMEGA, mav.MAV_TYPE_QUADROTOR, 10.0)
    assert Telemetry().vehicle is None


# Pace


def test_telemetry_goes_at_the_rate_of_the_position_stream():
    clock = FakeClock()
    gate = TelemetryGate(None, clock)
    sent = 0
    for _ in range(50):  # one second of a 50 Hz vehicle
        clock.now += 0.02
        for kind in ("GLOBAL_POSITION_INT", "ATTITUDE", "VFR_HUD", "SYS_STATUS"):
            sent += gate.offer(kind)
    assert sent == 50


def test_without_a_position_stream_the_next_one_sets_the_pace():
    clock = FakeClock()
    gate = TelemetryGate(None, clock)
    assert gate.offer("GLOBAL_POSITION_INT")
    clock.now += 1.0
    assert not gate.offer("ATTITUDE")  # position is still the pacer
    clock.now += mavlink.PACE_STALE_S + 0.1
    assert gate.offer("ATTITUDE")  # position went quiet
    assert not gate.offer("STATUSTEXT")


def test_max_rate_caps_telemetry():
    clock = FakeClock()
    gate = TelemetryGate(10, clock)
    sent = 0
    for _ in range(500):  # 10 s at 50 Hz
        clock.now += 0.02
        sent += gate.offer("GLOBAL_POSITION_INT")
    assert 100 <= sent <= 102  # 10 Hz, and the initial burst of 2
    with pytest.raises(ValueError):
        TelemetryGate(0, clock)


# Presence


def test_three_silent_seconds_make_the_vehicle_offline_and_a_heartbeat_brings_it_back():
    clock = FakeClock()
    watch = HeartbeatWatch(3.0, clock)
    assert watch.check() is None and not watch.online  # never heard: not "lost"
    assert watch.beat() is Presence.ONLINE
    clock.now += 1.0
    assert watch.beat() is None
    clock.now += 2.9
    assert watch.check() is None
    clock.now += 0.1
    assert watch.check() is Presence.OFFLINE
    assert watch.check() is None  # said once
    clock.now += 10
    assert watch.beat() is Presence.ONLINE and watch.online


# Events


def test_statustext_becomes_an_event_with_the_severity_named():
    texts = StatusTexts()
    warning = wire(mav.MAVLink_statustext_message(mav.MAV_SEVERITY_WARNING, b"PreArm: GPS"))
    assert texts.add(warning) == {
        "type": "statustext",
        "severity": "warning",
        "text": "PreArm: GPS",
    }
    critical = wire(mav.MAVLink_statustext_message(mav.MAV_SEVERITY_CRITICAL, b"Crash"))
    assert texts.add(critical) == {"type": "statustext", "severity": "critical", "text": "Crash"}


def test_a_long_statustext_is_joined_from_its_chunks():
    texts = StatusTexts()
    long_text = "x" * 50 + "y" * 50 + "tail"
    chunks = [long_text[i : i + 50] for i in range(0, len(long_text), 50)]
    events = [
        texts.add(wire(mav.MAVLink_statustext_message(6, chunk.encode(), 9, n)))
        for n, chunk in enumerate(chunks)
    ]
    assert events[:-1] == [None, None]
    assert events[-1] == {"type": "statustext", "severity": "info", "text": long_text}


# Commands


def test_arm_and_disarm():
    arm = translate({"command": "arm"}, ARDUCOPTER)
    assert arm.message == CommandLong(mav.MAV_CMD_COMPONENT_ARM_DISARM, (1, 0, 0, 0, 0, 0, 0))
    forced = translate({"command": "disarm", "force": True}, ARDUCOPTER).message
    assert forced == CommandLong(mav.MAV_CMD_COMPONENT_ARM_DISARM, (0, 21196, 0, 0, 0, 0, 0))
    with pytest.raises(BadParameter, match="force"):
        translate({"command": "arm", "force": "yes"}, ARDUCOPTER)


def test_takeoff_altitude_is_above_home_for_ardupilot_and_above_sea_level_for_px4():
    ardupilot = translate({"command": "takeoff", "alt": 15}, ARDUCOPTER).message
    assert isinstance(ardupilot, CommandLong) and ardupilot.command == mav.MAV_CMD_NAV_TAKEOFF
    assert ardupilot.params == (0, 0, 0, 0, 0, 0, 15.0)
    px4 = translate({"command": "takeoff", "alt": 15}, PX4).message
    assert isinstance(px4, CommandLong) and px4.params[6] == 503.0
    assert all(math.isnan(p) for p in px4.params[3:6])  # yaw, lat, lon: the vehicle's own
    with pytest.raises(NotReady, match="home"):
        translate({"command": "takeoff", "alt": 15}, Vehicle(1, 1, mav.MAV_AUTOPILOT_PX4))


@pytest.mark.parametrize(
    ("params", "complaint"),
    [
        ({}, "alt is missing"),
        ({"alt": "10"}, "must be a number"),
        ({"alt": True}, "must be a number"),
        ({"alt": math.inf}, "within"),
        ({"alt": 0}, "above 0"),
        ({"alt": 20_000}, "within"),
    ],
)
def test_takeoff_parameters_are_checked(params: dict[str, Any], complaint: str):
    with pytest.raises(BadParameter, match=complaint):
        translate({"command": "takeoff", **params}, ARDUCOPTER)


def test_land_and_rtl():
    land = translate({"command": "land"}, ARDUCOPTER).message
    assert land == CommandLong(mav.MAV_CMD_NAV_LAND, (0, 0, 0, 0, 0, 0, 0))
    rtl = translate({"command": "rtl"}, PX4).message
    assert rtl == CommandLong(mav.MAV_CMD_NAV_RETURN_TO_LAUNCH, (0, 0, 0, 0, 0, 0, 0))


def test_goto_is_a_position_target():
    goto = translate({"command": "goto", "lat": 52.1, "lon": -4.25, "alt": 30}, ARDUCOPTER)
    assert goto.message == PositionTarget(521000000, -42500000, 30.0)
    assert goto.message.frame == mav.MAV_FRAME_GLOBAL_RELATIVE_ALT_INT
    with pytest.raises(BadParameter, match="lat"):
        translate({"command": "goto", "lat": 91, "lon": 0, "alt": 30}, ARDUCOPTER)
    with pytest.raises(BadParameter, match="alt is missing"):
        translate({"command": "goto", "lat": 1, "lon": 0}, ARDUCOPTER)


def test_set_mode_uses_each_autopilots_mode_numbers():
    guided = translate({"command": "set_mode", "mode": "guided"}, ARDUCOPTER).message
    assert guided == CommandLong(mav.MAV_CMD_DO_SET_MODE, (1, 4, 0, 0, 0, 0, 0))
    plane = Vehicle(1, 1, mav.MAV_AUTOPILOT_ARDUPILOTMEGA, mav.MAV_TYPE_FIXED_WING)
    fbwa = translate({"command": "set_mode", "mode": "FBWA"}, plane).message
    assert isinstance(fbwa, CommandLong) and fbwa.params[1] == 5
    loiter = translate({"command": "set_mode", "mode": "LOITER"}, PX4).message
    base, main, sub = mavutil.px4_map["LOITER"]
    assert loiter == CommandLong(mav.MAV_CMD_DO_SET_MODE, (base, main, sub, 0, 0, 0, 0))
    with pytest.raises(UnknownMode, match="FBWA"):
        translate({"command": "set_mode", "mode": "FBWA"}, ARDUCOPTER)
    with pytest.raises(BadParameter):
        translate({"command": "set_mode"}, ARDUCOPTER)
    with pytest.raises(UnknownMode, match="generic"):
        translate({"command": "set_mode", "mode": "AUTO"}, Vehicle(1, 1, 0, 2))
    with pytest.raises(NotReady, match="autopilot"):
        translate({"command": "set_mode", "mode": "AUTO"}, Vehicle(1, 1))


def test_unknown_commands_and_shapes_are_errors_that_say_why():
    with pytest.raises(UnknownCommand, match=r"'fly'.*known: arm"):
        translate({"command": "fly"}, ARDUCOPTER)
    with pytest.raises(BadParameter, match="map"):
        translate("takeoff", ARDUCOPTER)
    with pytest.raises(NotReady):
        translate({"command": "arm"}, None)


def test_a_translated_command_packs_as_a_command_long():
    command = translate({"command": "takeoff", "alt": 12.5}, ARDUCOPTER).message
    assert isinstance(command, CommandLong)
    sent = wire(mav.MAVLink_command_long_message(1, 1, command.command, 2, *command.params), 255)
    assert (sent.command, sent.confirmation, sent.param7) == (mav.MAV_CMD_NAV_TAKEOFF, 2, 12.5)


def test_command_ids_and_names():
    assert mavlink.command_id({"command": "arm", "id": "op-7"}, 3) == "op-7"
    assert mavlink.command_id({"command": "arm", "id": 12}, 3) == 12
    assert mavlink.command_id({"command": "arm", "id": True}, 3) == 3
    assert mavlink.command_id({"command": "arm"}, 3) == 3
    assert mavlink.command_id("arm", None) is None
    assert mavlink.command_name({"command": "arm"}) == "arm"
    assert mavlink.command_name({"command": 1}) is None


# Answers


def test_command_ack_results_are_mav_result_in_lower_case():
    names = [mavlink.mav_result_name(code) for code in range(7)]
    assert names == [
        "accepted",
        "temporarily_rejected",
        "denied",
        "unsupported",
        "failed",
        "in_progress",
        "cancelled",
    ]
    assert mavlink.mav_result_name(42) == "result_42"


def test_an_ack_answers_our_command_only():
    ours = wire(mav.MAVLink_command_ack_message(400, 0, 0, 0, 255, 190))
    assert mavlink.ack_matches(ours, 400)
    assert not mavlink.ack_matches(ours, 22)
    theirs = wire(mav.MAVLink_command_ack_message(400, 0, 0, 0, 254, 190))
    assert not mavlink.ack_matches(theirs, 400)
    untargeted = wire(mav.MAVLink_command_ack_message(400, 0))
    assert mavlink.ack_matches(untargeted, 400)


def test_a_command_is_sent_again_every_interval_until_tries_run_out():
    clock = FakeClock()
    exchange = Exchange(RetryPolicy(interval_s=1.0, tries=3), clock)
    assert exchange.step() == Send(0)
    assert exchange.step() == Wait(1.0)
    clock.now += 1.0
    assert exchange.step() == Send(1)
    clock.now += 1.0
    assert exchange.step() == Send(2)
    clock.now += 0.5
    assert exchange.step() == Wait(0.5)
    clock.now += 0.5
    assert exchange.step() == Done("timeout", None, 3)


def test_an_ack_ends_the_exchange_with_its_result():
    clock = FakeClock()
    exchange = Exchange(RetryPolicy(), clock)
    assert exchange.step() == Send(0)
    clock.now += 1.0
    assert exchange.step() == Send(1)
    exchange.acknowledge(mav.MAV_RESULT_DENIED)
    assert exchange.step() == Done("denied", mav.MAV_RESULT_DENIED, 2)


def test_in_progress_stops_resending_and_waits_for_the_final_answer():
    clock = FakeClock()
    exchange = Exchange(RetryPolicy(interval_s=1.0, tries=3, progress_s=10.0), clock)
    assert exchange.step() == Send(0)
    exchange.acknowledge(mav.MAV_RESULT_IN_PROGRESS)
    clock.now += 5.0
    assert exchange.step() == Wait(5.0)  # not sent again
    exchange.acknowledge(mav.MAV_RESULT_ACCEPTED)
    assert exchange.step() == Done("accepted", 0, 1)
    slow = Exchange(RetryPolicy(interval_s=1.0, tries=3, progress_s=10.0), clock)
    slow.step()
    slow.acknowledge(mav.MAV_RESULT_IN_PROGRESS)
    clock.now += 10.0
    assert slow.step() == Done("in_progress", mav.MAV_RESULT_IN_PROGRESS, 1)


def test_a_retry_policy_is_checked():
    with pytest.raises(ValueError):
        RetryPolicy(tries=0)


def test_result_payloads():
    command = translate({"command": "arm"}, ARDUCOPTER)
    payload = mavlink.done_payload(command, "op-1", Done("accepted", 0, 1), 0.1234)
    assert payload == {
        "command": "arm",
        "id": "op-1",
        "result": "accepted",
        "tries": 1,
        "took_s": 0.123,
        "mav_result": 0,
    }
    error = mavlink.result_payload("fly", 4, "error", error="unknown command 'fly'")
    assert error == {"command": "fly", "id": 4, "result": "error", "error": "unknown command 'fly'"}


def test_old_commands_are_not_flown():
    assert mavlink.too_old(1_000, 62_000, 60.0) == 61.0
    assert mavlink.too_old(1_000, 60_000, 60.0) is None
    assert mavlink.too_old(1_000, 999_000, 0) is None  # no limit
    assert mavlink.too_old(5_000, 1_000, 60.0) is None  # a clock behind the router's


def test_recent_results_are_bounded():
    recent = mavlink.RecentResults(size=2)
    for n in range(3):
        recent.remember(("id", n), {"n": n})
    assert recent.get(("id", 0)) is None
    assert recent.get(("id", 2)) == {"n": 2}
