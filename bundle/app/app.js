// The TCMN app's page: plain JavaScript, no build step, nothing fetched but the app's own API.
// Label maps are kept as exact H×W byte arrays (painted here pixel by pixel, never anti-aliased), so what is
// sent is exactly what the page shows; the overlay is drawn opaque in a canvas made translucent by CSS, so its
// pixels map back to label values exactly.
"use strict";

const $ = (id) => document.getElementById(id);

function davisPalette() {
  // the PASCAL VOC / DAVIS colours, as scripts.overlay.PALETTE
  const palette = [];
  for (let label = 0; label < 256; label++) {
    const rgb = [0, 0, 0];
    let value = label;
    for (let bit = 0; bit < 8; bit++) {
      for (let c = 0; c < 3; c++) rgb[c] |= ((value >> c) & 1) << (7 - bit);
      value >>= 3;
    }
    palette.push(rgb);
  }
  return palette;
}

const PALETTE = davisPalette();
const state = {
  video: null,
  t: 0,
  labels: new Map(), // t -> {kind, data}
  revision: -1,
  tool: "brush",
  size: 16,
  active: 1,
  names: { 1: "object 1" },
  undo: [],
  polygon: [],
  stroke: null,
  playing: false,
  job: null,
  request: 0,
};
window.tcmn = state; // for debugging in the browser console

function showMessage(text, info = false) {
  const box = $("message");
  box.textContent = text;
  box.className = info ? "info" : "";
  box.hidden = !text;
}

async function api(method, url, body, contentType) {
  const options = { method, headers: {} };
  if (body instanceof FormData) options.body = body;
  else if (body instanceof Uint8Array) {
    options.body = body;
    options.headers["Content-Type"] = "application/octet-stream";
  } else if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers["Content-Type"] = contentType || "application/json";
  }
  const response = await fetch(url, options);
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      detail = (await response.json()).detail || detail;
    } catch (e) {
      /* not JSON */
    }
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return response;
}

async function guarded(action) {
  try {
    return await action();
  } catch (error) {
    showMessage(error.message);
    return null;
  }
}

// ---- opening videos -------------------------------------------------------------------------------------------

async function setVideo(video) {
  if (state.video && state.video.id !== video.id) {
    state.playing = false;
    await guarded(() => api("DELETE", `/api/videos/${state.video.id}`)); // the server forgets the video left
  }
  state.video = video;
  state.labels.clear();
  state.undo = [];
  state.polygon = [];
  state.revision = video.revision;
  for (const id of ["frame-canvas", "overlay-canvas", "ui-canvas"]) {
    $(id).width = video.width;
    $(id).height = video.height;
  }
  $("slider").max = video.num_frames - 1;
  $("video-name").textContent = `${video.name} (${video.num_frames} frames, ${video.width}×${video.height}, ${video.fps} fps)`;
  showMessage("");
  await showFrame(0);
  updateStatus(video);
}

async function openVideo(request) {
  const response = await guarded(request);
  if (response) await setVideo(await response.json());
}

async function browse(path) {
  const response = await guarded(() => api("GET", `/api/browse?path=${encodeURIComponent(path)}`));
  if (!response) return;
  const listing = await response.json();
  $("browser-path").textContent = "/" + listing.path;
  const list = $("browser");
  list.innerHTML = "";
  const openFolder = $("open-folder");
  openFolder.hidden = !listing.path;
  openFolder.onclick = () => openVideo(() => api("POST", "/api/open", { path: listing.path }));
  if (listing.path) {
    const up = document.createElement("li");
    up.className = "folder";
    up.textContent = "..";
    up.onclick = () => browse(listing.path.split("/").slice(0, -1).join("/"));
    list.appendChild(up);
  }
  for (const entry of listing.entries) {
    const item = document.createElement("li");
    item.className = entry.kind;
    item.textContent = entry.name;
    if (entry.kind === "folder") {
      item.onclick = () => browse(entry.path);
    } else if (entry.kind === "video") {
      item.onclick = () => openVideo(() => api("POST", "/api/open", { path: entry.path }));
    } else {
      item.onclick = () => loadMaskFromData(entry.path);
    }
    list.appendChild(item);
  }
}

