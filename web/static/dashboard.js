// telephony-forwarder dashboard: live statistics over server-sent events, events
// from memory or from the log files, routes and reload. No build step, no CDN.
"use strict";

const TEXT = {
  en: {
    connecting: "Connecting…", natsOk: "NATS connected", natsDown: "NATS disconnected",
    degraded: "Degraded", serviceDown: "Service unreachable",
    bannerNats: "NATS is not connected: new events are refused (HTTP 500) until it is back. Events already stored are safe.",
    bannerDegraded: "Degraded: {reason}. Forwarding continues.",
    bannerService: "The dashboard has lost its connection to the service; retrying…",
    totalSuccessful: "Delivered", totalFailed: "Failed attempts", retryCount: "Retries", givenUp: "Given up",
    successfulDomains: "Domains delivered", failedDomains: "Domains failing", inFlight: "In flight", uptime: "Uptime",
    events: "Events", readLogs: "Read from log files", domain: "Domain", allDomains: "All domains",
    chooseDomain: "Choose a domain", type: "Type", typeAll: "All", typeSuccessful: "Delivered", typeFailed: "Failed",
    date: "Date", liveNote: "Live: the most recent events in memory", logsNote: "History: read from the log files",
    loading: "Loading…", noEvents: "No events yet. Events appear here as soon as they are forwarded.",
    noMatch: "No events match these filters.", noLogDomains: "No log files yet.",
    pickLogDomain: "Choose a domain to read its log files.", noLogDay: "No forwarding outcomes in the log for this day.",
    apiError: "Could not load events: {error}", routes: "Routes", reload: "Reload config", reloading: "Reloading…",
    loadedAt: "Loaded", noRoutes: "No routes configured: events are stored and wait for a route.",
    backlog: "{n} waiting of {quota}", unrouted: "Waiting for a route", noUnrouted: "None.",
    unroutedItem: "{n} waiting, oldest {age} ago",
    attempt: "attempt {n} of {max}", attemptShort: "attempt {n}", willRetry: "Will retry", finalFailure: "Given up",
    delivered: "Delivered", payload: "Full event", events_n: "{n} events", shownOf: "showing {shown} of {total}",
    deadLetters: "Dead letters", deadNote: "Events that failed every delivery attempt. Replay sends one again to its domain's endpoints.",
    noDeadLetters: "None: every event was delivered or is still being retried.", replay: "Replay", discard: "Discard",
    cutShort: "The last attempt was cut short (restart, shutdown or route removed).",
  },
  vi: {
    connecting: "Đang kết nối…", natsOk: "NATS đã kết nối", natsDown: "Mất kết nối NATS",
    degraded: "Suy giảm", serviceDown: "Không kết nối được dịch vụ",
    bannerNats: "Mất kết nối NATS: sự kiện mới bị từ chối (HTTP 500) cho đến khi kết nối lại. Sự kiện đã lưu vẫn an toàn.",
    bannerDegraded: "Suy giảm: {reason}. Việc chuyển tiếp vẫn tiếp tục.",
    bannerService: "Bảng điều khiển mất kết nối tới dịch vụ; đang thử lại…",
    totalSuccessful: "Đã chuyển", totalFailed: "Lần thất bại", retryCount: "Lần thử lại", givenUp: "Đã bỏ",
    successfulDomains: "Tên miền thành công", failedDomains: "Tên miền lỗi", inFlight: "Đang xử lý", uptime: "Thời gian chạy",
    events: "Sự kiện", readLogs: "Read from log files", domain: "Tên miền", allDomains: "Tất cả tên miền",
    chooseDomain: "Chọn tên miền", type: "Loại", typeAll: "Tất cả", typeSuccessful: "Thành công", typeFailed: "Thất bại",
    date: "Ngày", liveNote: "Trực tiếp: các sự kiện gần nhất trong bộ nhớ", logsNote: "Lịch sử: đọc từ log files",
    loading: "Đang tải…", noEvents: "Chưa có sự kiện. Sự kiện sẽ hiện ở đây ngay khi được chuyển tiếp.",
    noMatch: "Không có sự kiện nào khớp bộ lọc.", noLogDomains: "Chưa có log file.",
    pickLogDomain: "Chọn một tên miền để đọc log files.", noLogDay: "Không có kết quả chuyển tiếp nào trong log ngày này.",
    apiError: "Không tải được sự kiện: {error}", routes: "Định tuyến", reload: "Tải lại cấu hình", reloading: "Đang tải lại…",
    loadedAt: "Nạp lúc", noRoutes: "Chưa có định tuyến: sự kiện được lưu và chờ định tuyến.",
    backlog: "{n} đang chờ / {quota}", unrouted: "Chờ định tuyến", noUnrouted: "Không có.",
    unroutedItem: "{n} đang chờ, cũ nhất {age} trước",
    attempt: "lần {n}/{max}", attemptShort: "lần {n}", willRetry: "Sẽ thử lại", finalFailure: "Đã bỏ",
    delivered: "Đã chuyển", payload: "Toàn bộ sự kiện", events_n: "{n} sự kiện", shownOf: "hiển thị {shown}/{total}",
    deadLetters: "Sự kiện thất bại", deadNote: "Sự kiện đã thất bại ở mọi lần gửi. Gửi lại sẽ chuyển sự kiện tới các endpoint của tên miền.",
    noDeadLetters: "Không có: mọi sự kiện đã được chuyển hoặc đang được thử lại.", replay: "Gửi lại", discard: "Bỏ",
    cutShort: "Lần thử cuối bị ngắt giữa chừng (khởi động lại, dừng dịch vụ hoặc tuyến bị gỡ).",
  },
};

