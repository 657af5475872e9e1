// The review page: plain JavaScript, no build step, nothing loaded from elsewhere.
// The token (if the device has one) is in an HttpOnly cookie the server set at /?token=...
"use strict";

const $ = (id) => document.getElementById(id);
const player = $("player");
let cursor = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  });
  children.forEach((c) => node.append(c));
  return node;
}

// "1 clip", "2 clips" (as the CLI's wording.counted says counts).
const counted = (n, noun) => `${n} ${noun}${n === 1 ? "" : "s"}`;

function say(text) {
  $("message").textContent = text;
  clearTimeout(say.timer);
  say.timer = setTimeout(() => ($("message").textContent = ""), 6000);
}

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (data.error && data.error.message) || response.statusText;
    say(message);
    throw new Error(message);
  }
  return data;
}

function when(ts) {
  return ts ? new Date(ts * 1000).toLocaleString() : "";
}

function play(url, start, end) {
  const fragment = start !== undefined ? `#t=${start.toFixed(2)},${end.toFixed(2)}` : "";
  player.src = url + fragment;
  player.play().catch((e) => say(`cannot play: ${e.message}`));
}

// --- status panel and the listening switch -------------------------------------------------

async function refreshStatus() {
  const s = await api("GET", "/api/v1/status");
  $("listening").checked = !!s.listening;
  $("st-backlog").textContent = counted(s.backlog, "job");
  $("st-disk").textContent = `${Math.round(s.disk_free_mb)} MB`;
  $("st-mqtt").textContent = s.mqtt ? (s.mqtt.connected ? "connected" : s.mqtt.error || "offline") : "off";
  $("st-mic").textContent = s.listening ? s.microphone || "-" : "muted";
  $("st-degraded").hidden = !s.degraded;
  $("st-degraded").textContent = s.degraded || "";
}

$("listening").addEventListener("change", async (event) => {
  const on = event.target.checked;
  try {
    await api("POST", on ? "/api/v1/vad/start" : "/api/v1/vad/stop");
    say(on ? "Listening" : "Not listening: the microphone is closed");
  } finally {
    refreshStatus();
  }
});

// --- live feed ----------------------------------------------------------------------------

