// The shop's search page: a search bar (words, a photo, or both), filters, sorting, "show more",
// and a product view at /items/ID. The whole search lives in the URL, so reload, Back and
// shared links work; an uploaded photo is kept in sessionStorage for the browser session.
// ?debug=1 in the address shows what shoppers do not need: each result's score and the time a search took.
"use strict";

const PAGE = 24;
const $ = (id) => document.getElementById(id);
const DEBUG = new URLSearchParams(location.search).get("debug") === "1";  // kept in every address the page makes
let info = { display: { title: "title" }, facets: [], columns: {} };
let photo = null; // { blob, name, url } of the query photo
let state = emptyState();
let lastFacets = null;
let searchSeq = 0; // answers to superseded searches are dropped
let lastSearch = null; // the results page a product view goes back to

function emptyState() {
  return { q: "", mode: "auto", sort: "", filters: {}, where: "", min: "", img: "", pages: 1, photo: false, crop: "" };
}

// ---------------------------------------------------------------- the URL holds the state

function stateFromUrl() {
  const p = new URLSearchParams(location.search);
  const s = emptyState();
  s.q = p.get("q") || "";
  s.mode = p.get("mode") || "auto";
  s.sort = p.get("sort") || "";
  try { s.filters = JSON.parse(p.get("f") || "{}") || {}; } catch { s.filters = {}; }
  if (typeof s.filters !== "object" || Array.isArray(s.filters)) s.filters = {};
  for (const [column, value] of Object.entries(s.filters)) {  // {"color": "red"}, as the API takes it: one value is a list of one
    if (value === null || typeof value !== "object") s.filters[column] = [value];
  }
  s.where = p.get("where") || "";
  s.min = p.get("min") || "";
  s.img = p.get("img") || "";
  s.pages = Math.max(1, Math.min(20, parseInt(p.get("pages") || "1", 10) || 1));
  s.photo = p.get("photo") === "1";
  s.crop = parseCrop(p.get("crop")) ? p.get("crop") : "";  // a part of the photo (see "a part of the photo" below)
  return s;
}

function searchUrl(s) {
  const p = new URLSearchParams();
  if (s.q) p.set("q", s.q);
  if (s.mode !== "auto") p.set("mode", s.mode);
  if (s.sort) p.set("sort", s.sort);
  if (Object.keys(s.filters).length) p.set("f", JSON.stringify(s.filters));
  if (s.where) p.set("where", s.where);
  if (s.min) p.set("min", s.min);
  if (s.img) p.set("img", s.img);
  if (s.pages > 1) p.set("pages", String(s.pages));
  if (s.photo) p.set("photo", "1");
  if (s.photo && s.crop) p.set("crop", s.crop);
  if (DEBUG) p.set("debug", "1");
  const query = p.toString();
  return "/" + (query ? "?" + query : "");
}

function go(url, replace = false) {
  const entry = { back: lastSearch }; // kept by the browser across reloads: a product page knows its results
  if (replace) history.replaceState(entry, "", url);
  else history.pushState(entry, "", url);
  route();
}

window.addEventListener("popstate", route);

async function route() {
  const match = location.pathname.match(/^\/items\/(.+)$/);
  $("search-view").hidden = !!match;
  $("product-view").hidden = !match;
  if (match) return showProduct(decodeURIComponent(match[1]));
  lastSearch = location.pathname + location.search;
  document.title = "Product search";
  state = stateFromUrl();
  await restorePhoto();
  fillForm();
  return runSearch();
}

// ---------------------------------------------------------------- the photo

function setPhoto(blob, name) {
  if (photo) URL.revokeObjectURL(photo.url);
  photo = blob ? { blob, name: name || "photo", url: URL.createObjectURL(blob) } : null;
  $("photo-chip").hidden = !photo;
  if (photo) {
    $("preview").hidden = false;
    $("preview").src = photo.url;
    $("preview").alt = "your photo: " + photo.name;
    $("photo-name").textContent = photo.name;
  }
}

$("preview").addEventListener("error", () => { $("preview").hidden = true; });  // not a picture after all: the name alone

function acceptFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError("That file is not a picture we can read (PNG, JPEG, WebP, GIF…).");
    return;
  }
  setPhoto(file, file.name);
  state.crop = "";  // a new photo: the whole of it, until a part is chosen
  const reader = new FileReader(); // kept for this browser session: reload and Back keep the photo
  reader.onload = () => {
    try { sessionStorage.setItem("photo", JSON.stringify({ name: file.name, data: reader.result })); } catch { /* too large to keep */ }
  };
  reader.readAsDataURL(file);
  submitSearch();
}

