// The audio-thread building blocks: resampler, 20 ms framer and the playback jitter buffer.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Framer, PlaybackQueue, StreamResampler, lowPass } from "../worklets.js";

const sine = (n, f, rate, phase = 0) =>
  Float32Array.from({ length: n }, (_, i) => 0.5 * Math.sin(2 * Math.PI * f * (i + phase) / rate));

function chunked(resampler, input, size) {
  const out = [];
  for (let i = 0; i < input.length; i += size) out.push(...resampler.process(input.subarray(i, i + size)));
  return Float32Array.from(out);
}

test("the low-pass filter has unity gain at DC", () => {
  const h = lowPass(31, 0.2);
  assert.ok(Math.abs(h.reduce((a, b) => a + b, 0) - 1) < 1e-6);
});

test("48 kHz to 24 kHz: half the samples, the tone kept, chunking changes nothing", () => {
  const x = sine(48000, 440, 48000);
  const whole = new StreamResampler(48000, 24000).process(x);
  const parts = chunked(new StreamResampler(48000, 24000), x, 128);
  assert.ok(Math.abs(whole.length - 24000) <= 1);
  assert.deepEqual([...parts], [...whole]);
  // after the filter's delay (15 input samples = 7.5 output samples) it is the same tone
  const ref = sine(24000, 440, 24000, -7.5);
  let err = 0;
  for (let i = 100; i < 23000; i++) err = Math.max(err, Math.abs(whole[i] - ref[i]));
  assert.ok(err < 0.02, `max error ${err}`);
});

test("a tone above the new Nyquist frequency is filtered out", () => {
  const out = new StreamResampler(48000, 16000).process(sine(48000, 11000, 48000));
  const rms = Math.sqrt(out.slice(100).reduce((a, v) => a + v * v, 0) / (out.length - 100));
  assert.ok(rms < 0.02, `rms ${rms}`);
});

test("44.1 kHz to 24 kHz and 16 kHz to 48 kHz give the right number of samples", () => {
  assert.ok(Math.abs(chunked(new StreamResampler(44100, 24000), sine(44100, 300, 44100), 128).length - 24000) <= 1);
  assert.ok(Math.abs(new StreamResampler(16000, 48000).process(sine(16000, 300, 16000)).length - 48000) <= 3);
});

test("the framer emits PCM16 frames of exactly the frame size with their RMS", () => {
  const frames = [];
  const f = new Framer(480);
  f.push(new Float32Array(1000).fill(0.5), (pcm, rms) => frames.push([pcm, rms]));
  assert.equal(frames.length, 2);
  assert.equal(frames[0][0].length, 480);
  assert.equal(frames[0][0][0], Math.round(0.5 * 0x7fff));
  assert.ok(Math.abs(frames[0][1] - 0.5) < 1e-6);
  f.push(new Float32Array([2, -2]), () => {});
  assert.equal(f.buf[40], 32767); // clipped
  assert.equal(f.buf[41], -32768);
});

function render(q, quanta, rate = 48000) {
  const out = new Float32Array(128);
  let heard = 0;
  for (let k = 0; k < quanta; k++) {
    q.render(out, k * 128);
    heard += out.filter((v) => v !== 0).length;
  }
  return heard;
}

test("playback waits for the prebuffer, then counts played samples per item", () => {
  const q = new PlaybackQueue(24000, 48000, { prebufferMs: 60, maxWaitMs: 1000 });
  q.push("a", new Float32Array(1000).fill(0.25)); // 41.7 ms: below the prebuffer
  render(q, 4);
  assert.equal(q.played.get("a"), undefined);
  q.push("a", new Float32Array(1000).fill(0.25));
  render(q, 1);
  assert.equal(q.played.get("a"), 64); // 128 output samples at 48 kHz = 64 input samples
  assert.deepEqual(q.events[0], { type: "start", item: "a", frame: 0 }); // first sample of the quantum
  render(q, 100);
  assert.equal(q.played.get("a"), 2000);
  assert.equal(q.events.at(-1).type, "idle");
});

test("a reply shorter than the prebuffer still plays after the longest wait", () => {
  const q = new PlaybackQueue(24000, 24000, { prebufferMs: 60, maxWaitMs: 20 });
  q.push("a", new Float32Array(100).fill(0.5));
  render(q, 10, 24000);
  assert.equal(q.played.get("a"), 100);
});

test("clear stops at once and returns what was played of the item", () => {
  const q = new PlaybackQueue(24000, 24000, { prebufferMs: 0 });
  q.push("a", new Float32Array(24000).fill(0.5));
  render(q, 10, 24000);
  assert.deepEqual(q.clear(), { item: "a", played: 1280 });
  assert.equal(q.queued, 0);
  assert.equal(render(q, 5, 24000), 0); // silence after the clear
  assert.equal(q.clear(), null);
});

test("items play in order and each is counted on its own", () => {
  const q = new PlaybackQueue(24000, 24000, { prebufferMs: 0 });
  q.push("a", new Float32Array(200).fill(0.5));
  q.push("b", new Float32Array(300).fill(0.5));
  render(q, 10, 24000);
  assert.equal(q.played.get("a"), 200);
  assert.equal(q.played.get("b"), 300);
  assert.deepEqual(q.events.filter((e) => e.type === "start").map((e) => e.item), ["a", "b"]);
});
