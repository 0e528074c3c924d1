// voicepipe's browser client: a plain ES module (no build step) that speaks the OpenAI Realtime
// protocol to voicepipe over a WebSocket.
//
//   import { RealtimeClient, Microphone, Player } from "./realtime.js";
//   const ctx = new AudioContext();                      // inside a click handler
//   const player = await Player.create(ctx, 24000);
//   const client = new RealtimeClient("ws://host:8765/v1/realtime", { apiKey, player });
//   client.addEventListener("response.output_audio_transcript.delta", (e) => ...e.detail);
//   await client.connect();
//   client.updateSession({ instructions: "...", voicepipe: { latency_events: true } });
//   const mic = await Microphone.open(ctx, 24000, (pcm, rms, at) => client.appendAudio(pcm, at));
//
// The three parts:
// - `RealtimeClient` owns the socket and the protocol: it sends session updates and microphone
//   frames (`input_audio_buffer.append`, base64 PCM16), queues reply audio on its player, and on
//   `input_audio_buffer.speech_started` stops playback at once and sends
//   `conversation.item.truncate` with the milliseconds of the reply actually played (barge-in).
//   It also reveals the reply text as it is spoken and maps the server's `speech_stopped`
//   position back to the page's clock. It touches no audio API, so Node can test it with a fake
//   WebSocket and a fake player.
// - `Microphone` captures through an AudioWorklet (worklets.js) that resamples to the session's
//   rate and cuts 20 ms PCM16 frames; echo cancellation and noise suppression are requested.
// - `Player` plays reply audio through an AudioWorklet with a small jitter buffer and reports
//   how many samples of each item have been played.
//
// Every server event is re-dispatched as a CustomEvent named by its type (detail: the event),
// and also as "event". The client adds its own events:
//   "open", "close" {code, reason, expected}, "transcript.spoken" {itemId, spoken, unspoken,
//   cut}, "audio.start" {itemId, at}, "audio.played" {itemId, samples}, "truncated" {itemId,
//   audioEndMs}, "speech.end" {itemId, at, audioEndMs}.
// Times named `at` are on the page's clock (`performance.now()`, ms).

export const KEY_PROTOCOL = "openai-insecure-api-key.";

// GA event names and the beta names that differ (the server uses the beta names only for
// clients that ask for them; both are accepted here).
const AUDIO_DELTA = new Set(["response.output_audio.delta", "response.audio.delta"]);
const AUDIO_TRANSCRIPT_DELTA = new Set([
  "response.output_audio_transcript.delta", "response.audio_transcript.delta"]);
const TEXT_DELTA = new Set(["response.output_text.delta", "response.text.delta"]);

/** The subprotocols to offer: "realtime", plus the API key the way browsers can send one. */
export function subprotocols(apiKey) {
  return apiKey ? ["realtime", KEY_PROTOCOL + apiKey] : ["realtime"];
}

