// SENAB page: chat through /v1/chat/completions and watch the session's affect through
// /sessions/{id}/events. Plain browser JavaScript, no build step. Requests go to the
// server that served this page; an API key, if set, is kept in this tab only.
"use strict";

const $ = (id) => document.getElementById(id);
const page = { sessionId: "", messages: [], points: [], watcher: null, busy: false };

// Counts status changes, so that a slow model list does not overwrite a newer message.
let statusChanges = 0;

function setStatus(text, isError = false) {
  statusChanges += 1;
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// The live-update line is separate, so a dropped event stream never hides the error of an action.
function setLive(text, isError = false) {
  $("live").textContent = text;
  $("live").classList.toggle("error", isError);
}

function headers(json = true) {
  const result = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function api(method, path, body) {
  const response = await fetch(path, { method, headers: headers(body !== undefined),
                                       body: body === undefined ? undefined : JSON.stringify(body) });
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error.message}`;
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

// Calls onEvent({event, id, data}) for every server-sent event in a fetch response body,
// following the HTML standard's event-stream rules (CR, LF or CRLF line ends, an optional
// space after the colon, several data lines joined by "\n").
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let event = { event: "message", id: null, data: [] };
  const handle = (line) => {
    if (line === "") {
      if (event.data.length) onEvent({ event: event.event, id: event.id, data: event.data.join("\n") });
      event = { event: "message", id: null, data: [] };
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let text = colon < 0 ? "" : line.slice(colon + 1);
    if (text.startsWith(" ")) text = text.slice(1);
    if (field === "data") event.data.push(text);
    else if (field === "event") event.event = text;
    else if (field === "id") event.id = text;
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        // A CR kept back for a possible LF ends its line after all.
        if (buffer.endsWith("\r")) for (const line of (buffer.slice(0, -1) + "\n").split(/\r\n|\r|\n/).slice(0, -1)) handle(line);
        return;
      }
      buffer += decoder.decode(value, { stream: true });
      // A CR at the end may be the first half of a CRLF: keep it for the next chunk.
      const complete = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
      const lines = buffer.slice(0, complete).split(/\r\n|\r|\n/);
      buffer = lines.pop() + buffer.slice(complete);
      lines.forEach(handle);
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = role;
  const speaker = document.createElement("span");
  speaker.className = "who";
  speaker.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("span");
  body.textContent = text;
  item.append(speaker, body);
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return body;
}

function setBusy(busy) {
  page.busy = busy;
  // Switching sessions mid-reply would mix two conversations, so those controls wait too.
  for (const id of ["send", "open-session", "new-session", "reset-session", "delete-session"]) $(id).disabled = busy;
  $("messages").setAttribute("aria-busy", String(busy));
}

async function send(text) {
  setBusy(true);
  page.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  const sessionHeader = page.sessionId ? { "X-Session-Id": page.sessionId } : {};
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: { ...headers(), ...sessionHeader },
      body: JSON.stringify({ model: $("model").value, messages: page.messages, stream: true }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const sessionId = response.headers.get("X-Session-Id");
    if (sessionId && !page.sessionId) {
      page.sessionId = sessionId;
      $("session-id").value = sessionId;
    }
    let failure = null;
    let finished = false;
    await readEvents(response, ({ data }) => {
      if (data === "[DONE]") { finished = true; return; }
      const chunk = JSON.parse(data);
      if (chunk.error) failure = chunk.error.message;
      for (const choice of chunk.choices || []) {
        reply.textContent += choice.delta.content || "";
        reply.scrollIntoView({ block: "nearest" });
      }
    });
    if (failure) throw new Error(failure);
    if (!finished) throw new Error("the reply stream ended early; the turn may not have been saved");
    page.messages.push({ role: "assistant", content: reply.textContent });
    setStatus(`Session ${page.sessionId}: ${page.messages.length / 2} turn(s) in this page.`);
    if (!page.watcher && page.sessionId) watch(page.sessionId);
  } catch (error) {
    page.messages.pop();  // the turn did not happen; a retry sends the same conversation
    reply.textContent += reply.textContent ? " (cut off)" : "(no reply)";
    if (!$("prompt").value) $("prompt").value = text;  // give the text back for a retry
    setStatus(`The message was not answered: ${error.message}`, true);
  } finally {
    setBusy(false);
    $("prompt").focus();
  }
}

// Follows the session's events and reconnects 2 s after a dropped stream or a server error.
// It stops on the session's 404 (not stored yet) and on other client errors.
function watch(sessionId) {
  if (page.watcher) page.watcher.abort();
  const controller = new AbortController();
  page.watcher = controller;
  const current = () => !controller.signal.aborted && page.sessionId === sessionId;
  const run = async () => {
    while (current()) {
      const since = page.points.length ? page.points[page.points.length - 1].turn : 0;
      try {
        const response = await fetch(`/sessions/${encodeURIComponent(sessionId)}/events?since=${since}`,
                                     { headers: headers(false), signal: controller.signal });
        if (response.status === 404) return;  // the first committed turn starts watching again
        if (response.status >= 400 && response.status < 500 && ![408, 429].includes(response.status)) {
          setLive(`Live updates stopped: ${await errorMessage(response)}`, true);
          return;
        }
        if (!response.ok) throw new Error(await errorMessage(response));
        if ($("live").textContent) setLive("");
        await readEvents(response, ({ event, data }) => {
          if (!current()) return;
          const body = JSON.parse(data);
          if (event === "turn") addPoint(body);
          else if (event === "reset") { page.points = []; draw(); }
          else if (event === "error") setLive(`Live updates paused: ${body.error.message}`, true);
        });
      } catch (error) {
        if (!current()) return;
        setLive(`Live updates paused, retrying: ${error.message}`, true);
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  };
  run().finally(() => {
    if (page.watcher === controller) page.watcher = null;
  });
  setLive("");
}

function addPoint(point) {
  page.points = page.points.filter((p) => p.turn < point.turn);
  page.points.push(point);
  draw();
}

async function openSession(sessionId) {
  if (page.busy) return;  // the controls are disabled while a reply streams
  if (page.watcher) page.watcher.abort();
  page.watcher = null;
  page.sessionId = sessionId;
  $("session-id").value = sessionId;
  page.messages = [];
  $("messages").replaceChildren();
  page.points = [];
  draw();
  try {
    const trajectory = await api("GET", `/sessions/${encodeURIComponent(sessionId)}/trajectory`);
    if (page.sessionId !== sessionId) return;  // another session was opened meanwhile
    page.points = trajectory.points;
    draw();
    setStatus(`Opened session ${sessionId} at turn ${page.points.length ? page.points.at(-1).turn : 0}; ` +
              "its earlier messages are not stored on the server.");
    watch(sessionId);
  } catch (error) {
    if (page.sessionId !== sessionId) return;
    setStatus(error.message.startsWith("404")
      ? `Session ${sessionId} has no stored turns yet; the first message creates it.`
      : error.message, !error.message.startsWith("404"));
  }
}

function newSession() {
  if (page.busy) return;
  if (page.watcher) page.watcher.abort();
  page.watcher = null;
  Object.assign(page, { sessionId: "", messages: [], points: [] });
  $("session-id").value = "";
  $("messages").replaceChildren();
  draw();
  setStatus("New session: it is created by the first message.");
}

async function sessionAction(method, suffix, done) {
  if (page.busy) return;
  if (!page.sessionId) { setStatus("Open or start a session first.", true); return; }
  try {
    await api(method, `/sessions/${encodeURIComponent(page.sessionId)}${suffix}`);
    done();
  } catch (error) {
    setStatus(error.message, true);
  }
}

const SVG = "http://www.w3.org/2000/svg";
function svgElement(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

function draw() {
  drawChart();
  drawTable();
  drawHeatmap();
  const last = page.points.at(-1);
  $("latest").textContent = last
    ? `Turn ${last.turn}: valence ${last.valence === null ? "n/a" : last.valence.toFixed(2)}, ` +
      `arousal ${last.arousal.toFixed(2)}, distance ${last.distance.toFixed(2)}.`
    : "No turns yet.";
}

function drawChart() {
  const chart = $("chart");
  chart.replaceChildren(chart.querySelector("title"));
  const [width, height, left, right, top, bottom] = [480, 260, 36, 10, 10, 24];
  const points = page.points;
  const high = Math.max(1, ...points.map((p) => p.distance));
  const low = -1;
  const turns = points.length ? points.at(-1).turn : 1;
  const first = points.length ? points[0].turn : 1;
  const x = (turn) => left + (turns === first ? 0.5 : (turn - first) / (turns - first)) * (width - left - right);
  const y = (value) => top + (high - value) / (high - low) * (height - top - bottom);

  for (const value of [low, 0, 1, high].filter((v, i, all) => all.indexOf(v) === i)) {
    chart.append(svgElement("line", { x1: left, x2: width - right, y1: y(value), y2: y(value),
                                      stroke: "#c9d1d9", "stroke-dasharray": value === 0 ? "" : "3 3" }));
    chart.append(svgElement("text", { x: 4, y: y(value) + 4, "font-size": 11, fill: "#4a5561" }, value.toFixed(1)));
  }
  chart.append(svgElement("text", { x: 4, y: height - 6, "font-size": 11, fill: "#4a5561" }, "turn"));
  // Turn numbers under the points, thinned to about ten labels.
  const step = Math.max(1, Math.ceil(points.length / 10));
  points.forEach((p, i) => {
    if (i % step !== 0 && i !== points.length - 1) return;
    chart.append(svgElement("text", { x: x(p.turn), y: height - 6, "font-size": 11, fill: "#4a5561",
                                      "text-anchor": "middle", class: "turn-label" }, String(p.turn)));
  });

  // Dash patterns as well as colours, so the series stay apart without colour vision.
  const styles = [["valence", "#0b7a3e", ""], ["arousal", "#b3261e", "7 4"], ["distance", "#5b3cc4", "2 3"]];
  for (const [name, color, dashes] of styles) {
    const series = points.filter((p) => p[name] !== null);
    if (!series.length) continue;
    chart.append(svgElement("polyline", { fill: "none", stroke: color, "stroke-width": 2, "stroke-dasharray": dashes,
                                          points: series.map((p) => `${x(p.turn)},${y(p[name])}`).join(" ") }));
    for (const p of series) {
      const dot = svgElement("circle", { cx: x(p.turn), cy: y(p[name]), r: 3.5, fill: color, class: `point ${name}` });
      dot.append(svgElement("title", {}, `turn ${p.turn}: ${name} ${p[name].toFixed(2)}`));
      chart.append(dot);
    }
  }
}

// The chart's values as a table, for screen readers and for reading exact numbers.
function drawTable() {
  const format = (value) => (value === null ? "n/a" : value.toFixed(3));
  $("points-table").tBodies[0].replaceChildren(...page.points.map((p) => {
    const row = document.createElement("tr");
    for (const value of [String(p.turn), format(p.valence), format(p.arousal), format(p.distance)]) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.append(cell);
    }
    return row;
  }));
}

function drawHeatmap() {
  const heatmap = $("heatmap");
  heatmap.replaceChildren(heatmap.querySelector("title"));
  const state = page.points.length ? page.points.at(-1).state : [];
  const scale = Math.max(1e-6, ...state.map(Math.abs));
  const width = 480 / Math.max(1, state.length);
  state.forEach((value, i) => {
    const strength = Math.round(255 * (1 - Math.abs(value) / scale));
    const color = value >= 0 ? `rgb(255,${strength},${strength})` : `rgb(${strength},${strength},255)`;
    const cell = svgElement("rect", { x: i * width, y: 0, width, height: 60, fill: color });
    cell.append(svgElement("title", {}, `channel ${i}: ${value.toFixed(3)}`));
    heatmap.append(cell);
  });
}

// Each call lists the models with the current API key, and only the latest call's response is used.
let modelLoads = 0;

async function loadModels() {
  const call = ++modelLoads;
  const changesBefore = statusChanges;
  try {
    const models = await api("GET", "/v1/models");
    if (call !== modelLoads) return;
    $("model").replaceChildren(...models.data.map((m) => new Option(m.id, m.id, false, m.id.endsWith("+senab"))));
    if (statusChanges === changesBefore) setStatus("Ready. Messages to the +senab model move the session's state.");
  } catch (error) {
    if (call === modelLoads) setStatus(`Could not list the models: ${error.message}`, true);
  }
}

$("api-key").value = sessionStorage.getItem("senab-api-key") || "";
$("api-key").addEventListener("keydown", (event) => {
  if (event.key !== "Enter") return;
  event.preventDefault();  // Enter here saves the key; it must not reopen the session
  $("api-key").dispatchEvent(new Event("change"));
});
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("senab-api-key", $("api-key").value.trim());
  loadModels();
});
const SESSION_ID = /^(?!\.\.?$)[A-Za-z0-9._-]{1,128}$/;
$("settings").addEventListener("submit", (event) => {
  event.preventDefault();
  const sessionId = $("session-id").value.trim();
  if (sessionId && !SESSION_ID.test(sessionId)) {
    setStatus(`Invalid session id "${sessionId.slice(0, 40)}${sessionId.length > 40 ? "..." : ""}": use 1 to 128 ` +
              "letters, digits, '.', '_' or '-' (not '.' or '..').", true);
    $("session-id").setAttribute("aria-invalid", "true");
    return;
  }
  $("session-id").removeAttribute("aria-invalid");
  if (sessionId === page.sessionId && sessionId) setStatus(`Session ${sessionId} is already open.`);
  else if (sessionId) openSession(sessionId);
  else newSession();
});
$("new-session").addEventListener("click", newSession);
$("reset-session").addEventListener("click", () => sessionAction("POST", "/reset", () => {
  // The server's turn count starts again, so the conversation on this page does too.
  page.points = [];
  page.messages = [];
  $("messages").replaceChildren();
  draw();
  setStatus(`Session ${page.sessionId} is back at the set-point; the conversation starts again.`);
}));
$("delete-session").addEventListener("click", () => sessionAction("DELETE", "", () => {
  const deleted = page.sessionId;
  newSession();
  setStatus(`Session ${deleted} was deleted.`);
}));
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || page.busy) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
draw();
loadModels();