async function loadMaskFromData(path) {
  if (!state.video) return showMessage("open a video first, then choose its mask");
  const url = `/api/videos/${state.video.id}/data_masks?frame=${state.t}`;
  await maskLoaded(path, await guarded(() => api("POST", url, { path })));
}

async function upload(files, folder) {
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  if (folder) form.append("folder", folder);
  showMessage(`uploading ${files.length} file(s)…`, true);
  await openVideo(() => api("POST", "/api/upload", form));
}

// ---- frames and labels ----------------------------------------------------------------------------------------

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error(`frame could not be loaded: ${url}`));
    image.src = url;
  });
}

async function labelsOf(t) {
  if (state.stroke && state.stroke.t === t) return { kind: "annotation", data: state.stroke.data };
  if (!state.labels.has(t)) {
    const response = await api("GET", `/api/videos/${state.video.id}/labels/${t}`);
    const bytes = new Uint8Array(await response.arrayBuffer());
    state.labels.set(t, { kind: response.headers.get("X-Labels"), data: bytes.length ? bytes : null });
  }
  return state.labels.get(t);
}

function drawLabels(data) {
  const canvas = $("overlay-canvas");
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(canvas.width, canvas.height);
  if (data) {
    for (let i = 0; i < data.length; i++) {
      const v = data[i];
      if (!v) continue;
      const colour = PALETTE[v];
      image.data[4 * i] = colour[0];
      image.data[4 * i + 1] = colour[1];
      image.data[4 * i + 2] = colour[2];
      image.data[4 * i + 3] = 255;
    }
  }
  ctx.putImageData(image, 0, 0);
}

async function showFrame(t) {
  if (!state.video) return;
  t = Math.max(0, Math.min(state.video.num_frames - 1, t));
  const request = ++state.request;
  state.t = t;
  $("slider").value = t;
  $("frame-label").textContent = `frame ${t} / ${state.video.num_frames - 1}`;
  try {
    const [image, labels] = await Promise.all([
      loadImage(`/api/videos/${state.video.id}/frames/${t}`),
      labelsOf(t),
    ]);
    if (request !== state.request) return; // a later frame was asked for meanwhile
    $("frame-canvas").getContext("2d").drawImage(image, 0, 0);
    drawLabels(labels.data);
    const kinds = { annotation: "annotated (pinned)", result: "propagated", none: "no labels yet" };
    $("frame-info").textContent = `frame ${t}: ${kinds[labels.kind]}`;
    $("frame-info").dataset.kind = labels.kind;
    $("stage").dataset.frame = t;
  } catch (error) {
    showMessage(error.message);
  }
  drawUi();
}

function updateStatus(video) {
  state.video = { ...state.video, ...video };
  if (video.revision !== state.revision) {
    state.revision = video.revision;
    state.labels.clear();
  }
  const annotated = video.annotated.length ? video.annotated.join(", ") : "none";
  const fresh = video.up_to_date ? "results up to date" : "propagate to update the results";
  $("frame-info").title = `annotated frames: ${annotated}; ${fresh}`;
  $("export").disabled = !video.up_to_date;
}

// ---- painting -------------------------------------------------------------------------------------------------

function imagePoint(event) {
  const canvas = $("ui-canvas");
  const rect = canvas.getBoundingClientRect();
  return {
    x: ((event.clientX - rect.left) * canvas.width) / rect.width,
    y: ((event.clientY - rect.top) * canvas.height) / rect.height,
  };
}

function stamp(data, cx, cy, radius, value) {
  // a disc: every pixel whose index lies within `radius` of the pixel (cx, cy)
  const { width, height } = state.video;
  const r = Math.floor(radius);
  for (let y = Math.max(0, cy - r); y <= Math.min(height - 1, cy + r); y++) {
    for (let x = Math.max(0, cx - r); x <= Math.min(width - 1, cx + r); x++) {
      if ((x - cx) * (x - cx) + (y - cy) * (y - cy) <= radius * radius) data[y * width + x] = value;
    }
  }
}