async function restorePhoto() {
  if (!state.photo) { setPhoto(null); return; }
  if (photo) return;
  const kept = JSON.parse(sessionStorage.getItem("photo") || "null");
  if (!kept) { state.photo = false; return; }
  setPhoto(await (await fetch(kept.data)).blob(), kept.name);
}

$("query-image").addEventListener("change", (e) => acceptFile(e.target.files[0]));
$("clear-image").addEventListener("click", () => { setPhoto(null); sessionStorage.removeItem("photo"); $("query-image").value = ""; submitSearch(); });
const dropZone = $("drop-zone");
["dragenter", "dragover"].forEach((t) => dropZone.addEventListener(t, (e) => { e.preventDefault(); dropZone.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => dropZone.addEventListener(t, () => dropZone.classList.remove("over")));
dropZone.addEventListener("drop", (e) => { e.preventDefault(); acceptFile(e.dataTransfer.files[0]); });
document.addEventListener("paste", (e) => {
  const file = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
  if (file) { e.preventDefault(); acceptFile(file); }
});

// ---------------------------------------------------------------- the search

function fillForm() {
  $("query-text").value = state.q;
  $("mode").value = state.mode;
  $("sort").value = state.sort;
  $("where").value = state.where;
  $("min-score").value = state.min;
  $("image-url").value = state.img;
  if (state.where || state.min || state.img || state.mode !== "auto") $("advanced").open = true;
  markCrop();
}

// The minimum score box: empty or "auto" is the service's calibrated floor, "off" none, else a number ("0,4" too).
function minScore(text) {
  if (text === "" || text === "auto") return undefined;
  if (text === "off") return "off";
  const value = Number(text.replace(",", "."));
  return Number.isFinite(value) ? value : undefined;
}

function submitSearch() {
  state.q = $("query-text").value.trim();
  state.mode = $("mode").value;
  state.where = $("where").value.trim();
  state.min = $("min-score").value.trim();
  state.img = $("image-url").value.trim();
  state.photo = !!photo;
  state.pages = 1;
  go(searchUrl(state));
}

$("search-form").addEventListener("submit", (e) => { e.preventDefault(); submitSearch(); });
$("sort").addEventListener("change", () => { state.sort = $("sort").value; state.pages = 1; go(searchUrl(state)); });
$("more").addEventListener("click", () => { state.pages += 1; history.replaceState(null, "", searchUrl(state)); runSearch(true); });

function hasQuery() {
  return !!(state.q || photo || state.img);
}

function requestBody(fields) {
  if (!photo || fields.like !== undefined) {
    return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(fields) };
  }
  const form = new FormData();
  for (const [key, value] of Object.entries(fields)) {
    if (value !== undefined && value !== null && value !== "") form.append(key, typeof value === "object" ? JSON.stringify(value) : value);
  }
  form.append("image", photo.blob, photo.name);
  return { method: "POST", body: form };
}

async function runSearch(append = false) {
  const seq = ++searchSeq;
  clearError();
  if (!hasQuery()) {
    $("results").replaceChildren();
    $("more").hidden = true;
    $("status").textContent = "Type what you are looking for, or drop a photo in the search bar.";
    const facets = await fetchJson("/facets?" + new URLSearchParams({ filters: JSON.stringify(state.filters) })).catch(() => null);
    if (seq === searchSeq && facets) renderFacets(facets);
    return;
  }
  const offset = append ? (state.pages - 1) * PAGE : 0;
  const fields = {
    text: state.q || undefined, mode: state.mode, k: append ? PAGE : state.pages * PAGE, offset,
    where: state.where || undefined, filters: Object.keys(state.filters).length ? state.filters : undefined,
    sort_by: state.sort || undefined, min_score: minScore(state.min),
    image_url: !photo && state.img ? state.img : undefined, facets: !append,
    crop: photo && state.crop ? parseCrop(state.crop) : undefined,
  };
  $("status").textContent = "Searching…";
  $("status").classList.remove("no-close-match");
  try {
    let data = await fetchJson("/search", requestBody(fields));
    if (seq !== searchSeq) return;
    // Nothing scored above the calibrated floor: say so, as a shop would, and show the nearest products anyway.
    const noCloseMatch = !append && data.no_close_match;
    if (noCloseMatch) {
      data = await fetchJson("/search", requestBody({ ...fields, min_score: "off", k: PAGE }));
      if (seq !== searchSeq) return;
      data.has_more = false;
    }
    const cards = data.results.map((item) => card(item, data.mode));
    if (append) $("results").append(...cards); else $("results").replaceChildren(...cards);
    $("results").dataset.mode = data.mode;
    $("more").hidden = !data.has_more;
    const shown = $("results").children.length;
    if (noCloseMatch) {
      const what = state.q ? `“${state.q}”` : "this photo";
      $("status").replaceChildren(`No close matches for ${what}` + (shown ? " — showing related products" : ""));
      $("status").classList.add("no-close-match");
    } else if (!shown) {  // a filter or the minimum score left nothing: say what to loosen
      const loosen = [Object.keys(state.filters).length && "remove a filter", state.where && "loosen the condition",
                      typeof minScore(state.min) === "number" && "lower the minimum score"].filter(Boolean);
      $("status").replaceChildren("No products match" + (loosen.length ? `: ${loosen.join(", or ")}.` : "."));
    } else {
      // The total counts every page; where the server could not count it (a score floor it did not reach), what is shown.
      const total = typeof data.total === "number" ? data.total : null;
      $("status").replaceChildren(total !== null ? products(total) : `${products(shown)}${data.has_more ? "+" : ""}`);
      if (DEBUG) $("status").append(muted(` · ${Math.round(data.took_ms)} ms`));
      if (data.mode === "fused") $("status").append(contributionLegend());
    }
    if (data.facets) renderFacets(data.facets);
  } catch (err) {
    if (seq !== searchSeq) return;
    $("results").replaceChildren();
    $("more").hidden = true;
    $("status").textContent = "";
    showError(err.message);
  }
}

async function fetchJson(url, options = {}) {
  let response;
  try {
    response = await fetch(url, { ...options, headers: { Accept: "application/json", ...(options.headers || {}) } });
  } catch {
    throw new Error("The search service is not answering. Try again in a moment.");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(humanError(response.status, data.detail));
  return data;
}

function humanError(status, detail) {
  const text = Array.isArray(detail) ? detail.map((d) => `${d.loc.slice(-1)[0]}: ${d.msg}`).join("; ") : String(detail || "");
  if (status === 413) return "That photo is too large. Try a smaller picture.";
  if (/not an image|cannot identify|corrupt|truncated|empty file|decompression|pixels/i.test(text)) {
    return "That file is not a picture we can read (PNG, JPEG, WebP, GIF…).";
  }
  if (/^where|filter/i.test(text)) return "The filter could not be used. " + text.replace(/^where: /, "");
  if (/image_url|download/i.test(text)) return "We could not fetch a photo from that address. " + text;
  if (status === 404) return "That product is no longer in the catalog.";
  return text || `Something went wrong (error ${status}).`;
}

function showError(message) {
  $("status").className = "error";
  $("status").textContent = message;
}

function clearError() {
  $("status").className = "";
}

// ---------------------------------------------------------------- results

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function muted(text) {
  return el("span", "muted", text);
}

function products(n) {
  return `${n.toLocaleString()} ${n === 1 ? "product" : "products"}`;
}

let moneyFormat = null;
function money(value) {
  // In the shop's currency (display.currency), as the shopper's browser writes amounts; without one, a plain number.
  if (!moneyFormat) {
    const currency = info.display.currency;
    try {
      moneyFormat = currency ? new Intl.NumberFormat(undefined, { style: "currency", currency })
        : new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
    } catch {  // a code this browser does not know
      moneyFormat = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
    }
  }
  return moneyFormat.format(value);
}

function price(item) {
  const column = info.display.price;
  const value = column ? item[column] : null;
  return typeof value === "number" ? money(value) : "";
}

function hasPhoto(item) {
  // The server leaves `image` empty where an item has no photo to show: no thumbnail is asked for.
  return item.image !== null && item.image !== undefined && item.image !== "";
}

function titleOf(item) {
  const title = item[info.display.title];
  if (title !== null && title !== undefined && title !== "") return String(title);
  // Untitled: the start of its description (the words that fit in 60 characters), else (a photo from a folder) its
  // file name rather than its whole path.
  const description = String(item.description ?? "").trim();
  if (description.length > 60) {
    const space = description.lastIndexOf(" ", 60);
    return description.slice(0, space > 0 ? space : 60) + "…";
  }
  if (description) return description;
  const id = String(item.id);
  const name = id.split("/").pop().replace(/\.(jpe?g|png|webp|gif|tiff?|bmp|avif|heic|heif)$/i, "");
  return name && name !== id ? name : `Item ${id}`;
}

function productLink(id) {
  return "/items/" + encodeURIComponent(id);
}

function productPage(id) {
  return productLink(id) + (DEBUG ? "?debug=1" : "");
}

function card(item, mode) {
  const li = el("li", "card");
  const link = el("a");
  link.href = productPage(item.id);
  link.addEventListener("click", (e) => {
    if (e.ctrlKey || e.metaKey || e.shiftKey) return; // a new tab gets the product page from the server
    e.preventDefault();
    go(link.href);
  });
  if (hasPhoto(item)) {
    const img = el("img");
    img.src = productLink(item.id) + "/image";
    img.alt = titleOf(item);
    img.loading = "lazy";
    img.addEventListener("load", () => img.classList.add("loaded"));
    img.addEventListener("error", () => img.replaceWith(el("span", "no-photo", "No photo")));  // its file is gone since
    link.append(img);
  } else link.append(el("span", "no-photo", "No photo"));
  link.append(el("span", "title", titleOf(item)));
  if (info.display.brand && item[info.display.brand]) link.append(el("span", "muted small", item[info.display.brand]));
  const extra = (info.display.columns || []).map((c) => item[c]).filter((v) => v !== null && v !== undefined && v !== "");
  if (extra.length) link.append(el("span", "muted small", extra.join(" · ")));
  const line = el("span", "line");
  line.append(el("span", "price", price(item)));
  if (DEBUG) {
    line.append(el("span", "score", item.score.toFixed(2)));
    line.lastChild.title = "how well it matches (1 = the same product)";
  }
  link.append(line);
  li.append(link);
  if (mode === "fused" && item.image_score !== undefined) li.append(contributionBar(item));
  return li;
}

function contributionLegend() {
  // What the bar under each fused result means: how much of its match came from the photo and from the words.
  const legend = el("span", "legend muted small");
  legend.append(" · matched by ", el("span", "swatch by-photo"), " the photo and ", el("span", "swatch by-words"), " the words");
  return legend;
}

function contributionBar(item) {
  if (item.word_match) {  // first because the words name it, then ordered by the photo: a share bar would say "photo only"
    const note = el("div", "contrib named small", "✓ matches your words");
    note.title = "the words name it (its category, tag or colour)"
      + (DEBUG ? `; ordered by the photo ${item.image_score.toFixed(2)}` : "");
    return note;
  }
  const photoPart = Math.max(item.image_score, 0), wordsPart = Math.max(item.text_score, 0);
  const total = photoPart + wordsPart || 1;
  const bar = el("div", "contrib");
  bar.setAttribute("role", "img");
  const share = Math.round(100 * photoPart / total);
  bar.setAttribute("aria-label", DEBUG ? `matched by the photo ${item.image_score.toFixed(2)}, by the words ${item.text_score.toFixed(2)}`
    : `matched ${share}% by the photo, ${100 - share}% by the words`);
  bar.title = bar.getAttribute("aria-label");
  const a = el("span", "by-photo"); a.style.width = (100 * photoPart / total) + "%";
  const b = el("span", "by-words"); b.style.width = (100 * wordsPart / total) + "%";
  bar.append(a, b);
  return bar;
}

// ---------------------------------------------------------------- filters (facets)

function label(column) {
  const text = column.replace(/_cm$/, " (cm)").replace(/_/g, " ");
  return text.charAt(0).toUpperCase() + text.slice(1);
}

let facetTimer = null;
function filtersChanged() {
  clearTimeout(facetTimer);
  facetTimer = setTimeout(() => { state.pages = 1; go(searchUrl(state)); }, 250);
}

function renderFacets(facets) {
  lastFacets = facets;
  const box = $("facets");
  box.replaceChildren();
  for (const [column, facet] of Object.entries(facets)) {
    const group = el("fieldset", "facet");
    group.dataset.column = column;
    group.append(el("legend", "", label(column)));
    if (facet.kind === "values") {
      if (!facet.values.length && !(state.filters[column] || []).length) continue;  // nothing to pick: no bare heading
      valuesFacet(group, column, facet);
    } else if (facet.min !== null && facet.min < facet.max) rangeFacet(group, column, facet);
    else continue;
    box.append(group);
  }
  if (Object.keys(state.filters).length) {
    const clear = el("button", "link", "Clear all filters");
    clear.type = "button";
    clear.addEventListener("click", () => { state.filters = {}; filtersChanged(); });
    box.append(clear);
  }
}

function valuesFacet(group, column, facet) {
  const chosen = new Set((state.filters[column] || []).map(String));
  const values = facet.values.slice();
  for (const value of state.filters[column] || []) if (!values.some((v) => String(v.value) === String(value))) values.push({ value, count: 0 });
  const byText = new Map(values.map((v) => [String(v.value), v.value]));
  for (const { value, count } of values) {
    const row = el("label", "option");
    const box = el("input");
    box.type = "checkbox";
    box.checked = chosen.has(String(value));
    box.addEventListener("change", () => {
      const now = new Set((state.filters[column] || []).map(String));
      if (box.checked) now.add(String(value)); else now.delete(String(value));
      const kept = [...now].map((text) => byText.get(text));
      if (kept.length) state.filters[column] = kept; else delete state.filters[column];
      filtersChanged();
    });
    row.append(box, el("span", "", String(value)), muted(String(count)));
    group.append(row);
  }
}

function rangeStops(facet) {
  // The slider's positions: the column's distinct quantiles (from /facets), so that each step passes about as many
  // products wherever it is (prices from 19 to 42,324 with a median of 77: a linear slider spends its whole width on
  // a few expensive items). Without quantiles, 100 even steps.
  const values = (facet.quantiles || []).filter((v) => typeof v === "number");
  const stops = values.length > 1 ? [...new Set(values)] : Array.from({ length: 101 }, (_, i) => facet.min + (facet.max - facet.min) * i / 100);
  if (stops[0] > facet.min) stops.unshift(facet.min);
  if (stops[stops.length - 1] < facet.max) stops.push(facet.max);
  return stops;
}

function rangeText(column, value) {
  if (column === info.display.price) return money(value);
  return value.toLocaleString(undefined, { maximumFractionDigits: 2 });
}

function currencySymbol() {
  if (!info.display.currency) return "";
  try {
    const parts = new Intl.NumberFormat(undefined, { style: "currency", currency: info.display.currency }).formatToParts(0);
    return parts.find((part) => part.type === "currency")?.value || "";
  } catch { return ""; }
}

function rangeFacet(group, column, facet) {
  // Two boxes to type a bound in, and a two-thumb slider on the quantile scale; either sets the filter.
  const chosen = state.filters[column] || {};
  const stops = rangeStops(facet);
  const last = stops.length - 1;
  const at = (value, end) => {  // the slider position of a bound: the stop at or inside it
    if (end === "min") { const i = stops.findIndex((s) => s >= value); return i < 0 ? last : i; }
    for (let i = last; i >= 0; i--) if (stops[i] <= value) return i;
    return 0;
  };
  const name = label(column);
  const unit = column === info.display.price ? currencySymbol() : "";
  const boxes = el("div", "range-boxes");
  const dual = el("div", "dual");
  const fill = el("span", "fill");
  dual.append(el("span", "track"), fill);
  const box = {}, slider = {};
  for (const end of ["min", "max"]) {
    const field = el("label", "bound");
    const input = el("input");
    input.type = "number";
    input.inputMode = "decimal";
    input.step = "any";
    input.dataset.end = end;
    input.placeholder = (end === "min" ? facet.min : facet.max).toLocaleString(undefined, { maximumFractionDigits: 2, useGrouping: false });
    input.value = chosen[end] ?? "";
    input.setAttribute("aria-label", `${name}, ${end === "min" ? "from" : "up to"}`);
    if (unit) field.append(el("span", "unit", unit));
    field.append(input);
    box[end] = input;
    boxes.append(field);
    if (end === "min") boxes.append(el("span", "muted", "–"));

    const range = el("input");
    range.type = "range";
    range.min = 0;
    range.max = last;
    range.step = 1;
    range.value = chosen[end] !== undefined ? at(chosen[end], end) : (end === "min" ? 0 : last);
    range.setAttribute("aria-label", `${name}, ${end === "min" ? "from" : "up to"} (slider)`);
    slider[end] = range;
    dual.append(range);
  }
  const show = () => {  // the thumbs' values where the shopper sees them: the boxes, the fill, what a screen reader says
    const lo = Number(slider.min.value), hi = Number(slider.max.value);
    fill.style.left = (100 * Math.min(lo, hi) / last) + "%";
    fill.style.width = (100 * Math.abs(hi - lo) / last) + "%";
    for (const end of ["min", "max"]) slider[end].setAttribute("aria-valuetext", rangeText(column, stops[Number(slider[end].value)]));
    slider.min.style.zIndex = lo > last / 2 ? 3 : 1;  // both thumbs at the top end: the lower one stays reachable
  };
  const apply = (lo, hi) => {
    const range = {};
    if (lo !== null && hi !== null && lo > hi) [lo, hi] = [hi, lo];
    if (lo !== null && lo > facet.min) range.min = lo;
    if (hi !== null && hi < facet.max) range.max = hi;
    if (Object.keys(range).length) state.filters[column] = range; else delete state.filters[column];
    filtersChanged();
  };
  for (const end of ["min", "max"]) {
    slider[end].addEventListener("input", () => {
      const i = Number(slider[end].value);
      box[end].value = i === (end === "min" ? 0 : last) ? "" : stops[i];
      show();
    });
    slider[end].addEventListener("change", () => {
      const lo = Number(slider.min.value), hi = Number(slider.max.value);
      apply(stops[Math.min(lo, hi)], stops[Math.max(lo, hi)]);
    });
    const typed = () => {
      const read = (input) => (input.value.trim() === "" || !Number.isFinite(Number(input.value)) ? null : Number(input.value));
      const lo = read(box.min), hi = read(box.max);
      const before = state.filters[column] || {};
      if ((lo ?? undefined) === before.min && (hi ?? undefined) === before.max) return;  // nothing new
      apply(lo, hi);
    };
    box[end].addEventListener("change", typed);
    box[end].addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); typed(); } });
  }
  show();
  group.append(boxes, dual);
}

