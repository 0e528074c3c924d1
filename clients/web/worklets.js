// The audio-thread half of voicepipe's browser client: two AudioWorklet processors and the
// plain classes they are made of.
//
// - "voicepipe-capture" takes the microphone at the AudioContext's rate, resamples it to the
//   session's rate (low-pass FIR, then linear interpolation) and posts PCM16 frames of 20 ms
//   to the page, each with its RMS level.
// - "voicepipe-playback" plays reply audio (float32 at the session's rate) through a small
//   jitter buffer: it starts once `prebufferMs` are queued (or `maxWaitMs` have passed), and
//   it counts the input samples it has actually handed to the audio output, per item, so the
//   page can send `conversation.item.truncate` with what the listener really heard.
//
// The classes are exported so that Node's test runner can check them; the processors are only
// registered when this file runs inside an AudioWorkletGlobalScope.

/** Streaming sample-rate converter for mono float32 audio, exact across chunk boundaries. */
export class StreamResampler {
  /**
   * @param {number} inRate  rate of the audio given to `process`
   * @param {number} outRate rate of the audio it returns
   * @param {number} taps    length of the anti-alias FIR used when downsampling (odd)
   */
  constructor(inRate, outRate, taps = 31) {
    this.step = inRate / outRate; // input samples per output sample
    this.t = 1; // position of the next output sample after `prev`, in input samples
    this.prev = 0;
    this.cur = 0;
    this.fir = inRate > outRate ? lowPass(taps, (0.45 * outRate) / inRate) : null;
    this.hist = this.fir ? new Float32Array(taps) : null; // ring of recent input samples
    this.hpos = 0;
  }

  /** Resample one chunk; returns the output samples it completes (possibly none). */
  process(input) {
    const out = new Float32Array(Math.ceil((input.length + 1) / this.step) + 1);
    let n = 0;
    for (let i = 0; i < input.length; i++) {
      const x = this.fir ? this._filter(input[i]) : input[i];
      this.prev = this.cur;
      this.cur = x;
      // output samples that fall between prev (time -1) and cur (time 0)
      while (this.t <= 1) {
        out[n++] = this.prev + (this.cur - this.prev) * this.t;
        this.t += this.step;
      }
      this.t -= 1;
    }
    return out.subarray(0, n);
  }

  _filter(x) {
    const h = this.fir, hist = this.hist, len = h.length;
    hist[this.hpos] = x;
    let acc = 0, j = this.hpos;
    for (let k = 0; k < len; k++) {
      acc += h[k] * hist[j];
      j = j === 0 ? len - 1 : j - 1;
    }
    this.hpos = this.hpos === len - 1 ? 0 : this.hpos + 1;
    return acc;
  }
}

/** Windowed-sinc (Blackman) low-pass with cutoff `fc` in cycles per sample, unity DC gain. */
export function lowPass(taps, fc) {
  const h = new Float32Array(taps), m = (taps - 1) / 2;
  let sum = 0;
  for (let i = 0; i < taps; i++) {
    const x = i - m;
    const sinc = x === 0 ? 2 * fc : Math.sin(2 * Math.PI * fc * x) / (Math.PI * x);
    const w = 0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (taps - 1)) +
      0.08 * Math.cos((4 * Math.PI * i) / (taps - 1));
    h[i] = sinc * w;
    sum += h[i];
  }
  for (let i = 0; i < taps; i++) h[i] /= sum;
  return h;
}

/** Cuts a stream of float32 samples into PCM16 frames of `size` samples. */
export class Framer {
  constructor(size) {
    this.size = size;
    this.buf = new Int16Array(size);
    this.n = 0;
    this.energy = 0;
  }

  /** Calls `emit(pcm: Int16Array, rms: number)` for every frame completed by `samples`. */
  push(samples, emit) {
    for (let i = 0; i < samples.length; i++) {
      const v = Math.max(-1, Math.min(1, samples[i]));
      this.buf[this.n++] = v < 0 ? Math.round(v * 0x8000) : Math.round(v * 0x7fff);
      this.energy += v * v;
      if (this.n === this.size) {
        emit(this.buf, Math.sqrt(this.energy / this.size));
        this.buf = new Int16Array(this.size);
        this.n = 0;
        this.energy = 0;
      }
    }
  }
}

/**
 * The reply audio queue of the playback processor: float32 chunks at the session's rate,
 * each tagged with its item id, rendered at the output rate.
 *
 * `render(out)` fills one render quantum. Playing starts once `prebuffer` input samples are
 * queued, or after `maxWait` output samples of waiting with anything queued (a reply shorter
 * than the prebuffer must still play); after an underrun it waits again. `played` counts, per
 * item, the input samples consumed by the interpolator — what has left for the speakers.
 */
