// lipstream web page, in three steps: choose (or make) an avatar, connect over WebRTC (WebSocket as
// fallback), then talk into the microphone or play an audio file and watch the avatar speak. While
// connected, choosing another avatar shows it at once. Wire format: README, "WebSocket".
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
if (params.get("key")) localStorage.setItem("lipstream-key", params.get("key"));
let apiKey = localStorage.getItem("lipstream-key") || "";

// What the page shows and measured (tests read it too).
const state = window.lipstream = {
  transport: null, connected: false, speaking: false, avatar: null, framesShown: 0, fps: 0,
  latenciesMs: [], events: [], errors: [],
};

let session = null;        // the server's session (POST /api/sessions reply)
let pc = null;             // RTCPeerConnection
let ws = null;             // WebSocket
let player = null;         // the WebSocket's frame and sound player
let mic = null;            // {stream, context, talking}
let sendAudio = null;      // (ArrayBuffer) => void, PCM16 16 kHz mono
let sendControl = null;    // (object) => void
let utteranceSentAt = null;  // performance.now() when the current utterance's first audio went out

const STAGES = {
  frames: "reading the video", faces: "finding the face", latents: "preparing the face for the neural engine",
  saving: "saving",
};

// ---- what the user reads: the status line, errors, the log, the figures ----

function setStatus(text) { $("status").textContent = text; }

function log(text) {
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("events").prepend(item);
}

function showError(text) {
  state.errors.push(text);
  $("error-text").textContent = text;
  $("error").hidden = false;
  log(text);
}

function clearError() { $("error").hidden = true; }