// ---------------------------------------------------------------- the product view

let productSeq = 0;  // answers for a product the shopper has left are dropped

function clearProduct() {
  // Nothing of the last product stays on the page while the next one loads: its words in "This, but…", its rows.
  $("product-image").onload = null;
  $("product-image").removeAttribute("src");
  for (const part of ["product-title", "product-brand", "product-price"]) $(part).textContent = "";
  $("product-details").replaceChildren();
  $("but-text").value = "";
  $("but-heading").textContent = "";
  $("but-section").hidden = true;
  for (const row of ["but-row", "looks-row", "described-row"]) $(row).replaceChildren();
}

async function showProduct(id) {
  const seq = ++productSeq;
  window.scrollTo(0, 0);
  clearProduct();
  $("back").href = history.state?.back || lastSearch || "/";
  let item;
  try {
    item = await fetchJson(productLink(id));
  } catch (err) {
    if (seq === productSeq) $("product-title").textContent = err.message;
    return;
  }
  if (seq !== productSeq) return;
  document.title = titleOf(item);
  const photo = hasPhoto(item);
  for (const part of ["product-image", "but-form", "looks-section"]) $(part).hidden = false;
  $("product-no-photo").hidden = true;
  // "Looks like this" once the photo shows: an item whose file is gone has none to search by (noPhoto hides the row).
  $("product-image").onload = photo ? () => fillRow("looks-row", { like: id, mode: "image", k: 8 }, seq) : null;
  if (photo) $("product-image").src = productLink(id) + "/image?size=512";
  else noPhoto();
  $("product-image").alt = titleOf(item);
  $("product-title").textContent = titleOf(item);
  $("product-brand").textContent = info.display.brand ? (item[info.display.brand] || "") : "";
  $("product-price").textContent = price(item);
  const rows = Object.entries(item).filter(([k, v]) => v !== null && v !== "" && k !== "image" && k !== info.display.title)
    .map(([k, v]) => {
      const tr = el("tr");
      tr.append(el("th", "", label(k)), el("td", "", k === info.display.price ? price(item) : String(v)));  // as in the heading
      return tr;
    });
  $("product-details").replaceChildren(...rows);
  $("but-form").dataset.id = id;
  fillRow("described-row", { like: id, mode: "text", k: 8 }, seq);
}

