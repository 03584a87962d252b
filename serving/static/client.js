// Browser client for a live session (protocol: serving/PROTOCOL.md).
//
// Sends:    the microphone as 16 kHz mono PCM16 (binary 0x01 frames of 50 ms),
//           the camera as 160x120 JPEG at 5 fps (binary 0x02 frames),
//           typed text ({"type": "text"}), session.end on Stop, pings for the round trip.
// Receives: the model's speech (0x01 frames of 3,200 samples, one per 200 ms tick),
//           played back to back behind a small jitter buffer; tick events (text,
//           who speaks, timing); tool calls and results; errors; the close code.
//
// The page is opened as /?token=T: every request it makes carries that token.
// Optional query flags: autostart=1 (start on load), rate=native (capture at the
// device's rate and resample here instead of asking for a 16 kHz AudioContext),
// worklet=0 (capture with a ScriptProcessorNode instead of the AudioWorklet),
// temperature=, top_p=, seed= (the session's sampling; the server's default is greedy).
//
// window.interactionStats holds counters for tests and for the curious.

"use strict";

const QUERY = new URLSearchParams(location.search);
const TOKEN = QUERY.get("token") || "";
const TOKEN_QUERY = "?token=" + encodeURIComponent(TOKEN);

// The protocol's constants, as serving/protocol.py defines them (tests/test_serving_protocol.py keeps them equal).
const PROTOCOL_VERSION = 1;
const SESSION_PATH = "/v1/session";
const KIND_AUDIO = 0x01;
const KIND_JPEG = 0x02;
const SAMPLE_RATE = 16000; // the protocol's audio rate, both ways
const ENCODING = "pcm16";
const SEND_SAMPLES = 800; // 50 ms of microphone audio per frame
const VIDEO_FPS = 5;
const VIDEO_WIDTH = 160;
const VIDEO_HEIGHT = 120;
const JITTER_S = 0.25; // playback starts this far behind the first frame, and again after running dry
const MAX_AHEAD_S = 1.5; // more model audio than this queued (a stalled clock): drop frames to catch up
const MAX_SEND_BUFFER = 256 << 10; // bytes queued in the socket: skip camera frames above this
const PING_EVERY_MS = 5000;
const TRANSCRIPT_CHARS = 20000; // keep the page small in long sessions
const LIST_ITEMS = 200;

const stats = {
  audioFrames: 0, // model audio frames received
  ticks: 0, // tick events received
  textTicks: 0, // tick events whose `text` is a string
  textChars: 0, // characters of model text received
  toolEvents: 0, // tool_call and tool_result events received
  errors: 0, // error events received
  closed: false, // the socket closed (closeCode, closeReason say how)
  closeCode: null,
  closeReason: null,
  session: null, // the server's session id
  audioSent: 0, // microphone frames sent
  samplesSent: 0, // 16 kHz samples sent
  videoSent: 0, // JPEG frames sent
  userAudioTicks: 0, // ticks where some of our audio had arrived (user_audio_ms > 0)
  userSpeakingTicks: 0, // ticks where the server heard speech energy from us
  modelSpeakingTicks: 0, // ticks where the model's audio was not silence
  underruns: 0, // playback ran dry and re-buffered
  dropped: 0, // model audio frames dropped to catch up
  contextRate: null, // the AudioContext's sample rate
  capture: null, // "AudioWorklet" or "ScriptProcessor"
};
window.interactionStats = stats;

const $ = (id) => document.getElementById(id);

// -- microphone: resample to 16 kHz, convert to PCM16, cut into frames ---------------

