// Microphone capture: the first input channel resampled (linear) to 16 kHz, posted as Int16Array
// chunks of 20 ms (320 samples) with their RMS level (0..1).
class Pcm16Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / 16000;  // input samples per output sample
    this.pos = 0;                    // read position in the current input block, in input samples
    this.last = 0;                   // the previous block's last sample (for interpolation)
    this.chunk = new Int16Array(320);
    this.fill = 0;
    this.energy = 0;
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    while (this.pos < input.length) {
      const i = Math.floor(this.pos);
      const frac = this.pos - i;
      const a = i === 0 ? this.last : input[i - 1];
      const b = input[i];
      const x = Math.max(-1, Math.min(1, a + (b - a) * frac));
      this.chunk[this.fill++] = Math.round(x * 32767);
      this.energy += x * x;
      if (this.fill === this.chunk.length) {
        this.port.postMessage({ pcm: this.chunk.buffer, rms: Math.sqrt(this.energy / this.fill) }, [this.chunk.buffer]);
        this.chunk = new Int16Array(320);
        this.fill = 0;
        this.energy = 0;
      }
      this.pos += this.step;
    }
    this.pos -= input.length;
    this.last = input[input.length - 1];
    return true;
  }
}

registerProcessor("pcm16-capture", Pcm16Capture);
