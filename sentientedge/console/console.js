// SentientEdge ground station: a client of the router's wire protocol (PROTOCOL.md) in plain
// JavaScript, over the JSON subprotocol se1.json. No build step, no framework, no network but
// the page's own origin (its Content-Security-Policy allows nothing else).
//
// Rules for this file:
// - The token lives in memory only (never storage, never a log line, never an element's text).
//   It leaves the page in exactly two places, both to the page's own origin: the WebSocket's
//   ?token= (browsers cannot set headers on a WebSocket) and GET /console/whoami's
//   Authorization header. Taken from the address (?token= or #token=), it is removed from the
//   address bar at once.
// - Whatever the router relays (drone ids, telemetry, results) is text: it reaches the page
//   through textContent only, never as HTML.
// - Frames are handled as they arrive; the page is drawn a few times a second from the state
//   they leave, so a fleet's firehose costs the DOM nothing extra.

"use strict";

(() => {
  const SUBSCRIPTIONS = [
    "drone/+/status",
    "drone/+/telemetry",
    "drone/+/event",
    "drone/+/cmd/result",
  ];
  const SUBPROTOCOL = "se1.json";
  const COMMAND_TIMEOUT_MS = 30000; // no result by then: "timeout" (a late one still counts)
  const RENDER_MS = 250;
  const STALE_MS = 5000; // telemetry older than this is shown as stale
  const TRAIL_POINTS = 120;
  const TRAIL_SPACING_MS = 500;
  const BACKOFF_MIN_MS = 1000;
  const BACKOFF_MAX_MS = 30000;
  const KEEPALIVE_MS = 20000; // silent this long: a ping (it counts towards the rate limit)
  const DEAD_MS = 45000; // silent this long: the connection is given up and opened again
  const ACK_DELAY_MS = 100; // one ack for every QoS 1 delivery handled meanwhile
  const MAX_EVENTS = 200;
  const MAX_COMMANDS = 100;
  const COMMAND_ROLES = new Set(["operator", "admin"]);

  // Close codes (PROTOCOL.md, "Close codes").
  const CLOSE_TEXT = {
    1000: "closed normally",
    1001: "the router is going away (drain)",
    1006: "the connection was lost",
    1008: "closed by the router's policy",
    1009: "a frame was too large",
    1011: "the router had an internal error",
    1012: "the router is restarting",
    4000: "this session was taken over by a newer connection",
    4001: "the token expired or was revoked",
  };

  // The token, taken out of the address before anything else runs.
  const tokenFromAddress = takeTokenFromAddress();

  const $ = (id) => document.getElementById(id);
  const el = {
    connState: $("conn-state"),
    connDetail: $("conn-detail"),
    who: $("who"),
    whoSub: $("who-sub"),
    whoRole: $("who-role"),
    whoExp: $("who-exp"),
    signOut: $("sign-out"),
    banner: $("banner"),
    signIn: $("sign-in"),
    signInForm: $("sign-in-form"),
    tokenInput: $("token"),
    signInButton: $("sign-in-button"),
    signInMessage: $("sign-in-message"),
    station: $("station"),
    droneCount: $("drone-count"),
    msgRate: $("msg-rate"),
    filter: $("filter"),
    dronesBody: document.querySelector("#drones tbody"),
    noDrones: $("no-drones"),
    plot: $("plot"),
    mapNote: $("map-note"),
    selectedId: $("selected-id"),
    commandsPanel: $("commands-panel"),
    observerNote: $("observer-note"),
    takeoffAlt: $("takeoff-alt"),
    fieldsBody: document.querySelector("#fields tbody"),
    commandsBody: document.querySelector("#commands tbody"),
    events: $("events"),
  };
  const commandButtons = Array.from(document.querySelectorAll("button[data-command]"));

  const state = freshState();

  function freshState() {
    return {
      token: null,
      identity: null, // {sub, role, exp}: for display; the router decides what is allowed
      ws: null,
      welcomed: false,
      session: null,
      attempts: 0,
      retryTimer: null,
      retryAt: 0,
      retryReason: "",
      lastHeard: 0,
      lastPing: 0,
      handledSeq: 0, // the highest QoS 1 seq handed to the page (per session)
      ackedSeq: 0,
      ackTimer: null,
      requestIds: 0,
      drones: new Map(),
      selected: null,
      commands: new Map(), // command id -> entry
      unacked: new Map(), // pub id -> frame, sent again on a new connection until puback
      live: 0, // live messages received
      rate: 0,
      rateMark: { at: performance.now(), live: 0 },
      dirty: { table: true, plot: true, details: true },
      rowOrder: "",
      plotPoints: [],
    };
  }

  // ---- the address and the token

  function takeTokenFromAddress() {
    const url = new URL(window.location.href);
    let token = url.searchParams.get("token");
    let changed = false;
    if (url.searchParams.has("token")) {
      url.searchParams.delete("token");
      changed = true;
    }
    const fragment = new URLSearchParams(url.hash.replace(/^#/, ""));
    if (fragment.has("token")) {
      token = token || fragment.get("token");
      fragment.delete("token");
      const rest = fragment.toString();
      url.hash = rest ? `#${rest}` : "";
      changed = true;
    }
    if (changed) {
      window.history.replaceState(window.history.state, "", url.pathname + url.search + url.hash);
    }
    return token ? token.trim() : null;
  }

  /** A JWT's claims, decoded without checking them: for display only. */
  function decodeClaims(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const padded = part + "===".slice((part.length + 3) % 4);
      const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
      const claims = JSON.parse(new TextDecoder().decode(bytes));
      return claims && typeof claims === "object" ? claims : null;
    } catch (_) {
      return null;
    }
  }

  /** Ask the router whether it takes the token (GET /console/whoami, same origin). */
  async function checkToken(token) {
    let answer;
    try {
      answer = await fetch("/console/whoami", {
        headers: { Authorization: `Bearer ${token}` },
        cache: "no-store",
        credentials: "omit",
        redirect: "error",
        referrerPolicy: "no-referrer",
      });
    } catch (_) {
      return { kind: "unreachable" };
    }
    let body = null;
    try {
      body = await answer.json();
    } catch (_) {
      body = null;
    }
    if (answer.status === 200 && body) return { kind: "ok", identity: body };
    if (answer.status === 401) return { kind: "refused", reason: (body && body.reason) || "" };
    if (answer.status === 404) return { kind: "unknown" }; // a router without the check
    return { kind: "unavailable", status: answer.status };
  }

  function refusedText(reason) {
    return `Sign-in failed: the token was refused${reason ? ` (${reason})` : ""}.`;
  }

  // ---- signing in and out

  async function signIn(token) {
    token = (token || "").trim();
    if (!token) {
      showSignIn("Paste a token first.");
      return;
    }
    reset();
    state.token = token;
    el.signInButton.disabled = true;
    setConn("connecting", "checking the token");
    const check = await checkToken(token);
    el.signInButton.disabled = false;
    if (state.token !== token) return; // signed out or in again meanwhile
    if (check.kind === "refused") {
      signOut(refusedText(check.reason), "refused");
      return;
    }
    const claims = decodeClaims(token) || {};
    state.identity =
      check.kind === "ok"
        ? check.identity
        : { sub: String(claims.sub || "?"), role: String(claims.role || "?"), exp: claims.exp };
    el.tokenInput.value = "";
    showStation();
    connect();
  }

  /** Signed out, with ``message`` on the sign-in form; ``kind`` "refused" when the router
   *  refused the token. */
  function signOut(message, kind) {
    reset();
    setConn(kind || "idle", "");
    showSignIn(message || "");
  }

  /** Nothing left of the last sign-in: connection, timers, token, drones, commands. */
  function reset() {
    closeConnection();
    for (const command of state.commands.values()) clearTimeout(command.timer);
    Object.assign(state, freshState());
    clearStation();
  }

  function showSignIn(message) {
    el.station.hidden = true;
    el.who.hidden = true;
    el.signIn.hidden = false;
    el.signInMessage.textContent = message || "";
    hideBanner();
    el.tokenInput.focus();
  }

  function showStation() {
    const who = state.identity;
    el.signIn.hidden = true;
    el.signInMessage.textContent = "";
    el.station.hidden = false;
    el.who.hidden = false;
    el.whoSub.textContent = who.sub;
    el.whoRole.textContent = who.role;
    const commander = canCommand();
    el.commandsPanel.hidden = !commander;
    el.observerNote.hidden = commander;
    updateExpiry();
    updateCommandButtons();
    markDirty();
  }

  function canCommand() {
    return !!state.identity && COMMAND_ROLES.has(state.identity.role);
  }

  function clearStation() {
    el.dronesBody.replaceChildren();
    el.commandsBody.replaceChildren();
    el.events.replaceChildren();
    el.fieldsBody.replaceChildren();
    el.selectedId.textContent = "none";
    el.msgRate.textContent = "0.0";
    el.droneCount.textContent = "";
    hideBanner();
  }

  // ---- the connection

  function connect() {
    clearTimeout(state.retryTimer);
    state.retryTimer = null;
    const exp = state.identity && Number(state.identity.exp);
    if (exp && exp * 1000 <= Date.now()) {
      signOut("The token has expired: sign in with a fresh one.");
      return;
    }
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const query = new URLSearchParams({ token: state.token });
    if (state.session) query.set("session", state.session);
    let ws;
    try {
      ws = new WebSocket(`${scheme}//${window.location.host}/ws?${query}`, SUBPROTOCOL);
    } catch (_) {
      scheduleReconnect("could not open a WebSocket");
      return;
    }
    state.ws = ws;
    state.welcomed = false;
    state.lastHeard = Date.now();
    setConn(state.attempts ? "reconnecting" : "connecting", "opening the connection");
    ws.onmessage = (event) => {
      if (ws === state.ws) onFrame(event.data);
    };
    ws.onclose = (event) => {
      if (ws === state.ws) onClosed(event.code, event.reason);
    };
  }

  function closeConnection() {
    const ws = state.ws;
    state.ws = null;
    state.welcomed = false;
    clearTimeout(state.retryTimer);
    clearTimeout(state.ackTimer);
    state.ackTimer = null;
    if (ws) {
      try {
        ws.close(1000);
      } catch (_) {
        /* closed already */
      }
    }
  }

  async function onClosed(code, reason) {
    const welcomed = state.welcomed;
    state.ws = null;
    state.welcomed = false;
    updateCommandButtons();
    const token = state.token;
    if (code === 4001) {
      signOut("The router closed the connection: the token expired or was revoked. " +
        "Sign in with a fresh token.");
      return;
    }
    if (code === 4000) {
      setConn("closed", CLOSE_TEXT[4000]);
      showBanner("This session was taken over by a newer connection; reload to connect again.");
      return;
    }
    let why;
    if (welcomed) {
      why = CLOSE_TEXT[code] || `closed (${code})`;
      if (reason) why += `: ${reason}`;
    } else {
      // The handshake failed: a browser cannot read why (401, 429, 503 all look alike).
      setConn("connecting", "the connection was refused, asking why");
      const check = await checkToken(token);
      if (state.token !== token) return;
      if (check.kind === "refused") {
        signOut(refusedText(check.reason), "refused");
        return;
      }
      why =
        check.kind === "unreachable"
          ? "the router is unreachable"
          : "the router did not accept the connection (busy, draining, or too many " +
            "connections for this user)";
    }
    scheduleReconnect(why);
  }

  function scheduleReconnect(why) {
    state.attempts += 1;
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** (state.attempts - 1));
    const delay = Math.round(base * (0.5 + Math.random() / 2));
    state.retryAt = Date.now() + delay;
    state.retryReason = why;
    showRetry();
    state.retryTimer = setTimeout(connect, delay);
  }

  function showRetry() {
    const seconds = Math.max(0, Math.ceil((state.retryAt - Date.now()) / 1000));
    setConn("reconnecting", `${state.retryReason}; trying again in ${seconds} s ` +
      `(attempt ${state.attempts + 1})`);
  }

  function send(frame) {
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  function nextId(prefix) {
    state.requestIds += 1;
    return `${prefix}${state.requestIds}`;
  }

  function keepalive() {
    const ws = state.ws;
    if (!ws || !state.welcomed) return;
    const now = Date.now();
    const silent = now - state.lastHeard;
    if (silent > DEAD_MS) {
      state.ws = null; // its close event, whenever it comes, is ignored
      try {
        ws.close(1000);
      } catch (_) {
        /* closed already */
      }
      onClosed(1006, "no answer");
    } else if (silent > KEEPALIVE_MS && now - state.lastPing > KEEPALIVE_MS) {
      state.lastPing = now;
      send({ op: "ping", id: nextId("ping-") });
    }
  }

  // ---- frames from the router

  function onFrame(text) {
    state.lastHeard = Date.now();
    let frame;
    try {
      frame = JSON.parse(text);
    } catch (_) {
      return; // not JSON: nothing this page can use
    }
    if (!frame || typeof frame !== "object") return;
    switch (frame.op) {
      case "msg":
        onMessage(frame);
        break;
      case "welcome":
        onWelcome(frame);
        break;
      case "puback":
        onPuback(frame);
        break;
      case "suback":
        onSuback(frame);
        break;
      case "error":
        onError(frame);
        break;
      default:
        break; // pong, unsuback: nothing to do
    }
  }

  function onWelcome(frame) {
    if (frame.session !== state.session) state.handledSeq = 0; // a fresh session
    state.session = frame.session;
    state.welcomed = true;
    state.attempts = 0;
    state.ackedSeq = 0; // what was acked may not have arrived: ack again
    if (!frame.resumed) {
      send({ op: "sub", topics: SUBSCRIPTIONS, id: nextId("sub-") });
    }
    for (const pub of state.unacked.values()) send(pub);
    if (state.handledSeq) scheduleAck();
    const server = typeof frame.server === "string" ? frame.server : "router";
    setConn("online", `${server}${frame.resumed ? ", session resumed" : ""}`);
    updateCommandButtons();
  }

  function onSuback(frame) {
    const granted = Array.isArray(frame.topics) ? frame.topics : [];
    const refused = SUBSCRIPTIONS.filter((topic) => !granted.includes(topic));
    if (String(frame.id || "").startsWith("sub-") && refused.length) {
      logEvent(`this token may not watch ${refused.join(", ")}`);
    }
  }

  function onError(frame) {
    const code = String(frame.code || "error");
    const msg = String(frame.msg || "");
    const id = frame.id == null ? "" : String(frame.id);
    const command = state.commands.get(id);
    if (command) {
      state.unacked.delete(id);
      if (code === "unavailable") {
        // Nothing was stored: the same id again shortly (the router stores an id once).
        const pub = command.pub;
        state.unacked.set(id, pub);
        setTimeout(() => send(pub), 500);
        setCommand(command, "pending", "router busy, sending again");
        return;
      }
      setCommand(command, "error", `${code}: ${msg}`);
      return;
    }
    if (id.startsWith("sub-")) {
      showBanner(`This token may not watch the fleet (${code}: ${msg}).`);
      return;
    }
    logEvent(`router: ${code}${msg ? `: ${msg}` : ""}`);
  }

  function onPuback(frame) {
    const id = String(frame.id || "");
    state.unacked.delete(id);
    const command = state.commands.get(id);
    if (command && command.state === "pending") {
      setCommand(command, "pending", "stored; waiting for the drone's result");
    }
  }

  function onMessage(frame) {
    if (typeof frame.seq === "number") {
      // QoS 1: handled once per session, acknowledged (redeliveries are acked again).
      if (frame.seq <= state.handledSeq) {
        state.ackedSeq = Math.min(state.ackedSeq, frame.seq - 1);
        scheduleAck();
        return;
      }
      state.handledSeq = frame.seq;
      scheduleAck();
    }
    const retained = frame.retained === true;
    if (!retained) state.live += 1;
    const topic = typeof frame.topic === "string" ? frame.topic : "";
    const levels = topic.split("/");
    if (levels[0] !== "drone" || levels.length < 3) return;
    const id = levels[1];
    const kind = levels.slice(2).join("/");
    if (kind === "telemetry") onTelemetry(id, frame, retained);
    else if (kind === "status") onStatus(id, frame, retained);
    else if (kind === "event") onDroneEvent(id, frame);
    else if (kind === "cmd/result") onResult(id, frame);
  }

  function scheduleAck() {
    if (state.ackTimer) return;
    state.ackTimer = setTimeout(() => {
      state.ackTimer = null;
      if (state.welcomed && state.handledSeq > state.ackedSeq) {
        if (send({ op: "ack", seq: state.handledSeq })) state.ackedSeq = state.handledSeq;
      }
    }, ACK_DELAY_MS);
  }

  function drone(id) {
    let entry = state.drones.get(id);
    if (!entry) {
      entry = {
        id,
        online: null,
        reason: "",
        data: undefined,
        frame: null,
        retained: false,
        heard: 0, // when live telemetry last arrived (Date.now())
        ts: 0, // the router's receive time of the last telemetry
        count: 0,
        mark: 0,
        rate: 0,
        trail: [],
        key: null,
      };
      state.drones.set(id, entry);
    }
    return entry;
  }

  function onTelemetry(id, frame, retained) {
    const entry = drone(id);
    if (retained && entry.frame && !entry.retained) return; // live data is newer
    entry.frame = frame;
    entry.data = frame.data;
    entry.retained = retained;
    entry.ts = Number(frame.ts) || 0;
    entry.key = keyFields(frame.data);
    if (!retained) {
      entry.heard = Date.now();
      entry.count += 1;
    }
    const pos = entry.key.position;
    if (pos) {
      const now = Date.now();
      const last = entry.trail[entry.trail.length - 1];
      if (!last || now - last.at >= TRAIL_SPACING_MS) {
        entry.trail.push({ lat: pos.lat, lon: pos.lon, at: now });
        if (entry.trail.length > TRAIL_POINTS) entry.trail.shift();
      } else {
        last.lat = pos.lat;
        last.lon = pos.lon;
      }
    }
    state.dirty.table = true;
    state.dirty.plot = true;
    if (id === state.selected) state.dirty.details = true;
  }

  function onStatus(id, frame, retained) {
    const data = frame.data;
    if (!data || typeof data !== "object" || typeof data.online !== "boolean") return;
    const entry = drone(id);
    const before = entry.online;
    entry.online = data.online;
    entry.reason = typeof data.reason === "string" ? data.reason : "";
    if (!retained && before !== entry.online) {
      logEvent(`${id} ${entry.online ? "online" : "offline"}${entry.reason ? ` (${entry.reason})` : ""}`);
    }
    markDirty();
  }

  function onDroneEvent(id, frame) {
    const data = frame.data;
    let text;
    if (data && typeof data === "object" && !Array.isArray(data)) {
      const said = data.text || data.message || data.msg;
      if (typeof said === "string") {
        text = said;
      } else if (typeof data.type === "string") {
        const { type, ...rest } = data; // {"type": "heartbeat_lost", "silent_s": 3.0}
        text = Object.keys(rest).length ? `${type} ${compact(rest)}` : type;
      } else {
        text = compact(data);
      }
      if (typeof data.severity === "string" || typeof data.severity === "number") {
        text = `[${data.severity}] ${text}`;
      }
    } else {
      text = compact(data);
    }
    logEvent(`${id}: ${text}`);
  }

  function onResult(id, frame) {
    const data = frame.data;
    if (!data || typeof data !== "object") return;
    const commandId = data.id == null ? "" : String(data.id);
    const result = resultOf(data);
    const detail = detailOf(data);
    const command = state.commands.get(commandId);
    if (command && command.drone === id) {
      setCommand(command, result, detail);
    } else {
      const name = typeof data.command === "string" ? data.command : "a command";
      logEvent(`${id}: ${name} ${result}${detail ? ` (${detail})` : ""}` +
        (frame.from ? ` for ${frame.from}` : ""));
    }
  }

  /** A result's outcome in lower case: "accepted", "denied", ... (MAV_RESULT), "timeout",
   *  "error"; results of the shape {"ok": true|false} (the load generator's) as well. */
  function resultOf(data) {
    if (typeof data.result === "string" && data.result) return data.result.toLowerCase();
    if (data.ok === true) return "accepted";
    if (data.ok === false || data.error) return "error";
    return "unknown";
  }

  function detailOf(data) {
    for (const name of ["error", "reason", "message", "detail", "text"]) {
      if (typeof data[name] === "string" && data[name]) return data[name];
    }
    if (num(data.took_s) !== null) return `took ${data.took_s} s`; // the MAVLink bridge's
    return "";
  }

  // ---- commands

  function randomHex(bytes) {
    const values = crypto.getRandomValues(new Uint8Array(bytes));
    return Array.from(values, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  const commandPrefix = `con-${randomHex(4)}-`;

  function sendCommand(name) {
    const target = state.selected;
    if (!target || !state.welcomed || !canCommand()) return;
    state.requestIds += 1;
    const id = `${commandPrefix}${Date.now().toString(36)}-${state.requestIds}`;
    const data = { command: name, id };
    if (name === "takeoff") {
      const alt = Number(el.takeoffAlt.value);
      data.alt = Number.isFinite(alt) && alt > 0 ? alt : 10;
    }
    // QoS 1 with the command's id as the publication's id: sent again after a reconnect, it
    // is stored once.
    const pub = { op: "pub", topic: `drone/${target}/cmd`, data, qos: 1, id };
    const command = {
      id,
      drone: target,
      command: name,
      pub,
      state: "pending",
      detail: "sent",
      at: new Date(),
      row: null,
      timer: null,
    };
    command.timer = setTimeout(() => {
      if (command.state === "pending" || command.state === "in_progress") {
        setCommand(command, "timeout", `no result within ${COMMAND_TIMEOUT_MS / 1000} s`);
      }
    }, COMMAND_TIMEOUT_MS);
    state.commands.set(id, command);
    state.unacked.set(id, pub);
    send(pub);
    addCommandRow(command);
  }

  function resultClass(result) {
    if (result === "accepted") return "result-ok";
    if (result === "pending" || result === "in_progress") return "result-pending";
    return "result-bad";
  }

  function addCommandRow(command) {
    const row = document.createElement("tr");
    row.dataset.commandId = command.id;
    const cells = {};
    for (const field of ["time", "drone", "command", "result", "detail"]) {
      const cell = document.createElement("td");
      cell.dataset.field = field;
      cells[field] = cell;
      row.append(cell);
    }
    cells.time.textContent = command.at.toLocaleTimeString();
    cells.drone.textContent = command.drone;
    cells.command.textContent =
      command.command + (command.pub.data.alt ? ` ${command.pub.data.alt} m` : "");
    command.row = row;
    command.cells = cells;
    el.commandsBody.prepend(row);
    while (el.commandsBody.rows.length > MAX_COMMANDS) {
      const last = el.commandsBody.rows[el.commandsBody.rows.length - 1];
      const old = state.commands.get(last.dataset.commandId);
      if (old) {
        clearTimeout(old.timer);
        state.commands.delete(old.id);
        state.unacked.delete(old.id);
      }
      last.remove();
    }
    setCommand(command, command.state, command.detail);
  }

  function setCommand(command, result, detail) {
    command.state = result;
    command.detail = detail;
    if (result !== "pending" && result !== "in_progress") {
      state.unacked.delete(command.id);
      clearTimeout(command.timer);
    }
    if (!command.cells) return;
    command.cells.result.textContent = result;
    command.cells.result.className = resultClass(result);
    command.cells.detail.textContent = detail || "";
  }

  function updateCommandButtons() {
    const ready = canCommand() && state.welcomed && !!state.selected;
    for (const button of commandButtons) button.disabled = !ready;
  }

  // ---- what telemetry says, whatever its shape

  const LAT = ["lat", "latitude"];
  const LON = ["lon", "lng", "long", "longitude"];
  const ALT = ["alt", "altitude", "alt_m", "relative_alt", "alt_rel", "alt_msl", "alt_amsl"];

  function isObject(value) {
    return value !== null && typeof value === "object" && !Array.isArray(value);
  }

  function num(value) {
    return typeof value === "number" && Number.isFinite(value) ? value : null;
  }

  function firstKey(object, names) {
    for (const name of names) {
      if (isObject(object) && object[name] !== undefined && object[name] !== null) {
        return object[name];
      }
    }
    return undefined;
  }

  /** The first object, breadth first (top level first), for which ``test`` holds. */
  function findObject(data, test, depth = 3) {
    let level = [data];
    for (let d = 0; d <= depth && level.length; d += 1) {
      const next = [];
      for (const object of level) {
        if (!isObject(object)) continue;
        if (test(object)) return object;
        for (const value of Object.values(object)) if (isObject(value)) next.push(value);
      }
      level = next;
    }
    return null;
  }

  function findKey(data, names) {
    const holder = findObject(data, (object) => firstKey(object, names) !== undefined);
    return holder ? firstKey(holder, names) : undefined;
  }

  /** Degrees; MAVLink's integer degE7 (GLOBAL_POSITION_INT) scaled down. */
  function degrees(value, limit) {
    if (value === null) return null;
    if (Math.abs(value) > limit && Number.isInteger(value)) value /= 1e7;
    return Math.abs(value) <= limit ? value : null;
  }

  function keyFields(data) {
    const out = {
      position: null,
      alt: null,
      speed: null,
      heading: null,
      battery: null,
      mode: null,
      armed: null,
    };
    if (isObject(data) && typeof data.e2e === "string") {
      out.sealed = true; // an end-to-end envelope: only the fleet's key opens it
      return out;
    }
    if (!isObject(data)) return out;
    const holder = findObject(
      data,
      (o) => num(firstKey(o, LAT)) !== null && num(firstKey(o, LON)) !== null,
    );
    if (holder) {
      const lat = degrees(num(firstKey(holder, LAT)), 90);
      const lon = degrees(num(firstKey(holder, LON)), 180);
      if (lat !== null && lon !== null) out.position = { lat, lon };
      out.alt = num(firstKey(holder, ALT));
    }
    if (out.alt === null) out.alt = num(findKey(data, ALT));
    out.speed = num(findKey(data, ["groundspeed", "ground_speed", "speed", "gs"]));
    if (out.speed === null) {
      const velocity = findObject(data, (o) => num(o.vx) !== null && num(o.vy) !== null);
      if (velocity) out.speed = Math.hypot(velocity.vx, velocity.vy);
    }
    // Heading in degrees, as the MAVLink bridge sends it. Not yaw: its unit is anyone's guess.
    const heading = num(findKey(data, ["heading", "hdg"]));
    out.heading = heading === null ? null : ((heading % 360) + 360) % 360;
    out.battery = batteryOf(data);
    const mode = findKey(data, ["mode", "flight_mode"]);
    out.mode = typeof mode === "string" ? mode : null;
    const armed = findKey(data, ["armed"]);
    out.armed = typeof armed === "boolean" ? armed : null;
    return out;
  }

  function batteryOf(data) {
    const battery = firstKey(data, ["battery", "batt", "bat"]);
    let percent = null;
    let volts = null;
    if (num(battery) !== null) {
      percent = battery <= 1 ? battery * 100 : battery; // a fraction (the demo fleet) or percent
    } else if (isObject(battery)) {
      const remaining = num(
        firstKey(battery, ["remaining", "percent", "pct", "level", "soc", "charge"]),
      );
      if (remaining !== null) {
        percent = remaining < 1 && !Number.isInteger(remaining) ? remaining * 100 : remaining;
      }
      volts = num(firstKey(battery, ["voltage", "volts", "voltage_v", "v"]));
    }
    if (percent === null) {
      percent = num(findKey(data, ["battery_remaining", "battery_percent", "battery_pct"]));
    }
    if (percent !== null && percent < 0) percent = null; // MAVLink: -1 is "unknown"
    if (percent === null && volts === null) return null;
    return { percent, volts };
  }

  function compact(value) {
    let text;
    try {
      text = JSON.stringify(value);
    } catch (_) {
      text = String(value);
    }
    if (text === undefined) text = String(value);
    return text.length > 160 ? `${text.slice(0, 157)}...` : text;
  }

  function formatValue(value) {
    if (typeof value === "number") {
      if (Number.isInteger(value)) return String(value);
      return String(Math.round(value * 1e7) / 1e7);
    }
    if (typeof value === "string") return value.length > 160 ? `${value.slice(0, 157)}...` : value;
    return compact(value);
  }

  /** [dotted key, text] for every leaf of ``value`` (nested objects flattened). */
  function flatten(value, prefix, out, depth) {
    if (out.length >= 200) return out;
    if (isObject(value) && depth < 5 && Object.keys(value).length) {
      for (const [key, inner] of Object.entries(value)) {
        flatten(inner, prefix ? `${prefix}.${key}` : key, out, depth + 1);
      }
    } else {
      out.push([prefix || "(value)", formatValue(value)]);
    }
    return out;
  }

  // ---- drawing

  function markDirty() {
    state.dirty.table = true;
    state.dirty.plot = true;
    state.dirty.details = true;
  }

  function fixed(value, digits) {
    return value === null || value === undefined ? "—" : value.toFixed(digits);
  }

  function age(ms) {
    if (ms < 0) ms = 0;
    if (ms < 10000) return `${(ms / 1000).toFixed(1)} s`;
    if (ms < 120000) return `${Math.round(ms / 1000)} s`;
    if (ms < 7200000) return `${Math.round(ms / 60000)} min`;
    return `${Math.round(ms / 3600000)} h`;
  }

  const FIELDS = [
    "drone", "status", "lat", "lon", "alt", "speed", "heading", "battery", "mode", "armed",
    "rate", "last",
  ];

  function rowTexts(entry, now) {
    const key = entry.key || {};
    const sealed = key.sealed === true;
    const na = sealed ? "sealed" : "—";
    const pos = key.position;
    const battery = key.battery;
    let batteryText = na;
    if (battery) {
      const parts = [];
      if (battery.percent !== null) parts.push(`${battery.percent.toFixed(0)}%`);
      if (battery.volts !== null) parts.push(`${battery.volts.toFixed(1)} V`);
      batteryText = parts.join(" ");
    }
    let last = "never";
    if (entry.frame) {
      last = entry.retained
        ? `${age(entry.ts ? Date.now() - entry.ts : 0)} (last known)`
        : age(now - entry.heard);
    }
    return {
      drone: entry.id,
      status: entry.online === true ? "online" : entry.online === false ? "offline" : "—",
      lat: pos ? pos.lat.toFixed(6) : na,
      lon: pos ? pos.lon.toFixed(6) : na,
      alt: key.alt === null || key.alt === undefined ? na : key.alt.toFixed(1),
      speed: key.speed === null || key.speed === undefined ? na : key.speed.toFixed(1),
      heading: key.heading === null || key.heading === undefined ? na : `${key.heading.toFixed(0)}°`,
      battery: batteryText,
      mode: key.mode || na,
      armed: key.armed === true ? "armed" : key.armed === false ? "disarmed" : na,
      rate: entry.rate ? `${entry.rate.toFixed(1)} Hz` : "—",
      last,
    };
  }

  function visibleDrones() {
    const filter = el.filter.value.trim().toLowerCase();
    const list = [];
    for (const entry of state.drones.values()) {
      if (!filter || entry.id.toLowerCase().includes(filter)) list.push(entry);
    }
    list.sort((a, b) => {
      const rank = (e) => (e.online === true ? 0 : e.online === null ? 1 : 2);
      return rank(a) - rank(b) || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
    });
    return list;
  }

  function makeRow(entry) {
    const row = document.createElement("tr");
    row.dataset.drone = entry.id;
    const cells = {};
    for (const field of FIELDS) {
      const cell = document.createElement("td");
      cell.dataset.field = field;
      cells[field] = cell;
      row.append(cell);
    }
    row.addEventListener("click", () => select(entry.id));
    entry.row = row;
    entry.cells = cells;
    entry.texts = {};
    return row;
  }

  function renderTable() {
    const now = Date.now();
    const list = visibleDrones();
    const order = list.map((entry) => entry.id).join("\n");
    if (order !== state.rowOrder) {
      el.dronesBody.replaceChildren(...list.map((entry) => entry.row || makeRow(entry)));
      state.rowOrder = order;
    }
    for (const entry of list) {
      const texts = rowTexts(entry, now);
      for (const field of FIELDS) {
        if (entry.texts[field] !== texts[field]) {
          entry.cells[field].textContent = texts[field];
          entry.texts[field] = texts[field];
        }
      }
      entry.cells.status.className = entry.online === true ? "on" : entry.online === false ? "off" : "";
      entry.cells.status.title = entry.reason || "";
      entry.row.classList.toggle("offline", entry.online === false);
      entry.row.classList.toggle("selected", entry.id === state.selected);
      entry.row.classList.toggle(
        "stale",
        !!entry.frame && (entry.retained || now - entry.heard > STALE_MS),
      );
    }
    let online = 0;
    for (const entry of state.drones.values()) if (entry.online === true) online += 1;
    el.droneCount.textContent = `(${online} online of ${state.drones.size})`;
    el.noDrones.hidden = state.drones.size > 0;
  }

  function renderDetails() {
    const entry = state.selected ? state.drones.get(state.selected) : null;
    el.selectedId.textContent = entry ? entry.id : "none";
    const rows = [];
    if (entry) {
      rows.push(["status", entry.online === null ? "unknown" : entry.online ? "online" : "offline"]);
      if (entry.reason) rows.push(["status.reason", entry.reason]);
      if (entry.frame) {
        if (entry.frame.from) rows.push(["from", String(entry.frame.from)]);
        if (entry.ts) rows.push(["received", new Date(entry.ts).toLocaleTimeString()]);
        if (entry.key && entry.key.sealed) {
          rows.push(["telemetry", "sealed end to end: only the fleet's key opens it"]);
        } else {
          for (const [key, text] of flatten(entry.data, "", [], 0)) rows.push([key, text]);
        }
      }
    }
    el.fieldsBody.replaceChildren(
      ...rows.map(([key, text]) => {
        const row = document.createElement("tr");
        const name = document.createElement("td");
        const value = document.createElement("td");
        name.textContent = key;
        value.textContent = text;
        value.dataset.field = key;
        row.append(name, value);
        return row;
      }),
    );
  }

  function colour(id, online) {
    if (online === false) return "#6e7681";
    let hash = 0;
    for (let i = 0; i < id.length; i += 1) hash = (hash * 31 + id.charCodeAt(i)) >>> 0;
    return `hsl(${hash % 360}, 70%, 60%)`;
  }

  function niceLength(metres) {
    const power = 10 ** Math.floor(Math.log10(metres));
    for (const step of [1, 2, 5, 10]) if (step * power >= metres) return step * power;
    return 10 * power;
  }

  function drawPlot() {
    const canvas = el.plot;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const drones = visibleDrones().filter((entry) => entry.key && entry.key.position);
    state.plotPoints = [];
    if (!drones.length) {
      ctx.fillStyle = "#8693a2";
      ctx.font = "14px system-ui, sans-serif";
      ctx.textAlign = "center";
      ctx.fillText("no positions yet", width / 2, height / 2);
      el.mapNote.textContent = "";
      return;
    }
    let minLat = Infinity;
    let maxLat = -Infinity;
    let minLon = Infinity;
    let maxLon = -Infinity;
    for (const entry of drones) {
      for (const p of [...entry.trail, entry.key.position]) {
        minLat = Math.min(minLat, p.lat);
        maxLat = Math.max(maxLat, p.lat);
        minLon = Math.min(minLon, p.lon);
        maxLon = Math.max(maxLon, p.lon);
      }
    }
    const midLat = (minLat + maxLat) / 2;
    const midLon = (minLon + maxLon) / 2;
    const squeeze = Math.max(0.01, Math.cos((midLat * Math.PI) / 180)); // metres per degree of lon
    const spanX = Math.max((maxLon - minLon) * squeeze, 0.0005);
    const spanY = Math.max(maxLat - minLat, 0.0005);
    const pad = 36;
    const scale = Math.min((width - 2 * pad) / spanX, (height - 2 * pad) / spanY); // px per degree
    const project = (p) => [
      width / 2 + (p.lon - midLon) * squeeze * scale,
      height / 2 - (p.lat - midLat) * scale,
    ];

    // Scale bar: a round number of metres, about 100 px long.
    const metresPerPixel = 111320 / scale;
    const barMetres = niceLength(metresPerPixel * 100);
    const barPixels = barMetres / metresPerPixel;
    ctx.strokeStyle = "#8693a2";
    ctx.fillStyle = "#8693a2";
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.moveTo(12, height - 14);
    ctx.lineTo(12 + barPixels, height - 14);
    ctx.stroke();
    ctx.font = "12px system-ui, sans-serif";
    ctx.textAlign = "left";
    ctx.fillText(barMetres >= 1000 ? `${barMetres / 1000} km` : `${barMetres} m`, 12, height - 20);

    for (const entry of drones) {
      const hue = colour(entry.id, entry.online);
      if (entry.trail.length > 1) {
        ctx.strokeStyle = hue;
        ctx.globalAlpha = 0.4;
        ctx.lineWidth = 1.5;
        ctx.beginPath();
        entry.trail.forEach((p, i) => {
          const [x, y] = project(p);
          if (i === 0) ctx.moveTo(x, y);
          else ctx.lineTo(x, y);
        });
        ctx.stroke();
        ctx.globalAlpha = 1;
      }
      const [x, y] = project(entry.key.position);
      state.plotPoints.push({ id: entry.id, x, y });
      if (entry.id === state.selected) {
        ctx.strokeStyle = "#ffffff";
        ctx.lineWidth = 2;
        ctx.beginPath();
        ctx.arc(x, y, 9, 0, 2 * Math.PI);
        ctx.stroke();
      }
      ctx.fillStyle = hue;
      ctx.beginPath();
      ctx.arc(x, y, 5, 0, 2 * Math.PI);
      ctx.fill();
      ctx.fillStyle = "#d8dee6";
      ctx.font = "12px system-ui, sans-serif";
      ctx.fillText(entry.id, x + 9, y - 7);
    }
    el.mapNote.textContent = `${midLat.toFixed(4)}, ${midLon.toFixed(4)}; north up`;
  }

  function select(id) {
    state.selected = state.selected === id ? null : id;
    updateCommandButtons();
    markDirty();
  }

  function onPlotClick(event) {
    const box = el.plot.getBoundingClientRect();
    const x = event.clientX - box.left;
    const y = event.clientY - box.top;
    let best = null;
    let bestDistance = 14;
    for (const point of state.plotPoints) {
      const distance = Math.hypot(point.x - x, point.y - y);
      if (distance < bestDistance) {
        best = point;
        bestDistance = distance;
      }
    }
    if (best) select(best.id);
  }

  // ---- status line, banner, events

  function setConn(kind, detail) {
    const labels = {
      idle: "signed out",
      connecting: "connecting",
      online: "online",
      reconnecting: "reconnecting",
      refused: "refused",
      closed: "closed",
    };
    el.connState.textContent = labels[kind] || kind;
    el.connState.className = `state state-${kind}`;
    el.connDetail.textContent = detail || "";
  }

  function showBanner(text) {
    el.banner.textContent = text;
    el.banner.hidden = false;
  }

  function hideBanner() {
    el.banner.hidden = true;
    el.banner.textContent = "";
  }

  function logEvent(text) {
    const item = document.createElement("li");
    const time = document.createElement("time");
    time.textContent = new Date().toLocaleTimeString();
    item.append(time, document.createTextNode(text));
    el.events.prepend(item);
    while (el.events.children.length > MAX_EVENTS) el.events.lastElementChild.remove();
  }

  function updateExpiry() {
    const exp = state.identity && Number(state.identity.exp);
    if (!exp) {
      el.whoExp.textContent = "";
      return;
    }
    const left = exp * 1000 - Date.now();
    el.whoExp.textContent = left > 0 ? `token expires in ${age(left)}` : "token expired";
    el.whoExp.className = left < 120000 ? "detail result-bad" : "detail";
  }

  // ---- the clock

  function everySecond() {
    const now = performance.now();
    const seconds = (now - state.rateMark.at) / 1000;
    if (seconds > 0) {
      state.rate = (state.live - state.rateMark.live) / seconds;
      state.rateMark = { at: now, live: state.live };
      for (const entry of state.drones.values()) {
        entry.rate = (entry.count - entry.mark) / seconds;
        entry.mark = entry.count;
      }
    }
    el.msgRate.textContent = state.rate.toFixed(1);
    if (state.retryTimer) showRetry();
    if (state.token) updateExpiry();
    keepalive();
    state.dirty.table = true; // ages and rates move without messages
  }

  let lastSecond = performance.now();

  function tick() {
    if (performance.now() - lastSecond >= 1000) {
      lastSecond = performance.now();
      everySecond();
    }
    if (el.station.hidden) return;
    if (state.dirty.table) {
      state.dirty.table = false;
      renderTable();
    }
    if (state.dirty.plot) {
      state.dirty.plot = false;
      drawPlot();
    }
    if (state.dirty.details) {
      state.dirty.details = false;
      renderDetails();
    }
  }

  // ---- wiring

  el.signInForm.addEventListener("submit", (event) => {
    event.preventDefault();
    signIn(el.tokenInput.value);
  });
  el.signOut.addEventListener("click", () => signOut("Signed out."));
  el.filter.addEventListener("input", markDirty);
  el.plot.addEventListener("click", onPlotClick);
  window.addEventListener("resize", () => {
    state.dirty.plot = true;
  });
  for (const button of commandButtons) {
    button.addEventListener("click", () => sendCommand(button.dataset.command));
  }
  setInterval(tick, RENDER_MS);

  if (tokenFromAddress) signIn(tokenFromAddress);
  else showSignIn("");
})();
