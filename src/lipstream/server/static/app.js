// lipstream web page: choose an avatar, connect over WebRTC (WebSocket as fallback), speak into the
// microphone or send an audio file, and watch the avatar speak. Wire format: README, "WebSocket".
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
if (params.get("key")) localStorage.setItem("lipstream-key", params.get("key"));
let apiKey = localStorage.getItem("lipstream-key") || "";

// What the page measured; tests read it.
const state = window.lipstream = {
  transport: null, connected: false, speaking: false, framesShown: 0, fps: 0,
  latenciesMs: [], events: [], errors: [],
};

let session = null;        // the server's session (POST /api/sessions reply)
let pc = null;             // RTCPeerConnection
let ws = null;             // WebSocket
let sendAudio = null;      // (ArrayBuffer) => void, PCM16 16 kHz mono
let sendControl = null;    // (object) => void
let utteranceSentAt = null;  // performance.now() when the current utterance's first audio went out

function log(text) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("events").prepend(li);
}

function setStatus(text) { $("status").textContent = text; }

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${apiKey}`, ...(options.headers || {}) };
  const reply = await fetch(path, { ...options, headers });
  const body = reply.headers.get("content-type")?.includes("json") ? await reply.json() : {};
  if (!reply.ok) {
    if (reply.status === 401 || reply.status === 403) $("keybox").hidden = false;
    throw new Error(`${reply.status}: ${body.detail || reply.statusText}`);
  }
  return body;
}

// ---- server messages (WebSocket text or WebRTC data channel): events and errors ----

function onServerText(text) {
  let message;
  try { message = JSON.parse(text); } catch { return; }
  if (message.type === "error") {
    state.errors.push(message);
    log(`error: ${message.message}`);
    return;
  }
  if (!["speech_started", "speech_ended", "interrupted"].includes(message.type)) return;
  state.events.push(message);
  log(`${message.type} (frame ${message.index})`);
  if (message.type === "speech_started") {
    state.speaking = true;
    if (utteranceSentAt !== null) {
      const ms = performance.now() - utteranceSentAt;
      state.latenciesMs.push(ms);
      utteranceSentAt = null;
      const sorted = [...state.latenciesMs].sort((a, b) => a - b);
      $("stat-latency").textContent = `${ms.toFixed(0)} ms (median ${sorted[sorted.length >> 1].toFixed(0)} ms)`;
    }
  } else {
    state.speaking = false;
  }
  $("stat-state").textContent = state.speaking ? "speaking" : "idle";
}

// ---- frames shown and fps ----

let fpsWindow = [];
function frameShown() {
  state.framesShown += 1;
  const now = performance.now();
  fpsWindow.push(now);
  while (fpsWindow.length && now - fpsWindow[0] > 1000) fpsWindow.shift();
  state.fps = fpsWindow.length;
  $("stat-frames").textContent = state.framesShown;
  $("stat-fps").textContent = state.fps;
}

// ---- WebRTC ----

async function connectWebRTC() {
  const config = await api("/api/config");
  pc = new RTCPeerConnection({ iceServers: config.ice_servers.map((urls) => ({ urls })) });
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  const channel = pc.createDataChannel("control");
  channel.binaryType = "arraybuffer";
  channel.onmessage = (e) => { if (typeof e.data === "string") onServerText(e.data); };
  const media = new MediaStream();
  const video = $("video");
  pc.ontrack = (e) => {
    media.addTrack(e.track);
    video.srcObject = media;
  };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {  // the whole offer at once: wait for ICE gathering (at most 3 s)
    if (pc.iceGatheringState === "complete") return resolve();
    pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && resolve());
    setTimeout(resolve, 3000);
  });
  const answer = await api(`/api/sessions/${session.id}/offer`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }),
  });
  await pc.setRemoteDescription(answer);
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("no WebRTC connection within 10 s")), 10000);
    const check = () => {
      if (pc.connectionState === "connected" && channel.readyState === "open") { clearTimeout(timer); resolve(); }
      if (pc.connectionState === "failed") { clearTimeout(timer); reject(new Error("WebRTC connection failed")); }
    };
    pc.addEventListener("connectionstatechange", check);
    channel.addEventListener("open", check);
    check();
  });
  pc.addEventListener("connectionstatechange", () => {
    if (["failed", "closed"].includes(pc?.connectionState)) disconnect(`WebRTC ${pc.connectionState}`);
  });
  video.hidden = false;
  video.play().catch(() => { video.muted = true; video.play(); log("autoplay blocked: muted; click the video for sound"); });
  video.onclick = () => { video.muted = false; };
  const countFrame = () => { frameShown(); video.requestVideoFrameCallback(countFrame); };
  video.requestVideoFrameCallback(countFrame);
  sendAudio = (buffer) => channel.readyState === "open" && channel.send(buffer);
  sendControl = (message) => channel.readyState === "open" && channel.send(JSON.stringify(message));
}

// ---- WebSocket: binary frames (header + PCM16 audio + JPEG) played on the audio clock ----

let player = null;

function makePlayer() {
  const context = new AudioContext();
  const canvas = $("canvas");
  const ctx2d = canvas.getContext("2d");
  const queue = [];  // {at, bitmap} in the player's clock, oldest first
  let offset = null;  // player time of pts 0
  const now = () => (context.state === "running" ? context.currentTime : performance.now() / 1000);
  let running = true;
  const draw = () => {
    if (!running) return;
    const t = now();
    let shown = null;
    while (queue.length && queue[0].at <= t) {
      if (shown) shown.bitmap.close();
      shown = queue.shift();
    }
    if (shown) {
      if (canvas.width !== shown.bitmap.width) { canvas.width = shown.bitmap.width; canvas.height = shown.bitmap.height; }
      ctx2d.drawImage(shown.bitmap, 0, 0);
      shown.bitmap.close();
      frameShown();
    }
    requestAnimationFrame(draw);
  };
  requestAnimationFrame(draw);
  return {
    context,
    async frame(buffer) {
      const view = new DataView(buffer);
      if (buffer.byteLength < 28 || view.getUint32(0, true) !== 0x3146534c) return;  // "LSF1"
      const pts = view.getFloat64(8, true);
      const samples = view.getUint32(20, true);
      const jpegBytes = view.getUint32(24, true);
      const pcm = new Int16Array(buffer, 28, samples);
      const bitmap = await createImageBitmap(new Blob([new Uint8Array(buffer, 28 + 2 * samples, jpegBytes)],
        { type: "image/jpeg" }));
      const t = now();
      if (offset === null || offset + pts < t) offset = t + 0.12 - pts;  // start, or late: re-anchor
      const at = offset + pts;
      queue.push({ at, bitmap });
      if (context.state === "running" && samples > 0) {
        const audio = context.createBuffer(1, samples, 16000);
        const channel = audio.getChannelData(0);
        for (let i = 0; i < samples; i++) channel[i] = pcm[i] / 32768;
        const source = context.createBufferSource();
        source.buffer = audio;
        source.connect(context.destination);
        source.start(at);
      }
    },
    stop() { running = false; queue.forEach((f) => f.bitmap.close()); context.close(); },
  };
}

async function connectWebSocket() {
  player = makePlayer();
  player.context.resume().catch(() => {});
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(`${scheme}://${location.host}/api/sessions/${session.id}/ws?key=${encodeURIComponent(apiKey)}`);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (e) => (typeof e.data === "string" ? onServerText(e.data) : player.frame(e.data));
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error("WebSocket failed"));
  });
  ws.onclose = (e) => disconnect(`WebSocket closed (${e.code} ${e.reason})`);
  $("canvas").hidden = false;
  sendAudio = (buffer) => ws.readyState === WebSocket.OPEN && ws.send(buffer);
  sendControl = (message) => ws.readyState === WebSocket.OPEN && ws.send(JSON.stringify(message));
}

