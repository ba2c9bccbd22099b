"use strict";
// The gateway's web page: a playground (submit a request, follow its events, show the image) and a
// cluster view (GET /v1/cluster every 2 s). It talks only to the gateway that served it.

const $ = (id) => document.getElementById(id);
const STORAGE = { apiKey: "lego.apiKey", workflow: "lego.workflow" };
const FIELDS = ["prompt", "steps", "seed"]; // the workflow inputs the form offers
const TERMINAL = new Set(["done", "failed", "cancelled", "rejected"]);
const CLUSTER_REFRESH_MS = 2000;
const GRPC_CODES = [
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
  "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
  "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
];

let workflows = [];
let clusterTimer = 0;
let imageUrl = "";
let running = null; // the request being followed

// --- the REST API -----------------------------------------------------------------------------

function authHeaders(headers = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

// fetch() with the API key; a non-2xx answer throws an Error carrying the JSON error's code and field.
async function api(path, init = {}) {
  const response = await fetch(path, { ...init, headers: authHeaders(init.headers) });
  if (response.ok) return response;
  let detail = { code: `HTTP ${response.status}`, message: response.statusText };
  try {
    detail = { ...detail, ...(await response.json()).error };
  } catch {
    // not a JSON error body: keep the HTTP status
  }
  const error = new Error(`${detail.code}: ${detail.message}`);
  error.field = detail.field;
  throw error;
}

// Server-sent events over fetch() (EventSource cannot send the Authorization header). Calls
// onEvent(data) for each event and returns the terminal one, or null if the stream ends before it.
async function followEvents(url, onEvent) {
  const response = await api(url, { headers: { Accept: "text/event-stream" } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return null;
    buffer += value;
    let match;
    while ((match = /\r\n\r\n|\n\n|\r\r/.exec(buffer))) {
      const block = buffer.slice(0, match.index);
      buffer = buffer.slice(match.index + match[0].length);
      const event = parseEvent(block);
      if (!event) continue;
      onEvent(event);
      if (TERMINAL.has(event.kind)) {
        reader.cancel();
        return event;
      }
    }
  }
}

function parseEvent(block) {
  let kind = "message";
  const data = [];
  for (const line of block.split(/\r\n|\r|\n/)) {
    if (line === "" || line.startsWith(":")) continue; // a comment: keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") kind = value;
    else if (field === "data") data.push(value);
  }
  if (data.length === 0) return null;
  const payload = JSON.parse(data.join("\n"));
  return { ...payload, kind: payload.kind ?? kind };
}

// --- the playground ---------------------------------------------------------------------------

async function loadWorkflows() {
  try {
    workflows = (await (await api("/v1/workflows")).json()).workflows;
  } catch (error) {
    $("workflow-description").textContent = `Could not list the workflows: ${error.message}`;
    $("workflow-description").className = "hint error";
    return;
  }
  $("workflow-description").className = "hint";
  const select = $("workflow");
  const wanted = select.value || localStorage.getItem(STORAGE.workflow);
  select.replaceChildren(...workflows.map((w) => new Option(w.name, w.name)));
  if (workflows.some((w) => w.name === wanted)) select.value = wanted;
  onWorkflowChange();
}

function onWorkflowChange() {
  const workflow = workflows.find((w) => w.name === $("workflow").value);
  localStorage.setItem(STORAGE.workflow, $("workflow").value);
  $("workflow-description").textContent = workflow?.description ?? "";
  for (const name of FIELDS) { // offer only the inputs this workflow takes
    $(name).disabled = Boolean(workflow?.inputs) && !workflow.inputs.includes(name);
  }
}

async function generate(event) {
  event.preventDefault();
  const inputs = {};
  for (const name of FIELDS) {
    const field = $(name);
    if (field.disabled || field.value === "") continue;
    inputs[name] = field.type === "number" ? Number(field.value) : field.value;
  }
  resetRun();
  $("generate").disabled = true;
  try {
    const response = await api("/v1/requests", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ workflow: $("workflow").value, inputs }),
    });
    const request = await response.json();
    running = request;
    setStatus(`Submitted ${request.request_id}`);
    $("cancel").hidden = false;
    refreshCluster(); // show it in flight now, not at the next tick
    const last = await followEvents(request.events_url, onEvent);
    if (last === null) throw new Error("the event stream ended before the request finished");
    if (last.kind === "done") await showImage(last.image_url ?? request.image_url, last);
  } catch (error) {
    setStatus(error.message, "error");
    if (FIELDS.includes(error.field)) $(error.field).setAttribute("aria-invalid", "true");
  } finally {
    running = null;
    $("generate").disabled = false;
    $("cancel").hidden = true;
    refreshCluster();
  }
}

async function cancel() {
  if (!running) return;
  try {
    await api(`/v1/requests/${encodeURIComponent(running.request_id)}/cancel`, { method: "POST" });
  } catch (error) {
    setStatus(`Could not cancel: ${error.message}`, "error");
  }
}

function onEvent(event) {
  logEvent(event);
  switch (event.kind) {
    case "queued":
      setStatus("Queued");
      break;
    case "admitted":
      setStatus("Admitted");
      break;
    case "node_started":
      setStatus(`Running ${[event.node_id, event.worker_id].filter(Boolean).join(" on ")}`);
      break;
    case "step":
      setProgress(event.step, event.total);
      break;
    case "done": {
      const bar = $("progress-bar");
      if (!$("progress").hidden) setProgress(bar.max, bar.max);
      setStatus(`Done in ${seconds(event.time_s)}`);
      break;
    }
    case "failed":
    case "rejected":
    case "cancelled":
      setStatus(`Request ${event.kind}: ${problem(event)}`, "error");
      break;
  }
}