async function fillRow(rowId, fields, seq) {
  const row = $(rowId);
  row.replaceChildren(el("li", "muted", "…"));
  try {
    const data = await fetchJson("/search", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(fields) });
    if (seq !== productSeq) return;
    row.replaceChildren(...data.results.map((item) => card(item, data.mode)));
    if (!data.results.length) row.replaceChildren(el("li", "muted", "Nothing like it yet."));
  } catch (err) {
    if (seq === productSeq) row.replaceChildren(el("li", "muted", err.message));
  }
}

$("but-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const words = $("but-text").value.trim();
  if (!words) return;
  $("but-heading").textContent = `This, but ${words}`;
  $("but-section").hidden = false;
  fillRow("but-row", { like: $("but-form").dataset.id, text: words, k: 8 }, productSeq);
});

function noPhoto() {
  // An item without a photo (none given, or its file is gone: indexed by its text) shows a placeholder instead of a
  // broken picture, and neither "This, but…" nor "Looks like this", which need its photo.
  for (const part of ["product-image", "but-form", "looks-section"]) $(part).hidden = true;
  $("product-no-photo").hidden = false;
}

$("product-image").addEventListener("error", noPhoto);

$("back").addEventListener("click", (e) => { e.preventDefault(); go($("back").getAttribute("href")); });

