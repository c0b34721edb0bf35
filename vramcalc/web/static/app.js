// vramcalc web page: builds the form from /api/options, asks /api/estimate, /api/fits and /api/plan on every change.
// Every user-provided string reaches the page through textContent or an attribute, never through innerHTML.
"use strict";

const GIB = 2 ** 30;
const HARDWARE = ["num_gpus", "sharding", "fsdp_shard", "offload"];  // placed beside the GPU; the rest are "setup"
const FITS_COLUMNS = [
  ["gpu", "GPU"], ["memory_gib", "GiB"], ["total_gib", "needs GiB"], ["fits", "fits"], ["max_batch_size", "max batch"],
];

const state = { options: null, fields: [], config: null, configName: null, lengths: null, lengthsName: null,
                generation: 0, timer: null, lastBody: null, lastEstimate: null };
const FORM_ROOM_BYTES = 64 * 1024;  // room in the request body for the form beside a length file
let maxLengthsBytes = 4 * 1024 * 1024 - FORM_ROOM_BYTES;  // the server's body limit (/api/options) less that room

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

const gib = (bytes) => (bytes / GIB).toFixed(2);
const grouped = (n) => Number(n).toLocaleString("en-US");

// -- the form -------------------------------------------------------------------------------------------------------
function control(field) {
  let input;
  if (field.kind === "choice") {
    input = el("select", { id: "f-" + field.name, name: field.name });
    for (const choice of field.choices) {
      input.appendChild(el("option", { value: choice.value, title: choice.help || null }, choice.value));
    }
  } else if (field.kind === "bool") {
    input = el("input", { id: "f-" + field.name, name: field.name, type: "checkbox" });
  } else if (field.kind === "int" || field.kind === "float") {
    input = el("input", { id: "f-" + field.name, name: field.name, type: "number", inputmode: "decimal",
                          step: field.kind === "int" ? "1" : "any", placeholder: field.optional ? "none" : null });
  } else {
    input = el("input", { id: "f-" + field.name, name: field.name, type: "text", spellcheck: "false",
                          placeholder: field.default === null ? "none" : String(field.default) });
  }
  return input;
}

function setValue(field, value) {
  const input = $("f-" + field.name);
  if (field.kind === "bool") input.checked = value === true || value === "true" || value === "1";
  else input.value = value === null || value === undefined ? "" : String(value);
}

function getValue(field) {
  const input = $("f-" + field.name);
  if (field.kind === "bool") return input.checked;
  return input.value.trim();
}

function isDefault(field, value) {
  if (field.kind === "bool") return value === field.default;
  if (value === "") return true;
  if (field.default === null) return false;
  if (field.kind === "int" || field.kind === "float") return Number(value) === Number(field.default);
  return value === String(field.default);
}

function buildField(field, parent) {
  const wrap = el("div", { class: field.kind === "bool" ? "field check" : "field", id: "w-" + field.name,
                           title: field.help || null });
  const input = control(field);
  const label = el("label", { for: input.id }, field.label);
  if (field.kind === "bool") { wrap.appendChild(input); wrap.appendChild(label); }
  else { wrap.appendChild(label); wrap.appendChild(input); }
  wrap.appendChild(el("div", { class: "err", id: "err-" + field.name }));
  wrap.addEventListener("focusin", () => showHelp(field));
  wrap.addEventListener("mouseenter", () => showHelp(field));
  parent.appendChild(wrap);
}

function showHelp(field) {
  const parts = [field.label + ": " + (field.help || "(no help text)")];
  if (field.choices) {
    const chosen = field.choices.find((c) => c.value === getValue(field));
    if (chosen && chosen.help) parts.push(chosen.value + ": " + chosen.help);
  }
  if (field.default !== null && field.default !== undefined && field.default !== "") parts.push("default " + field.default);
  $("help").textContent = parts.join(" — ");
}

const PLAN_FIELDS = [
  { name: "tokens", label: "dataset tokens", kind: "float", optional: true, default: null,
    help: "tokens in the training set, e.g. 1e9; none: the plan gives $ per million tokens, no hours or totals" },
  { name: "epochs", label: "epochs", kind: "float", help: "passes over the dataset", default: 1 },
  { name: "rank_by", label: "rank by", kind: "choice", help: "order of the plan table",
    choices: [{ value: "cost", help: "cheapest first" }, { value: "time", help: "fastest first" }], default: "cost" },
];

