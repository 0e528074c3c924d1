// Protocol handling of the RealtimeClient, with a fake WebSocket and a fake player.
// Run: node --test clients/web/test/
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  KEY_PROTOCOL, RealtimeClient, base64ToPcm16, pcm16ToBase64, subprotocols,
} from "../realtime.js";

class FakeSocket {
  static last = null;
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.last = this;
  }
  open() { this.readyState = 1; this.onopen({}); }
  send(data) { this.sent.push(JSON.parse(data)); }
  close(code = 1000) { this.readyState = 3; this.onclose({ code, reason: "" }); }
  drop(code = 1006) { this.readyState = 3; this.onclose({ code, reason: "" }); }
  receive(ev) { this.onmessage({ data: JSON.stringify(ev) }); }
}

class FakePlayer {
  constructor() { this.queued = []; this.stops = 0; this.playedNow = 0; this.item = null; }
  enqueue(itemId, pcm) { this.item = itemId; this.queued.push([itemId, pcm.length]); }
  async stop() { this.stops++; return this.item ? { item: this.item, played: this.playedNow } : null; }
}

const audio = (n) => pcm16ToBase64(new Int16Array(n).fill(1000));

async function connected(opts = {}) {
  const player = new FakePlayer();
  const client = new RealtimeClient("ws://server/v1/realtime",
                                    { WebSocket: FakeSocket, player, now: () => 1000, ...opts });
  const opening = client.connect();
  const ws = FakeSocket.last;
  ws.open();
  await opening;
  return { client, ws, player };
}

function record(client, type) {
  const got = [];
  client.addEventListener(type, (e) => got.push(e.detail));
  return got;
}

test("offers the realtime subprotocol, and the API key when there is one", async () => {
  assert.deepEqual(subprotocols(null), ["realtime"]);
  assert.deepEqual(subprotocols("sk-1"), ["realtime", KEY_PROTOCOL + "sk-1"]);
  const { ws } = await connected({ apiKey: "secret" });
  assert.deepEqual(ws.protocols, ["realtime", "openai-insecure-api-key.secret"]);
});

test("PCM16 survives base64 both ways", () => {
  const pcm = Int16Array.from([0, 1, -1, 32767, -32768, 1234]);
  assert.deepEqual([...base64ToPcm16(pcm16ToBase64(pcm))], [...pcm]);
});

test("a failed connection rejects; a drop after opening is reported as unexpected", async () => {
  const client = new RealtimeClient("ws://nowhere/v1/realtime", { WebSocket: FakeSocket });
  const opening = client.connect();
  FakeSocket.last.onerror({});
  FakeSocket.last.drop();
  await assert.rejects(opening, /cannot connect/);

  const { client: c2, ws } = await connected();
  const closes = record(c2, "close");
  ws.drop(1006);
  assert.deepEqual(closes, [{ code: 1006, reason: "", expected: false }]);

  const { client: c3 } = await connected();
  const closes3 = record(c3, "close");
  c3.close();
  assert.equal(closes3[0].expected, true);
});

test("microphone frames go out as input_audio_buffer.append and are counted", async () => {
  const { client, ws } = await connected();
  client.appendAudio(new Int16Array(480).fill(7), 500);
  client.appendAudio(new Int16Array(480).fill(7), 520);
  assert.equal(ws.sent.length, 2);
  assert.equal(ws.sent[0].type, "input_audio_buffer.append");
  assert.equal(base64ToPcm16(ws.sent[0].audio).length, 480);
  assert.equal(client.stats.framesSent, 2);
  // 30 ms of input (720 samples at 24 kHz) was the 240th sample of the frame captured at 520
  assert.equal(client.inputTime(30), 520 - 10);
  const ends = record(client, "speech.end");
  ws.receive({ type: "input_audio_buffer.speech_stopped", audio_end_ms: 20, item_id: "u1" });
  assert.deepEqual(ends, [{ itemId: "u1", audioEndMs: 20, at: 500 }]);
});

test("nothing is sent while the socket is closed", async () => {
  const client = new RealtimeClient("ws://server/v1/realtime", { WebSocket: FakeSocket });
  assert.equal(client.send({ type: "response.create" }), false);
  client.appendAudio(new Int16Array(480));
  assert.equal(client.stats.framesSent, 0);
});