// ---------------------------------------------------------------- a part of the photo (crop)
// The shopper drags a box over their photo, or a product's (mouse, pen or touch: pointer events), and searches by
// that part; the box starts on the photo's most salient region (POST /salient). The box is fractions of the photo,
// [x0, y0, x1, y1], as the API's `crop` takes it; the URL keeps it (crop=x0,y0,x1,y1) with the photo.

const MIN_SIDE = 0.04; // the smallest box, as a share of the photo's width and height
const cropper = { box: [0, 0, 1, 1], item: null, drag: null, touched: false };

function parseCrop(text) {
  const v = String(text || "").split(",").map(Number);
  return v.length === 4 && v.every((x) => Number.isFinite(x) && x >= 0 && x <= 1) && v[0] < v[2] && v[1] < v[3] ? v : null;
}

function markCrop() {
  const button = $("crop-open");
  button.classList.toggle("on", !!state.crop);
  button.setAttribute("aria-pressed", String(!!state.crop));
  button.title = state.crop ? "Searching a part of the photo: change it" : "Search a part of the photo";
}

const clamp = (v, lo = 0, hi = 1) => Math.min(hi, Math.max(lo, v));

function setBox(box) {
  let [x0, y0, x1, y1] = box.map((v) => clamp(v));
  if (x1 - x0 < MIN_SIDE) { x1 = clamp(x0 + MIN_SIDE); x0 = x1 - MIN_SIDE; }
  if (y1 - y0 < MIN_SIDE) { y1 = clamp(y0 + MIN_SIDE); y0 = y1 - MIN_SIDE; }
  cropper.box = [x0, y0, x1, y1];
  const style = $("crop-box").style;
  style.left = 100 * x0 + "%"; style.top = 100 * y0 + "%";
  style.width = 100 * (x1 - x0) + "%"; style.height = 100 * (y1 - y0) + "%";
  $("crop-box").dataset.box = cropper.box.map((v) => v.toFixed(3)).join(",");
}

