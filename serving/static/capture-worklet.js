// AudioWorklet module: hands the microphone's samples to the page in blocks.
//
// The audio thread calls process() with 128 frames at a time. Posting each of
// those would be ~125 messages a second at 16 kHz (375 at 48 kHz), so this
// processor collects them into blocks of about 20 ms and transfers each block
// (a Float32Array of mono samples at the context's rate) to the main thread,
// where client.js resamples to 16 kHz, converts to PCM16 and frames them.

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    // `sampleRate` is a global of the AudioWorkletGlobalScope: the context's rate.
    this.blockSize = Math.max(128, Math.round(sampleRate / 50));
    this.block = new Float32Array(this.blockSize);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (channels && channels.length > 0) {
      const frames = channels[0].length;
      for (let i = 0; i < frames; i++) {
        // Average the channels to mono (getUserMedia asks for one, but may give two).
        let sum = 0;
        for (let c = 0; c < channels.length; c++) sum += channels[c][i];
        this.block[this.filled++] = sum / channels.length;
        if (this.filled === this.blockSize) {
          this.port.postMessage(this.block, [this.block.buffer]);
          this.block = new Float32Array(this.blockSize);
          this.filled = 0;
        }
      }
    }
    return true; // keep running while the microphone is connected
  }
}

registerProcessor("capture-processor", CaptureProcessor);