/** Base64 of the bytes of an Int16Array (little-endian, as every browser stores it). */
export function pcm16ToBase64(pcm) {
  const bytes = new Uint8Array(pcm.buffer, pcm.byteOffset, pcm.byteLength);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

/** The Int16Array of base64 PCM16. */
export function base64ToPcm16(b64) {
  const s = atob(b64);
  const bytes = new Uint8Array(s.length & ~1);
  for (let i = 0; i < bytes.length; i++) bytes[i] = s.charCodeAt(i);
  return new Int16Array(bytes.buffer);
}

export class RealtimeClient extends EventTarget {
  /**
   * @param {string} url  ws:// or wss:// URL of /v1/realtime
   * @param {object} opts
   * @param {string} [opts.apiKey]  sent as the `openai-insecure-api-key.<key>` subprotocol
   * @param {number} [opts.sampleRate=24000]  PCM16 rate of input and output audio
   * @param {object} [opts.player]  where reply audio goes: {enqueue(itemId, Int16Array),
   *   stop(): Promise<{item, played}|null>, onStart, onPlayed} (see `Player`); none: not played
   * @param {Function} [opts.WebSocket]  the WebSocket class (tests pass a fake)
   * @param {Function} [opts.now]  the page clock in ms (default performance.now)
   */
  constructor(url, { apiKey = null, sampleRate = 24000, player = null,
                     WebSocket: WS = globalThis.WebSocket,
                     now = () => performance.now() } = {}) {
    super();
    this.url = url;
    this.apiKey = apiKey;
    this.rate = sampleRate;
    this.WS = WS;
    this.now = now;
    this.ws = null;
    this.closing = false;
    this.stats = { framesSent: 0, samplesSent: 0, playedSamples: 0, truncatesSent: 0,
                   responsesDone: 0 };
    this.setPlayer(player);
    this._reset();
  }

  _reset() {
    this.items = new Map(); // assistant item id -> {queued, played, marks, shown, cut, audio}
    this.sent = []; // [input samples sent so far, page time the last of them was captured]
    this.sentSamples = 0;
    this.stopping = null;
  }

  /** Attach the player that reply audio goes to (its onStart/onPlayed are set here). */
  setPlayer(player) {
    this.player = player;
    if (!player) return;
    player.onStart = (itemId, at) => this.emit("audio.start", { itemId, at });
    player.onPlayed = (itemId, played) => this._played(itemId, played);
  }

  get connected() { return !!this.ws && this.ws.readyState === 1; }

  emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  /** Open the socket; resolves when it is open, rejects if it cannot be opened. */
  connect() {
    this._reset();
    this.closing = false;
    return new Promise((resolve, reject) => {
      let opened = false;
      const ws = new this.WS(this.url, subprotocols(this.apiKey));
      this.ws = ws;
      ws.onopen = () => { opened = true; this.emit("open", {}); resolve(); };
      ws.onerror = () => { if (!opened) reject(new Error(`cannot connect to ${this.url}`)); };
      ws.onclose = (e) => {
        if (this.ws !== ws) return;
        this.ws = null;
        if (this.player) this.player.stop();
        if (opened) {
          this.emit("close", { code: e.code, reason: e.reason, expected: this.closing });
        } else {
          reject(new Error(`cannot connect to ${this.url} (code ${e.code})`));
        }
      };
      ws.onmessage = (m) => {
        if (typeof m.data !== "string") return; // binary audio is opt-in; never asked for
        let ev;
        try { ev = JSON.parse(m.data); } catch (_) { return; }
        this.handleEvent(ev);
      };
    });
  }

  /** Close the socket on purpose (the "close" event says expected: true). */
  close() {
    this.closing = true;
    if (this.player) this.player.stop();
    if (this.ws) this.ws.close(1000, "client closed");
  }

  send(event) {
    if (!this.connected) return false;
    this.ws.send(JSON.stringify(event));
    return true;
  }

  updateSession(session) { return this.send({ type: "session.update", session }); }

  /**
   * Send one microphone frame (Int16Array at the session rate). `capturedAt`: page time of
   * its last sample, used to find the page time of the server's `speech_stopped`.
   */
  appendAudio(pcm, capturedAt = this.now()) {
    if (!this.send({ type: "input_audio_buffer.append", audio: pcm16ToBase64(pcm) })) return;
    this.sentSamples += pcm.length;
    this.sent.push([this.sentSamples, capturedAt]);
    if (this.sent.length > 3000) this.sent.splice(0, 1000); // keep about a minute
    this.stats.framesSent++;
    this.stats.samplesSent += pcm.length;
  }

  /** Page time at which input audio position `ms` (since the connection opened) was captured. */
  inputTime(ms) {
    const sample = (ms * this.rate) / 1000;
    for (const [end, at] of this.sent) {
      if (end >= sample) return at - ((end - sample) * 1000) / this.rate;
    }
    return null;
  }

  _item(id) {
    let it = this.items.get(id);
    if (!it) {
      it = { queued: 0, played: 0, marks: [], shown: 0, cut: false, audio: false };
      this.items.set(id, it);
    }
    return it;
  }

  /** Handle one server event (the socket calls this; tests may too). */
  handleEvent(ev) {
    const t = ev.type;
    if (AUDIO_DELTA.has(t)) {
      const it = this._item(ev.item_id);
      if (!it.cut) {
        const pcm = base64ToPcm16(ev.delta);
        it.audio = true;
        it.queued += pcm.length;
        if (this.player) this.player.enqueue(ev.item_id, pcm);
      }
    } else if (AUDIO_TRANSCRIPT_DELTA.has(t)) {
      const it = this._item(ev.item_id);
      it.audio = true;
      // the phrase's text is spoken from the first sample of audio that follows it
      if (!it.cut) it.marks.push({ at: it.queued, text: ev.delta });
      this._reveal(ev.item_id);
    } else if (TEXT_DELTA.has(t)) {
      const it = this._item(ev.item_id);
      it.marks.push({ at: 0, text: ev.delta });
      it.shown = it.marks.length;
      this._emitSpoken(ev.item_id, it);
    } else if (t === "input_audio_buffer.speech_started") {
      this.bargeIn();
    } else if (t === "input_audio_buffer.speech_stopped") {
      this.emit("speech.end", { itemId: ev.item_id, audioEndMs: ev.audio_end_ms,
                                at: this.inputTime(ev.audio_end_ms) });
    } else if (t === "response.done") {
      this.stats.responsesDone++;
      const out = (ev.response && ev.response.output) || [];
      for (const o of out) {
        const it = this.items.get(o.id);
        if (it && it.audio && !it.cut && it.queued === 0 && it.shown < it.marks.length) {
          it.shown = it.marks.length; // text without audio: nothing to wait for
          this._emitSpoken(o.id, it);
        }
      }
    }
    this.emit(t, ev);
    this.emit("event", ev);
  }

  _played(itemId, played) {
    const it = this.items.get(itemId);
    if (!it || played <= it.played) return;
    this.stats.playedSamples += played - it.played;
    it.played = played;
    this.emit("audio.played", { itemId, samples: played });
    this._reveal(itemId);
  }

  _reveal(itemId) {
    const it = this.items.get(itemId);
    let n = it.shown;
    while (n < it.marks.length && it.marks[n].at < it.played) n++;
    if (n !== it.shown) {
      it.shown = n;
      this._emitSpoken(itemId, it);
    }
  }

  _emitSpoken(itemId, it) {
    const join = (ms) => ms.map((m) => m.text).join("");
    this.emit("transcript.spoken", { itemId, spoken: join(it.marks.slice(0, it.shown)),
                                     unspoken: join(it.marks.slice(it.shown)), cut: it.cut });
  }

  /** The assistant item whose audio is playing or waiting to play, if any. */
  audibleItem() {
    let found = null;
    for (const [id, it] of this.items) if (it.audio && !it.cut && it.queued > it.played) found = id;
    return found;
  }

  /**
   * Barge-in: stop playback now and tell the server how much of the reply was heard. Runs on
   * `input_audio_buffer.speech_started`; resolves to the truncate event sent, or null.
   */
  async bargeIn() {
    const itemId = this.audibleItem();
    if (itemId === null) return null;
    const it = this.items.get(itemId);
    it.cut = true; // later deltas of this item are dropped
    let played = it.played;
    if (this.player) {
      const r = await this.player.stop();
      if (r && r.item === itemId) played = Math.max(played, r.played);
    }
    this._played(itemId, played);
    const audioEndMs = Math.floor((Math.min(played, it.queued) * 1000) / this.rate);
    const event = { type: "conversation.item.truncate", item_id: itemId, content_index: 0,
                    audio_end_ms: audioEndMs };
    if (this.send(event)) this.stats.truncatesSent++;
    this._emitSpoken(itemId, it);
    this.emit("truncated", { itemId, audioEndMs });
    return event;
  }
}

/** Why the microphone could not be opened, in words for the page. */
export function describeMicError(err) {
  const name = err && err.name;
  if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
    return "Microphone access was denied. Allow the microphone for this page in the " +
      "browser's site settings, then press Connect again.";
  }
  if (name === "NotFoundError" || name === "OverconstrainedError") {
    return "No microphone was found. Plug one in, then press Connect again.";
  }
  if (name === "NotReadableError") {
    return "The microphone is in use by another program or could not be started.";
  }
  if (name === "InsecureContext") {
    return "The browser only allows the microphone on secure pages: open the demo over " +
      "https, or on http://localhost / http://127.0.0.1.";
  }
  return `The microphone could not be opened: ${(err && err.message) || err}`;
}