// Takes float blocks at `inRate` and calls `onFrame(Uint8Array)` with ready-to-send
// frames: the kind byte 0x01 followed by SEND_SAMPLES PCM16 little-endian samples.
// Downsampling low-passes with a moving average over one output period, then
// interpolates linearly: plenty for speech into a 16 kHz log-mel front end.
class MicEncoder {
  constructor(inRate, onFrame) {
    this.onFrame = onFrame;
    this.step = inRate / SAMPLE_RATE; // input samples per output sample
    this.pos = 0; // position of the next output sample in the current block (-1 = the previous block's last)
    this.prev = 0; // the previous block's last (filtered) sample
    const taps = this.step > 1 ? Math.round(this.step) : 1;
    this.ring = new Float32Array(taps); // moving-average window
    this.ringAt = 0;
    this.ringSum = 0;
    this.newFrame();
  }

  newFrame() {
    this.frame = new Uint8Array(1 + 2 * SEND_SAMPLES);
    this.frame[0] = KIND_AUDIO;
    this.view = new DataView(this.frame.buffer);
    this.filled = 0;
  }

  // One sample in [-1, 1] at 16 kHz: into the frame as PCM16.
  emit(x) {
    const s = Math.max(-1, Math.min(1, x));
    this.view.setInt16(1 + 2 * this.filled, Math.round(s < 0 ? s * 32768 : s * 32767), true);
    if (++this.filled === SEND_SAMPLES) {
      this.onFrame(this.frame);
      this.newFrame();
    }
  }

  push(block) {
    if (this.step === 1) {
      for (let i = 0; i < block.length; i++) this.emit(block[i]);
      return;
    }
    const x = this.ring.length > 1 ? this.lowpass(block) : block;
    const last = x.length - 1;
    while (this.pos <= last) {
      const i = Math.floor(this.pos);
      const f = this.pos - i;
      const a = i < 0 ? this.prev : x[i];
      const b = f === 0 ? a : x[i + 1];
      this.emit(a + (b - a) * f);
      this.pos += this.step;
    }
    this.pos -= x.length;
    this.prev = x[last];
  }

  lowpass(block) {
    const out = new Float32Array(block.length);
    const n = this.ring.length;
    for (let i = 0; i < block.length; i++) {
      this.ringSum += block[i] - this.ring[this.ringAt];
      this.ring[this.ringAt] = block[i];
      this.ringAt = (this.ringAt + 1) % n;
      out[i] = this.ringSum / n;
    }
    return out;
  }
}

// An AudioContext at 16 kHz fed by the microphone, or, when the browser refuses
// that rate (or ?rate=native), one at the device's rate (MicEncoder resamples).
function openAudio(stream) {
  const rates = QUERY.get("rate") === "native" ? [null] : [SAMPLE_RATE, null];
  let failure = null;
  for (const rate of rates) {
    let ctx = null;
    try {
      const options = { latencyHint: "interactive" };
      if (rate) options.sampleRate = rate;
      ctx = new AudioContext(options);
      // Firefox refuses a microphone into a context at another rate: that throws here.
      const source = ctx.createMediaStreamSource(stream);
      return { ctx, source };
    } catch (e) {
      failure = e;
      if (ctx) ctx.close();
    }
  }
  throw failure;
}

// Feeds the microphone into `encoder`: an AudioWorklet when available, else a ScriptProcessorNode.
// Either node is connected to the destination (it outputs silence) so the graph pulls it.
async function startCapture(ctx, source, encoder) {
  if (ctx.audioWorklet && QUERY.get("worklet") !== "0") {
    await ctx.audioWorklet.addModule("/static/capture-worklet.js" + TOKEN_QUERY);
    const node = new AudioWorkletNode(ctx, "capture-processor", { numberOfOutputs: 1, outputChannelCount: [1] });
    node.port.onmessage = (e) => encoder.push(e.data);
    source.connect(node).connect(ctx.destination);
    stats.capture = "AudioWorklet";
    return node;
  }
  const node = ctx.createScriptProcessor(2048, 1, 1);
  node.onaudioprocess = (e) => {
    encoder.push(e.inputBuffer.getChannelData(0));
    e.outputBuffer.getChannelData(0).fill(0);
  };
  source.connect(node).connect(ctx.destination);
  stats.capture = "ScriptProcessor";
  return node;
}

// -- model speech: back-to-back AudioBufferSourceNodes behind a jitter buffer ----------