function fillPolygon(data, points, value) {
  // even-odd rule at pixel centres; corners are whole pixel coordinates
  const { width, height } = state.video;
  const ys = points.map((p) => p.y);
  for (let y = Math.max(0, Math.min(...ys)); y < Math.min(height, Math.max(...ys)); y++) {
    const cy = y + 0.5;
    const crossings = [];
    for (let i = 0; i < points.length; i++) {
      const a = points[i];
      const b = points[(i + 1) % points.length];
      if (a.y <= cy !== b.y <= cy) crossings.push(a.x + ((cy - a.y) * (b.x - a.x)) / (b.y - a.y));
    }
    crossings.sort((p, q) => p - q);
    for (let k = 0; k + 1 < crossings.length; k += 2) {
      for (let x = Math.max(0, Math.ceil(crossings[k] - 0.5)); x < Math.min(width, Math.ceil(crossings[k + 1] - 0.5)); x++) {
        data[y * width + x] = value;
      }
    }
  }
}

async function beginEdit() {
  const current = await labelsOf(state.t);
  const size = state.video.width * state.video.height;
  const before = current.data ? new Uint8Array(current.data) : new Uint8Array(size);
  state.undo.push({ t: state.t, before, wasAnnotated: current.kind === "annotation" });
  return { t: state.t, data: new Uint8Array(before) };
}

async function commit(t, data) {
  const url = `/api/videos/${state.video.id}/annotations/${t}`;
  const response = await guarded(() => (data.some((v) => v) ? api("PUT", url, data) : api("DELETE", url)));
  state.labels.delete(t);
  if (response) {
    showMessage("");
    updateStatus(await response.json());
  }
  if (t === state.t) await showFrame(t);
}

async function pointerDown(event) {
  if (!state.video || event.button !== 0) return;
  const p = imagePoint(event);
  if (state.tool === "polygon") {
    state.polygon.push({ x: Math.round(p.x), y: Math.round(p.y) });
    drawUi();
    return;
  }
  $("ui-canvas").setPointerCapture(event.pointerId);
  const stroke = await beginEdit();
  stroke.last = { x: Math.floor(p.x), y: Math.floor(p.y) };
  state.stroke = stroke;
  stamp(stroke.data, stroke.last.x, stroke.last.y, state.size / 2, paintValue());
  drawLabels(stroke.data);
}

function paintValue() {
  return state.tool === "eraser" ? 0 : state.active;
}

function pointerMove(event) {
  if (!state.video) return;
  const p = imagePoint(event);
  state.cursor = p;
  const stroke = state.stroke;
  if (stroke && stroke.last) {
    const to = { x: Math.floor(p.x), y: Math.floor(p.y) };
    const steps = Math.max(1, Math.ceil(Math.hypot(to.x - stroke.last.x, to.y - stroke.last.y) / Math.max(1, state.size / 4)));
    for (let i = 1; i <= steps; i++) {
      const x = Math.round(stroke.last.x + ((to.x - stroke.last.x) * i) / steps);
      const y = Math.round(stroke.last.y + ((to.y - stroke.last.y) * i) / steps);
      stamp(stroke.data, x, y, state.size / 2, paintValue());
    }
    stroke.last = to;
    drawLabels(stroke.data);
  }
  drawUi();
}

async function pointerUp() {
  const stroke = state.stroke;
  if (!stroke || !stroke.last) return;
  stroke.last = null;
  state.labels.set(stroke.t, { kind: "annotation", data: stroke.data });
  state.stroke = null;
  await commit(stroke.t, stroke.data);
}

async function closePolygon() {
  if (state.polygon.length < 3) return;
  const points = state.polygon;
  state.polygon = [];
  const edit = await beginEdit();
  fillPolygon(edit.data, points, paintValue());
  state.labels.set(edit.t, { kind: "annotation", data: edit.data });
  await commit(edit.t, edit.data);
}

function drawUi() {
  const canvas = $("ui-canvas");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const scale = canvas.width / canvas.getBoundingClientRect().width || 1;
  ctx.lineWidth = 1.5 * scale;
  ctx.strokeStyle = "#ffeb3b";
  if (state.polygon.length) {
    ctx.beginPath();
    state.polygon.forEach((p, i) => (i ? ctx.lineTo(p.x, p.y) : ctx.moveTo(p.x, p.y)));
    if (state.cursor) ctx.lineTo(state.cursor.x, state.cursor.y);
    ctx.stroke();
  }
  if (state.cursor && state.tool !== "polygon") {
    ctx.beginPath();
    ctx.arc(state.cursor.x, state.cursor.y, state.size / 2, 0, 2 * Math.PI);
    ctx.stroke();
  }
}

