// The demo page: connects a RealtimeClient, shows the conversation as it is heard and, for
// each turn, a waterfall of the server's latency marks beside the mic-to-speaker gap measured
// here (the page time of the end of the user's speech to the page time the first reply sample
// reached the speakers). `window.voicepipeDemo` exposes counters for tests.

import { Microphone, Player, RealtimeClient, describeMicError } from "./realtime.js";

const RATE = 24000;
const $ = (id) => document.getElementById(id);
const MARKS = [ // [mark, row label]
  ["endpoint", "endpoint"], ["asr_final", "ASR final"], ["llm_first_token", "LLM first token"],
  ["tts_first_audio", "TTS first audio"], ["first_byte_sent", "first byte sent"]];

let ctx = null, mic = null, player = null, client = null;
let wanted = false; // the user wants to be connected (reconnect after a drop)
let retry = null, retryDelay = 1;
const turns = []; // in order of speech
const byUserItem = new Map(), byAssistantItem = new Map(), byResponse = new Map();
const counters = { turns: 0, playedSamples: 0, truncatesSent: 0, framesSent: 0,
                   reconnects: 0, events: {} };

window.voicepipeDemo = {
  counters,
  get state() { return $("state").textContent; },
  get status() { return $("status").textContent; },
  turns: () => turns.map((t) => ({ user: t.userText, userFinal: t.userFinal, agent: t.spoken,
                                   cut: t.cut, gapMs: t.gapMs, latency: t.latency,
                                   assistantItem: t.assistantItem })),
  items: () => client ? Object.fromEntries([...client.items].map(([k, v]) => [k,
    { queued: v.queued, played: v.played, cut: v.cut }])) : {},
  get client() { return client; },
};

$("url").value = location.origin.replace(/^http/, "ws") + "/v1/realtime";
$("connect").onclick = () => (wanted ? stop("Disconnected.") : start());
$("prompt").addEventListener("change", () => {
  if (client) client.updateSession({ instructions: $("prompt").value });
});