function liveStatus() {
  if (!state.connected) return;
  if (state.speaking) setStatus("The avatar is speaking.");
  else if (mic) setStatus(mic.talking ? "Listening to you…" : "Listening: speak into the microphone.");
  else setStatus("Connected. Start the microphone, or play an audio file.");
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = sorted.length >> 1;
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

function showLatency() {
  const values = state.latenciesMs;
  $("stat-latency").textContent = values.length
    ? `${Math.round(values[values.length - 1])} ms (median ${Math.round(median(values))} ms of ${values.length})`
    : "not measured yet";
}

function showAvatar(name, width, height) {
  state.avatar = name;
  $("stat-avatar").textContent = `${name} (${width}×${height})`;
}

function resetFigures() {
  state.latenciesMs = [];
  state.events = [];
  state.speaking = false;
  state.fps = 0;
  fpsWindow = [];
  showLatency();
  $("stat-fps").textContent = "no picture";
  $("stat-transport").textContent = "none";
  $("stat-avatar").textContent = "nothing";
  $("stat-mic").textContent = "off";
}

// ---- the REST API ----

function replyError(status, detail, retryAfter) {
  if (status === 401 || status === 403) $("keybox").hidden = false;
  let text = detail;
  if (status === 503) {
    text = `the server cannot take this now: ${detail.trim().replace(/[^.!?]$/, "$&.")}` +
           (retryAfter ? ` Try again in ${retryAfter} s.` : "");
  } else if (status === 429) {
    text = `too many at once: ${detail}`;
  }
  const error = new Error(text);
  error.status = status;
  return error;
}

async function replyBody(reply) {  // the server's JSON, or {} for anything else
  return reply.headers.get("content-type")?.includes("json") ? reply.json() : {};
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${apiKey}`, ...(options.headers || {}) };
  const reply = await fetch(path, { ...options, headers });
  const body = await replyBody(reply);
  if (!reply.ok) throw replyError(reply.status, body.detail || reply.statusText, reply.headers.get("Retry-After"));
  return body;
}

function postJson(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

// ---- server messages (WebSocket text or WebRTC data channel): events and errors ----

function onServerText(text) {
  let message;
  try { message = JSON.parse(text); } catch { return; }
  if (message.type === "error") {
    showError(`The server could not use what the page sent: ${message.message}`);
    return;
  }
  if (!["speech_started", "speech_ended", "interrupted", "avatar_changed"].includes(message.type)) return;
  state.events.push(message);
  if (message.type === "speech_started") {
    state.speaking = true;
    if (utteranceSentAt !== null) {
      const ms = performance.now() - utteranceSentAt;
      state.latenciesMs.push(ms);
      utteranceSentAt = null;
      showLatency();
      log(`The avatar started speaking, ${Math.round(ms)} ms after your first sound.`);
    } else {
      log("The avatar started speaking.");
    }
  } else if (message.type === "speech_ended") {
    state.speaking = false;
    log("The avatar finished speaking.");
  } else if (message.type === "interrupted") {
    state.speaking = false;
    log("Stopped.");
  } else {
    player?.avatarChanged();
    showAvatar(message.avatar, message.width, message.height);
    $("avatar").value = message.avatar;
    log(`Now showing ${message.avatar}.`);
  }
  liveStatus();
}

// ---- frames shown and their rate ----

let fpsWindow = [];
function frameShown() {
  state.framesShown += 1;
  const now = performance.now();
  fpsWindow.push(now);
  while (fpsWindow.length && now - fpsWindow[0] > 1000) fpsWindow.shift();
  state.fps = fpsWindow.length;
  $("stat-fps").textContent = `${state.fps} frames a second`;
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
  const answer = await postJson(`/api/sessions/${session.id}/offer`,
                                { sdp: pc.localDescription.sdp, type: pc.localDescription.type });
  await pc.setRemoteDescription(answer);
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("no WebRTC connection within 10 s")), 10000);
    const check = () => {
      if (pc.connectionState === "connected" && channel.readyState === "open") { clearTimeout(timer); resolve(); }
      if (pc.connectionState === "failed") { clearTimeout(timer); reject(new Error("the WebRTC connection failed")); }
    };
    pc.addEventListener("connectionstatechange", check);
    channel.addEventListener("open", check);
    check();
  });
  const connection = pc;
  pc.addEventListener("connectionstatechange", () => {
    if (pc === connection && ["failed", "closed"].includes(pc.connectionState)) {
      serverClosed("The connection to the server was lost.");
    }
  });
  video.hidden = false;
  video.play().catch(() => {
    video.muted = true;
    video.play().catch(() => {});
    log("The browser started the video without sound: click the video to hear it.");
  });
  video.onclick = () => { video.muted = false; };
  const countFrame = () => {
    if (pc !== connection) return;
    frameShown();
    video.requestVideoFrameCallback(countFrame);
  };
  video.requestVideoFrameCallback(countFrame);
  sendAudio = (buffer) => channel.readyState === "open" && channel.send(buffer);
  sendControl = (message) => channel.readyState === "open" && channel.send(JSON.stringify(message));
}

// ---- WebSocket: patch frames (the avatar's images once, each frame's face patch) on the audio clock ----
// Format: lipstream/server/wire.py. "LSI1" image messages are kept (as JPEG blobs) until the avatar
// changes; an "LSP1" frame draws its image, then the part of its patch JPEG the message names.

function makePlayer() {
  const context = new AudioContext();
  const canvas = $("canvas");
  const ctx2d = canvas.getContext("2d");
  const queue = [];  // {at, image, patch, rect} in the player's clock, oldest first
  const images = new Map();  // image number -> JPEG blob
  let offset = null;  // player time of pts 0
  const now = () => (context.state === "running" ? context.currentTime : performance.now() / 1000);
  let running = true;
  const release = (f) => { f.image.close(); if (f.patch) f.patch.close(); };
  const draw = () => {
    if (!running) return;
    const t = now();
    let shown = null;
    while (queue.length && queue[0].at <= t) {
      if (shown) release(shown);
      shown = queue.shift();
    }
    if (shown) {
      if (canvas.width !== shown.image.width || canvas.height !== shown.image.height) {
        canvas.width = shown.image.width;
        canvas.height = shown.image.height;
      }
      ctx2d.drawImage(shown.image, 0, 0);
      if (shown.patch) {
        const [x, y, dx, dy, dw, dh] = shown.rect;
        ctx2d.drawImage(shown.patch, dx - x, dy - y, dw, dh, dx, dy, dw, dh);
      }
      release(shown);
      frameShown();
    }
    requestAnimationFrame(draw);
  };
  requestAnimationFrame(draw);
  const jpeg = (buffer, offset, length) => new Blob([new Uint8Array(buffer, offset, length)], { type: "image/jpeg" });
  return {
    context,
    avatarChanged() { images.clear(); },
    async frame(buffer) {
      const view = new DataView(buffer);
      if (buffer.byteLength < 12) return;
      const magic = view.getUint32(0, true);
      if (magic === 0x3149534c) {  // "LSI1": an image
        images.set(view.getUint32(4, true), jpeg(buffer, 12, view.getUint32(8, true)));
        return;
      }
      if (magic !== 0x3150534c || buffer.byteLength < 44) return;  // "LSP1": a frame
      const pts = view.getFloat64(8, true);
      const samples = view.getUint32(20, true);
      const blob = images.get(view.getUint32(24, true));
      if (!blob) return;
      const rect = [28, 30, 32, 34, 36, 38].map((at) => view.getUint16(at, true));
      const patchBytes = view.getUint32(40, true);
      const pcm = new Int16Array(buffer, 44, samples);
      const [image, patch] = await Promise.all([createImageBitmap(blob), rect[4] && patchBytes
        ? createImageBitmap(jpeg(buffer, 44 + 2 * samples, patchBytes)) : null]);
      if (!running) { image.close(); if (patch) patch.close(); return; }
      const t = now();
      if (offset === null || offset + pts < t) offset = t + 0.12 - pts;  // start, or late: re-anchor
      const at = offset + pts;
      queue.push({ at, image, patch, rect });
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
    stop() { running = false; queue.forEach(release); context.close(); },
  };
}

async function connectWebSocket() {
  player = makePlayer();
  player.context.resume().catch(() => {});
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(`${scheme}://${location.host}/api/sessions/${session.id}/ws?frames=patches&key=${encodeURIComponent(apiKey)}`);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (e) => (typeof e.data === "string" ? onServerText(e.data) : player?.frame(e.data));
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error("the WebSocket did not open"));
  });
  ws.onerror = null;
  ws.onclose = (e) => serverClosed(`The server closed the connection${e.reason ? `: ${e.reason}` : ""}.`);
  $("canvas").hidden = false;
  sendAudio = (buffer) => ws?.readyState === WebSocket.OPEN && ws.send(buffer);
  sendControl = (message) => ws?.readyState === WebSocket.OPEN && ws.send(JSON.stringify(message));
}

