// voicepipe's browser client: the OpenAI Realtime protocol over WebSocket, microphone capture
// as PCM16 in 20 ms frames at the session's rate, and reply playback that knows how much was
// actually heard (for `conversation.item.truncate` on barge-in). Plain ES module, no build.

export class RealtimeClient extends EventTarget {
  constructor(url, { apiKey = null, rate = 24000 } = {}) {
    super();
    this.url = url;
    this.apiKey = apiKey;
    this.rate = rate;
    this.ws = null;
    this.ctx = null;
    this.playhead = 0;        // AudioContext time at which queued reply audio ends
    this.sources = [];
    this.playing = null;      // {itemId, startedAt, ms}
  }

  connect() {
    const protocols = ["realtime"];
    if (this.apiKey) protocols.push("openai-insecure-api-key." + this.apiKey);
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url, protocols);
      this.ws = ws;
      ws.onopen = () => resolve();
      ws.onerror = () => reject(new Error("cannot reach " + this.url));
      ws.onclose = (e) => this.emit("close", { code: e.code, reason: e.reason });
      ws.onmessage = (m) => this.onMessage(JSON.parse(m.data));
    });
  }

  emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  send(event) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(event));
  }

  updateSession(session) { this.send({ type: "session.update", session }); }

  async startMicrophone() {
    this.ctx = this.ctx || new AudioContext();
    await this.ctx.resume();
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, channelCount: 1 },
    });
    await this.ctx.audioWorklet.addModule(new URL("./worklets.js", import.meta.url));
    const src = this.ctx.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(this.ctx, "voicepipe-capture");
    const ratio = this.ctx.sampleRate / this.rate;
    const frame = Math.round(this.rate / 50);  // 20 ms
    let pending = [];
    let pos = 0;  // fractional read position for the linear resampler
    let carry = new Float32Array(0);
    node.port.onmessage = (e) => {
      const input = new Float32Array(carry.length + e.data.length);
      input.set(carry); input.set(e.data, carry.length);
      while (pos + 1 < input.length) {
        const i = Math.floor(pos), f = pos - i;
        pending.push(input[i] * (1 - f) + input[i + 1] * f);
        pos += ratio;
      }
      const used = Math.floor(pos);
      carry = input.slice(used); pos -= used;
      let level = 0;
      while (pending.length >= frame) {
        const chunk = pending.splice(0, frame);
        const pcm = new Int16Array(frame);
        for (let k = 0; k < frame; k++) {
          const v = Math.max(-1, Math.min(1, chunk[k]));
          pcm[k] = v < 0 ? v * 0x8000 : v * 0x7fff;
          level = Math.max(level, Math.abs(v));
        }
        this.send({ type: "input_audio_buffer.append", audio: b64(pcm.buffer) });
      }
      this.emit("level", level);
    };
    src.connect(node);
    this.micStream = stream;
  }

  onMessage(ev) {
    if (ev.type === "response.output_audio.delta") this.play(ev.item_id, ev.delta);
    if (ev.type === "input_audio_buffer.speech_started") this.interrupt();
    this.emit("event", ev);
    this.emit(ev.type, ev);
  }

  play(itemId, base64) {
    this.ctx = this.ctx || new AudioContext();
    const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    const pcm = new Int16Array(bytes.buffer);
    const buf = this.ctx.createBuffer(1, pcm.length, this.rate);
    const ch = buf.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
    const node = this.ctx.createBufferSource();
    node.buffer = buf;
    node.connect(this.ctx.destination);
    const now = this.ctx.currentTime;
    const at = Math.max(now + 0.02, this.playhead);
    if (!this.playing || this.playing.itemId !== itemId) {
      this.playing = { itemId, startedAt: at, firstPlayed: performance.now() + (at - now) * 1000 };
      this.emit("playback-start", this.playing);
    }
    node.start(at);
    this.playhead = at + buf.duration;
    this.sources.push(node);
    node.onended = () => { this.sources = this.sources.filter((s) => s !== node); };
  }

  playedMs() {
    if (!this.playing || !this.ctx) return 0;
    const end = Math.min(this.ctx.currentTime, this.playhead);
    return Math.max(0, Math.round((end - this.playing.startedAt) * 1000));
  }

  interrupt() {
    if (!this.playing || !this.ctx || this.ctx.currentTime >= this.playhead) return;
    const ms = this.playedMs();
    for (const s of this.sources) { try { s.stop(); } catch (_) { /* already stopped */ } }
    this.sources = [];
    this.playhead = 0;
    this.send({ type: "conversation.item.truncate", item_id: this.playing.itemId,
                content_index: 0, audio_end_ms: ms });
    this.emit("truncated", { itemId: this.playing.itemId, ms });
    this.playing = null;
  }

  close() {
    if (this.micStream) this.micStream.getTracks().forEach((t) => t.stop());
    if (this.ws) this.ws.close();
  }
}

function b64(buffer) {
  const bytes = new Uint8Array(buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}