class Player {
  constructor(ctx) {
    this.ctx = ctx;
    this.next = 0; // context time at which the next frame starts
    this.started = false;
  }

  // `pcm`: a DataView over PCM16 little-endian samples at 16 kHz.
  play(pcm) {
    const n = pcm.byteLength >> 1;
    if (n === 0) return;
    const buffer = this.ctx.createBuffer(1, n, SAMPLE_RATE); // the context resamples if its rate differs
    const samples = buffer.getChannelData(0);
    for (let i = 0; i < n; i++) samples[i] = pcm.getInt16(2 * i, true) / 32768;
    const now = this.ctx.currentTime;
    if (this.next < now + 0.01) {
      // First frame, or the network/server fell behind and the queue ran dry: re-buffer.
      if (this.started) stats.underruns++;
      this.next = now + JITTER_S;
      this.started = true;
    } else if (this.next > now + MAX_AHEAD_S) {
      stats.dropped++; // frames pile up (the context was suspended?): drop to keep the latency bounded
      return;
    }
    const node = this.ctx.createBufferSource();
    node.buffer = buffer;
    node.connect(this.ctx.destination);
    node.start(this.next);
    this.next += buffer.duration;
  }

  // Seconds of audio still queued.
  queued() {
    return Math.max(0, this.next - this.ctx.currentTime);
  }
}

// -- camera: 160x120 JPEG frames at 5 fps ----------------------------------------------

class VideoSender {
  constructor(video, canvas, send, canSend) {
    this.video = video;
    this.canvas = canvas;
    this.g = canvas.getContext("2d");
    this.send = send;
    this.canSend = canSend;
    this.busy = false; // one toBlob at a time
    this.timer = setInterval(() => this.grab(), 1000 / VIDEO_FPS);
  }

  grab() {
    const v = this.video;
    if (this.busy || v.readyState < 2 || !v.videoWidth || !this.canSend()) return;
    // Centre-crop to 4:3 so the picture is not stretched.
    const want = VIDEO_WIDTH / VIDEO_HEIGHT;
    let sw = v.videoWidth;
    let sh = v.videoHeight;
    if (sw / sh > want) sw = Math.round(sh * want);
    else sh = Math.round(sw / want);
    const sx = (v.videoWidth - sw) >> 1;
    const sy = (v.videoHeight - sh) >> 1;
    this.g.drawImage(v, sx, sy, sw, sh, 0, 0, VIDEO_WIDTH, VIDEO_HEIGHT);
    this.busy = true;
    this.canvas.toBlob(
      (jpeg) => {
        this.busy = false;
        if (jpeg && this.timer !== null && this.canSend()) {
          this.send(new Blob([new Uint8Array([KIND_JPEG]), jpeg]));
          stats.videoSent++;
        }
      },
      "image/jpeg",
      0.8,
    );
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
  }
}

// -- timeline: one column per micro-turn, scrolling left -------------------------------

class Timeline {
  constructor(canvas) {
    // Draw at the screen's pixel density, in CSS pixel coordinates.
    const dpr = window.devicePixelRatio || 1;
    this.w = canvas.width;
    this.h = canvas.height;
    canvas.style.width = this.w + "px";
    canvas.style.height = this.h + "px";
    canvas.width = Math.round(this.w * dpr);
    canvas.height = Math.round(this.h * dpr);
    this.g = canvas.getContext("2d");
    this.g.scale(dpr, dpr);
    this.gutter = 48; // row labels
    this.col = 4; // pixels per micro-turn
    this.capacity = Math.floor((this.w - this.gutter) / this.col);
    this.turns = [];
    this.draw();
  }

  push(turn) {
    this.turns.push(turn);
    if (this.turns.length > this.capacity) this.turns.shift();
    this.draw();
  }

