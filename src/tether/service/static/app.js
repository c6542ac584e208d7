// Tether dashboard: live charts from the /ws event stream, control through the REST API.
// No build step and no network beyond this service: uPlot is vendored under /static/vendor.
(function () {
  "use strict";

  const MAX_POINTS = 500;        // per series, as the issue asks
  const MA_WINDOW = 100;         // episodes in the moving average
  const TABLE_ROWS = 15;
  const RENDER_EVERY_MS = 100;   // coalesce bursts (e.g. the history replay) into one redraw
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const TOKEN_KEY = "tether.token";
  const TCHAR = /^[A-Za-z0-9!#$%&'*+.^_`|~-]+$/;  // what a Sec-WebSocket-Protocol entry may hold

  const $ = (id) => document.getElementById(id);

  // ---- token: from the URL fragment (#token=...), then kept for this tab only ----------------
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  if (location.hash.startsWith("#token=")) {
    token = decodeURIComponent(location.hash.slice("#token=".length));
    sessionStorage.setItem(TOKEN_KEY, token);
    history.replaceState(null, "", location.pathname + location.search);
  }

  // ---- state ------------------------------------------------------------------------------
  const state = {
    reward: { x: [], y: [], ma: [], evalReturn: [] },
    loss: { x: [], policy: [], value: [], entropy: [] },
    success: { x: [], y: [] },
    sps: { x: [], y: [] },
    rows: [],
    maWindow: [],
    maSum: 0,
    episodeCounter: 0,
    job: { status: "idle", active: false, run_id: null },
    lastSeq: 0,
    events: 0,
    connected: false,
  };
  let dirty = false;
  let renderTimer = null;

  function trim(obj) {
    for (const key of Object.keys(obj)) {
      const arr = obj[key];
      if (arr.length > MAX_POINTS) arr.splice(0, arr.length - MAX_POINTS);
    }
  }

  function num(v) {
    return typeof v === "number" && isFinite(v) ? v : null;
  }

  function resetSeries() {
    for (const group of [state.reward, state.loss, state.success, state.sps]) {
      for (const key of Object.keys(group)) group[key].length = 0;
    }
    state.rows.length = 0;
    state.maWindow.length = 0;
    state.maSum = 0;
    state.episodeCounter = 0;
    for (const id of ["stat-episodes", "stat-reward", "stat-success", "stat-sps"]) $(id).textContent = "–";
    markDirty();
  }

  // ---- charts (uPlot) ---------------------------------------------------------------------
  const charts = {};

  function makeChart(id, xLabel, series, extraAxes) {
    const el = $(id).querySelector(".plot");
    const opts = {
      width: Math.max(el.clientWidth, 280),
      height: 220,
      scales: { x: { time: false } },
      series: [{ label: xLabel }].concat(series),
      axes: [{ label: xLabel }, { size: 60 }].concat(extraAxes || []),
      cursor: { drag: { x: false, y: false } },
      legend: { live: true },
    };
    if (extraAxes && extraAxes.length) opts.scales.right = { auto: true };
    const data = [[]].concat(series.map(() => []));
    charts[id] = new uPlot(opts, data, el);
  }

  function buildCharts() {
    makeChart("chart-reward", "episode", [
      { label: "reward", stroke: "rgba(70,130,180,0.45)", width: 1, spanGaps: false },
      { label: "avg (100)", stroke: "#d9480f", width: 2 },
      // Greedy evaluations (schedule.eval_every), drawn at the episode count they came after.
      { label: "eval", stroke: "#2b8a3e", width: 2, spanGaps: true, points: { show: true, size: 7 } },
    ]);
    makeChart(
      "chart-loss",
      "step",
      [
        { label: "policy", stroke: "#1c7ed6", width: 1.5 },
        { label: "value", stroke: "#e8590c", width: 1.5, scale: "right" },
        { label: "entropy", stroke: "#2f9e44", width: 1.5 },
      ],
      [{ scale: "right", side: 1, grid: { show: false }, size: 60 }],
    );
    makeChart("chart-success", "step", [{ label: "success %", stroke: "#7048e8", width: 2 }]);
    makeChart("chart-sps", "step", [{ label: "steps/s", stroke: "#0c8599", width: 2 }]);
    const resize = () => {
      for (const id of Object.keys(charts)) {
        const el = $(id).querySelector(".plot");
        charts[id].setSize({ width: Math.max(el.clientWidth, 280), height: 220 });
      }
    };
    if (window.ResizeObserver) new ResizeObserver(resize).observe(document.querySelector("main"));
    else window.addEventListener("resize", resize);
  }

  function markDirty() {
    dirty = true;
    if (renderTimer === null) renderTimer = setTimeout(render, RENDER_EVERY_MS);
  }

  function render() {
    renderTimer = null;
    if (!dirty) return;
    dirty = false;
    const r = state.reward, l = state.loss, s = state.success, p = state.sps;
    charts["chart-reward"].setData([r.x.slice(), r.y.slice(), r.ma.slice(), r.evalReturn.slice()]);
    charts["chart-loss"].setData([l.x.slice(), l.policy.slice(), l.value.slice(), l.entropy.slice()]);
    charts["chart-success"].setData([s.x.slice(), s.y.slice()]);
    charts["chart-sps"].setData([p.x.slice(), p.y.slice()]);
    $("chart-reward").dataset.points = String(r.x.length);
    $("chart-reward").dataset.evalPoints = String(r.evalReturn.filter((v) => v !== null).length);
    $("chart-loss").dataset.points = String(l.x.length);
    $("chart-success").dataset.points = String(s.y.filter((v) => v !== null).length);
    $("chart-sps").dataset.points = String(p.x.length);
    $("success-note").textContent = s.x.length && !s.y.some((v) => v !== null) ? "(this environment reports none)" : "";
    renderTable();
  }

  // ---- events -----------------------------------------------------------------------------
  function onMetrics(d) {
    const rewards = Array.isArray(d.episode_rewards) ? d.episode_rewards : [];
    const total = num(d.episodes);
    let first = total !== null ? total - rewards.length + 1 : state.episodeCounter + 1;
    for (const raw of rewards) {
      const v = num(raw);
      if (v === null) { first += 1; continue; }
      state.maWindow.push(v);
      state.maSum += v;
      if (state.maWindow.length > MA_WINDOW) state.maSum -= state.maWindow.shift();
      state.reward.x.push(first);
      state.reward.y.push(v);
      state.reward.ma.push(state.maSum / state.maWindow.length);
      state.reward.evalReturn.push(null);
      state.episodeCounter = first;
      first += 1;
    }
    const evalReturn = num(d["eval/mean_return"]);
    const lastEpisode = state.reward.x.length - 1;
    if (evalReturn !== null && lastEpisode >= 0) state.reward.evalReturn[lastEpisode] = evalReturn;
    const step = num(d.step);
    if (step !== null) {
      state.loss.x.push(step);
      state.loss.policy.push(num(d["train/policy_loss"]));
      state.loss.value.push(num(d["train/value_loss"]));
      state.loss.entropy.push(num(d["train/entropy"]));
      state.success.x.push(step);
      const sr = num(d["train/success_rate"]);
      state.success.y.push(sr === null ? null : 100 * sr);
      state.sps.x.push(step);
      state.sps.y.push(num(d["perf/sps"]));
      $("run-step").textContent = step.toLocaleString();
    }
    trim(state.reward); trim(state.loss); trim(state.success); trim(state.sps);
    if (total !== null) $("stat-episodes").textContent = fmtInt(total);
    if (num(d["train/episode_reward_ma100"]) !== null) $("stat-reward").textContent = fmt(d["train/episode_reward_ma100"], 2);
    const rate = num(d["train/success_rate"]);
    if (rate !== null) $("stat-success").textContent = (100 * rate).toFixed(0) + " %";
    if (num(d["perf/sps"]) !== null) $("stat-sps").textContent = fmtInt(d["perf/sps"]);
    if (evalReturn !== null) $("stat-eval").textContent = fmt(evalReturn, 2);
    state.rows.unshift(d);
    if (state.rows.length > TABLE_ROWS) state.rows.length = TABLE_ROWS;
    markDirty();
  }

  function onStatus(d) {
    const status = String(d.status || "unknown");
    if (status === "started") resetSeries();
    const active = !["stopped", "finished", "error"].includes(status);
    setJob({ status: status, active: active, run_id: d.run_id || state.job.run_id });
    if (status === "error") toast("the job failed: " + (d.error || d.message || "see the server log"), true);
    else if (status === "stopped" || status === "finished") {
      toast("run " + (d.run_id || "") + " " + status + (num(d.step) !== null ? " at step " + fmtInt(d.step) : ""));
    }
    if (status !== "started") refreshRuns();
    if (status === "started") refreshConfig();
  }

  function onEvent(ev) {
    if (!ev || typeof ev !== "object" || typeof ev.type !== "string") return;
    state.events += 1;
    if (typeof ev.seq === "number") state.lastSeq = ev.seq;
    const data = ev.data && typeof ev.data === "object" ? ev.data : {};
    if (ev.type === "metrics_update") onMetrics(data);
    else if (ev.type === "training_status") onStatus(data);
    else if (ev.type === "config_updated") {
      toast("config updated: " + Object.entries(data).map(([k, v]) => k + "=" + v).join(", "));
      refreshConfig();
    }
  }

  // ---- job status / header ----------------------------------------------------------------
  function setJob(job) {
    state.job = Object.assign({}, state.job, job);
    const badge = $("status");
    const status = state.job.status || "idle";
    badge.textContent = status;
    badge.dataset.status = status;
    badge.className = "badge badge-" + status.replace(/[^a-z]/g, "");
    $("run-id").textContent = state.job.run_id || "–";
    if (state.job.algorithm) $("run-algo").textContent = state.job.algorithm;
    $("btn-start").disabled = !!state.job.active;
    $("btn-stop").disabled = !state.job.active;
    $("btn-save").disabled = !state.job.active;
    $("btn-apply").disabled = !state.job.active || !$("live-key").value;
  }

  // ---- REST ---------------------------------------------------------------------------------
  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const res = await fetch(path, { method: method, headers: headers, body: body === undefined ? undefined : JSON.stringify(body) });
    let payload = null;
    try { payload = await res.json(); } catch (e) { payload = null; }
    if (res.status === 401) showAuth();
    if (!res.ok) {
      const detail = payload && typeof payload.detail === "string" ? payload.detail : res.status + " " + res.statusText;
      throw new Error(detail);
    }
    return payload;
  }

  let toastTimer = null;
  function toast(text, isError) {
    const el = $("toast");
    el.textContent = text;
    el.className = "toast" + (isError ? " toast-error" : " toast-ok");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { el.textContent = ""; el.className = "toast"; }, 8000);
  }

  async function refreshStatus() {
    try {
      const m = await api("GET", "/metrics?limit=0");
      setJob(m.job);
    } catch (e) { /* the banner or the token form already says why */ }
  }

  async function refreshPresets() {
    try {
      const p = await api("GET", "/presets");
      const sel = $("preset");
      sel.textContent = "";
      for (const name of p.presets) {
        const opt = document.createElement("option");
        opt.value = name; opt.textContent = name;
        if (name === p.default) opt.selected = true;
        sel.appendChild(opt);
      }
    } catch (e) { /* shown elsewhere */ }
  }

  async function refreshConfig() {
    try {
      const c = await api("GET", "/config");
      $("config-view").textContent = c.config ? JSON.stringify(c.config, null, 2) : "no job yet";
      const sel = $("live-key");
      const current = sel.value;
      sel.textContent = "";
      for (const key of c.live_keys) {
        const opt = document.createElement("option");
        opt.value = key; opt.textContent = key;
        sel.appendChild(opt);
      }
      if (c.live_keys.includes(current)) sel.value = current;
      if (c.config && c.config.training && c.config.training.algorithm) $("run-algo").textContent = c.config.training.algorithm;
      setJob({});
    } catch (e) { /* shown elsewhere */ }
  }

  async function refreshRuns() {
    try {
      const r = await api("GET", "/runs");
      const body = $("runs-table").querySelector("tbody");
      body.textContent = "";
      for (const run of r.runs.slice(0, 20)) {
        const tr = document.createElement("tr");
        const m = run.last_metrics || {};
        for (const text of [run.id, run.algorithm || "–", run.status, fmtInt(m.step), fmt(m["train/episode_reward_ma100"], 2)]) {
          const td = document.createElement("td");
          td.textContent = text;
          tr.appendChild(td);
        }
        body.appendChild(tr);
      }
    } catch (e) { /* shown elsewhere */ }
  }

  // ---- table --------------------------------------------------------------------------------
  function fmt(v, digits) {
    const n = num(v);
    return n === null ? "–" : n.toFixed(digits);
  }
  function fmtInt(v) {
    const n = num(v);
    return n === null ? "–" : Math.round(n).toLocaleString();
  }

  function renderTable() {
    const body = $("metrics-table").querySelector("tbody");
    body.textContent = "";
    for (const d of state.rows) {
      const sr = num(d["train/success_rate"]);
      const cells = [
        fmtInt(d.episodes),
        fmtInt(d.step),
        fmt(d["train/episode_reward"], 2),
        fmt(d["train/episode_reward_ma100"], 2),
        fmt(d["train/policy_loss"], 4) + " / " + fmt(d["train/value_loss"], 3),
        sr === null ? "–" : (100 * sr).toFixed(0) + " %",
        fmtInt(d["perf/sps"]),
      ];
      const tr = document.createElement("tr");
      for (const text of cells) {
        const td = document.createElement("td");
        td.textContent = text;
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
  }

  // ---- WebSocket with reconnect -------------------------------------------------------------
  let ws = null;
  let attempts = 0;
  let reconnectTimer = null;
  let countdownTimer = null;

  function setConnected(on) {
    state.connected = on;
    $("conn-dot").className = "dot " + (on ? "dot-on" : "dot-off");
    $("conn-text").textContent = on ? "live" : "offline";
  }

  function showBanner(text) {
    const el = $("banner");
    el.textContent = text;
    el.hidden = false;
  }
  function hideBanner() { $("banner").hidden = true; }

  function wsUrl() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    let url = proto + "//" + location.host + "/ws";
    if (token && !TCHAR.test(token)) url += "?token=" + encodeURIComponent(token);
    return url;
  }

  function connect() {
    clearTimeout(reconnectTimer);
    const protocols = ["tether"];
    if (token && TCHAR.test(token)) protocols.push("bearer." + token);
    try {
      ws = new WebSocket(wsUrl(), protocols);
    } catch (e) {
      scheduleReconnect();
      return;
    }
    ws.onopen = () => {
      attempts = 0;
      clearInterval(countdownTimer);
      hideBanner();
      setConnected(true);
      resetSeries();          // the server replays its recent history right away
      refreshStatus();
      refreshConfig();
      refreshPresets();
      refreshRuns();
    };
    ws.onmessage = (msg) => {
      let ev;
      try { ev = JSON.parse(msg.data); } catch (e) { return; }
      onEvent(ev);
    };
    ws.onclose = () => {
      const wasConnected = state.connected;
      setConnected(false);
      ws = null;
      scheduleReconnect(wasConnected);
    };
  }

  function scheduleReconnect() {
    clearTimeout(reconnectTimer);
    clearInterval(countdownTimer);
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * Math.pow(2, attempts));
    const delay = Math.round(base * (0.75 + Math.random() * 0.5));
    attempts += 1;
    const due = Date.now() + delay;
    const tick = () => {
      const left = Math.max(0, Math.ceil((due - Date.now()) / 1000));
      showBanner("Connection to the training service lost — reconnecting in " + left + " s (attempt " + attempts + ").");
    };
    tick();
    countdownTimer = setInterval(tick, 500);
    reconnectTimer = setTimeout(() => { clearInterval(countdownTimer); checkAuthThenConnect(); }, delay);
  }

  async function checkAuthThenConnect() {
    // A refused handshake looks like any other drop; ask the REST side whether a token is missing.
    try {
      const h = await fetch("/health").then((r) => r.json());
      if (h.auth_required && !token) { showAuth(); }
    } catch (e) { /* server still down: just retry */ }
    connect();
  }

  function showAuth() {
    $("auth").hidden = false;
  }

  // ---- controls -----------------------------------------------------------------------------
  function wire() {
    $("btn-start").addEventListener("click", async () => {
      const body = { preset: $("preset").value || undefined };
      const steps = parseInt($("steps").value, 10);
      if (steps > 0) body.steps = steps;
      try {
        const r = await api("POST", "/control/start", body);
        setJob(r.job);
        toast("started " + r.run_id);
      } catch (e) { toast(e.message, true); }
    });
    $("btn-stop").addEventListener("click", async () => {
      $("btn-stop").disabled = true;
      try {
        const r = await api("POST", "/control/stop");
        toast("stopping " + r.run_id + "…");
      } catch (e) { toast(e.message, true); refreshStatus(); }
    });
    $("btn-save").addEventListener("click", async () => {
      $("btn-save").disabled = true;
      try {
        const r = await api("POST", "/control/save");
        toast("saved " + r.path);
      } catch (e) { toast(e.message, true); }
      finally { setJob({}); }
    });
    $("btn-apply").addEventListener("click", async () => {
      const key = $("live-key").value;
      const raw = $("live-value").value.trim();
      if (!key || !raw) return;
      const value = raw !== "" && !isNaN(Number(raw)) ? Number(raw) : raw;
      try {
        const r = await api("PATCH", "/config", { [key]: value });
        toast("queued " + Object.entries(r.applied).map(([k, v]) => k + "=" + v).join(", "));
      } catch (e) { toast(e.message, true); }
    });
    $("live-key").addEventListener("change", () => setJob({}));
    $("btn-runs").addEventListener("click", refreshRuns);
    $("auth").addEventListener("submit", (e) => {
      e.preventDefault();
      token = $("token-input").value.trim();
      sessionStorage.setItem(TOKEN_KEY, token);
      $("auth").hidden = true;
      if (ws) ws.close(); else connect();
    });
  }

  buildCharts();
  wire();
  setJob({});
  connect();

  // For tests and curious people: the live state, read-only by convention.
  window.tetherDashboard = { state: state, charts: charts };
})();
