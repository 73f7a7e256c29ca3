// SENAB page: chat through /v1/chat/completions and watch the session's affect through
// /sessions/{id}/events. Plain browser JavaScript, no build step. Requests go to the
// server that served this page; an API key, if set, is kept in this tab only.
"use strict";

const $ = (id) => document.getElementById(id);
const page = { sessionId: "", messages: [], points: [], watcher: null, busy: false };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
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

// Calls onEvent({event, id, data}) for every server-sent event in a fetch response body.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { event: "message", id: null, data: "" };
      for (const line of block.split("\n")) {
        const colon = line.indexOf(": ");
        if (line.startsWith(":") || colon < 0) continue;
        const field = line.slice(0, colon);
        const text = line.slice(colon + 2);
        if (field === "data") event.data += text;
        else if (field === "event") event.event = text;
        else if (field === "id") event.id = text;
      }
      if (event.data) onEvent(event);
    }
  }
}

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("span");
  body.textContent = text;
  item.append(who, body);
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return body;
}

async function send(text) {
  page.busy = true;
  $("send").disabled = true;
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
    if (sessionId && sessionId !== page.sessionId) openSession(sessionId, { keepMessages: true });
    let failure = null;
    await readEvents(response, ({ data }) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) failure = chunk.error.message;
      for (const choice of chunk.choices || []) reply.textContent += choice.delta.content || "";
    });
    if (failure) throw new Error(failure);
    page.messages.push({ role: "assistant", content: reply.textContent });
    if (!page.watcher) watch(page.sessionId);
    setStatus(`Session ${page.sessionId}: ${page.messages.length / 2} turn(s) in this page.`);
  } catch (error) {
    page.messages.pop();  // the turn did not happen; a retry sends the same conversation
    reply.textContent = "(no reply)";
    setStatus(`The message was not answered: ${error.message}`, true);
  } finally {
    page.busy = false;
    $("send").disabled = false;
  }
}

// Follows the session's events; reconnects after an error or a dropped stream.
function watch(sessionId) {
  if (page.watcher) page.watcher.abort();
  const controller = new AbortController();
  page.watcher = controller;
  const run = async () => {
    while (!controller.signal.aborted && page.sessionId === sessionId) {
      const since = page.points.length ? page.points[page.points.length - 1].turn : 0;
      try {
        const response = await fetch(`/sessions/${encodeURIComponent(sessionId)}/events?since=${since}`,
                                     { headers: headers(false), signal: controller.signal });
        if (response.status === 404) {  // not stored yet: the first committed turn starts watching
          if (page.watcher === controller) page.watcher = null;
          return;
        }
        if (!response.ok) throw new Error(await errorMessage(response));
        await readEvents(response, ({ event, data }) => {
          const body = JSON.parse(data);
          if (event === "turn") addPoint(body);
          else if (event === "reset") { page.points = []; draw(); }
          else if (event === "error") setStatus(`Live updates paused: ${body.error.message}`, true);
        });
      } catch (error) {
        if (controller.signal.aborted) return;
        setStatus(`Live updates paused: ${error.message}`, true);
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  };
  run();
}

function addPoint(point) {
  page.points = page.points.filter((p) => p.turn < point.turn);
  page.points.push(point);
  draw();
}

async function openSession(sessionId, { keepMessages = false } = {}) {
  page.sessionId = sessionId;
  $("session-id").value = sessionId;
  if (!keepMessages) {
    page.messages = [];
    $("messages").replaceChildren();
  }
  page.points = [];
  draw();
  try {
    const trajectory = await api("GET", `/sessions/${encodeURIComponent(sessionId)}/trajectory`);
    page.points = trajectory.points;
    draw();
    if (!keepMessages) setStatus(`Opened session ${sessionId} at turn ${page.points.length ? page.points.at(-1).turn : 0}; ` +
                                 "its earlier messages are not stored on the server.");
  } catch (error) {
    if (!error.message.startsWith("404")) setStatus(error.message, true);
  }
  watch(sessionId);
}

function newSession() {
  if (page.watcher) page.watcher.abort();
  page.watcher = null;
  Object.assign(page, { sessionId: "", messages: [], points: [] });
  $("session-id").value = "";
  $("messages").replaceChildren();
  draw();
  setStatus("New session: it is created by the first message.");
}

async function sessionAction(method, suffix, done) {
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
  chart.append(svgElement("text", { x: width - right, y: height - 6, "font-size": 11, fill: "#4a5561",
                                    "text-anchor": "end" }, "turn"));
  for (const [name, color] of [["valence", "#0b7a3e"], ["arousal", "#b3261e"], ["distance", "#5b3cc4"]]) {
    const series = points.filter((p) => p[name] !== null);
    if (!series.length) continue;
    chart.append(svgElement("polyline", { fill: "none", stroke: color, "stroke-width": 2,
                                          points: series.map((p) => `${x(p.turn)},${y(p[name])}`).join(" ") }));
    for (const p of series) {
      const dot = svgElement("circle", { cx: x(p.turn), cy: y(p[name]), r: 3.5, fill: color, class: `point ${name}` });
      dot.append(svgElement("title", {}, `turn ${p.turn}: ${name} ${p[name].toFixed(2)}`));
      chart.append(dot);
    }
  }
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

async function loadModels() {
  try {
    const models = await api("GET", "/v1/models");
    $("model").replaceChildren(...models.data.map((m) => new Option(m.id, m.id, false, m.id.endsWith("+senab"))));
    setStatus("Ready. Messages to the +senab model move the session's state.");
  } catch (error) {
    setStatus(`Could not list the models: ${error.message}`, true);
  }
}

$("api-key").value = sessionStorage.getItem("senab-api-key") || "";
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("senab-api-key", $("api-key").value.trim());
  loadModels();
});
$("settings").addEventListener("submit", (event) => {
  event.preventDefault();
  const sessionId = $("session-id").value.trim();
  if (sessionId) openSession(sessionId); else newSession();
});
$("new-session").addEventListener("click", newSession);
$("reset-session").addEventListener("click", () => sessionAction("POST", "/reset", () => {
  page.points = [];
  draw();
  setStatus(`Session ${page.sessionId} is back at the set-point.`);
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
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
draw();
loadModels();