  draw() {
    const g = this.g;
    const rows = [
      { label: "you", y: 4, h: 26 },
      { label: "model", y: 34, h: 26 },
      { label: "text", y: 64, h: 12 },
      { label: "tools", y: 80, h: 12 },
      { label: "tick ms", y: 96, h: 18 },
    ];
    g.clearRect(0, 0, this.w, this.h);
    g.font = "11px system-ui, sans-serif";
    g.textBaseline = "middle";
    for (const r of rows) {
      g.fillStyle = "#f3f4f6";
      g.fillRect(this.gutter, r.y, this.w - this.gutter, r.h);
      g.fillStyle = "#4b5563";
      g.fillText(r.label, 4, r.y + r.h / 2);
    }
    const [you, model, txt, tools, tick] = rows;
    // The newest turn sits at the right edge.
    const x0 = this.w - this.turns.length * this.col;
    this.turns.forEach((t, i) => {
      const x = x0 + i * this.col;
      if (t.user) fill(g, "#2563eb", x, you.y, this.col, you.h);
      else if (t.heardMs > 0) fill(g, "#bfdbfe", x, you.y + you.h - 4, this.col, 4);
      if (t.model) fill(g, "#ea580c", x, model.y, this.col, model.h);
      if (t.text) fill(g, "#16a34a", x, txt.y + 2, this.col - 1, txt.h - 4);
      if (t.tools) fill(g, "#9333ea", x, tools.y + 2, this.col - 1, tools.h - 4);
      if (t.tickMs != null) {
        // Bar height: the tick's latency against the 200 ms budget; red past it.
        const frac = Math.min(1, t.tickMs / 200);
        const h = Math.max(1, Math.round(frac * tick.h));
        fill(g, t.tickMs > 200 ? "#dc2626" : "#6b7280", x, tick.y + tick.h - h, this.col - 1, h);
      }
      if (t.turn % 25 === 0) {
        // A grid line and the session time every 5 s.
        fill(g, "#9ca3af", x, 2, 1, tick.y + tick.h);
        g.fillStyle = "#374151";
        g.fillText(t.turn / 5 + " s", x + 2, this.h - 8);
      }
    });
  }
}

function fill(g, color, x, y, w, h) {
  g.fillStyle = color;
  g.fillRect(x, y, w, h);
}

// -- page elements ----------------------------------------------------------------------

const ui = {};

function setStatus(text, kind) {
  ui.status.textContent = text;
  ui.status.className = "status " + kind;
}

// Control characters other than newline and tab show as a middle dot.
function printable(text) {
  return text.replace(/[\u0000-\u0008\u000b-\u001f\u007f]/g, "\u00b7");
}

function addLine(kind, text) {
  const line = document.createElement("div");
  line.className = "line " + kind;
  line.appendChild(document.createTextNode(text));
  ui.transcript.appendChild(line);
  while (ui.transcript.childElementCount > LIST_ITEMS) ui.transcript.firstElementChild.remove();
  return line;
}

// Appends the model's text to its current line (a new one after anything else).
function appendModelText(text) {
  const box = ui.transcript;
  const follow = box.scrollHeight - box.scrollTop - box.clientHeight < 24; // the reader is at the bottom
  let line = box.lastElementChild;
  if (!line || !line.classList.contains("model")) line = addLine("model", "");
  const node = line.firstChild;
  node.appendData(printable(text));
  if (node.length > TRANSCRIPT_CHARS) node.deleteData(0, node.length - TRANSCRIPT_CHARS);
  if (follow) box.scrollTop = box.scrollHeight;
}

function addItem(list, text, className) {
  const item = document.createElement("li");
  if (className) item.className = className;
  item.textContent = text;
  list.appendChild(item);
  while (list.childElementCount > LIST_ITEMS) list.firstElementChild.remove();
  list.scrollTop = list.scrollHeight;
  return item;
}

// -- one live session ---------------------------------------------------------------------

class LiveSession {
  constructor() {
    this.ws = null;
    this.stream = null;
    this.ctx = null;
    this.capture = null;
    this.player = null;
    this.video = null;
    this.live = false; // session.started arrived and we have not stopped
    this.ended = false;
    this.pingTimer = null;
    this.stopTimer = null;
    this.calls = new Map(); // call number -> its list item
    this.toolsSinceTick = 0;
    this.tickMs = []; // recent tick latencies, for the p50/max display
    this.rttMs = null;
  }

