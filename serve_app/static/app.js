// trimodal web page: text, images (with previews) and an uploaded or recorded audio clip, sent to
// /v1/chat/completions with stream: true, to the model picked from /v1/models (the server's default run, the base
// model, or any finished run); the answer appears as the server-sent events arrive.
// Recorded (and unusual uploaded) audio is decoded by the browser and re-encoded as 16 kHz mono WAV here.
"use strict";

const $ = (id) => document.getElementById(id);
const BASE = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
const SENDABLE_AUDIO = ["wav", "flac", "ogg", "mp3"];
const state = { history: [], images: [], audio: null, controller: null, recorder: null, models: [] };

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  return headers;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

function modelNote(model) {
  const info = model.trimodal || {};
  if (info.note) return info.note;
  if (info.base) return "the base model: no LoRA adapter, and an UNTRAINED projector (image answers are noise)";
  return `run ${info.run}` + (info.adapter ? "" : " (no LoRA adapter: trained up to stage 1)");
}

function showNote() {
  const model = state.models.find((m) => m.id === $("model").value);
  const note = model ? modelNote(model) : "";
  $("note").hidden = !note;
  $("note").textContent = note;
}

async function loadModel() {
  const picker = $("model");
  try {
    const response = await fetch(BASE + "v1/models", { headers: apiHeaders() });
    if (!response.ok) { picker.replaceChildren(new Option(await errorMessage(response), "")); return; }
    const chosen = picker.value;
    state.models = (await response.json()).data;
    picker.replaceChildren(...state.models.map((m) => new Option(m.id, m.id)));
    if (state.models.some((m) => m.id === chosen)) picker.value = chosen;
    showNote();
  } catch (err) {
    picker.replaceChildren(new Option("server unreachable: " + err, ""));
  }
}

// ---- bytes, base64, WAV --------------------------------------------------------------------------------------

function bytesToBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function encodeWav(samples, rate) {
  const buffer = new ArrayBuffer(44 + samples.length * 2);
  const view = new DataView(buffer);
  const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return new Uint8Array(buffer);
}

async function toWav16k(arrayBuffer) {
  const ctx = new AudioContext();
  let decoded;
  try { decoded = await ctx.decodeAudioData(arrayBuffer); } finally { ctx.close(); }
  const rate = 16000;
  const offline = new OfflineAudioContext(1, Math.max(1, Math.ceil(decoded.duration * rate)), rate);
  const source = offline.createBufferSource();
  source.buffer = decoded;
  source.connect(offline.destination);
  source.start();
  const rendered = await offline.startRendering();
  return encodeWav(rendered.getChannelData(0), rate);
}

// ---- attachments ---------------------------------------------------------------------------------------------