function buildForm(options) {
  state.fields = options.fields;
  const models = $("model-list");
  for (const model of options.models) {
    models.appendChild(el("option", { value: model.name }, `${model.name} (${(model.params / 1e9).toFixed(1)}B)`));
  }
  const gpu = $("f-gpu");
  gpu.appendChild(el("option", { value: "" }, "(none)"));
  for (const device of options.gpus) {
    gpu.appendChild(el("option", { value: device.name }, `${device.name} (${gib(device.memory_bytes)} GiB)`));
  }
  for (const field of options.fields) {
    buildField(field, HARDWARE.includes(field.name) ? $("hardware-fields") : $("setup-fields"));
  }
  PLAN_FIELDS[0].default = options.defaults.tokens;
  for (const field of PLAN_FIELDS) buildField(field, $("plan-fields"));
  $("w-model").addEventListener("focusin", () => {
    $("help").textContent = "model: a catalogue name (type to search), a Hugging Face ORG/NAME repo id, or upload its config.json";
  });
  $("w-gpu").addEventListener("focusin", () => {
    $("help").textContent = "gpu: the catalogue GPU the bar is drawn against (its memory as the driver reports it)";
  });
  $("trace-button").hidden = !options.allow_trace;
  maxLengthsBytes = options.max_body_bytes - FORM_ROOM_BYTES;
}

function applyDefaults(options) {
  $("f-model").value = options.defaults.model;
  $("f-gpu").value = options.defaults.gpu || "";
  for (const field of state.fields.concat(PLAN_FIELDS)) setValue(field, field.default);
}

function applyQuery(search) {
  const params = new URLSearchParams(search);
  if (params.has("model")) $("f-model").value = params.get("model");
  if (params.has("gpu")) $("f-gpu").value = params.get("gpu");
  for (const field of state.fields.concat(PLAN_FIELDS)) {
    if (params.has(field.name)) setValue(field, params.get(field.name));
  }
}

function applicable(field) {
  if (!field.methods) return true;
  const method = state.fields.find((f) => f.name === "method");
  return field.methods.includes(method ? getValue(method) : "full");
}

function refreshVisibility() {
  for (const field of state.fields) {
    const show = applicable(field);
    $("w-" + field.name).hidden = !show;
    $("f-" + field.name).disabled = !show;
  }
}

// The request: the model (or uploaded config), the GPU, and every applicable field that differs from its default,
// so that the request, the shareable URL and the CLI flags name the same things.
function collect() {
  const body = {};
  if (state.config) { body.config = state.config; body.config_name = state.configName; }
  else body.model = $("f-model").value.trim();
  body.gpu = $("f-gpu").value;
  for (const field of state.fields) {
    if (!applicable(field)) continue;
    const value = getValue(field);
    if (!isDefault(field, value)) body[field.name] = value;
  }
  for (const field of PLAN_FIELDS) {
    const value = getValue(field);
    if (!isDefault(field, value)) body[field.name] = value;
  }
  return body;
}

function queryString(body) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(body)) {
    if (key === "config" || key === "config_name") continue;
    params.set(key, String(value));
  }
  return params.toString();
}

function updateShareUrl(body) {
  const query = queryString(body);
  const url = location.origin + location.pathname + (query ? "?" + query : "");
  history.replaceState(null, "", url);
  const uploads = [state.config ? "config.json" : null, state.lengths ? "length file" : null].filter(Boolean);
  const verb = uploads.length > 1 ? "are" : "is";
  $("share-url").value = uploads.length ? url + `  (the uploaded ${uploads.join(" and ")} ${verb} not in the link)` : url;
}