  async start() {
    setStatus("asking for the microphone and camera...", "busy");
    this.stream = await getMedia();
    if (this.ended) return this.stopMedia(); // Stop was pressed while the browser asked
    const { ctx, source } = openAudio(this.stream);
    this.ctx = ctx;
    stats.contextRate = ctx.sampleRate;
    if (ctx.state !== "running") {
      // Without a user gesture (?autostart=1) the browser may hold audio until the page is clicked.
      ctx.resume().catch(() => {});
      document.addEventListener("click", () => ctx.state === "suspended" && ctx.resume(), { once: true });
    }
    this.player = new Player(ctx);
    const encoder = new MicEncoder(ctx.sampleRate, (frame) => this.sendAudio(frame));
    this.capture = await startCapture(ctx, source, encoder);
    if (this.ended) return this.stopMedia();
    if (this.stream.getVideoTracks().length) {
      ui.camera.srcObject = this.stream;
      ui.camera.play().catch(() => {}); // muted autoplay; a refusal only blanks the preview
    }

    setStatus("connecting...", "busy");
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}${SESSION_PATH}${TOKEN_QUERY}`);
    ws.binaryType = "arraybuffer";
    ws.onmessage = (e) => this.onMessage(e.data);
    ws.onclose = (e) => this.onClose(e);
    this.ws = ws;
  }

  // Ends the session: the server answers session.end by closing with 1000.
  stop() {
    this.live = false;
    this.stopMedia();
    const ws = this.ws;
    if (ws && ws.readyState === WebSocket.OPEN) {
      setStatus("ending...", "busy");
      ws.send(JSON.stringify({ type: "session.end" }));
      this.stopTimer = setTimeout(() => ws.close(1000, "client stopped"), 3000); // the server did not answer
    } else if (ws && ws.readyState === WebSocket.CONNECTING) {
      ws.close(1000, "client stopped");
    } else {
      setStatus("stopped", "idle");
      this.finish();
    }
  }

  stopMedia() {
    if (this.video) this.video.stop();
    this.video = null;
    if (this.capture) {
      this.capture.disconnect();
      if (this.capture.port) this.capture.port.onmessage = null;
      else this.capture.onaudioprocess = null;
    }
    this.capture = null;
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    this.stream = null;
    ui.camera.srcObject = null;
    clearInterval(this.pingTimer);
    ui.sending.textContent = "not sending";
  }

  // The socket is gone (or never came): release everything, let the queued speech play out.
  finish() {
    if (this.ended) return;
    this.ended = true;
    this.live = false;
    this.stopMedia();
    clearTimeout(this.stopTimer);
    const ctx = this.ctx;
    if (ctx) setTimeout(() => ctx.close(), 1000 * (this.player ? this.player.queued() : 0) + 100);
    ui.text.disabled = ui.send.disabled = true;
    ui.stop.disabled = true;
    ui.start.disabled = false;
    session = null;
  }

  canSend() {
    return this.live && this.ws.readyState === WebSocket.OPEN && this.ws.bufferedAmount < MAX_SEND_BUFFER;
  }

  sendAudio(frame) {
    if (!this.live || this.ws.readyState !== WebSocket.OPEN) return;
    this.ws.send(frame);
    stats.audioSent++;
    stats.samplesSent += SEND_SAMPLES;
  }

  sendText(text) {
    if (!this.live) return;
    this.ws.send(JSON.stringify({ type: "text", text }));
    addLine("user", "you: " + text);
  }

  onMessage(data) {
    if (typeof data !== "string") {
      const kind = new Uint8Array(data, 0, 1)[0];
      if (kind === KIND_AUDIO) {
        stats.audioFrames++;
        this.player.play(new DataView(data, 1));
      }
      return;
    }
    const event = JSON.parse(data);
    switch (event.type) {
      case "session.started":
        this.onStarted(event);
        break;
      case "tick":
        this.onTick(event);
        break;
      case "tool_call":
      case "tool_result":
        this.onTool(event);
        break;
      case "error":
        stats.errors++;
        addItem(ui.errors, `${event.code}: ${event.message}${event.fatal ? " (fatal)" : ""}`, "error");
        break;
      case "pong":
        if (typeof event.id === "number") this.rttMs = performance.now() - event.id;
        break;
    }
  }

  onStarted(event) {
    stats.session = event.session;
    this.live = true;
    if (event.protocol !== PROTOCOL_VERSION) {
      const versions = `the server speaks protocol ${event.protocol}, this page ${PROTOCOL_VERSION}`;
      addItem(ui.errors, `${versions}: reload the page`, "error");
    }
    // Say what we send (the server refuses anything but 16 kHz PCM16 with an error event), and the sampling asked for.
    const update = { type: "session.update", audio: { sample_rate: SAMPLE_RATE, encoding: ENCODING } };
    const sampling = samplingFromQuery();
    if (Object.keys(sampling).length) update.sampling = sampling;
    this.ws.send(JSON.stringify(update));
    if (this.stream.getVideoTracks().length) {
      this.video = new VideoSender(ui.camera, ui.frame, (blob) => this.ws.send(blob), () => this.canSend());
    }
    this.pingTimer = setInterval(() => {
      if (this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({ type: "ping", id: performance.now() }));
    }, PING_EVERY_MS);
    const resampled = this.ctx.sampleRate === SAMPLE_RATE ? "" : `, resampled from ${this.ctx.sampleRate} Hz`;
    const camera = this.video ? ` + camera ${VIDEO_WIDTH}x${VIDEO_HEIGHT} JPEG at ${VIDEO_FPS} fps` : " (no camera)";
    ui.sending.textContent = `sending microphone 16 kHz PCM16${resampled} (${stats.capture})${camera}`;
    ui.text.disabled = ui.send.disabled = false;
    setStatus(`live: session ${event.session}`, "live");
  }

  onTick(event) {
    stats.ticks++;
    if (typeof event.text === "string") {
      stats.textTicks++;
      stats.textChars += event.text.length;
      if (event.text) appendModelText(event.text);
    }
    if (event.user_audio_ms > 0) stats.userAudioTicks++;
    if (event.user_speaking) stats.userSpeakingTicks++;
    if (event.speaking) stats.modelSpeakingTicks++;
    const tickMs = event.timing ? event.timing.tick_ms : null;
    ui.timeline.push({
      turn: event.turn,
      user: !!event.user_speaking,
      heardMs: event.user_audio_ms || 0,
      model: !!event.speaking,
      text: !!event.text,
      tools: this.toolsSinceTick,
      tickMs,
    });
    this.toolsSinceTick = 0;
    if (event.timing) this.showTiming(event.timing);
  }

  showTiming(timing) {
    this.tickMs.push(timing.tick_ms);
    if (this.tickMs.length > 50) this.tickMs.shift();
    const sorted = [...this.tickMs].sort((a, b) => a - b);
    const p50 = sorted[sorted.length >> 1];
    const max = sorted[sorted.length - 1];
    const rtt = this.rttMs == null ? "" : ` · ping ${this.rttMs.toFixed(0)} ms`;
    ui.timing.textContent =
      `tick ${timing.tick_ms.toFixed(1)} ms (step ${timing.step_ms.toFixed(1)}, late ${timing.late_ms.toFixed(1)})` +
      ` · last ${sorted.length}: p50 ${p50.toFixed(0)} / max ${max.toFixed(0)} ms${rtt}`;
  }

  onTool(event) {
    stats.toolEvents++;
    this.toolsSinceTick++;
    if (event.type === "tool_call") {
      const item = addItem(ui.tools, `#${event.call} ${event.kind} (turn ${event.turn}): ${event.request}`);
      item.appendChild(document.createElement("span")).className = "result";
      this.calls.set(event.call, item);
      return;
    }
    let item = this.calls.get(event.call);
    if (!item) {
      item = addItem(ui.tools, `#${event.call} ${event.kind}`);
      item.appendChild(document.createElement("span")).className = "result";
      this.calls.set(event.call, item);
    }
    const result = item.querySelector(".result");
    if (!result.textContent) result.textContent = " \u2192 ";
    result.textContent += event.text;
    if (event.done) {
      item.classList.add(event.error ? "failed" : "done");
      if (event.error) result.textContent += ` (error: ${event.error})`;
      this.calls.delete(event.call);
    }
  }

  async onClose(event) {
    stats.closed = true;
    stats.closeCode = event.code;
    stats.closeReason = event.reason;
    let text = `closed: ${event.code}${event.reason ? " " + event.reason : ""}`;
    if (stats.session === null && event.code === 1006) {
      // The browser hides why a handshake failed; a plain GET of the same URL shows the server's answer.
      text += ": the connection was refused" + (await refusal());
    }
    ui.closed.textContent = text;
    setStatus(text, event.code === 1000 ? "idle" : "failed");
    this.finish();
  }
}

