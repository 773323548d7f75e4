// The playground: a streaming chat with live per-reply metrics, settings, the API key, and the
// engine panel. Model text only ever reaches the page through renderMarkdown (escaped first).

import { ApiError, apiKey, getJSON, setApiKey, streamChat } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import { fetchMetrics, specCounters, startEnginePanel } from "./metrics.js";

const $ = (id) => document.getElementById(id);
const history = []; // [{role, content}] without the system prompt
let model = null;
let controller = null;

function banner(message) {
  $("banner").textContent = message || "";
  $("banner").hidden = !message;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("regenerate").disabled = busy || history.length === 0;
  document.body.classList.toggle("busy", busy);
}

function addMessage(role) {
  $("messages").querySelector(".hint")?.remove();
  const message = document.createElement("article");
  message.className = `msg ${role}`;
  const body = document.createElement("div");
  body.className = "body";
  message.append(body);
  $("messages").append(message);
  return message;
}

function showUser(text) {
  addMessage("user").querySelector(".body").textContent = text;
}

function statsLine(message) {
  const stats = document.createElement("p");
  stats.className = "stats";
  for (const [key, label] of [
    ["ttft", "first token"],
    ["tps", "tok/s"],
    ["tokens", "tokens"],
    ["acceptance", "draft acceptance"],
    ["state", ""],
  ]) {
    const item = document.createElement("span");
    item.dataset.stat = key;
    item.title = label;
    stats.append(item);
  }
  stats.querySelector('[data-stat="acceptance"]').title =
    "accepted ÷ drafted tokens on the server during this reply (from /metrics: exact when it is the only request)";
  message.append(stats);
  return (key, text) => {
    stats.querySelector(`[data-stat="${key}"]`).textContent = text;
  };
}

// A settings field's JSON, or `fallback` when it is empty.
function jsonField(form, name, label, fallback) {
  const text = String(form.get(name) || "").trim();
  if (!text) return fallback;
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new ApiError(0, `${label} is not JSON: ${error.message}`);
  }
}

// response_format, tools and tool_choice from the structured-output settings.
function structuredSettings(form) {
  const out = {};
  const format = String(form.get("format") || "text");
  if (format === "json_object") out.response_format = { type: "json_object" };
  if (format === "json_schema") {
    const schema = jsonField(form, "schema", "JSON schema", null);
    if (!schema) throw new ApiError(0, "JSON schema output needs a schema");
    out.response_format = { type: "json_schema", json_schema: { name: "playground", schema, strict: true } };
  }
  const tools = jsonField(form, "tools", "tools", null);
  if (tools) {
    out.tools = tools;
    out.tool_choice = String(form.get("tool_choice") || "auto");
  }
  return out;
}

function readSettings() {
  const form = new FormData($("settings"));
  const number = (name) => (form.get(name) === "" ? undefined : Number(form.get(name)));
  const system = String(form.get("system") || "").trim();
  const extra = jsonField(form, "extra", "extra body", {});
  const body = {
    messages: [...(system ? [{ role: "system", content: system }] : []), ...history],
    stream: true,
    stream_options: { include_usage: true, continuous_usage_stats: true },
    temperature: number("temperature"),
    top_p: number("top_p"),
    max_completion_tokens: number("max_tokens"),
    seed: number("seed"),
    speculation_depth: number("speculation_depth"),
    ...structuredSettings(form),
    ...extra,
  };
  if (model) body.model = model;
  return JSON.parse(JSON.stringify(body)); // drops the undefined fields
}

async function counters() {
  try {
    return specCounters(await fetchMetrics());
  } catch {
    return null;
  }
}

function acceptanceText(before, after) {
  if (!before || !after || after.drafted === undefined) return "no speculation";
  const drafted = after.drafted - before.drafted;
  if (drafted <= 0) return "no drafts";
  return `${((100 * (after.accepted - before.accepted)) / drafted).toFixed(1)}% of ${drafted} drafts`;
}