async function undo() {
  const entry = state.undo.pop();
  if (!entry || !state.video) return;
  const url = `/api/videos/${state.video.id}/annotations/${entry.t}`;
  const response = await guarded(() => (entry.wasAnnotated ? api("PUT", url, entry.before) : api("DELETE", url)));
  state.labels.delete(entry.t);
  if (response) updateStatus(await response.json());
  await showFrame(entry.t);
}

async function loadMask(file) {
  if (!state.video) return;
  const form = new FormData();
  form.append("file", file, file.name);
  await maskLoaded(file.name, await guarded(() => api("POST", `/api/videos/${state.video.id}/masks?frame=${state.t}`, form)));
}

async function maskLoaded(name, response) {
  if (!response) return;
  const video = await response.json();
  state.labels.clear();
  updateStatus(video);
  showMessage(`${name}: annotates frame(s) ${video.loaded.join(", ")}`, true);
  await showFrame(state.t);
}

// ---- labels list ----------------------------------------------------------------------------------------------

function renderLabels() {
  const list = $("labels");
  list.innerHTML = "";
  for (const value of Object.keys(state.names).map(Number).sort((a, b) => a - b)) {
    const item = document.createElement("li");
    const radio = document.createElement("input");
    radio.type = "radio";
    radio.name = "active-label";
    radio.checked = value === state.active;
    radio.onchange = () => (state.active = value);
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${PALETTE[value].join(",")})`;
    const name = document.createElement("input");
    name.type = "text";
    name.value = state.names[value];
    name.onchange = () => (state.names[value] = name.value);
    const number = document.createElement("span");
    number.textContent = value;
    item.append(radio, swatch, number, name);
    list.appendChild(item);
  }
}

function addLabel() {
  const used = Object.keys(state.names).map(Number);
  const value = used.length ? Math.max(...used) + 1 : 1;
  if (value > 255) return showMessage("labels go up to 255");
  state.names[value] = `object ${value}`;
  state.active = value;
  renderLabels();
}

// ---- playback -------------------------------------------------------------------------------------------------

async function play() {
  if (!state.video) return;
  state.playing = !state.playing;
  $("play").textContent = state.playing ? "❚❚ Pause" : "▶ Play";
  while (state.playing) {
    const started = performance.now();
    if (state.t >= state.video.num_frames - 1) await showFrame(0);
    else await showFrame(state.t + 1);
    const wait = 1000 / state.video.fps - (performance.now() - started);
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
  }
}

function toggleOverlay(show) {
  $("show-overlay").checked = show;
  $("overlay-canvas").style.visibility = show ? "visible" : "hidden";
}

// ---- propagation ----------------------------------------------------------------------------------------------

function showJob(job) {
  state.job = job;
  const box = $("job-state");
  box.dataset.state = job.state;
  $("progress").max = Math.max(1, job.total);
  $("progress").value = job.done;
  const texts = {
    queued: `waiting for another propagation: position ${job.position} in the queue`,
    running: `propagating: ${job.done} / ${job.total} frames`,
    done: `done: ${job.recomputed} frame(s) recomputed, annotated frames kept as painted`,
    cancelled: "cancelled: frames not reached show no labels; propagate again",
    failed: `failed: ${job.error}`,
  };
  box.textContent = texts[job.state];
  const active = job.state === "queued" || job.state === "running";
  $("cancel").disabled = !active;
  $("propagate").disabled = active;
  if (job.state === "failed") showMessage(job.error);
}

async function propagate() {
  if (!state.video) return;
  const response = await guarded(() => api("POST", `/api/videos/${state.video.id}/propagate`));
  if (!response) return;
  let job = await response.json();
  showJob(job);
  while (job.state === "queued" || job.state === "running") {
    await new Promise((resolve) => setTimeout(resolve, 250));
    const polled = await guarded(() => api("GET", `/api/jobs/${job.id}`));
    if (!polled) return;
    job = await polled.json();
    showJob(job);
    await refreshVideo();
  }
  await refreshVideo();
}

async function refreshVideo() {
  const response = await guarded(() => api("GET", `/api/videos/${state.video.id}`));
  if (!response) return;
  const video = await response.json();
  const changed = video.revision !== state.revision;
  updateStatus(video);
  if (changed && !state.playing && !state.stroke) await showFrame(state.t);
}

async function cancel() {
  if (state.job) await guarded(() => api("POST", `/api/jobs/${state.job.id}/cancel`));
}

// ---- export ---------------------------------------------------------------------------------------------------

async function exportResults() {
  if (!state.video) return;
  const destination = document.querySelector("input[name=destination]:checked").value;
  const request = {
    destination,
    save_png: $("save-png").checked,
    save_overlay: $("save-overlay").checked,
    overlay_format: $("overlay-format").value,
    overwrite: $("overwrite").checked,
  };
  $("export-state").textContent = "exporting…";
  const response = await guarded(() => api("POST", `/api/videos/${state.video.id}/export`, request));
  if (!response) {
    $("export-state").textContent = "";
    return;
  }
  if (destination === "folder") {
    const written = (await response.json()).written;
    $("export-state").textContent = `wrote ${written.join(", ")}`;
  } else {
    const disposition = response.headers.get("Content-Disposition") || "";
    const name = (disposition.match(/filename="([^"]+)"/) || [null, "results"])[1];
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = name;
    link.click();
    $("export-state").textContent = `downloaded ${name}`;
  }
  $("export-state").dataset.done = "true";
}

// ---- wiring ---------------------------------------------------------------------------------------------------

function selectTool(tool) {
  state.tool = tool;
  state.polygon = [];
  for (const button of document.querySelectorAll(".tool")) button.classList.toggle("active", button.dataset.tool === tool);
  drawUi();
}

async function init() {
  const info = await (await api("GET", "/api/info")).json();
  $("output-dir").textContent = info.output_dir;
  $("open-sample").hidden = !info.sample;
  if (info.data_dir) await browse("");
  else $("browser-panel").hidden = true;
  $("open-sample").onclick = () => openVideo(() => api("POST", "/api/open_sample"));
  $("upload-file").onchange = (e) => e.target.files.length && upload(e.target.files, "");
  $("upload-folder").onchange = (e) => {
    const files = [...e.target.files];
    if (files.length) upload(files, (files[0].webkitRelativePath || "frames/").split("/")[0]);
  };
  $("mask-file").onchange = (e) => e.target.files.length && loadMask(e.target.files[0]);
  $("slider").oninput = (e) => showFrame(Number(e.target.value));
  $("prev").onclick = () => showFrame(state.t - 1);
  $("next").onclick = () => showFrame(state.t + 1);
  $("play").onclick = play;
  $("show-overlay").onchange = (e) => toggleOverlay(e.target.checked);
  for (const button of document.querySelectorAll(".tool")) button.onclick = () => selectTool(button.dataset.tool);
  $("brush-size").oninput = (e) => {
    state.size = Number(e.target.value);
    $("size-label").textContent = state.size;
  };
  $("undo").onclick = undo;
  $("clear-frame").onclick = () => state.video && beginEdit().then((edit) => commit(edit.t, new Uint8Array(edit.data.length)));
  $("add-label").onclick = addLabel;
  $("propagate").onclick = propagate;
  $("cancel").onclick = cancel;
  $("export").onclick = exportResults;
  const ui = $("ui-canvas");
  ui.addEventListener("pointerdown", pointerDown);
  ui.addEventListener("pointermove", pointerMove);
  ui.addEventListener("pointerup", pointerUp);
  ui.addEventListener("pointerleave", () => ((state.cursor = null), drawUi()));
  ui.addEventListener("dblclick", closePolygon);
  document.addEventListener("keydown", (event) => {
    if (event.target.tagName === "INPUT" && event.target.type === "text") return;
    if (event.key === "ArrowLeft") showFrame(state.t - 1);
    else if (event.key === "ArrowRight") showFrame(state.t + 1);
    else if (event.key === " ") play();
    else if (event.key === "Enter") closePolygon();
    else if (event.key === "Escape") ((state.polygon = []), drawUi());
    else if (event.key === "o" || event.key === "O") toggleOverlay(!$("show-overlay").checked);
    else if (event.key === "z" && (event.ctrlKey || event.metaKey)) undo();
    else return;
    event.preventDefault();
  });
  renderLabels();
  document.body.dataset.ready = "true";
}

init().catch((error) => showMessage(error.message));