export class PlaybackQueue {
  constructor(inRate, outRate, { prebufferMs = 60, maxWaitMs = 120 } = {}) {
    this.step = inRate / outRate;
    this.prebuffer = Math.round((prebufferMs * inRate) / 1000);
    this.maxWait = Math.round((maxWaitMs * outRate) / 1000);
    this.chunks = []; // {item, data, off}
    this.queued = 0; // input samples waiting
    this.playing = false;
    this.waited = 0;
    this.t = 1;
    this.prev = 0;
    this.cur = 0;
    this.item = null; // item of the sample in `cur`
    this.played = new Map(); // item -> input samples played
    this.events = []; // {type: "start"|"idle", item, frame} since the last drain
  }

  push(item, data) {
    if (data.length === 0) return;
    this.chunks.push({ item, data, off: 0 });
    this.queued += data.length;
  }

  /** Drops everything queued; returns {item, played} of the item that was playing, if any. */
  clear() {
    const item = this.item ?? (this.chunks[0] && this.chunks[0].item);
    this.chunks = [];
    this.queued = 0;
    this.playing = false;
    this.waited = 0;
    this.t = 1;
    this.prev = this.cur = 0;
    this.item = null;
    return item == null ? null : { item, played: this.played.get(item) || 0 };
  }

  _next() {
    const c = this.chunks[0];
    const x = c.data[c.off++];
    if (c.off === c.data.length) this.chunks.shift();
    this.queued--;
    if (c.item !== this.item) {
      this.item = c.item;
      if (!this.played.has(c.item)) this.events.push({ type: "start", item: c.item });
    }
    this.played.set(c.item, (this.played.get(c.item) || 0) + 1);
    return x;
  }

  /** Fills `out` (output rate); `frame` is the output frame index of out[0], for events. */
  render(out, frame = 0) {
    let i = 0;
    if (!this.playing) {
      if (this.queued > 0) this.waited += out.length;
      if (this.queued >= this.prebuffer || (this.queued > 0 && this.waited >= this.maxWait)) {
        this.playing = true;
        this.waited = 0;
      } else {
        out.fill(0);
        return;
      }
    }
    for (; i < out.length; i++) {
      while (this.t >= 1) {
        if (this.queued === 0) break;
        this.prev = this.cur;
        this.cur = this._next();
        if (this.events.length && this.events[this.events.length - 1].frame === undefined) {
          this.events[this.events.length - 1].frame = frame + i;
        }
        this.t -= 1;
      }
      if (this.t >= 1) break; // underrun
      out[i] = this.prev + (this.cur - this.prev) * this.t;
      this.t += this.step;
    }
    if (i < out.length) {
      out.fill(0, i);
      this.playing = false;
      this.events.push({ type: "idle", item: this.item, frame: frame + i });
      this.item = null;
      this.t = 1;
      this.prev = this.cur = 0;
    }
  }
}

if (typeof registerProcessor === "function") {
  class CaptureProcessor extends AudioWorkletProcessor {
    constructor({ processorOptions }) {
      super();
      const rate = processorOptions.rate;
      this.resampler = new StreamResampler(sampleRate, rate);
      this.framer = new Framer(Math.round(rate / 50)); // 20 ms
    }

    process(inputs) {
      const ch = inputs[0] && inputs[0][0];
      if (ch) {
        this.framer.push(this.resampler.process(ch), (pcm, rms) => {
          this.port.postMessage({ pcm: pcm.buffer, rms }, [pcm.buffer]);
        });
      }
      return true;
    }
  }

  class PlaybackProcessor extends AudioWorkletProcessor {
    constructor({ processorOptions }) {
      super();
      this.queue = new PlaybackQueue(processorOptions.rate, sampleRate, processorOptions);
      this.reportEvery = Math.round((sampleRate * (processorOptions.reportMs || 20)) / 1000);
      this.sinceReport = 0;
      this.port.onmessage = (e) => {
        const m = e.data;
        if (m.type === "audio") this.queue.push(m.item, new Float32Array(m.samples));
        else if (m.type === "clear") {
          const was = this.queue.clear();
          this.port.postMessage({ type: "cleared", id: m.id, item: was && was.item,
                                  played: was ? was.played : 0, time: currentTime });
        } else if (m.type === "forget") this.queue.played.delete(m.item);
      };
    }

    process(inputs, outputs) {
      const out = outputs[0][0];
      const q = this.queue;
      q.render(out, currentFrame);
      for (const ev of q.events) {
        this.port.postMessage({ type: ev.type, item: ev.item, time: ev.frame / sampleRate,
                                played: q.played.get(ev.item) || 0 });
      }
      q.events.length = 0;
      this.sinceReport += out.length;
      if (q.item !== null && this.sinceReport >= this.reportEvery) {
        this.sinceReport = 0;
        this.port.postMessage({ type: "played", item: q.item, played: q.played.get(q.item),
                                time: currentTime });
      }
      for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
      return true;
    }
  }

  registerProcessor("voicepipe-capture", CaptureProcessor);
  registerProcessor("voicepipe-playback", PlaybackProcessor);
}
