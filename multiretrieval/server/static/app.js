// The search page: sends the form to POST /search (multipart) and draws the results grid.
"use strict";
const form = document.getElementById("search-form");
const fileInput = document.getElementById("query-image");
const dropZone = document.getElementById("drop-zone");
const preview = document.getElementById("preview");
const dropText = document.getElementById("drop-text");
const clearButton = document.getElementById("clear-image");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");
let photo = null;

function setPhoto(file) {
  photo = file;
  if (file) {
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
    preview.alt = "query photo: " + file.name;
    dropText.textContent = file.name;
  } else {
    preview.hidden = true;
    preview.removeAttribute("src");
    dropText.textContent = "Drop a photo here, or choose one";
    fileInput.value = "";
  }
  clearButton.hidden = !file;
}

fileInput.addEventListener("change", () => setPhoto(fileInput.files[0] || null));
clearButton.addEventListener("click", () => setPhoto(null));
["dragenter", "dragover"].forEach((t) => dropZone.addEventListener(t, (e) => { e.preventDefault(); dropZone.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => dropZone.addEventListener(t, () => dropZone.classList.remove("over")));
dropZone.addEventListener("drop", (e) => {
  e.preventDefault();
  const file = e.dataTransfer.files[0];
  if (file) setPhoto(file);
});

function text(tag, className, content) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  el.textContent = content;
  return el;
}

const HIDDEN = new Set(["rank", "id", "score", "image_score", "text_score", "title", "image", "source_id",
  "matched", "vector_score", "keyword_score"]);

function card(item, mode) {
  const li = document.createElement("li");
  li.className = "card";
  const link = document.createElement("a");
  link.href = "/item?id=" + encodeURIComponent(item.id);  // ids may hold slashes: a query parameter takes any
  const img = document.createElement("img");
  img.src = "/item/image?id=" + encodeURIComponent(item.id);
  img.alt = item.title || "item " + item.id;
  img.loading = "lazy";
  link.append(img, text("div", "title", item.title || "(untitled) #" + item.id));
  const by = item.matched ? " · by its " + item.matched : "";
  link.append(text("div", "score", "#" + item.rank + " · score " + item.score.toFixed(3) + by));
  li.append(link);
  if (mode === "fused" && item.image_score !== undefined) {
    const total = Math.max(item.image_score, 0) + Math.max(item.text_score, 0) || 1;
    const bars = document.createElement("div");
    bars.className = "bars";
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.setAttribute("role", "img");
    bar.setAttribute("aria-label", `photo ${item.image_score.toFixed(2)}, text ${item.text_score.toFixed(2)}`);
    const a = text("span", "img", ""); a.style.width = (100 * Math.max(item.image_score, 0) / total) + "%";
    const b = text("span", "txt", ""); b.style.width = (100 * Math.max(item.text_score, 0) / total) + "%";
    bar.append(a, b);
    bars.append(text("div", "", `photo ${item.image_score.toFixed(2)} · text ${item.text_score.toFixed(2)}`), bar);
    li.append(bars);
  }
  const meta = Object.entries(item).filter(([k, v]) => !HIDDEN.has(k) && v !== null && v !== "").slice(0, 4);
  li.append(text("div", "meta", meta.map(([k, v]) => k + ": " + v).join(" · ")));
  return li;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = new FormData();
  const query = document.getElementById("query-text").value.trim();
  if (query) body.append("text", query);
  if (photo) body.append("image", photo);
  body.append("mode", document.getElementById("mode").value);
  body.append("k", document.getElementById("k").value || "12");
  const where = document.getElementById("where").value.trim();
  if (where) body.append("where", where);
  if (!query && !photo) {
    statusLine.className = "error";
    statusLine.textContent = "Type a description or choose a photo.";
    return;
  }
  statusLine.className = "";
  statusLine.textContent = "Searching…";
  const started = performance.now();
  try {
    const response = await fetch("/search", { method: "POST", body });
    const data = await response.json();
    if (!response.ok) {
      const detail = Array.isArray(data.detail) ? data.detail.map((d) => d.loc.slice(-1) + ": " + d.msg).join("; ") : data.detail;
      throw new Error(detail || response.statusText);
    }
    results.replaceChildren(...data.results.map((item) => card(item, data.mode)));
    results.dataset.mode = data.mode;
    statusLine.textContent = `${data.count} results (${data.mode}) in ${Math.round(performance.now() - started)} ms`;
  } catch (err) {
    statusLine.className = "error";
    statusLine.textContent = "Error: " + err.message;
    results.replaceChildren();
  }
});
