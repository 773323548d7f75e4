// The engine panel: helix's Prometheus text from /metrics, parsed here, shown every 2 seconds.

import { getText } from "./api.js";

const P = "helix:";

// Prometheus text -> Map(metric name -> value summed over its label sets).
export function parsePrometheus(text) {
  const totals = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([A-Za-z_:][\w:]*)(\{.*\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const value = Number(match[3]);
    if (Number.isFinite(value)) totals.set(match[1], (totals.get(match[1]) || 0) + value);
  }
  return totals;
}

// The counters a reply's draft acceptance is computed from (undefined without speculation).
export function specCounters(totals) {
  return {
    drafted: totals.get(P + "spec_decode_num_draft_tokens_total"),
    accepted: totals.get(P + "spec_decode_num_accepted_tokens_total"),
  };
}

export async function fetchMetrics() {
  return parsePrometheus(await getText("/metrics"));
}

const percent = (part, whole) => (whole > 0 ? `${((100 * part) / whole).toFixed(1)}%` : "–");

export function renderEngine(panel, totals) {
  const get = (name) => totals.get(P + name);
  const total = get("num_kv_blocks_total");
  const used = total - get("num_kv_blocks_free");
  const spec = specCounters(totals);
  const values = {
    running: get("num_requests_running"),
    waiting: get("num_requests_waiting"),
    kv: total === undefined ? "–" : `${used} / ${total} (${percent(used, total)})`,
    prefix: `${percent(get("prefix_cache_hits_total"), get("prefix_cache_queries_total"))}`,
    acceptance: spec.drafted === undefined ? "off" : percent(spec.accepted, spec.drafted),
    generated: get("generation_tokens_total"),
  };
  for (const [key, value] of Object.entries(values)) {
    panel.querySelector(`[data-metric="${key}"]`).textContent = value === undefined ? "–" : String(value);
  }
}

// Refresh the panel now and every `intervalMs`; failures show in `status` and are retried.
export function startEnginePanel(panel, status, intervalMs = 2000) {
  const tick = async () => {
    try {
      renderEngine(panel, await fetchMetrics());
      status.textContent = `from /metrics, updated ${new Date().toLocaleTimeString()}`;
      status.dataset.updates = String(Number(status.dataset.updates || 0) + 1);
    } catch (error) {
      status.textContent = `/metrics: ${error.message}`;
    }
  };
  tick();
  return setInterval(tick, intervalMs);
}