// ---- connect / disconnect ----

async function newSession() {
  session = await postJson("/api/sessions", { avatar: $("avatar").value });
}

async function closeSession() {
  // Only a session the server still has: one that lost its viewer is closed by the server itself.
  if (!session) return;
  const id = session.id;
  session = null;
  try {
    const { sessions } = await api("/api/sessions");
    if (sessions.some((s) => s.id === id)) await api(`/api/sessions/${id}`, { method: "DELETE" });
  } catch { /* the server closes it when its time without a viewer runs out */ }
}

function setConnected(connected) {
  $("connect").disabled = connected;
  for (const id of ["disconnect", "mic", "send-file", "interrupt"]) $(id).disabled = !connected;
  $("placeholder").hidden = connected;
}

async function connect() {
  clearError();
  if (!$("avatar").value) {
    showError("Choose an avatar first, or make one (step 1).");
    return;
  }
  $("connect").disabled = true;
  setStatus("Connecting…");
  resetFigures();
  try {
    await newSession();
    const wanted = $("transport").value;
    if (wanted !== "websocket" && window.RTCPeerConnection) {
      try {
        await connectWebRTC();
        state.transport = "webrtc";
      } catch (error) {
        if (wanted === "webrtc") throw error;
        log(`WebRTC did not connect (${error.message}); using the WebSocket instead.`);
        closeTransports();
        await closeSession();
        await newSession();
      }
    }
    if (!state.transport) {
      await connectWebSocket();
      state.transport = "websocket";
    }
    state.connected = true;
    $("stat-transport").textContent = state.transport === "webrtc" ? "WebRTC" : "WebSocket";
    showAvatar(session.avatar, session.width, session.height);
    setConnected(true);
    log(`Connected: showing ${session.avatar}.`);
    liveStatus();
  } catch (error) {
    closeTransports();
    await closeSession();
    setStatus("Not connected.");
    showError(`Could not connect: ${error.message}`);
    setConnected(false);
  }
}

function closeTransports() {
  if (pc) { const old = pc; pc = null; old.close(); }
  if (ws) { const old = ws; ws = null; old.onclose = null; old.onmessage = null; old.close(); }
  if (player) { player.stop(); player = null; }
  $("video").hidden = true;
  $("canvas").hidden = true;
  state.transport = null;
  sendAudio = sendControl = null;
}

async function disconnect() {
  if (!state.connected) return;
  state.connected = false;
  stopMic();
  await closeSession();  // first, so that the server does not see a viewer vanish
  closeTransports();
  ended("Disconnected. Press Connect to start again.");
}