/** Microphone capture: 20 ms PCM16 frames at `rate`, from an AudioWorklet. */
export class Microphone {
  /**
   * @param {AudioContext} ctx
   * @param {number} rate  the session's input rate
   * @param {(pcm: Int16Array, rms: number, capturedAt: number) => void} onFrame
   */
  static async open(ctx, rate, onFrame) {
    if (!globalThis.navigator || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      const e = new Error("getUserMedia is unavailable");
      e.name = "InsecureContext";
      throw e;
    }
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true,
               channelCount: 1 },
    });
    await loadWorklets(ctx);
    const source = ctx.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(ctx, "voicepipe-capture", {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
      processorOptions: { rate } });
    node.port.onmessage = (e) => onFrame(new Int16Array(e.data.pcm), e.data.rms, performance.now());
    source.connect(node);
    node.connect(ctx.destination); // silent; keeps the node pulled in every browser
    return new Microphone(stream, source, node);
  }

  constructor(stream, source, node) {
    this.stream = stream;
    this.source = source;
    this.node = node;
  }

  close() {
    this.stream.getTracks().forEach((t) => t.stop());
    this.source.disconnect();
    this.node.disconnect();
    this.node.port.onmessage = null;
  }
}

const loaded = new WeakMap();
function loadWorklets(ctx) {
  if (!loaded.has(ctx)) {
    loaded.set(ctx, ctx.audioWorklet.addModule(new URL("./worklets.js", import.meta.url)));
  }
  return loaded.get(ctx);
}