// -- talking to the server ------------------------------------------------------------------------------------------
async function post(path, body) {
  let response;
  try {
    response = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                   body: JSON.stringify(body) });
  } catch (err) {
    return { ok: false, status: 0, error: { error: "the server did not answer (" + err.message + ")", field: null } };
  }
  const type = response.headers.get("Content-Type") || "";
  if (!response.ok) {
    let error = { error: `HTTP ${response.status}`, field: null };
    if (type.startsWith("application/json")) {
      try { error = await response.json(); } catch (err) { /* keep the status line */ }
    }
    return { ok: false, status: response.status, error };
  }
  if (type.startsWith("application/json")) return { ok: true, data: await response.json(), response };
  return { ok: true, data: await response.blob(), response };
}

function clearErrors() {
  for (const node of document.querySelectorAll(".err")) node.textContent = "";
  for (const node of document.querySelectorAll(".invalid")) node.classList.remove("invalid");
  $("error-banner").hidden = true;
  $("error-banner").textContent = "";
}

function showError(error) {
  const field = error.field;
  const box = field ? $("err-" + field) : null;
  if (box && !$("w-" + field)?.hidden) {
    box.textContent = error.error;
    const input = $("f-" + field);
    if (input) input.classList.add("invalid");
  } else {
    $("error-banner").textContent = error.error;
    $("error-banner").hidden = false;
  }
}

function setStale(stale) {
  for (const id of ["summary", "chart", "terms-table", "fits-table", "plan-section"]) {
    $(id).classList.toggle("stale", stale);
  }
}

// body[data-busy] is "1" from a change until the answers for it are on the page (tests wait on it).
function schedule() {
  document.body.dataset.busy = "1";
  refreshVisibility();
  clearTimeout(state.timer);
  state.timer = setTimeout(run, 200);
}

async function run() {
  const generation = ++state.generation;
  refreshVisibility();
  const body = collect();
  state.lastBody = body;
  updateShareUrl(body);
  clearErrors();
  $("status").textContent = "computing…";
  // the dataset's lengths go to the estimate only, as the CLI's `estimate --sample-lengths` (fits and plan: seq_len)
  const estimate = await post("/api/estimate", state.lengths === null ? body
    : { ...body, sample_lengths: state.lengths, sample_lengths_name: state.lengthsName });
  if (generation !== state.generation) return;
  if (!estimate.ok) {
    showError(estimate.error);
    setStale(true);
    $("status").textContent = "fix the marked field";
    document.body.dataset.busy = "0";
    return;
  }
  setStale(false);
  state.lastEstimate = estimate.data;
  renderEstimate(estimate.data);
  $("status").textContent = "estimate ready; finding the GPUs that fit…";
  const fits = await post("/api/fits", body);
  if (generation !== state.generation) return;
  if (fits.ok) renderFits(fits.data); else showError(fits.error);
  $("status").textContent = "planning time and cost…";
  const plan = await post("/api/plan", body);
  if (generation !== state.generation) return;
  if (plan.ok) renderPlan(plan.data); else showError(plan.error);
  $("status").textContent = "ready";
  document.body.dataset.busy = "0";
}

// -- rendering ------------------------------------------------------------------------------------------------------
function renderEstimate(result) {
  $("total-gib").textContent = gib(result.total_bytes) + " GiB";
  $("total-bytes").textContent = "(" + grouped(result.total_bytes) + " bytes)";
  $("total-bytes").dataset.bytes = String(result.total_bytes);
  $("phase").textContent = `${result.model} · peak at ${result.phase} · tensors ${gib(result.peak_tensor_bytes)} GiB`;
  const verdict = $("verdict");
  verdict.className = "";
  if (result.gpu) {
    const fits = result.gpu.fits;
    verdict.className = fits ? "fits" : "nofit";
    verdict.textContent = `${fits ? "fits" : "does not fit"} ${result.gpu.name} (${gib(result.gpu.memory_bytes)} GiB): ` +
      `headroom ${gib(result.gpu.headroom_bytes)} GiB`;
  } else {
    verdict.textContent = "no GPU chosen";
  }
  renderLengths(result);
  const warnings = $("warnings");
  warnings.replaceChildren(...(result.warnings || []).map((text) => el("li", {}, text)));
  renderBar(result);
  renderTerms(result);
}