async function generate() {
  const message = addMessage("assistant");
  const body = message.querySelector(".body");
  const stat = statsLine(message);
  let request;
  try {
    request = readSettings();
  } catch (error) {
    message.classList.add("error");
    body.textContent = error.message;
    return;
  }
  controller = new AbortController();
  setBusy(true);
  stat("state", "waiting…");
  const before = await counters();
  const start = performance.now();
  let first = null;
  let tokens = 0;
  let text = "";
  const calls = []; // tool calls, assembled from their streamed pieces by index
  let pending = false;
  const paint = () => {
    pending = false;
    body.innerHTML = renderMarkdown(text); // escaped first: see markdown.js
    for (const call of calls) {
      const pre = document.createElement("pre");
      pre.className = "tool-call";
      pre.textContent = `${call.name}(${call.arguments})`; // text, never markup
      body.append(pre);
    }
    const now = performance.now();
    if (first !== null) stat("ttft", `${((first - start) / 1000).toFixed(2)} s to first token`);
    if (first !== null && tokens > 1 && now > first) stat("tps", `${((tokens - 1) / ((now - first) / 1000)).toFixed(1)} tok/s`);
    stat("tokens", `${tokens} tokens`);
    $("messages").scrollTop = $("messages").scrollHeight;
  };
  let finish = null;
  let failed = false;
  try {
    await streamChat(request, controller.signal, (chunk) => {
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) {
        if (first === null) first = performance.now();
        text += choice.delta.content;
      }
      for (const piece of (choice.delta && choice.delta.tool_calls) || []) {
        if (first === null) first = performance.now();
        const call = (calls[piece.index] ||= { name: "", arguments: "" });
        if (piece.function && piece.function.name) call.name = piece.function.name;
        if (piece.function && piece.function.arguments) call.arguments += piece.function.arguments;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
      stat("state", "streaming…");
      if (!pending) {
        pending = true;
        requestAnimationFrame(paint);
      }
    });
    paint();
    stat("state", finish === "length" ? "stopped at max tokens" : finish === "tool_calls" ? "tool calls" : "done");
  } catch (error) {
    paint();
    if (error.name === "AbortError") {
      stat("state", "stopped");
    } else {
      failed = true;
      message.classList.add("error");
      stat("tokens", "");
      const note = document.createElement("p");
      note.className = "error-text";
      note.textContent = error.message;
      body.append(note);
      stat("state", "failed");
      if (error.status === 401) {
        banner("This server needs an API key: enter it under “API key”.");
        $("key-panel").open = true;
        $("api-key").focus();
      }
    }
  } finally {
    controller = null;
    // The playground runs no tools: a call stays in the history as text, so the next turn is valid.
    const said = [text, ...calls.map((call) => `[called ${call.name}(${call.arguments})]`)].filter(Boolean);
    if (said.length) history.push({ role: "assistant", content: said.join("\n") });
    message.dataset.done = "true";
    setBusy(false);
    if (!failed) stat("acceptance", acceptanceText(before, await counters()));
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  history.push({ role: "user", content: text });
  showUser(text);
  await generate();
}

async function regenerate() {
  if (controller || history.length === 0) return;
  if (history[history.length - 1].role === "assistant") history.pop();
  const last = $("messages").lastElementChild;
  if (last && last.classList.contains("assistant")) last.remove();
  await generate();
}

async function loadModel() {
  try {
    const models = await getJSON("/v1/models");
    model = models.data[0].id;
    $("model").textContent = model;
    banner("");
  } catch (error) {
    $("model").textContent = "model unknown";
    if (error.status === 401) banner("This server needs an API key: enter it under “API key”.");
    else banner(`Could not list the models: ${error.message}`);
  }
}

function showKeyStatus() {
  $("key-status").textContent = apiKey() ? "A key is saved in this browser." : "No key saved.";
}

function init() {
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) send(event);
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("regenerate").addEventListener("click", regenerate);
  $("clear").addEventListener("click", () => {
    if (controller) controller.abort();
    history.length = 0;
    $("messages").replaceChildren();
    setBusy(false);
  });
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey($("api-key").value.trim());
    showKeyStatus();
    loadModel();
  });
  $("forget-key").addEventListener("click", () => {
    setApiKey("");
    $("api-key").value = "";
    showKeyStatus();
  });
  showKeyStatus();
  setBusy(false);
  loadModel();
  startEnginePanel($("engine"), $("engine-updated"));
}

init();