async function openCrop(imageUrl, salientRequest, current) {
  cropper.touched = false;
  $("crop-stage").dataset.ready = "";
  $("crop-image").src = imageUrl;
  $("crop-dialog").hidden = false;
  document.body.classList.add("modal-open");
  setBox(current || [0, 0, 1, 1]);
  $("crop-box").focus();
  if (!current) {  // the most salient region, unless the shopper has moved the box meanwhile
    const data = await fetchJson("/salient", salientRequest).catch(() => null);
    if (data && !cropper.touched && !$("crop-dialog").hidden) setBox(data.box);
  }
  $("crop-stage").dataset.ready = "1";
}

function closeCrop() {
  $("crop-dialog").hidden = true;
  cropper.drag = null;
  document.body.classList.remove("modal-open");
}

function pointAt(e) {
  const r = $("crop-stage").getBoundingClientRect();
  return [clamp((e.clientX - r.left) / r.width), clamp((e.clientY - r.top) / r.height)];
}

function dragged(drag, p) {
  const dx = p[0] - drag.start[0], dy = p[1] - drag.start[1];
  let [x0, y0, x1, y1] = drag.box;
  if (drag.kind === "move") {
    const w = x1 - x0, h = y1 - y0;
    x0 = clamp(x0 + dx, 0, 1 - w); y0 = clamp(y0 + dy, 0, 1 - h);
    return [x0, y0, x0 + w, y0 + h];
  }
  if (drag.kind === "draw") {
    return [Math.min(drag.start[0], p[0]), Math.min(drag.start[1], p[1]), Math.max(drag.start[0], p[0]), Math.max(drag.start[1], p[1])];
  }
  if (drag.corner.includes("w")) x0 = Math.min(x0 + dx, x1 - MIN_SIDE); else x1 = Math.max(x1 + dx, x0 + MIN_SIDE);
  if (drag.corner.includes("n")) y0 = Math.min(y0 + dy, y1 - MIN_SIDE); else y1 = Math.max(y1 + dy, y0 + MIN_SIDE);
  return [x0, y0, x1, y1];
}

