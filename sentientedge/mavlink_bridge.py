"""The MAVLink bridge: one autopilot's link in, one drone connection to the router out.

    sentientedge mavlink --connect udpin:0.0.0.0:14550 --drone ID [--key KEY] [--url URL]
                         [--max-rate HZ]

Rules for this module:
- The logic is :mod:`sentientedge.mavlink`; this module only moves messages between a pymavlink
  connection, the thread that reads it and a :class:`sentientedge.client.Client`.
- The event loop never waits on MAVLink: a thread of its own reads the link and hands each
  message to the loop. Sends from the loop share a lock with that thread (pymavlink's parser
  and sequence numbers are one object) and never wait for more than a datagram or a serial
  write.
- The drone is online at the router while the vehicle's HEARTBEAT is heard: the bridge opens its
  connection at the first heartbeat and closes it when none came for ``heartbeat_timeout_s``.
  Presence is the router's job (PROTOCOL.md): it then publishes ``{"online": false, "reason":
  "closed"}``, retained, on ``drone/{id}/status``; just before, the bridge says why on
  ``drone/{id}/event`` (``{"type": "heartbeat_lost"}``). It connects again at the next heartbeat.
- Commands run one at a time, in their order. A result's ``id`` is the command's own ``id``
  field when it has one (the operator chose it, so can wait for it), else the delivery's
  ``seq``. Each command is acknowledged (QoS 1) once its result is published, so a command
  whose result was not published is delivered again; one delivered again after its result was
  published (same id, or same session and seq) gets the same result without being flown twice.
  One older than ``command_max_age_s`` (by the router's ``ts``) is refused, not flown: commands
  queue at the router while the vehicle is away, and a takeoff is not wanted an hour late.
- The API key is a secret: it travels in a header, never in a URL, a log line or an error
  message; :class:`BridgeSettings` keeps it out of its repr.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import websockets
from pymavlink import mavutil
from pymavlink.dialects.v20 import common as mav

from sentientedge import auth, logs, mavlink
from sentientedge.client import Client, Message
from sentientedge.config import Config
from sentientedge.errors import (
    AuthError,
    BridgeFailed,
    ClientError,
    CommandError,
    ConfigError,
    ConnectionClosed,
    ConnectRejected,
)
from sentientedge.mavlink import Presence

log = logging.getLogger(__name__)

API_KEY_ENV = "SENTIENTEDGE_API_KEY"
READ_WAIT_S = 0.05  # the reader thread's longest wait for bytes (it checks for a stop this often)
WATCH_TICK_S = 0.1  # how often the heartbeat watch looks
GCS_HEARTBEAT_S = 1.0
CANCEL_AGAIN_S = 0.1
EVENT_BACKLOG = 100  # events kept while the router is away; the oldest go first
ACK_BACKLOG = 64  # COMMAND_ACKs kept for the command in flight
CONNECT_BACKOFF_S = (0.5, 5.0)
OFFLINE_EVENT_TIMEOUT_S = 2.0
# Of the router's per-connection rate (``limits.rate_hz`` in ``welcome``), telemetry takes at
# most this share: the rest is for events and command results.
TELEMETRY_SHARE = 0.5


@dataclass(frozen=True)
class BridgeSettings:
    connect: str  # any pymavlink connection string: udpin:, udpout:, udp:, tcp:, a serial device
    drone_id: str
    api_key: str = field(repr=False)
    url: str = "ws://127.0.0.1:4000/ws"
    max_rate: float | None = None  # telemetry Hz at most; None: the vehicle's rate
    baud: int = 57600  # serial links only
    heartbeat_timeout_s: float = mavlink.HEARTBEAT_TIMEOUT_S
    retry: mavlink.RetryPolicy = field(default_factory=mavlink.RetryPolicy)
    command_max_age_s: float = 60.0  # 0: no limit
    tls_ca_file: str | None = None  # for a wss:// router whose certificate is its own

    @property
    def topics(self) -> dict[str, str]:
        base = f"drone/{self.drone_id}"
        return {
            "telemetry": f"{base}/telemetry",
            "event": f"{base}/event",
            "cmd": f"{base}/cmd",
            "result": f"{base}/cmd/result",
        }


class MavlinkLink:
    """A pymavlink connection, read on a thread of its own."""

    def __init__(self, connection: Any, deliver: Callable[[Any], object]) -> None:
        self._connection = connection
        self._deliver = deliver
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="mavlink-reader", daemon=True)

    @classmethod
    async def open(cls, settings: BridgeSettings, deliver: Callable[[Any], object]) -> MavlinkLink:
        try:
            # Opening may block (a TCP connect, a serial port): off the event loop.
            connection = await asyncio.to_thread(
                mavutil.mavlink_connection,
                settings.connect,
                baud=settings.baud,
                source_system=mavlink.GCS_SYSTEM,
                source_component=mavlink.GCS_COMPONENT,
                autoreconnect=True,
            )
        except (OSError, ValueError) as exc:
            raise BridgeFailed(
                f"cannot open the MAVLink link {settings.connect!r}: {exc}"
            ) from None
        link = cls(connection, deliver)
        link._thread.start()
        return link

    def _read(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                with self._lock:
                    msg = self._connection.recv_msg()
                if msg is None:
                    self._connection.select(READ_WAIT_S)
                    continue
            except Exception as exc:  # a serial port unplugged, a TCP peer gone: try again
                if not failing:
                    log.warning("mavlink link: %s; retrying", exc)
                failing = True
                self._stop.wait(1.0)
                continue
            failing = False
            if msg.get_type() == "BAD_DATA":
                continue
            try:
                self._deliver(msg)
            except RuntimeError:  # the event loop is closed: nobody listens any more
                return

    def send_command(
        self, vehicle: mavlink.Vehicle, message: mavlink.CommandLong, confirmation: int
    ) -> None:
        with self._lock:
            self._connection.mav.command_long_send(
                vehicle.system, vehicle.component, message.command, confirmation, *message.params
            )

    def send_position_target(
        self, vehicle: mavlink.Vehicle, target: mavlink.PositionTarget
    ) -> None:
        with self._lock:
            self._connection.mav.set_position_target_global_int_send(
                0,  # time_boot_ms: ours, which the vehicle ignores
                vehicle.system,
                vehicle.component,
                target.frame,
                target.type_mask,
                target.lat_int,
                target.lon_int,
                target.alt,
                *(0.0,) * 8,  # velocity, acceleration, yaw, yaw rate: ignored (type_mask)
            )

    def send_gcs_heartbeat(self) -> None:
        with self._lock:
            self._connection.mav.heartbeat_send(
                mav.MAV_TYPE_GCS, mav.MAV_AUTOPILOT_INVALID, 0, 0, mav.MAV_STATE_ACTIVE
            )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        with contextlib.suppress(Exception):
            self._connection.close()


class Bridge:
    """One vehicle's bridge; :meth:`run` until ``stop`` is set."""

    def __init__(
        self,
        settings: BridgeSettings,
        clock: mavlink.Clock = time.monotonic,
        wall_clock: mavlink.Clock = time.time,  # commands' ages: the router's ``ts`` is wall time
    ) -> None:
        self.settings = settings
        self.topics = settings.topics
        self._clock = clock
        self._wall_clock = wall_clock
        self.telemetry = mavlink.Telemetry()
        self.watch = mavlink.HeartbeatWatch(settings.heartbeat_timeout_s, clock)
        self.texts = mavlink.StatusTexts()
        self.recent = mavlink.RecentResults()
        self.gate: mavlink.TelemetryGate | None = None  # per router connection (its rate)
        self.client: Client | None = None
        self.link: MavlinkLink | None = None
        self.counters = collections.Counter[str]()
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENT_BACKLOG)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Bridge until ``stop`` is set; raises :class:`BridgeFailed` when it cannot go on."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._acks: asyncio.Queue[Any] = asyncio.Queue(ACK_BACKLOG)
        self._vehicle_online = asyncio.Event()
        self._vehicle_offline = asyncio.Event()
        self._telemetry_ready = asyncio.Event()
        self._events_ready = asyncio.Event()
        self._latest: dict[str, Any] | None = None
        self.link = await MavlinkLink.open(
            self.settings, lambda msg: loop.call_soon_threadsafe(self._inbox.put_nowait, msg)
        )
        log.info(
            "mavlink bridge for drone %s: %s -> %s; waiting for the vehicle's heartbeat",
            self.settings.drone_id,
            self.settings.connect,
            logs.redact(self.settings.url),
            extra={"drone": self.settings.drone_id},
        )
        jobs = [
            asyncio.create_task(self._pump(), name="mavlink-pump"),
            asyncio.create_task(self._watch(), name="mavlink-watch"),
            asyncio.create_task(self._sessions(), name="mavlink-sessions"),
            asyncio.create_task(self._gcs_heartbeat(), name="mavlink-gcs-heartbeat"),
        ]
        stopped = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([*jobs, stopped], return_when=asyncio.FIRST_COMPLETED)
            for job in jobs:
                if job in done:
                    job.result()  # a job ends only by failing: say why
        finally:
            await _cancel([*jobs, stopped])
            if self.client is not None:
                await self.client.close()
                self.client = None
            self.link.close()

    def stats(self) -> dict[str, Any]:
        vehicle = self.telemetry.vehicle
        return {
            "drone": self.settings.drone_id,
            "vehicle_online": self.watch.online,
            "connected": self.client is not None and not self.client.closed,
            "system": vehicle.system if vehicle else None,
            **self.counters,
        }

    # MAVLink in

    async def _pump(self) -> None:
        while True:
            self._take(await self._inbox.get())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_TICK_S)
            if self.watch.check() is Presence.OFFLINE:
                log.warning(
                    "no heartbeat from the vehicle for %.1f s: offline",
                    self.watch.silent_for(),
                    extra={"drone": self.settings.drone_id},
                )
                self._vehicle_online.clear()
                self._vehicle_offline.set()

    def _take(self, msg: Any) -> None:
        if not self.telemetry.update(msg):
            return
        kind = msg.get_type()
        if self.telemetry.is_beat(msg) and self.watch.beat() is Presence.ONLINE:
            log.info(
                "heartbeat from the vehicle (system %s, %s): online",
                self.telemetry.system,
                self.telemetry.state["autopilot"],
                extra={"drone": self.settings.drone_id},
            )
            self._vehicle_offline.clear()
            self._vehicle_online.set()
        elif kind == "STATUSTEXT":
            event = self.texts.add(msg)
            if event is not None:
                self._queue_event(event)
        elif kind == "COMMAND_ACK":
            if self._acks.full():  # answers nobody waits for (to another station, say)
                self._acks.get_nowait()
            self._acks.put_nowait(msg)
        if self.gate is not None and self.gate.offer(kind):
            self._latest = self.telemetry.snapshot()  # a newer one replaces one not yet sent
            self._telemetry_ready.set()

    def _queue_event(self, event: dict[str, Any]) -> None:
        if len(self._events) == self._events.maxlen:
            self.counters["events_dropped"] += 1
        self._events.append(event)
        self._events_ready.set()

    async def _gcs_heartbeat(self) -> None:
        """A ground station's HEARTBEAT every second: a vehicle on ``udpout`` learns where the
        bridge is from it, and autopilots watch it for their GCS failsafe."""
        assert self.link is not None
        while True:
            self.link.send_gcs_heartbeat()
            await asyncio.sleep(GCS_HEARTBEAT_S)

    # The router

    async def _sessions(self) -> None:
        """Connected to the router while the vehicle is heard, not otherwise."""
        while True:
            await self._vehicle_online.wait()
            client = await self._connect()
            if client is None:
                continue  # the vehicle went away before the router answered
            self.client = client
            try:
                vehicle_lost = await self._serve(client)
            except (ClientError, asyncio.TimeoutError) as exc:
                log.warning("router session: %s", logs.redact(str(exc) or type(exc).__name__))
                vehicle_lost = False
            finally:
                self.client, self.gate = None, None
                await client.close()
            if not vehicle_lost:  # the connection failed: not again at once
                await asyncio.sleep(CONNECT_BACKOFF_S[0])

    async def _connect(self) -> Client | None:
        settings = self.settings
        ssl = None
        if settings.url.startswith("wss:"):
            import ssl as ssl_lib

            ssl = ssl_lib.create_default_context(cafile=settings.tls_ca_file)
        delay = CONNECT_BACKOFF_S[0]
        while not self._vehicle_offline.is_set():
            try:
                client = await Client.connect(
                    settings.url,
                    api_key=settings.api_key,
                    reconnect=True,
                    auto_ack=False,  # acknowledged once the result is out
                    ssl=ssl,
                )
            except ConnectRejected as exc:
                if exc.status in (401, 403):
                    raise BridgeFailed(
                        f"the router refused the drone's credentials: {exc}"
                    ) from None
                reason = str(exc)
            except websockets.InvalidURI:
                raise BridgeFailed(f"not a router URL: {logs.redact(settings.url)}") from None
            except (OSError, asyncio.TimeoutError, websockets.WebSocketException, ClientError) as e:
                reason = str(e) or type(e).__name__
            else:
                self.counters["connections"] += 1
                return client
            log.warning(
                "router at %s: %s; again in %.1f s",
                logs.redact(settings.url),
                logs.redact(reason),
                delay,
                extra={"drone": settings.drone_id},
            )
            await _wait_event(self._vehicle_offline, delay)
            delay = min(delay * 2, CONNECT_BACKOFF_S[1])
        return None

    async def _serve(self, client: Client) -> bool:
        """Until the vehicle goes silent (returns True) or the connection fails (False)."""
        rate_hz = client.welcome.limits.get("rate_hz")
        cap = self.settings.max_rate
        if isinstance(rate_hz, (int, float)) and rate_hz > 0:
            cap = min(cap or float("inf"), rate_hz * TELEMETRY_SHARE)
        self.gate = mavlink.TelemetryGate(cap, self._clock)
        await client.subscribe(self.topics["cmd"])
        log.info(
            "connected to the router as drone %s (telemetry at most %s Hz)",
            self.settings.drone_id,
            f"{cap:g}" if cap else "the vehicle's rate",
            extra={"drone": self.settings.drone_id, "session": client.session},
        )
        jobs = [
            asyncio.create_task(self._send_telemetry(client)),
            asyncio.create_task(self._send_events(client)),
            asyncio.create_task(self._serve_commands(client)),
        ]
        offline = asyncio.create_task(self._vehicle_offline.wait())
        try:
            done, _ = await asyncio.wait([*jobs, offline], return_when=asyncio.FIRST_COMPLETED)
        finally:  # shielded: the session's tasks end even if this one is cancelled meanwhile
            await asyncio.shield(_cancel([*jobs, offline]))
        if offline in done:
            with contextlib.suppress(Exception):
                event = mavlink.heartbeat_lost_event(self.watch.silent_for())
                await client.publish(
                    self.topics["event"], event, qos=1, timeout=OFFLINE_EVENT_TIMEOUT_S
                )
            return True
        for job in done:
            error = job.exception()
            if error is not None and not isinstance(error, ConnectionClosed):
                log.warning(
                    "router session ended: %s",
                    logs.redact(str(error) or type(error).__name__),
                    extra={"drone": self.settings.drone_id},
                )
        return False

    async def _send_telemetry(self, client: Client) -> None:
        while True:
            await self._telemetry_ready.wait()
            self._telemetry_ready.clear()
            data, self._latest = self._latest, None
            if data is not None:
                await client.publish(self.topics["telemetry"], data)
                self.counters["telemetry"] += 1

    async def _send_events(self, client: Client) -> None:
        while True:
            while self._events:
                try:
                    await client.publish(self.topics["event"], self._events[0], qos=1)
                except (ClientError, asyncio.TimeoutError) as exc:
                    if isinstance(exc, ConnectionClosed):
                        raise
                    log.warning("event not published: %s", exc)
                else:
                    self.counters["events"] += 1
                self._events.popleft()
            self._events_ready.clear()
            await self._events_ready.wait()

    # Commands

    async def _serve_commands(self, client: Client) -> None:
        while True:
            message = await client.recv()
            if message.topic != self.topics["cmd"]:
                continue
            if message.retained:  # not a command sent now: never flown on a (re)connect
                log.warning("a retained message on %s is not executed", message.topic)
            else:
                result = await self._execute(client, message)
                await client.publish(self.topics["result"], result, qos=1)
                self.counters["commands"] += 1
            if message.seq is not None:
                await client.ack(message.seq)

    async def _execute(self, client: Client, message: Message) -> dict[str, Any]:
        data = message.data
        name = mavlink.command_name(data)
        own_id = mavlink.command_id(data, None)
        ident = message.seq if own_id is None else own_id
        # The operator's id holds across connections; a seq only within its session.
        key = ("seq", client.session, message.seq) if own_id is None else ("id", own_id)
        known = self.recent.get(key)
        if known is not None:
            return known
        now_ms = int(self._wall_clock() * 1000)
        age = mavlink.too_old(message.ts, now_ms, self.settings.command_max_age_s)
        if age is not None:
            result = mavlink.result_payload(
                name, ident, mavlink.RESULT_ERROR, error=f"expired: sent {age:.0f} s ago"
            )
        else:
            try:
                command = mavlink.translate(data, self.telemetry.vehicle)
            except CommandError as exc:
                result = mavlink.result_payload(name, ident, mavlink.RESULT_ERROR, error=str(exc))
            else:
                result = await self._fly(command, ident)
        log.info(
            "command %s (id %s): %s%s",
            name,
            ident,
            result["result"],
            f" ({result['error']})" if "error" in result else "",
            extra={"drone": self.settings.drone_id},
        )
        self.recent.remember(key, result)
        return result

    async def _fly(self, command: mavlink.Command, ident: Any) -> dict[str, Any]:
        vehicle = self.telemetry.vehicle
        assert vehicle is not None and self.link is not None
        started = self._clock()
        message = command.message
        if isinstance(message, mavlink.PositionTarget):
            self.link.send_position_target(vehicle, message)
            done = mavlink.Done(mavlink.RESULT_SENT, None, 1)
            return mavlink.done_payload(command, ident, done, self._clock() - started)
        while not self._acks.empty():  # answers to earlier commands
            self._acks.get_nowait()
        exchange = mavlink.Exchange(self.settings.retry, self._clock)
        while True:
            step = exchange.step()
            if isinstance(step, mavlink.Done):
                return mavlink.done_payload(command, ident, step, self._clock() - started)
            if isinstance(step, mavlink.Send):
                self.link.send_command(vehicle, message, step.confirmation)
                continue
            ack = await _get(self._acks, step.seconds)
            if ack is not None and mavlink.ack_matches(ack, message.command):
                exchange.acknowledge(ack.result)