const state = {
  lang: localStorage.getItem("tf-lang") === "vi" ? "vi" : "en",
  source: "live",          // "live" (memory) or "logs"
  domain: "", type: "all", date: "",
  stats: null, health: null, routes: [], logDomains: [],
  lastChanges: -1, loading: false, pending: false, deadLetterCount: -1, deadLetters: [],
};

const $ = (selector) => document.querySelector(selector);

function t(key, values = {}) {
  const text = TEXT[state.lang][key] ?? TEXT.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(values[name] ?? ""));
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

async function getJSON(url, options = {}) {
  // The service refuses a POST or DELETE without this header: a page on
  // another site cannot send it, so it cannot replay, discard or reload.
  const headers = { "X-Requested-With": "telephony-forwarder-dashboard", ...options.headers };
  const response = await fetch(url, { ...options, headers });
  let body = null;
  try { body = await response.json(); } catch { /* not JSON: reported below */ }
  if (!response.ok && !(body && (body.message || body.error))) {
    throw new Error(`HTTP ${response.status}`);
  }
  return { status: response.status, body };
}

// ---------- language ----------
function applyLanguage() {
  document.documentElement.lang = state.lang;
  for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
  for (const button of document.querySelectorAll("[data-lang]")) {
    button.setAttribute("aria-pressed", String(button.dataset.lang === state.lang));
  }
  renderHealth();
  renderStats();
  renderRoutes();
  renderDeadLetters();
  renderSourceNote();
  loadEvents();
}

