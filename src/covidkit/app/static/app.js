// covidkit web page: upload a radiograph, draw the predicted opacity boxes and the study probabilities.
"use strict";

const CLASSES = ["negative", "typical", "indeterminate", "atypical"];
const ERRORS = { 413: "File too large", 415: "Not a DICOM, PNG or JPEG file", 422: "The image cannot be decoded" };
const $ = (id) => document.getElementById(id);
let current = null; // {result, image}: the last successful prediction and its decoded display image

function setStatus(text, kind = "") {
  $("status").textContent = text;
  $("status").className = kind;
}

function errorText(status, payload) {
  const detail = typeof payload.detail === "string" ? payload.detail : JSON.stringify(payload.detail ?? "");
  return `${ERRORS[status] ?? `Server error ${status}`}${detail ? `: ${detail}` : ""}`;
}

async function upload(file) {
  setStatus("Analysing…", "busy");
  const body = new FormData();
  body.append("file", file);
  let response, payload;
  try {
    response = await fetch("/api/predict", { method: "POST", body });
    payload = await response.json().catch(() => ({}));
  } catch (err) {
    setStatus("The server cannot be reached.", "error");
    return;
  }
  if (!response.ok) {
    setStatus(errorText(response.status, payload), "error");
    return;
  }
  const image = new Image();
  image.onload = () => {
    current = { result: payload, image };
    render();
    setStatus(`${payload.kind.toUpperCase()} analysed in ${payload.timings.total.toFixed(2)} s.`);
  };
  image.onerror = () => setStatus("The display image could not be shown.", "error");
  image.src = payload.display.data_url;
}

function render() {
  if (!current) return;
  $("placeholder").hidden = true;
  $("stage").hidden = false;
  $("panel").hidden = false;
  drawImage();
  renderBars(current.result.study_probs);
  renderFacts(current.result);
}

// Fit the image into the viewer, keeping its aspect ratio; both canvases get the same size.
function drawImage() {
  const { result, image } = current;
  const viewer = $("viewer");
  const scale = Math.min(viewer.clientWidth / result.width, viewer.clientHeight / result.height);
  const width = Math.max(1, Math.floor(result.width * scale));
  const height = Math.max(1, Math.floor(result.height * scale));
  const ratio = window.devicePixelRatio || 1;
  for (const canvas of [$("image-layer"), $("boxes-layer")]) {
    canvas.style.width = `${width}px`;
    canvas.style.height = `${height}px`;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = $("image-layer").getContext("2d");
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(image, 0, 0, $("image-layer").width, $("image-layer").height);
  drawBoxes(scale * ratio, ratio);
}

// Boxes come in original pixels: one scale maps them onto the canvas. They arrive best first; a
// label is drawn only where it does not cover the label of a better box.
function drawBoxes(scale, ratio) {
  const canvas = $("boxes-layer");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const threshold = Number($("threshold").value);
  const shown = current.result.boxes.filter((b) => b.score >= threshold);
  const labels = [];
  const lineHeight = 17 * ratio;
  ctx.lineWidth = 2 * ratio;
  ctx.font = `${Math.round(13 * ratio)}px system-ui, sans-serif`;
  ctx.textBaseline = "bottom";
  for (const b of shown) {
    const [x, y, w, h] = [b.x1 * scale, b.y1 * scale, (b.x2 - b.x1) * scale, (b.y2 - b.y1) * scale];
    ctx.strokeStyle = `rgba(245, 179, 1, ${0.35 + 0.65 * b.score})`;
    ctx.strokeRect(x, y, w, h);
    const text = `opacity ${b.score.toFixed(2)}`;
    const label = { x, y: y >= lineHeight ? y - lineHeight : y, w: ctx.measureText(text).width + 6 * ratio, h: lineHeight };
    if (labels.some((o) => label.x < o.x + o.w && o.x < label.x + label.w && label.y < o.y + o.h && o.y < label.y + label.h)) {
      continue;
    }
    labels.push(label);
    ctx.fillStyle = "rgba(17, 20, 24, 0.75)";
    ctx.fillRect(label.x, label.y, label.w, label.h);
    ctx.fillStyle = "#f5b301";
    ctx.fillText(text, label.x + 3 * ratio, label.y + label.h - 2 * ratio);
  }
  canvas.dataset.count = String(shown.length);
}

function renderBars(probs) {
  const best = CLASSES.reduce((a, c) => (probs[c] > probs[a] ? c : a), CLASSES[0]);
  const bars = CLASSES.map((name) => {
    const p = probs[name] ?? 0;
    const row = document.createElement("div");
    row.className = name === best ? "bar top" : "bar";
    row.dataset.class = name;
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(100 * p).toFixed(1)} %`;
    row.append(label, track, value);
    return row;
  });
  $("bars").replaceChildren(...bars);
}

// Nested values (package versions, model hashes) become one row each; long hashes are shortened.
function flatten(value, prefix = "") {
  if (value !== null && typeof value === "object") {
    return Object.entries(value).flatMap(([k, v]) => flatten(v, prefix ? `${prefix} · ${k}` : k));
  }
  const text = String(value);
  return [[prefix, /^[0-9a-f]{32,}$/.test(text) ? `${text.slice(0, 12)}…` : text]];
}

function renderFacts(result) {
  const shown = result.boxes.filter((b) => b.score >= Number($("threshold").value)).length;
  $("none-prob").textContent = `${(100 * result.none_prob).toFixed(1)} %`;
  $("box-count").textContent = `${shown} shown of ${result.boxes.length}`;
  $("image-size").textContent = `${result.width} × ${result.height} px (${result.kind})`;
  const rows = [
    ...Object.entries(result.timings).map(([k, v]) => [`time · ${k}`, `${v.toFixed(3)} s`]),
    ...flatten(result.versions),
  ];
  $("details").replaceChildren(...rows.flatMap(([k, v]) => {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    return [dt, dd];
  }));
}

$("file").addEventListener("change", (event) => {
  const [file] = event.target.files;
  if (file) upload(file);
  event.target.value = ""; // choosing the same file again uploads it again
});
function setThreshold(value) {
  $("threshold").value = String(value);
  $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
}

$("threshold").addEventListener("input", () => {
  setThreshold($("threshold").value);
  if (current) render();
});
// The default: the models folder's operating point (the best F1 of the out-of-fold boxes), not every box.
fetch("/api/health")
  .then((response) => response.json())
  .then((health) => setThreshold(health.box_threshold.toFixed(2)))
  .catch(() => {});
window.addEventListener("resize", () => render());
document.addEventListener("dragover", (event) => {
  event.preventDefault();
  document.body.classList.add("dragging");
});
document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
document.addEventListener("drop", (event) => {
  event.preventDefault();
  document.body.classList.remove("dragging");
  const [file] = event.dataTransfer.files;
  if (file) upload(file);
});