function renderPreviews() {
  const box = $("previews");
  box.replaceChildren();
  state.images.forEach((image, index) => {
    const item = document.createElement("div");
    item.className = "preview";
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = image.name;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "✕";
    remove.title = "remove " + image.name;
    remove.addEventListener("click", () => { state.images.splice(index, 1); renderPreviews(); });
    item.append(img, remove);
    box.append(item);
  });
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addImages(files) {
  for (const file of files) {
    state.images.push({ name: file.name, url: await readDataUrl(file) });
  }
  renderPreviews();
  setStatus(`${state.images.length} image(s) attached`);
}

function setAudio(bytes, format, label) {
  if (state.audio) URL.revokeObjectURL(state.audio.url);
  const url = URL.createObjectURL(new Blob([bytes], { type: "audio/" + (format === "mp3" ? "mpeg" : format) }));
  state.audio = { data: bytesToBase64(bytes), format, url, label };
  $("audio-player").src = url;
  $("audio-label").textContent = label;
  $("audio-preview").hidden = false;
}

function clearAudio() {
  if (state.audio) URL.revokeObjectURL(state.audio.url);
  state.audio = null;
  $("audio-player").removeAttribute("src");
  $("audio-preview").hidden = true;
}

async function addAudioFile(file) {
  const ext = (file.name.split(".").pop() || "").toLowerCase();
  const raw = await file.arrayBuffer();
  if (SENDABLE_AUDIO.includes(ext)) {
    setAudio(new Uint8Array(raw), ext, file.name);
  } else {
    setStatus("converting " + file.name + " to WAV…");
    setAudio(await toWav16k(raw), "wav", file.name + " (as WAV)");
  }
  setStatus("audio attached: " + file.name);
}

async function toggleRecording() {
  const button = $("record");
  if (state.recorder) { state.recorder.stop(); return; }
  if (!navigator.mediaDevices || !window.MediaRecorder) { setStatus("this browser cannot record audio", true); return; }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (err) {
    setStatus("microphone unavailable: " + err.message, true);
    return;
  }
  const chunks = [];
  const recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (event) => { if (event.data.size) chunks.push(event.data); };
  recorder.onstop = async () => {
    stream.getTracks().forEach((track) => track.stop());
    state.recorder = null;
    button.classList.remove("recording");
    button.textContent = "● Record";
    try {
      const wav = await toWav16k(await new Blob(chunks).arrayBuffer());
      setAudio(wav, "wav", `recording (${((wav.length - 44) / 32000).toFixed(1)} s)`);
      setStatus("recording attached");
    } catch (err) {
      setStatus("could not decode the recording: " + err.message, true);
    }
  };
  state.recorder = recorder;
  recorder.start();
  button.classList.add("recording");
  button.textContent = "■ Stop recording";
  setStatus("recording… press again to stop");
}

// ---- conversation --------------------------------------------------------------------------------------------

function addMessage(role, text, images = [], extra = "") {
  const msg = document.createElement("div");
  msg.className = "msg " + role;
  images.forEach((url) => { const img = document.createElement("img"); img.src = url; msg.append(img); });
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  msg.append(body);
  if (extra) {
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = extra;
    msg.append(meta);
  }
  $("log").append(msg);
  msg.scrollIntoView({ block: "end" });
  return msg;
}

function buildParts(question) {
  const parts = state.images.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
  if (state.audio) parts.push({ type: "input_audio", input_audio: { data: state.audio.data, format: state.audio.format } });
  if (question) parts.push({ type: "text", text: question });
  return parts;
}

function handleEvent(data, msg, answer) {
  if (data === "[DONE]") return true;
  const event = JSON.parse(data);
  if (event.error) throw new Error(event.error.message);
  const choice = event.choices && event.choices[0];
  if (choice && choice.delta && choice.delta.content) {
    answer.text += choice.delta.content;
    msg.querySelector(".text").textContent = answer.text;
  }
  if (choice && choice.finish_reason) answer.finish = choice.finish_reason;
  if (event.timings) answer.timings = event.timings;
  if (event.usage) answer.usage = event.usage;
  return false;
}

// The server's stage timings of one answer (the final chunk's `timings`), as one line under it.
function timingsText(timings) {
  const parts = [];
  if (timings.transcribe_s != null) parts.push(`transcribe ${timings.transcribe_s.toFixed(2)} s`);
  if (timings.encode_s != null) parts.push(`image encode ${timings.encode_s.toFixed(2)} s`);
  if (timings.first_token_s != null) parts.push(`first token ${timings.first_token_s.toFixed(2)} s`);
  if (timings.tokens_per_s != null) parts.push(`${timings.tokens_per_s.toFixed(1)} tokens/s`);
  return parts.join(" · ");
}

function showTimings(msg, timings) {
  const meta = document.createElement("div");
  meta.className = "meta timings";
  meta.textContent = timingsText(timings);
  msg.append(meta);
}

async function readStream(response, msg, answer) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) !== -1) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data:") && handleEvent(line.slice(5).trim(), msg, answer)) return;
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(event) {
  event.preventDefault();
  if (state.controller) return;
  const question = $("question").value.trim();
  const parts = buildParts(question);
  if (!parts.length) { setStatus("type a question, add an image, or attach audio", true); return; }
  const shown = state.images.map((image) => image.url);
  addMessage("user", question || "(no text)", shown, state.audio ? "🎤 " + state.audio.label : "");
  state.history.push({ role: "user", content: parts });
  $("question").value = "";
  state.images = [];
  renderPreviews();
  clearAudio();

  const msg = addMessage("assistant", "");
  msg.dataset.state = "streaming";
  const answer = { text: "", finish: null, usage: null, timings: null };
  state.controller = new AbortController();
  setBusy(true);
  setStatus("thinking…");
  const started = performance.now();
  try {
    const response = await fetch(BASE + "v1/chat/completions", {
      method: "POST", headers: apiHeaders(), signal: state.controller.signal,
      body: JSON.stringify({
        model: $("model").value || undefined, messages: state.history, stream: true,
        stream_options: { include_usage: true },
        max_tokens: Number($("max-tokens").value) || 128, temperature: Number($("temperature").value) || 0,
      }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    await readStream(response, msg, answer);
    msg.dataset.state = "done";
    if (answer.timings) showTimings(msg, answer.timings);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const tokens = answer.usage ? `${answer.usage.completion_tokens} tokens, ` : "";
    setStatus(`done (${tokens}${seconds} s${answer.finish === "length" ? ", hit max tokens" : ""})`);
  } catch (err) {
    const stopped = err.name === "AbortError";
    msg.dataset.state = stopped ? "stopped" : "error";
    if (!stopped) msg.classList.add("error");
    if (!answer.text) msg.querySelector(".text").textContent = stopped ? "(stopped)" : String(err.message || err);
    setStatus(stopped ? "stopped" : "error: " + (err.message || err), !stopped);
  } finally {
    state.history.push({ role: "assistant", content: answer.text || "(no answer)" });
    state.controller = null;
    setBusy(false);
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("log").replaceChildren();
  setStatus("new conversation");
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", send);
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
  });
  $("image-input").addEventListener("change", (event) => { addImages([...event.target.files]); event.target.value = ""; });
  $("audio-input").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) addAudioFile(file).catch((err) => setStatus("could not read the audio: " + err.message, true));
    event.target.value = "";
  });
  $("audio-remove").addEventListener("click", clearAudio);
  $("record").addEventListener("click", toggleRecording);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", newChat);
  $("api-key").addEventListener("change", loadModel);
  $("model").addEventListener("change", showNote);
  loadModel();
});