test("reply audio is queued on the player and server events are re-dispatched", async () => {
  const { client, ws, player } = await connected();
  const deltas = record(client, "response.output_audio.delta");
  const all = record(client, "event");
  ws.receive({ type: "response.output_audio.delta", item_id: "a1", delta: audio(2400) });
  assert.deepEqual(player.queued, [["a1", 2400]]);
  assert.equal(deltas.length, 1);
  assert.equal(all[0].type, "response.output_audio.delta");
  // the beta name works as well
  ws.receive({ type: "response.audio.delta", item_id: "a1", delta: audio(100) });
  assert.deepEqual(player.queued[1], ["a1", 100]);
});

test("reply text is revealed as its audio is played", async () => {
  const { client, ws, player } = await connected();
  const spoken = record(client, "transcript.spoken");
  ws.receive({ type: "response.output_audio_transcript.delta", item_id: "a1", delta: "Hello there." });
  ws.receive({ type: "response.output_audio.delta", item_id: "a1", delta: audio(2400) });
  ws.receive({ type: "response.output_audio_transcript.delta", item_id: "a1", delta: " Bye." });
  ws.receive({ type: "response.output_audio.delta", item_id: "a1", delta: audio(2400) });
  assert.equal(spoken.length, 0); // nothing heard yet
  player.onPlayed("a1", 10);
  assert.deepEqual(spoken.at(-1), { itemId: "a1", spoken: "Hello there.", unspoken: " Bye.", cut: false });
  player.onPlayed("a1", 2401);
  assert.equal(spoken.at(-1).spoken, "Hello there. Bye.");
  assert.equal(client.stats.playedSamples, 2401);
});

test("barge-in stops playback and truncates to the milliseconds actually played", async () => {
  const { client, ws, player } = await connected();
  const truncated = record(client, "truncated");
  ws.receive({ type: "response.output_audio_transcript.delta", item_id: "a1", delta: "One." });
  ws.receive({ type: "response.output_audio.delta", item_id: "a1", delta: audio(24000) });
  ws.receive({ type: "response.output_audio_transcript.delta", item_id: "a1", delta: " Two." });
  ws.receive({ type: "response.output_audio.delta", item_id: "a1", delta: audio(24000) });
  player.onPlayed("a1", 4800); // last report: 200 ms
  player.playedNow = 7212; // the player's exact count when it stopped: 300.5 ms
  ws.receive({ type: "input_audio_buffer.speech_started", audio_start_ms: 900, item_id: "u2" });
  await new Promise((r) => setTimeout(r, 0));
  assert.equal(player.stops, 1);
  const sent = ws.sent.filter((e) => e.type === "conversation.item.truncate");
  assert.deepEqual(sent, [{ type: "conversation.item.truncate", item_id: "a1", content_index: 0,
                            audio_end_ms: 300 }]);
  assert.equal(client.stats.truncatesSent, 1);
  assert.deepEqual(truncated, [{ itemId: "a1", audioEndMs: 300 }]);
  // audio of the cut item still in flight is dropped, not played
  ws.receive({ type: "response.output_audio.delta", item_id: "a1", delta: audio(2400) });
  assert.equal(player.queued.length, 2);
});

test("speech while nothing is playing sends no truncate", async () => {
  const { client, ws, player } = await connected();
  ws.receive({ type: "response.output_audio.delta", item_id: "a1", delta: audio(2400) });
  player.onPlayed("a1", 2400); // all of it was played
  ws.receive({ type: "input_audio_buffer.speech_started", audio_start_ms: 100, item_id: "u2" });
  await new Promise((r) => setTimeout(r, 0));
  assert.equal(player.stops, 0);
  assert.equal(ws.sent.filter((e) => e.type === "conversation.item.truncate").length, 0);
  assert.equal(client.stats.truncatesSent, 0);
});

test("text-only replies are shown at once", async () => {
  const { client, ws } = await connected();
  const spoken = record(client, "transcript.spoken");
  ws.receive({ type: "response.output_text.delta", item_id: "t1", delta: "Hi" });
  assert.equal(spoken.at(-1).spoken, "Hi");
});

test("session.update carries the session patch", async () => {
  const { client, ws } = await connected();
  client.updateSession({ instructions: "Be brief.", voicepipe: { latency_events: true } });
  assert.deepEqual(ws.sent.at(-1), { type: "session.update",
    session: { instructions: "Be brief.", voicepipe: { latency_events: true } } });
});
