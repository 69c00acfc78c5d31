// capture-worklet.js: an AudioWorkletProcessor that turns the microphone (the AudioContext's
// rate, usually 48 kHz, first channel) into 16 kHz mono s16le frames of `frameMs`, posted to
// the main thread as ArrayBuffers. Used by captureMicrophone() in scheduler-client.js.
//
// Resampling: a two-pole low-pass below the new Nyquist frequency (against aliasing), then
// linear interpolation, with the fractional read position carried from one 128-sample
// block to the next, so frames join without a seam.

class SchedulerCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRate = 16000, frameMs = 100 } = (options && options.processorOptions) || {};
    this.step = sampleRate / targetRate; // input samples per output sample
    this.t = 0; // position of the next output sample, in input samples from this block's start
    this.last = 0; // the previous block's last (filtered) sample
    this.size = Math.round((targetRate * frameMs) / 1000); // samples per frame
    this.frame = new Int16Array(this.size);
    this.n = 0;
    // biquad low-pass (RBJ cookbook), cut-off at 0.45 x the target rate, Q = 1/sqrt(2)
    const w = (2 * Math.PI * 0.45 * targetRate) / sampleRate;
    const alpha = Math.sin(w) / Math.SQRT2;
    const cos = Math.cos(w);
    const a0 = 1 + alpha;
    this.b = [(1 - cos) / 2 / a0, (1 - cos) / a0, (1 - cos) / 2 / a0];
    this.a = [(-2 * cos) / a0, (1 - alpha) / a0];
    this.z = [0, 0, 0, 0]; // x1, x2, y1, y2
  }

  lowpass(input) {
    if (this.step <= 1) return input;
    const out = new Float32Array(input.length);
    const [b0, b1, b2] = this.b;
    const [a1, a2] = this.a;
    let [x1, x2, y1, y2] = this.z;
    for (let i = 0; i < input.length; i++) {
      const x = input[i];
      const y = b0 * x + b1 * x1 + b2 * x2 - a1 * y1 - a2 * y2;
      x2 = x1; x1 = x; y2 = y1; y1 = y;
      out[i] = y;
    }
    this.z = [x1, x2, y1, y2];
    return out;
  }

  push(value) {
    const v = Math.max(-1, Math.min(1, value));
    this.frame[this.n++] = v < 0 ? v * 0x8000 : v * 0x7fff;
    if (this.n === this.size) {
      this.port.postMessage(this.frame.buffer, [this.frame.buffer]); // transferred: detached here
      this.frame = new Int16Array(this.size);
      this.n = 0;
    }
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel || channel.length === 0) return true;
    const x = this.lowpass(channel);
    let t = this.t;
    while (t < x.length - 1) {
      const i = Math.floor(t);
      const f = t - i;
      const a = i < 0 ? this.last : x[i];
      const b = x[i + 1];
      this.push(a + (b - a) * f);
      t += this.step;
    }
    this.t = t - x.length;
    this.last = x[x.length - 1];
    return true;
  }
}

registerProcessor("scheduler-capture", SchedulerCapture);