function connectFeed() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/ws/events`);
  socket.onopen = () => ($("live-state").textContent = "Live: new transcripts appear here.");
  socket.onclose = () => {
    $("live-state").textContent = "Live feed lost; reconnecting…";
    setTimeout(connectFeed, 3000);
  };
  socket.onmessage = (message) => {
    const event = JSON.parse(message.data);
    if (event.event_type !== "transcript") return;
    const who = (event.segments || []).map((s) => s.speaker && s.speaker.name).find((n) => n);
    const item = el("li", {},
      el("div", { class: "meta" }, `${when(event.started_at)}${who ? " · " + who : ""}`),
      el("div", {}, event.text),
      el("div", { class: "actions" },
        el("button", { onclick: () => play(`/api/v1/recordings/${event.recording_id}/audio`) }, "Play")));
    $("feed").prepend(item);
    while ($("feed").children.length > 50) $("feed").lastChild.remove();
    refreshStatus();
  };
}

// --- recordings ---------------------------------------------------------------------------

async function loadRecordings(more) {
  const params = new URLSearchParams({ limit: "20" });
  const search = $("search").value.trim();
  if (search) params.set("search", search);
  if (more && cursor) params.set("cursor", cursor);
  const page = await api("GET", `/api/v1/recordings?${params}`);
  if (!more) $("recordings").replaceChildren();
  page.recordings.forEach((r) => {
    const url = `/api/v1/recordings/${r.id}/audio`;
    $("recordings").append(el("li", { "data-id": r.id },
      el("div", { class: "meta" }, `${when(r.started_at)} · ${r.duration_s.toFixed(1)} s · ${r.state}`),
      el("div", {}, r.text || "(no text)"),
      el("div", { class: "actions" },
        el("button", { onclick: () => play(url) }, "Play"),
        el("button", { class: "danger", onclick: async () => {
          if (!confirm("Delete this recording: audio and text?")) return;
          await api("DELETE", `/api/v1/recordings/${r.id}`);
          loadRecordings(false);
        } }, "Delete"))));
  });
  cursor = page.next_cursor;
  $("more").hidden = !cursor;
}

$("search-form").addEventListener("submit", (e) => { e.preventDefault(); loadRecordings(false); });
$("more").addEventListener("click", () => loadRecordings(true));

// --- speakers -----------------------------------------------------------------------------

async function loadSpeakers() {
  const profiles = await api("GET", "/api/v1/persistent-speakers");
  const people = profiles.filter((p) => !p.provisional);
  $("unknown").replaceChildren();
  $("people").replaceChildren();
  profiles.filter((p) => p.provisional).forEach((p) => $("unknown").append(unknownCard(p, people)));
  if (!$("unknown").children.length) $("unknown").append(el("li", { class: "hint" }, "No unknown voices."));
  people.forEach((p) => $("people").append(personCard(p)));
}

function speakerActions(p) {
  return [
    el("button", { onclick: async () => {
      await api("POST", "/api/v1/persistent-speakers/opt-out", { name: p.name, opt_out: !p.opt_out });
      say(p.opt_out ? `${p.name} is kept again` : `${p.name} will not be kept`);
      loadSpeakers();
    } }, p.opt_out ? "Keep again" : "Opt out"),
    el("button", { class: "danger", onclick: async () => {
      if (!confirm(`Delete the voice ${p.name}?`)) return;
      await api("DELETE", `/api/v1/persistent-speakers/${encodeURIComponent(p.name)}`);
      say(`${p.name} deleted`);
      loadSpeakers();
    } }, "Delete"),
  ];
}

function unknownCard(p, people) {
  const clips = el("div", { class: "actions clips" });
  api("GET", `/api/v1/persistent-speakers/${encodeURIComponent(p.name)}/clips`).then((rows) => {
    rows.slice(0, 5).forEach((c, i) => clips.append(el("button", {
      class: "clip", title: c.text, onclick: () => play(c.audio_url, c.start_s, c.end_s),
    }, `▶ clip ${i + 1}`)));
    if (!rows.length) clips.append(el("span", { class: "hint" }, "no clips with audio"));
  });
  const name = el("input", { placeholder: "Who is this?", class: "new-name", maxlength: "100" });
  const target = el("select", { class: "merge-target" },
    ...people.map((x) => el("option", { value: x.name }, x.name)));
  return el("li", { "data-name": p.name },
    el("div", {}, el("strong", {}, p.name)),
    el("div", { class: "meta" }, `heard ${when(p.last_heard_at) || "-"} · ${p.speech_s.toFixed(1)} s of speech`),
    clips,
    el("form", { onsubmit: async (e) => {
      e.preventDefault();
      if (!name.value.trim()) return;
      await api("POST", "/api/v1/persistent-speakers/rename", { name: p.name, new_name: name.value.trim() });
      say(`${p.name} is now ${name.value.trim()}`);
      loadSpeakers();
    } }, name, el("button", { class: "primary" }, "Name")),
    people.length ? el("form", { onsubmit: async (e) => {
      e.preventDefault();
      await api("POST", "/api/v1/persistent-speakers/merge", { source: p.name, target: target.value });
      say(`${p.name} merged into ${target.value}`);
      loadSpeakers();
    } }, target, el("button", {}, "Merge into")) : "",
    el("div", { class: "actions" }, ...speakerActions(p)));
}

function personCard(p) {
  return el("li", { "data-name": p.name },
    el("div", {}, el("strong", {}, p.name), p.opt_out ? " (not kept)" : ""),
    el("div", { class: "meta" }, `${counted(p.embeddings, "voice sample")} · heard ${when(p.last_heard_at) || "-"}`),
    el("div", { class: "actions" }, ...speakerActions(p)));
}

$("enrol-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = new FormData();
  form.set("name", $("enrol-name").value.trim());
  Array.from($("enrol-files").files).forEach((f) => form.append("files", f));
  const result = await api("POST", "/api/v1/persistent-speakers/upload", form);
  say(`${result.name} enrolled from ${counted(result.sources.filter((s) => s.stored).length, "clip")}`);
  e.target.reset();
  loadSpeakers();
});

// --- tabs ---------------------------------------------------------------------------------

document.querySelectorAll("nav button").forEach((button) => button.addEventListener("click", () => {
  document.querySelectorAll("nav button").forEach((b) => b.classList.toggle("active", b === button));
  ["live", "recordings", "speakers"].forEach((t) => ($(`tab-${t}`).hidden = t !== button.dataset.tab));
  if (button.dataset.tab === "recordings") loadRecordings(false);
  if (button.dataset.tab === "speakers") loadSpeakers();
}));

refreshStatus();
setInterval(refreshStatus, 10000);
connectFeed();