// What `vramcalc estimate --sample-lengths` prints under its table (MemoryBreakdown.table), from the same details.
function renderLengths(result) {
  const d = result.details || {};
  const note = $("lengths-note");
  if (d.longest_step_tokens === undefined) { note.textContent = ""; return; }
  const s = result.inputs.sample_lengths || {};
  let text = `dataset: ${grouped(s.samples)} samples, mean ${s.mean_tokens} tokens; longest step ` +
    `${grouped(d.longest_step_tokens)} tokens (${(100 * d.share_of_steps_at_longest).toFixed(1)}% of ` +
    `${grouped(d.steps_per_epoch)} steps an epoch); about ${d.expected_later_records.toFixed(1)} steps longer than every earlier one`;
  if (d.length_ladders_bytes !== undefined) {
    text += `; their loss blocks keep ${gib(d.length_ladders_bytes)} GiB more cached on average (in max_memory_reserved, ` +
      "not in the total: freed before an out-of-memory)";
  }
  if (d.step_reserved_bytes !== undefined) text += `; the step's own reserved ${gib(d.step_reserved_bytes)} GiB`;
  note.textContent = text;
}

function renderBar(result) {
  const bar = $("bar");
  const width = Math.max(bar.clientWidth || 800, 300);
  const height = 96;
  bar.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const limit = result.gpu ? result.gpu.memory_bytes : 0;
  const scale = (width - 20) / (Math.max(result.total_bytes, limit) * 1.04 || 1);
  const top = 30, barHeight = 36;
  const nodes = [svg("rect", { class: "frame", x: 0, y: top, width: width, height: barHeight })];
  let x = 0;
  Object.entries(result.terms).forEach(([term, bytes], index) => {
    const w = bytes * scale;
    if (w <= 0) return;
    const rect = svg("rect", { class: "c" + index, x: x, y: top, width: Math.max(w, 0.5), height: barHeight });
    rect.appendChild(svg("title", {}, `${term}: ${gib(bytes)} GiB (${grouped(bytes)} bytes)`));
    nodes.push(rect);
    if (w > 70) nodes.push(svg("text", { x: x + 4, y: top + barHeight / 2 + 4 }, term.replace("_", " ")));
    x += w;
  });
  nodes.push(svg("text", { x: Math.min(x, width - 120), y: top + barHeight + 16 }, `total ${gib(result.total_bytes)} GiB`));
  if (limit) {
    const lx = limit * scale;
    nodes.push(svg("line", { class: "limit", x1: lx, x2: lx, y1: 8, y2: top + barHeight + 4 }));
    const label = `${result.gpu.name}: ${gib(limit)} GiB`;
    nodes.push(svg("text", { class: "limit-label", x: Math.max(lx - 8 - label.length * 6, 0), y: 20 }, label));
  }
  bar.replaceChildren(...nodes);
  const legend = $("legend");
  legend.replaceChildren(...Object.entries(result.terms).map(([term, bytes], index) => {
    const item = el("li");
    item.appendChild(el("span", { class: "swatch c" + index }));
    item.appendChild(document.createTextNode(`${term} ${gib(bytes)}`));
    return item;
  }));
}

function renderTerms(result) {
  const table = $("terms-table");
  table.tHead.replaceChildren(row(["term", "GiB", "bytes", "%"], "th"));
  const rows = Object.entries(result.terms).map(([term, bytes]) =>
    row([term, gib(bytes), grouped(bytes), result.total_bytes ? (100 * bytes / result.total_bytes).toFixed(1) : "–"]));
  rows.push(row(["total", gib(result.total_bytes), grouped(result.total_bytes), "100"], "th"));
  table.tBodies[0].replaceChildren(...rows);
}

function row(cells, tag = "td") {
  const tr = el("tr");
  for (const cell of cells) tr.appendChild(el(tag, {}, cell));
  return tr;
}