function serverClosed(reason) {
  if (!state.connected) return;
  state.connected = false;
  session = null;  // the server closed it
  stopMic();
  closeTransports();
  ended(`${reason} Press Connect to start again.`);
}

function ended(text) {
  resetFigures();
  setConnected(false);
  setStatus(text);
  log(text);
}

// ---- microphone: 20 ms PCM16 chunks, sent while the level says someone speaks ----

const LEVEL_ON = 0.02;     // RMS that starts an utterance (about -34 dBFS)
const HANGOVER_MS = 600;   // silence that ends it
const PREROLL_CHUNKS = 10; // 200 ms sent ahead of the chunk that crossed the level

async function startMic() {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw Object.assign(new Error("no microphone access here"), { name: "NotSecureError" });
  }
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  if (!state.connected) { stream.getTracks().forEach((track) => track.stop()); return; }
  const context = new AudioContext();
  await context.audioWorklet.addModule("/static/mic-worklet.js");
  const node = new AudioWorkletNode(context, "pcm16-capture");
  const silent = context.createGain();
  silent.gain.value = 0;
  context.createMediaStreamSource(stream).connect(node).connect(silent).connect(context.destination);
  mic = { stream, context, talking: false };
  const current = mic;
  const preroll = [];
  let quietSince = 0;
  node.port.onmessage = ({ data }) => {
    if (mic !== current || !sendAudio) return;
    const t = performance.now();
    if (data.rms >= LEVEL_ON) quietSince = t;
    if (!current.talking && data.rms >= LEVEL_ON) {
      current.talking = true;
      utteranceSentAt = t;
      preroll.splice(0).forEach((chunk) => sendAudio(chunk));
      $("stat-mic").textContent = "on: hearing you";
      liveStatus();
    }
    if (current.talking) {
      sendAudio(data.pcm);
      if (t - quietSince > HANGOVER_MS) {
        current.talking = false;
        sendControl({ type: "end" });
        $("stat-mic").textContent = "on: listening";
        liveStatus();
      }
    } else {
      preroll.push(data.pcm);
      if (preroll.length > PREROLL_CHUNKS) preroll.shift();
    }
  };
  $("mic").textContent = "Stop the microphone";
  $("stat-mic").textContent = "on: listening";
  liveStatus();
}

function micError(error) {
  if (error.name === "NotAllowedError") {
    showError("The browser did not let this page use the microphone. Allow it (the icon next to the address " +
              "bar), then press Start the microphone again; or play an audio file instead.");
  } else if (error.name === "NotFoundError") {
    showError("No microphone was found. Connect one, or play an audio file instead.");
  } else if (error.name === "NotSecureError" || !window.isSecureContext) {
    showError("Browsers open the microphone only for pages on localhost or over HTTPS. Open this page that " +
              "way, or play an audio file instead.");
  } else {
    showError(`The microphone did not start: ${error.message}`);
  }
  $("stat-mic").textContent = "off";
}

function stopMic() {
  if (!mic) return;
  mic.stream.getTracks().forEach((track) => track.stop());
  mic.context.close();
  mic = null;
  $("mic").textContent = "Start the microphone";
  $("stat-mic").textContent = "off";
  liveStatus();
}

async function sendFile() {
  clearError();
  const file = $("file").files[0];
  if (!file) { showError("Choose an audio file first."); return; }
  const form = new FormData();
  form.append("file", file);
  utteranceSentAt = performance.now();
  try {
    const reply = await api(`/api/sessions/${session.id}/audio?end=true`, { method: "POST", body: form });
    log(`Playing ${file.name} (${reply.seconds.toFixed(1)} s).`);
  } catch (error) {
    utteranceSentAt = null;
    showError(`Could not play ${file.name}: ${error.message}`);
  }
}

// ---- avatars: the list, switching while connected, making one from a video or photo ----

async function loadAvatars(choose) {
  const { avatars } = await api("/api/avatars");
  const list = $("avatar");
  const keep = choose || list.value;
  list.replaceChildren(...avatars.map((a) => new Option(`${a.name} (${a.width}×${a.height})`, a.name)));
  if (avatars.some((a) => a.name === keep)) list.value = keep;
  $("no-avatars").hidden = avatars.length > 0;
  if (!avatars.length) $("create").open = true;
  if (!state.connected) {
    setStatus(avatars.length ? "Choose an avatar, then press Connect." : "Make an avatar to start (step 1).");
  }
}