const stage = $("crop-stage");
stage.addEventListener("pointerdown", (e) => {
  if (e.pointerType === "mouse" && e.button !== 0) return;
  e.preventDefault();  // no text selection, no image drag, no scrolling under a finger
  const p = pointAt(e), corner = e.target.dataset.corner;
  const kind = corner ? "corner" : e.target === $("crop-box") ? "move" : "draw";  // outside the box: draw a new one
  cropper.drag = { kind, corner, start: p, box: kind === "draw" ? [...p, ...p] : cropper.box.slice(), pointer: e.pointerId };
  cropper.touched = true;
  stage.setPointerCapture(e.pointerId);
});
stage.addEventListener("pointermove", (e) => {
  if (!cropper.drag || e.pointerId !== cropper.drag.pointer) return;
  e.preventDefault();
  setBox(dragged(cropper.drag, pointAt(e)));
});
for (const type of ["pointerup", "pointercancel"]) {
  stage.addEventListener(type, (e) => {
    if (cropper.drag && e.pointerId === cropper.drag.pointer) cropper.drag = null;
  });
}
$("crop-box").addEventListener("keydown", (e) => {  // arrows move the box; with Shift they resize it
  const step = 0.02, moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
  if (!moves[e.key]) return;
  e.preventDefault();
  cropper.touched = true;
  const [dx, dy] = moves[e.key];
  const drag = e.shiftKey ? { kind: "corner", corner: "se", start: [0, 0], box: cropper.box } : { kind: "move", start: [0, 0], box: cropper.box };
  setBox(dragged(drag, [dx, dy]));
});