// A table whose rows are data objects, its columns [key, header, header class]; clicking a header sorts by that column
// (numbers as numbers, blanks last).
function sortableTable(table, columns, rows, format, decorate) {
  const current = table._sort || { key: null, dir: 1 };
  table._sort = current;
  table._rows = rows;
  const draw = () => {
    const sorted = table._rows.slice();
    if (current.key) {
      sorted.sort((a, b) => {
        const x = a[current.key], y = b[current.key];
        const blankX = x === null || x === undefined || x === "", blankY = y === null || y === undefined || y === "";
        if (blankX || blankY) return blankX === blankY ? 0 : blankX ? 1 : -1;
        if (typeof x === "number" && typeof y === "number") return (x - y) * current.dir;
        return String(x).localeCompare(String(y)) * current.dir;
      });
    }
    const head = el("tr");
    for (const [key, label, cls] of columns) {
      const th = el("th", { scope: "col", "data-key": key, class: cls || null,
                            "aria-sort": current.key === key ? (current.dir > 0 ? "ascending" : "descending") : null }, label);
      th.addEventListener("click", () => {
        current.dir = current.key === key ? -current.dir : 1;
        current.key = key;
        draw();
      });
      head.appendChild(th);
    }
    table.tHead.replaceChildren(head);
    table.tBodies[0].replaceChildren(...sorted.map((item) => {
      const tr = el("tr");
      for (const [key] of columns) {
        const [text, cls] = format(key, item[key], item);
        tr.appendChild(el("td", { class: cls || null }, text));
      }
      if (decorate) decorate(tr, item);
      return tr;
    }));
  };
  draw();
}

function renderFits(result) {
  const chosen = $("f-gpu").value;
  const rows = result.rows.map((r) => ({ ...r, memory_gib: r.memory_bytes / GIB, total_gib: r.total_bytes / GIB }));
  $("fits-note").textContent = `(fits: at the batch you set; max batch: largest micro-batch at seq_len ${result.seq_len}, 0 = none` +
    (state.lengths === null ? ")" : "; every step at seq_len: the dataset's lengths apply to the estimate above)");
  sortableTable($("fits-table"), FITS_COLUMNS, rows, (key, value) => {
    if (key === "fits") return [value ? "yes" : "no", value ? "yes" : "no"];
    if (key === "memory_gib" || key === "total_gib") return [value.toFixed(2)];
    if (key === "max_batch_size") return [value === null ? "–" : grouped(value), value ? "yes" : "no"];
    return [value];
  }, (tr, item) => { if (item.gpu === chosen) tr.classList.add("chosen"); });
}

const fixed = (value, digits) => value.toLocaleString("en-US", { minimumFractionDigits: digits,
                                                                   maximumFractionDigits: digits });

// A plan cell: GiB to 0.1, dollars (totals and per million tokens) to the cent, tokens/s and counts as whole numbers;
// text (GPU, parallelism, note) left-aligned.
function formatPlan(key, value, isText) {
  const text = isText ? "text" : null;
  if (value === null || value === undefined || value === "") return ["–", text];
  if (typeof value === "string") return [value, text];
  if (typeof value === "boolean") return [value ? "yes" : "no"];
  if (typeof value !== "number") return [String(value)];
  if (key.endsWith("_usd") || key.startsWith("usd_")) return [fixed(value, 2)];
  if (key.endsWith("_gib") || key.endsWith("_kwh")) return [fixed(value, 1)];
  if (key.endsWith("_hours")) return [fixed(value, value >= 10 ? 1 : 2)];
  return [fixed(value, 0)];
}

// The columns come with the answer: those of the table `vramcalc plan` prints, under its headers, in its order.
function renderPlan(result) {
  $("plan-summary").textContent = `${result.summary} (catalogue ${result.catalogue_version}, prices up to ${result.catalogue_date})`;
  const text = new Set(result.columns.map((column) => column.key)
    .filter((key) => result.rows.some((item) => typeof item[key] === "string")));
  const columns = result.columns.map((column) => [column.key, column.label, text.has(column.key) ? "text" : null]);
  sortableTable($("plan-table"), columns, result.rows, (key, value) => formatPlan(key, value, text.has(key)));
}

// -- actions --------------------------------------------------------------------------------------------------------
async function downloadCsv() {
  const result = await post("/api/plan.csv", state.lastBody || collect());
  if (!result.ok) { showError(result.error); return; }
  const disposition = result.response.headers.get("Content-Disposition") || "";
  const match = /filename="([^"]+)"/.exec(disposition);
  const link = el("a", { href: URL.createObjectURL(result.data), download: match ? match[1] : "vramcalc-plan.csv" });
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