async function switchAvatar() {
  if (!state.connected || !session) return;
  clearError();
  const name = $("avatar").value;
  try {
    await postJson(`/api/sessions/${session.id}/avatar`, { avatar: name });
    log(`Switching to ${name}…`);
  } catch (error) {
    showError(`Could not show ${name}: ${error.message}`);
    $("avatar").value = state.avatar;
  }
}

function upload(name, file, onProgress) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    form.append("name", name);
    form.append("file", file);
    const request = new XMLHttpRequest();
    request.open("POST", "/api/avatars");
    request.setRequestHeader("Authorization", `Bearer ${apiKey}`);
    request.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    request.onload = () => {
      let body = {};
      try { body = JSON.parse(request.responseText); } catch { /* not JSON */ }
      if (request.status === 202) resolve(body.job);
      else reject(replyError(request.status, body.detail || request.statusText, request.getResponseHeader("Retry-After")));
    };
    request.onerror = () => reject(new Error("the upload broke off"));
    request.send(form);
  });
}

function showMaking(share, text) {
  $("create-progress").hidden = false;
  $("create-bar").value = share;
  $("create-text").textContent = text;
}

async function makeAvatar() {
  clearError();
  const name = $("new-name").value.trim();
  const file = $("new-file").files[0];
  if (!name) { showError("Give the new avatar a name."); return; }
  if (!file) { showError("Choose a video or a photo of a face for the new avatar."); return; }
  $("create-avatar").disabled = true;
  try {
    showMaking(0, "Uploading… 0%");
    let job = await upload(name, file, (share) => showMaking(share, `Uploading… ${Math.round(100 * share)}%`));
    while (job.status === "queued" || job.status === "running") {
      showMaking(job.progress, job.status === "queued" ? "Waiting for another avatar to be made first…"
        : `Making it: ${STAGES[job.stage] || "starting"}… ${Math.round(100 * job.progress)}%`);
      await new Promise((resolve) => setTimeout(resolve, 400));
      job = await api(`/api/jobs/${job.id}`);
    }
    if (job.status === "failed") throw new Error(job.error);
    showMaking(1, `The avatar ${job.avatar} is ready.`);
    log(`Made the avatar ${job.avatar}.`);
    await loadAvatars(job.avatar);
    await switchAvatar();
  } catch (error) {
    showMaking(0, "The avatar was not made.");
    showError(`The avatar ${name} could not be made: ${error.message}`);
  } finally {
    $("create-avatar").disabled = false;
  }
}

// ---- start: the server serves this page while it still loads its engine ----

async function untilReady() {
  let waiting = false;
  for (;;) {
    const reply = await fetch("/ready", { headers: { Authorization: `Bearer ${apiKey}` } });
    const body = await replyBody(reply);
    if (reply.status !== 503 || !body.loading) {
      if (body.error) throw new Error(`the server could not load its engine: ${body.error}`);
      if (reply.status === 401 || reply.status === 403) throw replyError(reply.status, body.detail || reply.statusText);
      break;  // ready, or draining: connecting says why not
    }
    if (!waiting) {
      waiting = true;
      $("connect").disabled = true;
      setStatus("The server is starting: it is loading its engine, which takes a few seconds…");
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  if (waiting) {
    $("connect").disabled = state.connected;
    log("The server is ready.");
  }
}

async function start() {
  try {
    await untilReady();
  } catch (error) {
    showError(`The server cannot be used: ${error.message}`);
    return;
  }
  await loadAvatars().catch((e) => showError(`Could not list the avatars: ${e.message}`));
}

// ---- buttons ----

$("connect").onclick = connect;
$("disconnect").onclick = disconnect;
$("mic").onclick = () => (mic ? stopMic() : startMic().catch(micError));
$("send-file").onclick = sendFile;
$("interrupt").onclick = () => { utteranceSentAt = null; sendControl?.({ type: "interrupt" }); };
$("avatar").onchange = switchAvatar;
$("create-avatar").onclick = makeAvatar;
$("error-close").onclick = clearError;
$("save-key").onclick = () => {
  apiKey = $("key").value.trim();
  localStorage.setItem("lipstream-key", apiKey);
  $("keybox").hidden = true;
  start();
};
if (params.get("transport")) $("transport").value = params.get("transport");
if (!apiKey) {
  $("keybox").hidden = false;
  setStatus("Paste the access key to start.");
} else {
  start();
}
window.addEventListener("pagehide", () => {  // the server closes a session whose viewer goes
  state.connected = false;
  stopMic();
  closeTransports();
});