// ---- connect / disconnect ----

async function newSession() {
  session = await api("/api/sessions", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ avatar: $("avatar").value }),
  });
}

async function connect() {
  $("connect").disabled = true;
  try {
    await newSession();
    const wanted = $("transport").value;
    if (wanted !== "websocket" && window.RTCPeerConnection) {
      try {
        await connectWebRTC();
        state.transport = "webrtc";
      } catch (error) {
        if (wanted === "webrtc") throw error;
        log(`WebRTC did not connect (${error.message}); using the WebSocket`);
        closeTransports();
        await api(`/api/sessions/${session.id}`, { method: "DELETE" }).catch(() => {});
        await newSession();
      }
    }
    if (!state.transport) {
      await connectWebSocket();
      state.transport = "websocket";
    }
    state.connected = true;
    $("stat-transport").textContent = state.transport;
    $("stat-state").textContent = "idle";
    setStatus(`connected: session ${session.id}, ${session.width}x${session.height} at ${session.fps} fps`);
    for (const id of ["disconnect", "mic", "send-file", "interrupt"]) $(id).disabled = false;
  } catch (error) {
    log(`could not connect: ${error.message}`);
    setStatus("not connected");
    closeTransports();
    $("connect").disabled = false;
  }
}

function closeTransports() {
  if (pc) { const old = pc; pc = null; old.close(); }
  if (ws) { const old = ws; ws = null; old.onclose = null; old.close(); }
  if (player) { player.stop(); player = null; }
  $("video").hidden = true;
  $("canvas").hidden = true;
  state.transport = null;
}