async function traceIt() {
  $("trace-result").textContent = "tracing…";
  const result = await post("/api/trace", state.lastBody || collect());
  if (!result.ok) { $("trace-result").textContent = ""; showError(result.error); return; }
  $("trace-result").textContent = `traced: ${gib(result.data.total_bytes)} GiB (${grouped(result.data.total_bytes)} bytes), ` +
    `peak at ${result.data.phase}`;
}

function readConfig(file) {
  $("err-config").textContent = "";
  if (!file) return;
  if (file.size > 60 * 1024) { $("err-config").textContent = "this file is over 60 KiB: is it really a config.json?"; return; }
  const reader = new FileReader();
  reader.onload = () => {
    let parsed;
    try { parsed = JSON.parse(reader.result); } catch (err) {
      $("err-config").textContent = "not valid JSON: " + err.message;
      return;
    }
    if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) {
      $("err-config").textContent = "a config.json holds one JSON object";
      return;
    }
    state.config = parsed;
    state.configName = file.name.replace(/\.json$/i, "").slice(0, 100) || "uploaded-config";
    $("config-name").textContent = "using " + file.name;
    $("config-chip").hidden = false;
    $("f-model").disabled = true;
    schedule();
  };
  reader.readAsText(file);
}

function readLengths(file) {
  $("err-sample_lengths").textContent = "";
  $("f-sample_lengths").classList.remove("invalid");
  if (!file) return;
  const tooLarge = () => {
    $("err-sample_lengths").textContent = `this file is over ${(maxLengthsBytes / 2 ** 20).toFixed(1)} MiB as sent: ` +
      "send the 'tokens,samples' histogram that `vramcalc lengths DATA --tokenizer T --output FILE` writes";
  };
  if (file.size > maxLengthsBytes) return tooLarge();
  const reader = new FileReader();
  reader.onload = () => {  // the server parses it (sample_lengths.parse, as the CLI): one parser, one set of messages
    // the text travels as a JSON string, where every newline takes two bytes: measure what is sent
    if (new Blob([JSON.stringify(reader.result)]).size > maxLengthsBytes) return tooLarge();
    state.lengths = reader.result;
    state.lengthsName = file.name.slice(0, 100);
    $("lengths-name").textContent = "using " + file.name;
    $("lengths-chip").hidden = false;
    schedule();
  };
  reader.readAsText(file);
}

function clearLengths() {
  state.lengths = null;
  state.lengthsName = null;
  $("f-sample_lengths").value = "";
  $("lengths-chip").hidden = true;
  schedule();
}

function clearConfig() {
  state.config = null;
  state.configName = null;
  $("f-config").value = "";
  $("config-chip").hidden = true;
  $("f-model").disabled = false;
  schedule();
}

async function start() {
  let options;
  try {
    const response = await fetch("/api/options");
    options = await response.json();
  } catch (err) {
    $("status").textContent = "the server did not answer";
    return;
  }
  state.options = options;
  buildForm(options);
  applyDefaults(options);
  applyQuery(location.search);
  refreshVisibility();
  const form = $("form");
  const own = new Set(["f-config", "f-sample_lengths", "share-url"]);  // these have their own handlers (or none)
  form.addEventListener("input", (event) => { if (!own.has(event.target.id)) schedule(); });
  form.addEventListener("change", (event) => { if (!own.has(event.target.id)) schedule(); });
  form.addEventListener("submit", (event) => { event.preventDefault(); schedule(); });
  $("f-config").addEventListener("change", (event) => readConfig(event.target.files[0]));
  $("config-clear").addEventListener("click", clearConfig);
  $("f-sample_lengths").addEventListener("change", (event) => readLengths(event.target.files[0]));
  $("lengths-clear").addEventListener("click", clearLengths);
  $("copy-url").addEventListener("click", () => { $("share-url").select(); navigator.clipboard?.writeText($("share-url").value); });
  $("download-csv").addEventListener("click", downloadCsv);
  $("trace-button").addEventListener("click", traceIt);
  window.addEventListener("resize", () => { if (state.lastEstimate) renderBar(state.lastEstimate); });
  document.body.dataset.busy = "1";
  run();
}

document.addEventListener("DOMContentLoaded", start);
