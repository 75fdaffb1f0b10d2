// Operator dashboard: polls the /admin JSON routes and draws them. No framework, no CDN.
// Every value is written with textContent (model errors may contain anything).
(() => {
  "use strict";

  const TOKEN_KEY = "model_server_admin_token";
  const MAX_SAMPLES = 200;
  const params = new URLSearchParams(location.search);
  const intervalMs = Math.max(250, 1000 * (Number(params.get("interval")) || 3));
  const $ = (selector) => document.querySelector(selector);

  // A token handed over in the fragment (#token=...) never reaches the server or its logs;
  // it is moved to sessionStorage and removed from the address bar at once.
  if (location.hash.startsWith("#token=")) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(location.hash.slice(7)));
    history.replaceState(null, "", location.pathname + location.search);
  }

  // Exposed for debugging and for the browser tests.
  const state = { samples: [], polls: 0, needToken: false, busy: new Set(), models: {}, timer: null };
  window.dashboard = state;

  class AuthError extends Error {}

  async function api(path, method = "GET") {
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    const response = await fetch(path, { method, headers, cache: "no-store" });
    if (response.status === 401) {
      // an answer to a token replaced while it was in flight says nothing about the new one
      if (token !== sessionStorage.getItem(TOKEN_KEY)) throw new AuthError("stale token");
      askForToken(token ? "The token was rejected. Enter the admin token." : "This server needs the admin token.");
      throw new AuthError("unauthorized");
    }
    let body = null;
    try { body = await response.json(); } catch (e) { /* not JSON */ }
    if (!response.ok) {
      const detail = body ? `${body.error}: ${body.details}` : `HTTP ${response.status}`;
      throw new Error(detail);
    }
    return body;
  }

  // ------------------------------------------------------------------ formatting

  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = Number(n), unit = 0;
    while (Math.abs(value) >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
    return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
  }

  function fmtSeconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return `${(s * 1000).toFixed(0)} ms`;
    if (s < 120) return `${s.toFixed(1)} s`;
    if (s < 7200) return `${(s / 60).toFixed(1)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }

  function el(tag, text, props = {}) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [key, value] of Object.entries(props)) {
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key === "className") node.className = value;
      else node[key] = value;
    }
    return node;
  }

  function facts(target, pairs) {
    target.replaceChildren(...pairs.map(([label, value, key]) => {
      const box = el("div", undefined, { dataset: { fact: key || label } });
      box.append(el("dt", label), el("dd", value));
      return box;
    }));
  }

  function setStatus(text, kind = "ok") {
    const node = $("#status");
    node.textContent = text;
    node.dataset.state = kind;
  }

  function activity(text, kind = "info") {
    const list = $("#activity");
    const stamp = new Date().toLocaleTimeString();
    list.prepend(el("li", `${stamp} ${text}`, { className: kind }));
    while (list.children.length > 50) list.lastChild.remove();
  }

  // ------------------------------------------------------------------ token

  function askForToken(message) {
    state.needToken = true;
    $("#auth-message").textContent = message;
    $("#auth").hidden = false;
    $("#content").hidden = true;
    setStatus("waiting for the admin token", "error");
    $("#token").focus();
  }

  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("#token").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("#token").value = "";
    state.needToken = false;
    $("#auth").hidden = true;
    $("#content").hidden = false;
    refresh();
  });

  $("#forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken("Token forgotten. Enter the admin token.");
  });

  // ------------------------------------------------------------------ models

  // The model's engine: how it batches, how many requests wait, how many run in the current batch.
  function engineCell(engine) {
    if (!engine) return el("td", "–", { className: "engine" });
    return el("td", `${engine.kind} · queue ${engine.queue_depth} · batch ${engine.running_batch}`, {
      className: "engine",
      title: `max batch ${engine.max_batch_size}, max queue ${engine.max_queue}, ` +
             `${engine.tokens_per_second} tokens/s over the last minute`,
      dataset: { kind: engine.kind, queue: engine.queue_depth, running: engine.running_batch },
    });
  }

  // RAM tier: "device" (serving), "ram" (parked in CPU RAM; its next request moves it back to its GPU).
  function tierCell(m) {
    const text = m.tier === "ram" ? `RAM (${fmtBytes(m.parked_bytes)})` : (m.tier || "–");
    return el("td", text, {
      className: "tier", dataset: { tier: m.tier || "" },
      title: `parked ${m.demote_count} time(s), promoted ${m.promote_count}` +
             (m.last_promote_seconds === null ? "" : `, last promotion ${fmtSeconds(m.last_promote_seconds)}`),
    });
  }

  function renderModels(body) {
    const rows = [];
    state.models = body.models;
    for (const [key, m] of Object.entries(body.models)) {
      const row = el("tr", undefined, { dataset: { model: key, state: m.state } });
      const stateCell = el("td", undefined, { className: "state", dataset: { state: m.state } });
      stateCell.append(el("span", m.state, { className: "badge" }));
      if (m.error) stateCell.append(el("span", m.error, { className: "reason" }));
      if (m.in_flight && m.state === "loaded") stateCell.title = `${m.in_flight} request(s) in flight`;
      const loadSeconds = m.load_count ? m.load_seconds_total : null;
      row.append(
        el("td", key, { className: "key" }),
        el("td", m.family, { className: "family" }),
        stateCell,
        el("td", m.device || "–", { className: "device" }),
        tierCell(m),
        // an openvino model: its runtime, weight format and export state (docs/openvino.md)
        el("td", m.runtime === "openvino" ? `openvino ${m.weight_format} · ${m.export}` : m.quantization,
           { className: "quantization", dataset: { runtime: m.runtime || "pytorch" } }),
        el("td", m.loaded ? fmtBytes(m.bytes_in_memory) : "–",
           { className: "num bytes", title: `${m.bytes_in_memory} bytes`, dataset: { bytes: m.bytes_in_memory } }),
        el("td", fmtBytes(m.bytes_estimated), { className: "num estimated", dataset: { bytes: m.bytes_estimated ?? "" } }),
        el("td", m.in_flight, { className: "num in-flight" }),
        engineCell(m.engine),
        el("td", m.load_count, { className: "num load-count" }),
        el("td", fmtSeconds(loadSeconds), { className: "num load-seconds" }),
        el("td", m.last_used_ago === null ? "never" : `${fmtSeconds(m.last_used_ago)} ago`, { className: "num last-used" }),
      );
      const actions = el("td", undefined, { className: "actions" });
      const busy = state.busy.has(key);
      actions.append(
        el("button", "Load", { type: "button", disabled: busy || m.loaded || m.state === "loading" || m.state === "waiting_to_load",
                               dataset: { action: "load", model: key } }),
        el("button", "Unload", { type: "button", disabled: busy || !(m.loaded || m.state === "parked"),
                                 dataset: { action: "unload", model: key } }),
      );
      row.append(actions);
      rows.push(row);
    }
    $("#models tbody").replaceChildren(...rows);
    const loaded = body.loaded_models || [];
    $("#models-summary").textContent =
      `${loaded.length} of at most ${body.max_loaded_models} loaded` + (loaded.length ? `: ${loaded.join(", ")}` : "");
  }

  // ------------------------------------------------------------------ memory

  const SERIES = [
    { key: "rss", label: "server RSS", color: "#2f6feb" },
    { key: "ramUsed", label: "RAM in use (whole machine)", color: "#9a6700" },
    { key: "models", label: "held by models", color: "#1a7f37" },
    { key: "gpu", label: "GPU allocated", color: "#cf222e" },
  ];

  // Pressure events per device: how many, whether one is going on, what it released or what holds memory.
  function pressureText(pressure) {
    const parts = Object.entries(pressure).map(([device, p]) => {
      let text = `${device}: ${p.events} event(s)` + (p.active ? ", now" : "");
      if (p.released && p.released.length) text += `, released ${p.released.join(", ")}`;
      if (p.active && p.held_by && p.held_by.length) text += `, held by ${p.held_by.join(", ")}`;
      return text;
    });
    return parts.length ? parts.join("; ") : "none";
  }

  function ramTierText(tier) {
    if (!tier || !tier.enabled) return "off";
    return `${fmtBytes(tier.used)} of ${fmtBytes(tier.budget)}` + (tier.models.length ? `: ${tier.models.join(", ")}` : "");
  }

  function renderMemory(body) {
    const ram = body.ram;
    const modelsBytes = (ram.models_bytes || 0) + body.gpus.reduce((sum, g) => sum + (g.models_bytes || 0), 0);
    facts($("#memory-summary"), [
      ["RAM total", fmtBytes(ram.total), "ram_total"],
      ["RAM available", `${fmtBytes(ram.available)} (${ram.percent}% used)`, "ram_available"],
      ["Server RSS", fmtBytes(ram.process_rss), "process_rss"],
      ["RAM budget", fmtBytes(ram.budget), "ram_budget"],
      ["RAM headroom", fmtBytes(ram.headroom), "ram_headroom"],
      ["Models in RAM", fmtBytes(ram.models_bytes), "ram_models"],
      ["GPU", body.gpu_available ? `${body.gpus.length} device(s)` : "none", "gpu_available"],
      ["Memory pressure", pressureText(body.pressure || {}), "pressure"],
      ["RAM tier", ramTierText(body.ram_tier), "ram_tier"],
    ]);
    const gpuTable = $("#gpus");
    gpuTable.hidden = !body.gpus.length;
    $("#gpus tbody").replaceChildren(...body.gpus.map((g) => {
      const row = el("tr", undefined, { dataset: { device: g.device } });
      row.append(el("td", g.device), el("td", g.name), ...[g.total, g.allocated, g.reserved, g.free, g.budget,
        g.models_bytes].map((n) => el("td", fmtBytes(n), { className: "num" })));
      return row;
    }));
    $("#warnings").replaceChildren(...(body.warnings || []).map((w) => el("li", w)));
    state.samples.push({
      t: body.timestamp, rss: ram.process_rss, ramUsed: ram.total - ram.available, models: modelsBytes,
      gpu: body.gpus.length ? body.gpus.reduce((sum, g) => sum + g.allocated, 0) : null,
    });
    if (state.samples.length > MAX_SAMPLES) state.samples.shift();
    drawChart();
  }

  function drawChart() {
    const canvas = $("#memory-chart");
    const ctx = canvas.getContext("2d");
    const { width, height } = canvas;
    const pad = { left: 70, right: 10, top: 10, bottom: 22 };
    ctx.clearRect(0, 0, width, height);
    const samples = state.samples;
    const series = SERIES.filter((s) => samples.some((p) => p[s.key] !== null));
    let top = 1;
    for (const p of samples) for (const s of series) top = Math.max(top, p[s.key] || 0);
    top *= 1.1;
    const plotW = width - pad.left - pad.right, plotH = height - pad.top - pad.bottom;
    const t0 = samples.length ? samples[0].t : 0, t1 = samples.length ? samples[samples.length - 1].t : 1;
    const x = (t) => pad.left + (t1 > t0 ? (t - t0) / (t1 - t0) : 1) * plotW;
    const y = (v) => pad.top + plotH - (v / top) * plotH;
    ctx.font = "11px system-ui, sans-serif";
    ctx.strokeStyle = "#d9dee7";
    ctx.fillStyle = "#667085";
    for (let i = 0; i <= 4; i += 1) {
      const v = (top * i) / 4;
      ctx.beginPath();
      ctx.moveTo(pad.left, y(v));
      ctx.lineTo(width - pad.right, y(v));
      ctx.stroke();
      ctx.fillText(fmtBytes(v), 4, y(v) + 4);
    }
    if (samples.length) ctx.fillText(`last ${fmtSeconds(t1 - t0)}`, pad.left, height - 6);
    for (const s of series) {
      ctx.strokeStyle = s.color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      samples.forEach((p, i) => {
        if (p[s.key] === null) return;
        if (i === 0) ctx.moveTo(x(p.t), y(p[s.key])); else ctx.lineTo(x(p.t), y(p[s.key]));
      });
      if (samples.length === 1) ctx.arc(x(samples[0].t), y(samples[0][s.key] || 0), 2, 0, 2 * Math.PI);
      ctx.stroke();
    }
    ctx.lineWidth = 1;
    $("#legend").replaceChildren(...series.map((s) => {
      const item = el("li");
      const swatch = el("span", undefined, { className: "swatch" });
      swatch.style.background = s.color;
      item.append(swatch, s.label);
      return item;
    }));
  }

  // ------------------------------------------------------------------ temp

  function renderTemp(body) {
    facts($("#temp"), [
      ["Folder", body.root, "root"],
      ["Files", body.files, "files"],
      ["Size", fmtBytes(body.bytes), "bytes"],
      ["Live request scopes", body.active_scopes, "active_scopes"],
      ["Oldest", body.oldest_age_seconds === null ? "–" : `${fmtSeconds(body.oldest_age_seconds)} old`, "oldest"],
      ["Expire after", fmtSeconds(body.ttl_seconds), "ttl"],
      ["Size cap", fmtBytes(body.max_total_bytes), "max_total_bytes"],
    ]);
  }

  // ------------------------------------------------------------------ jobs

  function jobProgress(job) {
    if (job.status === "queued") return `#${job.position} in queue`;
    if (job.progress) return `${job.progress.step} / ${job.progress.total}`;
    return "";
  }

  function renderJobs(body) {
    facts($("#job-counts"), Object.entries(body.counts).map(([name, count]) => [name, count, `jobs-${name}`]));
    const rows = body.recent.map((job) => {
      const tr = el("tr", "", { dataset: { job: job.job_id, status: job.status } });
      tr.append(el("td", job.job_id.slice(0, 8), { title: job.job_id }), el("td", job.model),
                el("td", job.status, { className: `state-${job.status}` }), el("td", jobProgress(job)),
                el("td", new Date(job.created_at).toLocaleTimeString()),
                el("td", fmtSeconds(job.timings.queue_seconds), { className: "num" }),
                el("td", job.timings.run_seconds === undefined ? "–" : fmtSeconds(job.timings.run_seconds),
                   { className: "num" }),
                el("td", job.details || job.note || ""));
      return tr;
    });
    $("#jobs tbody").replaceChildren(...rows);
  }

  // ------------------------------------------------------------------ polling and actions

  async function refresh() {
    if (state.needToken) return;
    clearTimeout(state.timer);
    try {
      const [models, memory, temp, jobs] = await Promise.all(
        [api("model_status"), api("memory_status"), api("temp_status"), api("jobs")]);
      renderModels(models);
      renderMemory(memory);
      renderTemp(temp);
      renderJobs(jobs);
      state.polls += 1;
      $("#forget-token").hidden = !sessionStorage.getItem(TOKEN_KEY);
      setStatus(`updated ${new Date().toLocaleTimeString()}` + (memory.memory_warning ? " · memory warning" : ""),
                memory.memory_warning ? "warning" : "ok");
    } catch (error) {
      if (!(error instanceof AuthError)) setStatus(`refresh failed: ${error.message}`, "error");
    }
    if (!state.needToken) state.timer = setTimeout(refresh, intervalMs);
  }

  const ACTIONS = {
    load: (key) => api(`models/${encodeURIComponent(key)}/load`, "POST")
      .then((b) => `loaded ${key} (${fmtBytes(b.model.bytes_in_memory)} in ${fmtSeconds(b.model.last_load_seconds)})`),
    unload: (key) => api(`models/${encodeURIComponent(key)}/unload?wait=10`, "POST")
      .then((b) => (b.unloaded ? `unloaded ${key}` : `${key} was not loaded`)),
    "cleanup-temp": () => api("cleanup_temp", "POST")
      .then((b) => `temp cleanup removed ${b.removed_files} file(s), ${fmtBytes(b.removed_bytes)}`),
    "emergency-cleanup": () => api("emergency_cleanup", "POST")
      .then((b) => `emergency cleanup unloaded [${b.unloaded_models.join(", ")}], freed ` +
                   `${fmtBytes(b.model_bytes_freed)} of models; kept in use [${b.kept_in_use.join(", ")}]`),
  };

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button || button.disabled) return;
    const { action, model } = button.dataset;
    const busyKey = model || action;
    state.busy.add(busyKey);
    button.disabled = true;
    activity(`${action}${model ? " " + model : ""}…`);
    try {
      activity(await ACTIONS[action](model));
    } catch (error) {
      if (!(error instanceof AuthError)) activity(`${action}${model ? " " + model : ""} failed: ${error.message}`, "error");
    } finally {
      state.busy.delete(busyKey);
      button.disabled = false;
      refresh();
    }
  });

  refresh();
})();