async function getMedia() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("this page needs a secure context for the microphone: open it on localhost or over https");
  }
  const audio = { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true };
  const video = { width: { ideal: 320 }, height: { ideal: 240 }, frameRate: { ideal: 15 } };
  try {
    return await navigator.mediaDevices.getUserMedia({ audio, video });
  } catch (e) {
    // No camera (or it was refused): go on with the microphone alone.
    addItem(ui.errors, `camera: ${e.name}: ${e.message}; microphone only`, "error");
    return await navigator.mediaDevices.getUserMedia({ audio });
  }
}

// {temperature, top_p, seed} from the page's query, as numbers (the server checks their ranges).
function samplingFromQuery() {
  const sampling = {};
  for (const name of ["temperature", "top_p", "seed"]) {
    const value = QUERY.get(name);
    if (value !== null && value !== "" && Number.isFinite(Number(value))) sampling[name] = Number(value);
  }
  return sampling;
}

// Why the server refused the WebSocket: " (401: missing or wrong token)", " (503: server full: ...)", ...
// A plain GET carries no Origin header, so when it passes, the Origin check is what refused the upgrade.
async function refusal() {
  try {
    const response = await fetch(SESSION_PATH + TOKEN_QUERY, { cache: "no-store" });
    if (response.status === 401 || response.status === 503) {
      return ` (${response.status}: ${(await response.text()).trim().slice(0, 200)})`;
    }
    return ` (token and slots are fine: start the server with --allowed-origin ${location.origin}?)`;
  } catch {
    return " (the server is unreachable)";
  }
}

// -- wiring --------------------------------------------------------------------------------

let session = null;

async function start() {
  if (session) return;
  ui.start.disabled = true;
  ui.stop.disabled = false;
  ui.closed.textContent = "";
  session = new LiveSession();
  try {
    await session.start();
  } catch (e) {
    stats.errors++;
    addItem(ui.errors, `start: ${e.name || "Error"}: ${e.message}`, "error");
    setStatus("could not start", "failed");
    if (session) session.finish();
  }
}

function init() {
  for (const id of ["start", "stop", "status", "timing", "camera", "frame", "sending", "transcript", "say", "text"]) {
    ui[id] = $(id);
  }
  Object.assign(ui, { send: $("send"), tools: $("tools"), errors: $("errors"), closed: $("closed") });
  ui.timeline = new Timeline($("timeline"));
  ui.start.addEventListener("click", start);
  ui.stop.addEventListener("click", () => session && session.stop());
  ui.say.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = ui.text.value;
    if (text && session) {
      session.sendText(text);
      ui.text.value = "";
    }
  });
  if (!TOKEN) addItem(ui.errors, "no ?token= in the page URL: the server will refuse the session", "error");
  if (QUERY.get("autostart") === "1") start();
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
