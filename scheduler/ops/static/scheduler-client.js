// scheduler-client.js: a browser client for the speech scheduler's /v1/session (protocol v1).
//
// Copy this file into your app (no build step, no dependency). Usage:
//
//   import { SchedulerClient } from "./scheduler-client.js";
//   const client = new SchedulerClient({ urls: ["wss://asr.example.com:8765"], srcLang: "en",
//                                         tgtLangs: ["de"], apiKey: "optional" });
//   client.addEventListener("result", (e) => console.log(e.detail.result, e.detail.latencyMs));
//   await client.start();               // resolves on session_ready
//   client.sendAudio(int16Frame);       // 16 kHz mono s16le, e.g. 100 ms = 1600 samples
//   client.finish();                    // finalize + close_session; "closed" follows the last result
//
// Events (CustomEvent, payload in .detail): "ready" {sessionId, resumed}, "utterance"
// {utterance}, "result" {result, latencyMs}, "busy" {busy}, "error" {error} (an error
// message of the daemon), "reconnecting" {attempt, url, delayMs}, "closed" {reason, utterances}
// or {reason: "failed", error} when no daemon could be reached again.
//
// Resume: when the connection breaks, or the daemon closes the session with reason
// "shutdown" (it is draining), the client connects again to the next URL (round robin,
// backoff from 250 ms doubling to 5 s, `maxReconnects` times) with session_id and
// resume_from, and sends again the audio it sent since the last utterance_finalized (at most
// `keepMs` of it), then what was captured meanwhile. Results already received are not
// delivered twice. The API key travels as the `bearer.<base64url>` subprotocol next to
// `scheduler.v1` (browsers cannot set an Authorization header).

export const SUBPROTOCOL = "scheduler.v1";