/** Reply playback through an AudioWorklet with a jitter buffer; counts played samples. */
export class Player {
  /**
   * @param {AudioContext} ctx
   * @param {number} rate  the session's output rate
   * @param {object} [opts]  prebufferMs (60), maxWaitMs (120), reportMs (20)
   */
  static async create(ctx, rate, opts = {}) {
    await loadWorklets(ctx);
    const node = new AudioWorkletNode(ctx, "voicepipe-playback", {
      numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1],
      processorOptions: { rate, prebufferMs: 60, maxWaitMs: 120, reportMs: 20, ...opts } });
    node.connect(ctx.destination);
    return new Player(ctx, node);
  }

  constructor(ctx, node) {
    this.ctx = ctx;
    this.node = node;
    this.onStart = null;
    this.onPlayed = null;
    this.waiting = new Map(); // clear request id -> resolve
    this.nextId = 1;
    node.port.onmessage = (e) => this._message(e.data);
  }

  enqueue(itemId, pcm) {
    const f = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) f[i] = pcm[i] / 32768;
    this.node.port.postMessage({ type: "audio", item: itemId, samples: f.buffer }, [f.buffer]);
  }

  /** Stop at once and drop what is queued; resolves to {item, played} of what was playing. */
  stop() {
    const id = this.nextId++;
    this.node.port.postMessage({ type: "clear", id });
    return new Promise((resolve) => {
      this.waiting.set(id, resolve);
      setTimeout(() => { if (this.waiting.delete(id)) resolve(null); }, 200);
    });
  }

  /** Page time (performance.now) at which audio-context time `t` reaches the speakers. */
  pageTime(t) {
    const ts = this.ctx.getOutputTimestamp ? this.ctx.getOutputTimestamp() : null;
    if (ts && ts.performanceTime > 0) return ts.performanceTime + (t - ts.contextTime) * 1000;
    const latency = this.ctx.outputLatency || this.ctx.baseLatency || 0;
    return performance.now() - (this.ctx.currentTime - t - latency) * 1000;
  }

  _message(m) {
    if (m.type === "cleared") {
      const resolve = this.waiting.get(m.id);
      if (resolve) { this.waiting.delete(m.id); resolve(m.item == null ? null : m); }
      if (m.item != null && this.onPlayed) this.onPlayed(m.item, m.played);
      return;
    }
    if (m.type === "start" && this.onStart) this.onStart(m.item, this.pageTime(m.time));
    if (m.item != null && this.onPlayed) this.onPlayed(m.item, m.played);
  }

  close() {
    this.node.disconnect();
    this.node.port.onmessage = null;
  }
}