function disconnect(reason) {
  if (!state.connected) return;
  state.connected = false;
  stopMic();
  closeTransports();
  if (session) api(`/api/sessions/${session.id}`, { method: "DELETE" }).catch(() => {});
  session = null;
  log(reason || "disconnected");
  setStatus("not connected");
  $("connect").disabled = false;
  for (const id of ["disconnect", "mic", "send-file", "interrupt"]) $(id).disabled = true;
  $("stat-transport").textContent = "-";
}

// ---- microphone: 20 ms PCM16 chunks, sent while the level says someone speaks ----

let mic = null;
const LEVEL_ON = 0.02;     // RMS that starts an utterance (about -34 dBFS)
const HANGOVER_MS = 600;   // silence that ends it
const PREROLL_CHUNKS = 10; // 200 ms sent ahead of the chunk that crossed the level

async function startMic() {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  const context = new AudioContext();
  await context.audioWorklet.addModule("/static/mic-worklet.js");
  const node = new AudioWorkletNode(context, "pcm16-capture");
  const silent = context.createGain();
  silent.gain.value = 0;
  context.createMediaStreamSource(stream).connect(node).connect(silent).connect(context.destination);
  const preroll = [];
  let talking = false;
  let quietSince = 0;
  node.port.onmessage = ({ data }) => {
    const t = performance.now();
    if (data.rms >= LEVEL_ON) quietSince = t;
    if (!talking && data.rms >= LEVEL_ON) {
      talking = true;
      utteranceSentAt = t;
      preroll.splice(0).forEach((chunk) => sendAudio(chunk));
      $("stat-mic").textContent = "on: speech";
    }
    if (talking) {
      sendAudio(data.pcm);
      if (t - quietSince > HANGOVER_MS) {
        talking = false;
        sendControl({ type: "end" });
        $("stat-mic").textContent = "on: listening";
      }
    } else {
      preroll.push(data.pcm);
      if (preroll.length > PREROLL_CHUNKS) preroll.shift();
    }
  };
  mic = { stream, context };
  $("mic").textContent = "Stop microphone";
  $("stat-mic").textContent = "on: listening";
}

function stopMic() {
  if (!mic) return;
  mic.stream.getTracks().forEach((track) => track.stop());
  mic.context.close();
  mic = null;
  $("mic").textContent = "Start microphone";
  $("stat-mic").textContent = "off";
}

async function sendFile() {
  const file = $("file").files[0];
  if (!file) { log("choose an audio file first"); return; }
  const form = new FormData();
  form.append("file", file);
  utteranceSentAt = performance.now();
  try {
    const reply = await api(`/api/sessions/${session.id}/audio?end=true`, { method: "POST", body: form });
    log(`sent ${file.name}: ${reply.seconds.toFixed(1)} s of audio`);
  } catch (error) {
    utteranceSentAt = null;
    log(`could not send ${file.name}: ${error.message}`);
  }
}

// ---- avatars and buttons ----

async function loadAvatars() {
  const select = $("avatar");
  const { avatars } = await api("/api/avatars");
  select.replaceChildren(...avatars.map((a) => new Option(`${a.name} (${a.width}x${a.height})`, a.name)));
  if (!avatars.length) log("no avatars yet: prepare one (`lipstream avatars prepare` or POST /api/avatars)");
}

$("connect").onclick = connect;
$("disconnect").onclick = () => disconnect("disconnected");
$("mic").onclick = () => (mic ? stopMic() : startMic().catch((e) => log(`microphone: ${e.message}`)));
$("send-file").onclick = sendFile;
$("interrupt").onclick = () => { utteranceSentAt = null; sendControl({ type: "interrupt" }); };
$("save-key").onclick = () => {
  apiKey = $("key").value.trim();
  localStorage.setItem("lipstream-key", apiKey);
  $("keybox").hidden = true;
  loadAvatars().catch((e) => log(e.message));
};
if (params.get("transport")) $("transport").value = params.get("transport");
if (!apiKey) $("keybox").hidden = false;
else loadAvatars().catch((e) => log(e.message));
window.addEventListener("pagehide", () => disconnect("page closed"));