export function bearerSubprotocol(key) {
  const bytes = new TextEncoder().encode(key);
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return "bearer." + btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

const TRY_AGAIN_CODES = ["SERVER_FULL", "UNAVAILABLE", "SHUTTING_DOWN"]; // (SHUTTING_DOWN: another instance next)

export class SchedulerClient extends EventTarget {
  constructor({ urls, srcLang, tgtLangs, apiKey = null, sampleRate = 16000, maxReconnects = 8, keepMs = 30000 }) {
    super();
    this.urls = (Array.isArray(urls) ? urls : [urls]).map((u) => u.replace(/\/+$/, "").replace(/\/v1\/session$/, ""));
    this.srcLang = srcLang;
    this.tgtLangs = tgtLangs;
    this.apiKey = apiKey;
    this.sampleRate = sampleRate;
    this.maxReconnects = maxReconnects;
    this.keepBytes = Math.round((keepMs / 1000) * sampleRate * 2);
    this.sessionId = null;
    this._resumeToken = null; // from session_ready; without it nobody (this client included) resumes the session
    this.nextResult = 0; // results arrive in index order: the first one not received yet
    this.state = "idle"; // idle, connecting, ready, finishing, closed
    this._ws = null;
    this._urlIndex = 0;
    this._attempt = 0;
    this._unacked = []; // frames sent (or queued) since the last utterance_finalized
    this._unackedBytes = 0;
    this._finalizedAt = new Map(); // utterance index -> performance.now() of utterance_finalized
    this._finishing = false;
    this._ready = null;
    this._retryAfterMs = null; // from a SERVER_FULL / UNAVAILABLE refusal: when to try again
  }

  /** Connect and open the session; resolves with session_ready's detail, rejects on refusal. */
  start() {
    this._ready = {};
    const promise = new Promise((resolve, reject) => Object.assign(this._ready, { resolve, reject }));
    this._connect();
    return promise;
  }

  /** One frame of 16-bit PCM (Int16Array or ArrayBuffer). Kept for a resume until its utterance is finalized. */
  sendAudio(frame) {
    if (this.state === "closed" || this._finishing) return;
    const buffer = frame instanceof ArrayBuffer ? frame : frame.buffer.slice(frame.byteOffset, frame.byteOffset + frame.byteLength);
    this._keep(buffer); // sent now, or on session_ready if not connected
    if (this.state === "ready") this._ws.send(buffer);
  }

  /** Cut the open utterance now (finalize). */
  finalize() {
    if (this.state === "ready") this._send({ type: "finalize" });
  }

  /** No more audio: finalize and close_session; "closed" comes after the last result. */
  finish() {
    this._finishing = true;
    if (this.state === "ready") {
      this._send({ type: "finalize" });
      this._send({ type: "close_session" });
      this.state = "finishing";
    }
  }

  /** Drop the connection at once (no resume). */
  abort() {
    this.state = "closed";
    if (this._ws) this._ws.close(1000);
  }

  // ------------------------------------------------------------------ internals

  _emit(name, detail) {
    this.dispatchEvent(new CustomEvent(name, { detail }));
  }

  _send(message) {
    this._ws.send(JSON.stringify(message));
  }

  _keep(buffer) {
    this._unacked.push(buffer);
    this._unackedBytes += buffer.byteLength;
    while (this._unackedBytes > this.keepBytes && this._unacked.length > 1) {
      this._unackedBytes -= this._unacked.shift().byteLength;
    }
  }

  _connect() {
    const url = this.urls[this._urlIndex % this.urls.length] + "/v1/session";
    const protocols = [SUBPROTOCOL];
    if (this.apiKey) protocols.push(bearerSubprotocol(this.apiKey));
    this.state = "connecting";
    let ws;
    try {
      ws = new WebSocket(url, protocols);
    } catch (error) {
      this._lost(error);
      return;
    }
    this._ws = ws;
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      const init = { type: "session_init", src_lang: this.srcLang, tgt_langs: this.tgtLangs, sample_rate: this.sampleRate };
      if (this.sessionId) {
        Object.assign(init, { session_id: this.sessionId, resume_token: this._resumeToken, resume_from: this.nextResult });
      }
      this._send(init);
    };
    ws.onmessage = (event) => {
      if (typeof event.data === "string") this._onMessage(JSON.parse(event.data));
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._ws = null;
      if (this.state !== "closed") this._lost(new Error(`connection closed (${event.code})`));
    };
  }

  _onMessage(msg) {
    switch (msg.type) {
      case "session_ready": {
        const resumed = this.sessionId !== null;
        this.sessionId = msg.session_id;
        if (msg.resume_token) this._resumeToken = msg.resume_token; // the session's secret: sent on every resume
        this.state = "ready";
        this._attempt = 0;
        // what the daemon may not have: the audio since the last utterance_finalized,
        // including what was captured while disconnected
        for (const frame of this._unacked) this._ws.send(frame);
        if (this._finishing) this.finish();
        if (this._ready) {
          this._ready.resolve({ sessionId: msg.session_id, resumed: msg.resumed, limits: msg.limits });
          this._ready = null;
        }
        this._emit("ready", { sessionId: msg.session_id, resumed: resumed || msg.resumed });
        break;
      }
      case "utterance_finalized":
        this._finalizedAt.set(msg.utterance_index, performance.now());
        this._unacked = [];
        this._unackedBytes = 0;
        this._emit("utterance", { utterance: msg });
        break;
      case "result": {
        if (msg.utterance_index < this.nextResult) break; // re-sent after a resume: had it
        this.nextResult = msg.utterance_index + 1;
        const at = this._finalizedAt.get(msg.utterance_index);
        this._finalizedAt.delete(msg.utterance_index);
        this._emit("result", { result: msg, latencyMs: at === undefined ? null : Math.round(performance.now() - at) });
        break;
      }
      case "busy":
        this._emit("busy", { busy: msg });
        break;
      case "error":
        this._emit("error", { error: msg });
        if (msg.fatal && TRY_AGAIN_CODES.includes(msg.code) && Number.isInteger(msg.retry_after_ms)) {
          // full, no Redis now, or stopping: the close that follows brings _lost, which waits this long
          this._retryAfterMs = msg.retry_after_ms;
          break;
        }
        if (msg.fatal && this._ready) {
          this._ready.reject(new Error(`${msg.code}: ${msg.message}`));
          this._ready = null;
          this.state = "closed";
        }
        break;
      case "session_closed":
        if (msg.reason === "shutdown") {
          this._lost(new Error("the daemon is shutting down"));
        } else {
          this.state = "closed";
          this._emit("closed", { reason: msg.reason, utterances: msg.utterances });
          this._ws.close(1000);
        }
        break;
    }
  }

  _lost(error) {
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.close(1000);
    if (this.state === "closed") return;
    if (this._attempt >= this.maxReconnects || (this.sessionId === null && this._ready === null)) {
      this.state = "closed";
      this._emit("closed", { reason: "failed", error: String(error) });
      if (this._ready) this._ready.reject(error);
      return;
    }
    // the daemon said when to try again (SERVER_FULL, UNAVAILABLE): that long, with jitter so that
    // refused clients do not all come back at once; else a backoff doubling from 250 ms
    const retryAfterMs = this._retryAfterMs;
    this._retryAfterMs = null;
    const delayMs = retryAfterMs !== null ? Math.round(retryAfterMs * (0.8 + 0.4 * Math.random()))
      : Math.min(250 * 2 ** this._attempt, 5000);
    this._attempt += 1;
    this._urlIndex += 1;
    this.state = "connecting";
    this._emit("reconnecting", { attempt: this._attempt, url: this.urls[this._urlIndex % this.urls.length], delayMs });
    setTimeout(() => this._connect(), delayMs);
  }
}

/**
 * Capture the microphone as 16 kHz s16le frames of `frameMs` (default 100 ms) through an
 * AudioWorklet, and hand each one to `onFrame(Int16Array)`. Returns { context, stop }.
 * `workletUrl` is where capture-worklet.js is served (next to this module by default).
 */
export async function captureMicrophone(onFrame, { frameMs = 100, workletUrl = new URL("./capture-worklet.js", import.meta.url),
                                                  processing = false } = {}) {
  // the browser's echo cancellation, noise suppression and gain control are off by default:
  // recognisers do better on the plain signal (turn them on for a speakerphone)
  const audio = { channelCount: 1, echoCancellation: processing, noiseSuppression: processing, autoGainControl: processing };
  const stream = await navigator.mediaDevices.getUserMedia({ audio });
  const context = new AudioContext();
  await context.audioWorklet.addModule(workletUrl);
  const source = context.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(context, "scheduler-capture", { processorOptions: { targetRate: 16000, frameMs } });
  node.port.onmessage = (event) => onFrame(new Int16Array(event.data));
  // the graph is pulled from its destination: route the worklet there through a muted gain
  const mute = new GainNode(context, { gain: 0 });
  source.connect(node).connect(mute).connect(context.destination);
  if (context.state === "suspended") await context.resume();
  return {
    context,
    stop() {
      source.disconnect();
      mute.disconnect();
      node.port.onmessage = null;
      stream.getTracks().forEach((track) => track.stop());
      return context.close();
    },
  };
}