# Before Python 3.12, asyncio.wait_for can swallow a cancellation that comes as its awaitable
# completes or its timeout expires (the client's requests use it): the cancelled task goes on.
# So tasks are cancelled until they end, and the bridge's own waits do without wait_for.


async def _cancel(tasks: list[asyncio.Task[Any]], patience_s: float = 10.0) -> None:
    """Cancel ``tasks`` and wait until they have ended, cancelling again any that went on."""
    deadline = time.monotonic() + patience_s
    pending = [task for task in tasks if not task.done()]
    while pending and time.monotonic() < deadline:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=CANCEL_AGAIN_S)
        pending = [task for task in pending if not task.done()]
    for task in pending:
        log.error("task %s does not end", task.get_name())
    for task in tasks:  # retrieved, so that asyncio does not warn of exceptions never read
        if task.done() and not task.cancelled():
            task.exception()


async def _wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Whether ``event`` is set within ``timeout`` seconds."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([waiter], timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()


async def _get(queue: asyncio.Queue[Any], timeout: float) -> Any | None:
    """The next item of ``queue`` within ``timeout`` seconds, else None."""
    getter = asyncio.ensure_future(queue.get())
    try:
        await asyncio.wait([getter], timeout=timeout)
    finally:
        if not getter.done():
            getter.cancel()
    return getter.result() if getter.done() and not getter.cancelled() else None


