// AudioWorklet processors of the demo: microphone capture (float32 frames to the page).
class CaptureProcessor extends AudioWorkletProcessor {
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (ch) this.port.postMessage(ch.slice(0));
    return true;
  }
}
registerProcessor("voicepipe-capture", CaptureProcessor);