// ---------- statistics, health ----------
function formatUptime(seconds) {
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s % 60}s`;
  return `${s}s`;
}

function renderStats() {
  if (!state.stats) return;
  for (const node of document.querySelectorAll("[data-stat]")) {
    const value = state.stats[node.dataset.stat];
    if (value === undefined) continue;
    node.textContent = node.dataset.stat === "uptime_seconds"
      ? formatUptime(value) : Number(value).toLocaleString(state.lang === "vi" ? "vi-VN" : "en-US");
  }
}

function renderHealth(unreachable = false) {
  const pill = $("#service-pill"), banner = $("#banner");
  banner.hidden = true;
  banner.className = "banner";
  if (unreachable) {
    pill.className = "pill pill-bad"; pill.textContent = t("serviceDown");
    banner.hidden = false; banner.textContent = t("bannerService");
    return;
  }
  const health = state.health;
  if (!health) return;
  if (health.status === "unavailable") {
    pill.className = "pill pill-bad"; pill.textContent = t("natsDown");
    banner.hidden = false; banner.textContent = t("bannerNats");
  } else if (health.status === "degraded") {
    pill.className = "pill pill-warn"; pill.textContent = t("degraded");
    banner.hidden = false; banner.classList.add("warn");
    banner.textContent = t("bannerDegraded", { reason: health.reason || "" });
  } else {
    pill.className = "pill pill-ok"; pill.textContent = t("natsOk");
  }
}

function connectLive() {
  const source = new EventSource("/api/live");
  source.addEventListener("stats", (message) => {
    const update = JSON.parse(message.data);
    state.health = update.health;
    state.stats = update;
    renderHealth();
    renderStats();
    renderBacklog();
    refreshDomainChoices();
    if (update.backlog?.dead_letters !== state.deadLetterCount) {
      state.deadLetterCount = update.backlog?.dead_letters;
      loadDeadLetters();
    }
    if (state.source === "live" && update.changes !== state.lastChanges) {
      state.lastChanges = update.changes;
      loadEvents();
    }
  });
  source.onerror = () => renderHealth(true); // EventSource reconnects by itself
}

// ---------- domain, type, date choices ----------
function setOptions(select, options, selected) {
  const current = [...select.options].map((o) => `${o.value}|${o.textContent}`).join(",");
  const wanted = options.map((o) => `${o.value}|${o.label}`).join(",");
  if (current !== wanted) {
    select.replaceChildren(...options.map((o) => el("option", { value: o.value, text: o.label })));
  }
  select.value = options.some((o) => o.value === selected) ? selected : (options[0]?.value ?? "");
  return select.value;
}

function refreshDomainChoices() {
  const select = $("#domain-filter");
  if (state.source === "live") {
    const known = new Set([...Object.keys(state.stats?.domains ?? {}), ...state.routes.map((r) => r.domain)]);
    const options = [{ value: "", label: t("allDomains") }, ...[...known].sort().map((d) => ({ value: d, label: d }))];
    state.domain = setOptions(select, options, state.domain);
  } else {
    const options = state.logDomains.map((d) => ({ value: d.sanitized, label: d.domain }));
    if (!options.length) options.push({ value: "", label: t("noLogDomains") });
    state.domain = setOptions(select, options, state.domain);
    const dates = state.logDomains.find((d) => d.sanitized === state.domain)?.dates ?? [];
    state.date = setOptions($("#date-filter"), dates.map((d) => ({ value: d, label: d })), state.date);
  }
}

function renderSourceNote() {
  $("#source-note").textContent = t(state.source === "live" ? "liveNote" : "logsNote");
  $("#date-control").hidden = state.source !== "logs";
}

// ---------- events ----------
function showState(text, kind = "") {
  const node = $("#events-state");
  node.hidden = !text;
  node.className = `state ${kind}`;
  node.textContent = text || "";
}

function card(record, kind) {
  const time = record.forwarded_at || record.failed_at;
  const top = el("div", { className: "card-top" },
    el("span", { className: "call-id", text: record.call_id ?? record.event_id ?? "—" }),
    record.direction ? el("span", { className: "chip", text: record.direction }) : null,
    record.state ? el("span", { className: "chip", text: record.state }) : null,
    record.status ? el("span", { className: "chip", text: record.status }) : null,
  );
  const node = el("article", { className: "card", "data-kind": kind, "data-call-id": record.call_id ?? "" }, top);
  if (kind === "failed") {
    const retry = Boolean(record.will_retry);
    top.append(el("span", {
      className: `badge ${retry ? "badge-retry" : "badge-final"}`,
      "data-retry": retry ? "will-retry" : "given-up",
      text: `${t(retry ? "willRetry" : "finalFailure")} · ${t("attempt", { n: record.delivery_attempt, max: record.max_deliveries })}`,
    }));
  } else {
    top.append(el("span", { className: "badge badge-ok", text: t("delivered") }));
    top.append(el("span", { className: "attempt", text: t("attemptShort", { n: record.delivery_attempt }) }));
  }
  top.append(el("time", { className: "time", datetime: time, title: time, text: time ? new Date(time).toLocaleString(state.lang === "vi" ? "vi-VN" : "en-GB") : "" }));
  if (kind === "failed" && record.error) node.append(el("p", { className: "error-text", text: record.error }));
  if (record.event) {
    node.append(el("details", {}, el("summary", { text: t("payload") }),
      el("pre", { text: JSON.stringify(record.event, null, 2) })));
  }
  return { node, time: time || "" };
}

function renderEvents(body) {
  const groups = new Map();
  for (const [kind, key] of [["successful", "events_by_domain"], ["failed", "failed_events_by_domain"]]) {
    for (const [domain, records] of Object.entries(body[key] ?? {})) {
      if (!groups.has(domain)) groups.set(domain, []);
      for (const record of records) groups.get(domain).push(card(record, kind));
    }
  }
  const container = $("#events");
  const sections = [...groups.keys()].sort().map((domain) => {
    const cards = groups.get(domain).sort((a, b) => b.time.localeCompare(a.time));
    return el("section", { className: "domain-group", "data-domain": domain },
      el("h3", {}, document.createTextNode(domain), el("small", { text: t("events_n", { n: cards.length }) })),
      el("div", { className: "cards" }, ...cards.map((c) => c.node)));
  });
  // Keep expanded payloads open across refreshes.
  const open = new Set([...container.querySelectorAll("details[open]")].map((d) => d.closest(".card")?.dataset.callId));
  container.replaceChildren(...sections);
  for (const details of container.querySelectorAll("details")) {
    if (open.has(details.closest(".card").dataset.callId)) details.open = true;
  }
  return sections.length;
}

async function loadEvents() {
  if (state.loading) { state.pending = true; return; }
  state.loading = true;
  try {
    do {
      state.pending = false;
      await loadEventsOnce();
    } while (state.pending);
  } finally {
    state.loading = false;
  }
}

async function loadEventsOnce() {
  const params = new URLSearchParams({ type: state.type, limit: "100" });
  let url;
  if (state.source === "live") {
    if (state.domain) params.set("domain", state.domain);
    url = `/api/events?${params}`;
  } else {
    if (!state.domain) { $("#events").replaceChildren(); showState(t(state.logDomains.length ? "pickLogDomain" : "noLogDomains")); return; }
    params.set("domain", state.domain);
    if (state.date) params.set("date", state.date);
    url = `/api/logs?${params}`;
  }
  if (!$("#events").children.length) showState(t("loading"));
  try {
    const { status, body } = await getJSON(url);
    if (status !== 200) throw new Error(body.error || body.message || `HTTP ${status}`);
    const shown = renderEvents(body);
    if (shown) showState("");
    else if (state.source === "logs") showState(t("noLogDay"));
    else showState(t(state.domain || state.type !== "all" ? "noMatch" : "noEvents"));
  } catch (error) {
    showState(t("apiError", { error: error.message }), "error");
  }
}

// ---------- routes and reload ----------
function renderRoutes() {
  const list = $("#routes");
  if (!state.routes.length) {
    list.replaceChildren(el("li", { className: "muted", text: t("noRoutes") }));
    return;
  }
  list.replaceChildren(...state.routes.map((route) => el("li", { "data-domain": route.domain },
    el("div", { className: "route-domain", text: route.domain }),
    ...route.endpoints.map((endpoint) => el("div", { className: "route-endpoint", text: endpoint })))));
}

function renderBacklog() {
  const backlog = state.stats?.backlog;
  if (!backlog?.available) return;
  const number = (n) => Number(n).toLocaleString(state.lang === "vi" ? "vi-VN" : "en-US");
  for (const node of document.querySelectorAll("#routes li[data-domain]")) {
    const waiting = backlog.domains[node.dataset.domain] ?? 0;
    let line = node.querySelector(".route-backlog");
    if (!line) line = node.appendChild(el("div", { className: "route-backlog" }));
    line.textContent = t("backlog", { n: number(waiting), quota: number(backlog.quota_per_domain) });
    line.classList.toggle("error-text", waiting >= backlog.quota_per_domain * 0.9);
  }
  const unrouted = Object.entries(backlog.unrouted);
  $("#unrouted").replaceChildren(...(unrouted.length
    ? unrouted.map(([domain, { waiting, oldest_age_seconds: age }]) => el("li", { "data-domain": domain },
      el("div", { className: "route-domain", text: domain }),
      el("div", { className: "route-endpoint", text: t("unroutedItem", { n: number(waiting), age: formatUptime(age ?? 0) }) })))
    : [el("li", { className: "muted", text: t("noUnrouted") })]));
}

async function loadRoutes() {
  try {
    const { body } = await getJSON("/api/config/routes");
    state.routes = body.routes;
    const loaded = $("#routes-loaded");
    loaded.textContent = body.loaded_at ? new Date(body.loaded_at).toLocaleString(state.lang === "vi" ? "vi-VN" : "en-GB") : "—";
    loaded.dateTime = body.loaded_at || "";
    renderRoutes();
    renderBacklog();
    refreshDomainChoices();
  } catch (error) {
    $("#routes").replaceChildren(el("li", { className: "muted", text: t("apiError", { error: error.message }) }));
  }
}

async function reload() {
  const button = $("#reload"), result = $("#reload-result");
  button.disabled = true;
  button.textContent = t("reloading");
  try {
    const { status, body } = await getJSON("/api/config/reload", { method: "POST" });
    result.className = `reload-result ${status === 200 ? "ok" : "bad"}`;
    result.textContent = status === 200 ? `${body.message} (${body.routes})` : body.message || body.error;
    await loadRoutes();
  } catch (error) {
    result.className = "reload-result bad";
    result.textContent = error.message;
  } finally {
    button.disabled = false;
    button.textContent = t("reload");
  }
}

// ---------- dead letters ----------
function renderDeadLetters() {
  const list = $("#dead-letters");
  $("#dead-count").textContent = String(state.deadLetters.length);
  if (!state.deadLetters.length) {
    list.replaceChildren(el("li", { className: "muted", text: t("noDeadLetters") }));
    return;
  }
  list.replaceChildren(...state.deadLetters.map((letter) => {
    const errors = letter.errors
      ? Object.entries(letter.errors).map(([endpoint, error]) => `${endpoint}: ${error}`).join("; ")
      : t("cutShort");
    const act = (label, method, path) => {
      const button = el("button", { type: "button", className: "button button-small", text: t(label) });
      if (method === "DELETE") button.classList.add("button-quiet");
      button.addEventListener("click", async () => {
        button.disabled = true;
        try { await getJSON(path, { method }); } catch { /* the list below shows what is left */ }
        loadDeadLetters();
      });
      return button;
    };
    const id = encodeURIComponent(letter.id);
    return el("li", { "data-event-id": letter.event_id, "data-letter-id": letter.id },
      el("div", { className: "route-domain", text: `${letter.call_id ?? letter.event_id} · ${letter.domain}` }),
      el("div", { className: "error-text", text: errors }),
      el("div", { className: "dead-actions" },
        act("replay", "POST", `/api/dead-letters/${id}/replay`), act("discard", "DELETE", `/api/dead-letters/${id}`)));
  }));
}

async function loadDeadLetters() {
  try {
    state.deadLetters = (await getJSON("/api/dead-letters?limit=50")).body.dead_letters ?? [];
  } catch {
    return; // the banner already says when the service or NATS is away
  }
  renderDeadLetters();
}

// ---------- wiring ----------
async function switchSource(toLogs) {
  state.source = toLogs ? "logs" : "live";
  state.domain = "";
  state.date = "";
  renderSourceNote();
  $("#events").replaceChildren();
  if (toLogs) {
    // The live view's domains are not the log files': none can be picked until those are here.
    const select = $("#domain-filter");
    select.replaceChildren(el("option", { value: "", text: t("loading") }));
    select.disabled = true;
    showState(t("loading"));
    try {
      state.logDomains = (await getJSON("/api/logs/domains")).body.domains;
    } catch (error) {
      showState(t("apiError", { error: error.message }), "error");
      return;
    } finally {
      select.disabled = false;
    }
  }
  refreshDomainChoices();
  loadEvents();
}

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("[data-lang]")) {
    button.addEventListener("click", () => {
      state.lang = button.dataset.lang;
      localStorage.setItem("tf-lang", state.lang);
      applyLanguage();
    });
  }
  $("#source-logs").addEventListener("change", (e) => switchSource(e.target.checked));
  $("#domain-filter").addEventListener("change", (e) => {
    state.domain = e.target.value;
    state.date = "";
    refreshDomainChoices();
    loadEvents();
  });
  $("#type-filter").addEventListener("change", (e) => { state.type = e.target.value; loadEvents(); });
  $("#date-filter").addEventListener("change", (e) => { state.date = e.target.value; loadEvents(); });
  $("#reload").addEventListener("click", reload);
  applyLanguage();
  loadRoutes();
  connectLive();
});