async def run_bridge(settings: BridgeSettings, stop: asyncio.Event | None = None) -> None:
    """Run one bridge until ``stop`` is set; raises :class:`BridgeFailed` when it cannot go on
    (the router refused the key, the link cannot be opened)."""
    await Bridge(settings).run(stop)


# The command line


def settings_from_args(
    args: argparse.Namespace, env: dict[str, str] | None = None
) -> BridgeSettings:
    """Raises :class:`BridgeFailed` (never naming the key) for a missing or foreign key."""
    env = dict(os.environ) if env is None else env
    if not args.connect:
        raise BridgeFailed("--connect is required: the autopilot's link")
    key = args.key or env.get(API_KEY_ENV)
    if not key:
        raise BridgeFailed(f"no API key: --key or {API_KEY_ENV}")
    try:
        issued_for = auth.parse_api_key(key).drone_id
    except AuthError:
        raise BridgeFailed("the API key is malformed") from None
    if issued_for != args.drone:
        raise BridgeFailed(f"the API key was issued for drone {issued_for!r}, not {args.drone!r}")
    if args.max_rate is not None and not args.max_rate > 0:
        raise BridgeFailed("--max-rate must be above 0")
    config = Config.from_env(env)
    return BridgeSettings(
        connect=args.connect,
        drone_id=args.drone,
        api_key=key,
        url=args.url or f"{config.scheme}://127.0.0.1:{config.port}/ws",
        max_rate=args.max_rate,
        baud=args.baud,
        heartbeat_timeout_s=args.heartbeat_timeout or mavlink.HEARTBEAT_TIMEOUT_S,
        command_max_age_s=args.command_max_age,
        tls_ca_file=config.tls_cert_file,
    )


def run(args: argparse.Namespace) -> int:
    """``sentientedge mavlink``: bridge until SIGINT or SIGTERM."""
    try:
        settings = settings_from_args(args)
    except BridgeFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(os.environ.get("LOG_LEVEL", "INFO"), actor=f"mavlink-{settings.drone_id}")

    async def bridge() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await run_bridge(settings, stop)

    try:
        asyncio.run(bridge())
    except BridgeFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