async function showImage(url, done) {
  const blob = await (await api(url)).blob(); // fetched, not <img src>: it carries the API key
  if (imageUrl) URL.revokeObjectURL(imageUrl);
  imageUrl = URL.createObjectURL(blob);
  const image = $("result-image");
  image.src = imageUrl;
  await image.decode();
  const size = `${image.naturalWidth}x${image.naturalHeight}`;
  $("result-caption").textContent = `${done.request_id}, ${size}, ${seconds(done.time_s)}`;
  $("result").hidden = false;
}

function resetRun() {
  setProgress(0, 0);
  $("progress").hidden = true;
  $("result").hidden = true;
  $("events").replaceChildren();
  for (const name of FIELDS) $(name).removeAttribute("aria-invalid");
  setStatus("Submitting");
}

function setProgress(step, total) {
  $("progress").hidden = false;
  $("progress-bar").max = Math.max(total, 1);
  $("progress-bar").value = step;
  $("progress-label").textContent = `step ${step}/${total}`;
}

function setStatus(text, kind = "") {
  $("status").textContent = text;
  $("status").className = kind;
}

function logEvent(event) {
  const node = [event.node_id, event.worker_id].filter(Boolean).join(" on ");
  const detail = {
    step: `${event.step}/${event.total}`,
    node_started: node,
    node_finished: node,
  }[event.kind] ?? problem(event);
  const item = document.createElement("li");
  item.dataset.kind = event.kind;
  item.textContent = `${(event.time_s ?? 0).toFixed(3)} s  ${event.kind}  ${detail}`;
  $("events").append(item);
}

// --- the cluster view -------------------------------------------------------------------------

async function refreshCluster() {
  clearTimeout(clusterTimer);
  try {
    renderCluster(await (await api("/v1/cluster")).json());
    $("cluster-status").textContent = `Updated ${new Date().toLocaleTimeString()}`;
    $("cluster-status").className = "hint";
  } catch (error) {
    $("cluster-status").textContent = `Could not read the cluster: ${error.message}`;
    $("cluster-status").className = "error";
  } finally {
    clearTimeout(clusterTimer);
    clusterTimer = setTimeout(refreshCluster, CLUSTER_REFRESH_MS);
  }
}

function renderCluster(cluster) {
  $("requests-in-flight").textContent = cluster.requests_in_flight;
  $("ready-tasks").textContent = cluster.ready_tasks;
  $("policy").textContent = `${cluster.policy} / ${cluster.epoch}`;
  if (cluster.slo) renderSlo(cluster.slo);
  const rows = cluster.workers.map((worker) => {
    const row = document.createElement("tr");
    row.dataset.worker = worker.worker_id;
    const state = worker.draining ? "draining" : worker.busy ? "busy" : "idle";
    const name = cell(worker.worker_id);
    name.title = worker.address;
    const models = cell("");
    for (const model of worker.loaded_models) {
      const chip = document.createElement("span");
      chip.className = "model";
      chip.textContent = model;
      models.append(chip);
    }
    if (worker.loaded_models.length === 0) models.textContent = "none";
    const badge = cell("");
    const label = document.createElement("span");
    label.className = `state ${state}`;
    label.textContent = state;
    badge.append(label);
    row.append(name, badge, models);
    return row;
  });
  $("workers").tBodies[0].replaceChildren(...rows);
}

function renderSlo(slo) {
  const span = slo.window_s >= 120 ? `${Math.round(slo.window_s / 60)} min` : `${slo.window_s} s`;
  const detail = document.createElement("small");
  if (!slo.answered) {
    detail.textContent = `no requests in ${span}`;
    $("slo").replaceChildren("-", detail);
    $("slo").className = "";
    return;
  }
  const percent = (100 * slo.met) / slo.answered;
  detail.textContent = `${slo.met}/${slo.answered} met in ${span}`;
  $("slo").replaceChildren(`${percent.toFixed(percent === 100 ? 0 : 1)}%`, detail);
  $("slo").className = percent >= 99 ? "" : percent >= 90 ? "warn" : "error";
}

// "CODE: message" of a failed/rejected/cancelled event; its code is a gRPC status code number.
function problem(event) {
  const code = typeof event.code === "number" ? (GRPC_CODES[event.code] ?? `code ${event.code}`) : event.code;
  return [code, event.message].filter(Boolean).join(": ");
}

function seconds(value) {
  return `${(value ?? 0).toFixed(2)} s`;
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

// --- start ------------------------------------------------------------------------------------

function onApiKeyChange() {
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(STORAGE.apiKey, key);
  else localStorage.removeItem(STORAGE.apiKey);
  loadWorkflows();
  refreshCluster();
}

$("api-key").value = localStorage.getItem(STORAGE.apiKey) ?? "";
$("api-key").addEventListener("change", onApiKeyChange);
// Enter in the key field fires "change" (which applies the key) and submits this form: keep the page
$("api-key-form").addEventListener("submit", (event) => event.preventDefault());
$("workflow").addEventListener("change", onWorkflowChange);
$("generate-form").addEventListener("submit", generate);
$("cancel").addEventListener("click", cancel);
loadWorkflows();
refreshCluster();