function applyCrop(box) {
  const whole = !box || (box[0] <= 0.001 && box[1] <= 0.001 && box[2] >= 0.999 && box[3] >= 0.999);
  const text = whole ? "" : box.map((v) => v.toFixed(3)).join(",");
  const item = cropper.item;
  closeCrop();
  if (item === null) {
    state.crop = text;
    state.pages = 1;
    go(searchUrl(state));
  } else searchItemPart(item, text);
}

async function searchItemPart(id, text) {
  // A product's photo becomes the query photo, as if uploaded (kept for the session), cut to the box.
  const response = await fetch(productLink(id) + "/image?size=1024").catch(() => null);
  if (!response || !response.ok) { $("product-title").textContent = "We could not read this product's photo."; return; }
  const blob = await response.blob();
  const name = `${$("product-title").textContent || "product"}.png`;
  setPhoto(blob, name);
  const reader = new FileReader();
  reader.onload = () => {
    try { sessionStorage.setItem("photo", JSON.stringify({ name, data: reader.result })); } catch { /* too large to keep */ }
  };
  reader.readAsDataURL(blob);
  state = emptyState();
  state.photo = true;
  state.crop = text;
  go(searchUrl(state));
}

$("crop-open").addEventListener("click", () => {
  if (!photo) return;
  const form = new FormData();
  form.append("image", photo.blob, photo.name);
  cropper.item = null;
  openCrop(photo.url, { method: "POST", body: form }, parseCrop(state.crop));
});
$("product-crop").addEventListener("click", () => {
  const id = $("but-form").dataset.id;
  cropper.item = id;
  openCrop(productLink(id) + "/image?size=1024",
           { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ like: id }) }, null);
});
$("crop-search").addEventListener("click", () => applyCrop(cropper.box));
$("crop-whole").addEventListener("click", () => applyCrop(null));
$("crop-close").addEventListener("click", closeCrop);
$("crop-dialog").addEventListener("click", (e) => { if (e.target === $("crop-dialog")) closeCrop(); });
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && !$("crop-dialog").hidden) closeCrop(); });

// ---------------------------------------------------------------- start

(async function start() {
  try { info = await fetchJson("/info"); } catch { /* the page still searches with the defaults */ }
  if (info.display.price) {
    for (const [value, text] of [[info.display.price, "Price: low to high"], ["-" + info.display.price, "Price: high to low"]]) {
      const option = el("option", "", text);
      option.value = value;
      $("sort").append(option);
    }
  }
  if (window.matchMedia("(max-width: 700px)").matches) $("filters").open = false;
  await route();
})();