function setState(text) { $("state").textContent = text; }
function say(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function start() {
  wanted = true;
  retryDelay = 1;
  $("connect").textContent = "Disconnect";
  $("connect").className = "stop";
  say("");
  // The AudioContext must be made inside the click for browsers to let it play.
  ctx = new AudioContext();
  ctx.resume();
  try {
    player = await Player.create(ctx, RATE);
  } catch (e) {
    return fail(`This browser cannot run the audio worklets: ${e.message}`);
  }
  if (!(await open())) return;
  try {
    mic = await Microphone.open(ctx, RATE, onFrame);
  } catch (e) {
    return fail(describeMicError(e));
  }
  setState("listening");
  say("Connected. Speak, then pause.");
}

/**
 * Open the socket (first time, or `reconnecting` after a drop); false when it failed. A first
 * connect that fails is explained and not retried, unless the server is still loading.
 */
async function open(reconnecting = false) {
  setState("connecting");
  const c = new RealtimeClient($("url").value, { apiKey: $("key").value || null,
                                                 sampleRate: RATE, player });
  listen(c);
  try {
    await c.connect();
  } catch (_) {
    if (!wanted) return false;
    const why = await diagnose($("url").value);
    if (reconnecting || why.retry) {
      scheduleRetry(why.text);
    } else {
      fail(why.text);
    }
    return false;
  }
  if (!wanted) { c.close(); return false; }
  client = c;
  c.updateSession({
    instructions: $("prompt").value,
    audio: { input: { format: { type: "audio/pcm", rate: RATE } },
             output: { format: { type: "audio/pcm", rate: RATE } } },
    voicepipe: { latency_events: true },
  });
  retryDelay = 1;
  return true;
}

/** After a failed connect: ask /healthz what is wrong. */
async function diagnose(wsUrl) {
  const http = wsUrl.replace(/^ws/, "http").replace(/\/v1\/realtime.*$/, "/healthz");
  let res;
  try {
    res = await fetch(http, { cache: "no-store" });
  } catch (_) {
    return { text: `Cannot reach the voicepipe server at ${new URL(http).host}. ` +
      "Is `voicepipe serve` running?", retry: false };
  }
  const body = await res.json().catch(() => ({}));
  if (body.status === "loading") {
    return { text: "The server is still loading its models.", retry: true };
  }
  if (body.status === "failed") {
    return { text: `The server failed to load its models: ${body.error || "see its log"}.`,
             retry: false };
  }
  return { text: "The server refused the connection: the API key is missing or wrong, or " +
    "it is at its session limit.", retry: false };
}

function scheduleRetry(why) {
  const delay = retryDelay;
  retryDelay = Math.min(10, retryDelay * 2);
  setState("reconnecting");
  say(`${why} Reconnecting in ${delay} s…`, true);
  retry = setTimeout(async () => {
    retry = null;
    counters.reconnects++;
    if (wanted && (await open(true))) {
      setState("listening");
      say("Reconnected. The server started a new conversation.");
    }
  }, delay * 1000);
}

function fail(message) {
  stop(message, true);
}

function stop(message, error = false) {
  wanted = false;
  if (retry) { clearTimeout(retry); retry = null; }
  if (client) { client.close(); client = null; }
  if (mic) { mic.close(); mic = null; }
  if (player) { player.close(); player = null; }
  if (ctx) { ctx.close(); ctx = null; }
  $("connect").textContent = "Connect";
  $("connect").className = "";
  setState("disconnected");
  setLevel(0);
  say(message, error);
}

function onFrame(pcm, rms, at) {
  setLevel(rms);
  if (client) {
    client.appendAudio(pcm, at);
    counters.framesSent = client.stats.framesSent;
  }
}

function setLevel(rms) {
  const db = 20 * Math.log10(Math.max(rms, 1e-5));
  const pct = Math.max(0, Math.min(100, ((db + 60) / 60) * 100));
  document.querySelector("#meter .level").style.width = pct.toFixed(0) + "%";
}

// ---- the conversation ------------------------------------------------------------------------

function listen(c) {
  c.addEventListener("event", (e) => {
    const t = e.detail.type;
    counters.events[t] = (counters.events[t] || 0) + 1;
  });
  c.addEventListener("close", (e) => {
    if (c !== client) return;
    client = null;
    if (!e.detail.expected && wanted) scheduleRetry(
      `The connection to the server dropped (code ${e.detail.code}).`);
  });
  c.addEventListener("error", (e) => {
    const err = e.detail.error || {};
    say(`Server: ${err.message || err.code || "error"}`, true);
  });
  c.addEventListener("input_audio_buffer.speech_started", (e) => {
    $("meter").classList.add("speaking");
    $("vad").textContent = "speaking";
    userTurn(e.detail.item_id);
  });
  c.addEventListener("input_audio_buffer.speech_stopped", () => {
    $("meter").classList.remove("speaking");
    $("vad").textContent = "silent";
  });
  c.addEventListener("speech.end", (e) => {
    const t = userTurn(e.detail.itemId);
    t.speechEndAt = e.detail.at;
    render(t);
  });
  c.addEventListener("conversation.item.input_audio_transcription.delta", (e) => {
    const t = userTurn(e.detail.item_id);
    if (!t.userFinal) { t.userText += e.detail.delta; render(t); }
  });
  c.addEventListener("conversation.item.input_audio_transcription.completed", (e) => {
    const t = userTurn(e.detail.item_id);
    t.userText = e.detail.transcript;
    t.userFinal = true;
    render(t);
  });
  c.addEventListener("response.created", (e) => {
    const t = turns[turns.length - 1] || userTurn(null);
    byResponse.set(e.detail.response.id, t);
  });
  c.addEventListener("response.output_item.added", (e) => {
    const t = byResponse.get(e.detail.response_id);
    if (t && e.detail.item) {
      t.assistantItem = e.detail.item.id;
      byAssistantItem.set(e.detail.item.id, t);
    }
  });
  c.addEventListener("transcript.spoken", (e) => {
    const t = byAssistantItem.get(e.detail.itemId);
    if (!t) return;
    t.spoken = e.detail.spoken;
    t.unspoken = e.detail.unspoken;
    t.cut = e.detail.cut;
    render(t);
  });
  c.addEventListener("audio.start", (e) => {
    const t = byAssistantItem.get(e.detail.itemId);
    if (t && t.firstPlayedAt == null) { t.firstPlayedAt = e.detail.at; render(t); }
  });
  c.addEventListener("audio.played", () => { counters.playedSamples = c.stats.playedSamples; });
  c.addEventListener("truncated", (e) => {
    counters.truncatesSent = c.stats.truncatesSent;
    const t = byAssistantItem.get(e.detail.itemId);
    if (t) { t.truncatedMs = e.detail.audioEndMs; render(t); }
  });
  c.addEventListener("response.done", (e) => {
    const t = byResponse.get(e.detail.response.id);
    if (t) { t.responseStatus = e.detail.response.status; render(t); }
  });
  c.addEventListener("voicepipe.latency", (e) => {
    const t = byResponse.get(e.detail.response_id) || byAssistantItem.get(e.detail.item_id);
    if (t) { t.latency = e.detail; render(t); }
  });
}

function userTurn(itemId) {
  if (itemId && byUserItem.has(itemId)) return byUserItem.get(itemId);
  const t = { userItem: itemId, userText: "", userFinal: false, spoken: "", unspoken: "",
              cut: false, speechEndAt: null, firstPlayedAt: null, gapMs: null, latency: null };
  t.el = document.createElement("div");
  t.el.className = "turn";
  t.el.innerHTML = '<div class="user"><span class="who">You</span><span class="text"></span></div>' +
    '<div class="agent" hidden><span class="who">Agent</span><span class="spoken"></span>' +
    '<span class="unspoken"></span><span class="note"></span></div>' +
    '<div class="waterfall" hidden></div><div class="summary" hidden></div>';
  $("turns").append(t.el);
  turns.push(t);
  counters.turns = turns.length;
  if (itemId) byUserItem.set(itemId, t);
  return t;
}

function render(t) {
  const user = t.el.querySelector(".user .text");
  user.textContent = t.userText || "…";
  user.className = t.userFinal ? "text" : "text partial";
  const agent = t.el.querySelector(".agent");
  if (t.spoken || t.unspoken) {
    agent.hidden = false;
    agent.querySelector(".spoken").textContent = t.spoken;
    const rest = agent.querySelector(".unspoken");
    rest.textContent = t.unspoken;
    rest.className = t.cut ? "unspoken cut" : "unspoken";
    agent.querySelector(".note").textContent = t.cut
      ? `(interrupted after ${t.truncatedMs ?? "?"} ms)` : "";
  }
  if (t.speechEndAt != null && t.firstPlayedAt != null) {
    t.gapMs = Math.round(t.firstPlayedAt - t.speechEndAt);
  }
  if (t.latency || t.gapMs != null) renderWaterfall(t);
  const near = window.innerHeight + window.scrollY >= document.body.scrollHeight - 200;
  if (near) t.el.scrollIntoView({ block: "end" });
}

function renderWaterfall(t) {
  const rows = []; // [label, start ms, end ms, class, value ms]
  const m = t.latency ? t.latency.marks : {};
  if (m.speech_end != null) {
    const rel = (k) => (m[k] == null ? null : (m[k] - m.speech_end) * 1000);
    let prev = 0;
    for (const [key, label] of MARKS) {
      const at = rel(key);
      if (at == null) continue;
      let from = prev;
      if (key === "llm_first_token") from = Math.max(rel("endpoint") ?? 0, rel("asr_final") ?? 0);
      const early = at < from;
      rows.push([label, Math.min(from, at), Math.max(from, at), early ? "early" : "", at - from]);
      prev = Math.max(prev, at);
    }
  }
  if (t.gapMs != null) rows.push(["mic → speaker", 0, t.gapMs, "page", t.gapMs]); // page clock
  const scale = Math.max(100, ...rows.map((r) => r[2]));
  const wf = t.el.querySelector(".waterfall");
  wf.hidden = rows.length === 0;
  wf.replaceChildren();
  for (const [label, from, to, cls, value] of rows) {
    const name = div("name", label);
    name.title = label;
    const track = div("track");
    const bar = div("bar " + cls);
    bar.style.left = ((Math.max(0, from) / scale) * 100).toFixed(2) + "%";
    bar.style.width = (((to - Math.max(0, from)) / scale) * 100).toFixed(2) + "%";
    bar.title = `${label}: ${Math.round(from)}–${Math.round(to)} ms after the end of speech`;
    track.append(bar);
    wf.append(name, track, div("ms", `${Math.round(value)} ms`));
  }
  const parts = [];
  const d = t.latency ? t.latency.derived_ms : {};
  if (d.voice_to_voice != null) parts.push(`voice-to-voice (server) <b>${Math.round(d.voice_to_voice)} ms</b>`);
  if (t.gapMs != null) parts.push(`mic-to-speaker (page) <b>${t.gapMs} ms</b>`);
  if (d.endpoint_delay != null) parts.push(`of which end-of-turn wait ${Math.round(d.endpoint_delay)} ms`);
  const summary = t.el.querySelector(".summary");
  summary.hidden = parts.length === 0;
  summary.innerHTML = parts.join(" · ");
}

function div(cls, text = "") {
  const el = document.createElement("div");
  el.className = cls;
  el.textContent = text;
  return el;
}
