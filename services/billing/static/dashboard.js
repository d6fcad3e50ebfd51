// Tollway's built-in dashboard: reads /v1/dashboard/data (hourly rollups), /v1/quota and /v1/reports/roi
// with the token kept in sessionStorage. Everything user-supplied is written with textContent, never HTML.
"use strict";
(() => {
  const TOKEN_KEY = "tollway.dashboard.token";
  const REFRESH_MS = 10000;
  const PALETTE = ["#2f6fdd", "#1f9d55", "#d98b00", "#8e44ad", "#d23c3c", "#16a2b8", "#6b7385", "#e67e22", "#2c3e50", "#27ae60"];
  const $ = (id) => document.getElementById(id);
  const charts = {};
  let timer = null;
  let loading = false;
  let view = { role: null, teamId: null };

  const getToken = () => sessionStorage.getItem(TOKEN_KEY);

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(path, params) {
    const url = new URL(path, window.location.origin);
    for (const [k, v] of Object.entries(params || {})) if (v) url.searchParams.set(k, v);
    const resp = await fetch(url, { headers: { Authorization: "Bearer " + getToken() }, cache: "no-store" });
    let body = null;
    try { body = await resp.json(); } catch (_) { body = null; }
    if (!resp.ok) throw new ApiError(resp.status, (body && body.error && body.error.message) || resp.statusText);
    return body;
  }

  // -- formatting --------------------------------------------------------------------------------------
  const num = new Intl.NumberFormat("en-US");
  const usd = (s) => {
    const v = Number(s || 0);
    const digits = v !== 0 && Math.abs(v) < 1 ? 4 : 2;
    return "$" + v.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  };
  const pct = (x) => (100 * x).toFixed(1) + "%";
  const label = (iso, granularity) => {
    const d = new Date(iso);
    const day = d.toISOString().slice(5, 10);
    return granularity === "day" ? day : day + " " + d.toISOString().slice(11, 16);
  };
  const el = (tag, text, cls) => {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  };

  function rangeParams() {
    const now = new Date();
    const choice = $("range").value;
    let from;
    if (choice === "mtd") from = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1));
    else {
      const hours = { "24h": 24, "7d": 168, "30d": 720, "90d": 2160 }[choice] || 168;
      from = new Date(now.getTime() - hours * 3600 * 1000);
    }
    return { from: from.toISOString().slice(0, 19) + "Z" };
  }

  // -- charts ------------------------------------------------------------------------------------------
  function chart(id, config) {
    if (charts[id]) {
      charts[id].data = config.data;
      charts[id].update("none");
      return;
    }
    config.options = Object.assign({ animation: false, responsive: true, maintainAspectRatio: false }, config.options || {});
    charts[id] = new window.Chart($(id), config);
  }

  function drawCharts(d) {
    const labels = d.series.map((p) => label(p.t, d.granularity));
    chart("chart-spend", {
      type: "bar",
      data: { labels, datasets: [{ label: "Spend (USD)", data: d.series.map((p) => Number(p.cost_usd)), backgroundColor: PALETTE[0] }] },
      options: { plugins: { legend: { display: false } } },
    });
    chart("chart-traffic", {
      type: "line",
      data: {
        labels,
        datasets: [
          { label: "Prompt tokens", data: d.series.map((p) => p.prompt_tokens), borderColor: PALETTE[0], backgroundColor: PALETTE[0], yAxisID: "y" },
          { label: "Completion tokens", data: d.series.map((p) => p.completion_tokens), borderColor: PALETTE[1], backgroundColor: PALETTE[1], yAxisID: "y" },
          { label: "Requests", data: d.series.map((p) => p.requests), borderColor: PALETTE[2], backgroundColor: PALETTE[2], yAxisID: "y1" },
        ],
      },
      options: { scales: { y: { position: "left", beginAtZero: true }, y1: { position: "right", beginAtZero: true, grid: { drawOnChartArea: false } } } },
    });
    chart("chart-teams", {
      type: "bar",
      data: { labels: d.by_team.map((t) => t.name), datasets: [{ label: "Spend (USD)", data: d.by_team.map((t) => Number(t.cost_usd)), backgroundColor: PALETTE[3] }] },
      options: { indexAxis: "y", plugins: { legend: { display: false } } },
    });
    chart("chart-models", {
      type: "doughnut",
      data: { labels: d.by_model.map((m) => m.model), datasets: [{ data: d.by_model.map((m) => Number(m.cost_usd)), backgroundColor: PALETTE }] },
      options: { plugins: { legend: { position: "right" } } },
    });
  }

  // -- sections ----------------------------------------------------------------------------------------
  function drawKpis(d) {
    const t = d.totals;
    $("kpi-spend").textContent = usd(t.cost_usd);
    $("kpi-requests").textContent = num.format(t.requests);
    $("kpi-tokens").textContent = num.format(t.total_tokens);
    $("kpi-cache-rate").textContent = pct(t.cache_hit_rate);
    $("kpi-cache-savings").textContent = usd(t.cache_savings_usd);
    $("kpi-unpriced").textContent = num.format(t.unpriced_requests);
    const warn = $("unpriced-warning");
    if (d.unpriced.requests > 0) {
      const models = d.unpriced.models.map((m) => m.model + " (" + m.requests + ")").join(", ");
      warn.textContent = d.unpriced.requests + " call(s) in this range have tokens but no price in force: " + models +
        ". They are billed $0 until a price is added to tollway.yaml; the meter then re-prices them.";
      warn.hidden = false;
    } else warn.hidden = true;
  }

  function drawKeys(d) {
    const body = $("keys").tBodies[0];
    body.replaceChildren();
    for (const k of d.by_key) {
      const tr = document.createElement("tr");
      tr.append(el("td", k.prefix || k.key_id), el("td", k.name || ""), el("td", k.team),
        el("td", num.format(k.requests), "num"), el("td", num.format(k.total_tokens), "num"),
        el("td", num.format(k.cache_hits), "num"), el("td", usd(k.cost_usd), "num"));
      body.append(tr);
    }
    if (!d.by_key.length) {
      const tr = document.createElement("tr");
      const td = el("td", "No calls in this range.", "muted");
      td.colSpan = 7;
      tr.append(td);
      body.append(tr);
    }
  }

  function gauge(title, used, limit, fmt) {
    const box = el("div", null, "gauge");
    const head = el("div", null, "head");
    const ratio = limit ? Number(used) / Number(limit) : 0;
    head.append(el("span", title), el("span", fmt(used) + (limit ? " of " + fmt(limit) + " (" + pct(ratio) + ")" : " (no limit)")));
    const track = el("div", null, "track");
    const fill = el("div", null, "fill" + (ratio >= 1 ? " bad" : ratio >= 0.8 ? " warn" : ""));
    fill.style.width = Math.min(100, 100 * ratio).toFixed(1) + "%";
    track.append(fill);
    box.append(head, track);
    return box;
  }

  function quotaBlock(q, title) {
    const box = el("div");
    const state = q.state || "ok";
    const badge = el("span", state, "badge" + (state === "exhausted" ? " bad" : state === "ok" ? "" : " warn"));
    const h = el("p", title + " ");
    h.append(badge);
    box.append(h);
    box.append(gauge("Budget", q.used.usd, q.limits.budget_usd_per_month, usd));
    box.append(gauge("Tokens", q.used.tokens, q.limits.tokens_per_month, (v) => num.format(Number(v))));
    const eta = q.projected_exhaustion_at ? "projected to run out " + q.projected_exhaustion_at : "not projected to run out before reset";
    box.append(el("p", "Burn " + usd(q.burn_rate.usd_per_hour) + "/h; resets " + q.reset_at + "; " + eta + ".", "muted"));
    return box;
  }

  async function drawQuota(period) {
    const target = $("quota");
    $("quota-period").textContent = period;
    if (!view.teamId) {
      target.replaceChildren(el("p", "Pick a team to see its quota and budget state.", "muted"));
      return;
    }
    const q = await api("/v1/quota", view.role === "team" ? {} : { team: view.teamId });
    const blocks = [quotaBlock(q.team, "Team")];
    if (q.key) blocks.push(quotaBlock(q.key, "This key"));
    target.replaceChildren(...blocks);
  }

  async function drawRoi(period) {
    const target = $("roi");
    $("roi-period").textContent = period;
    if (!view.teamId) {
      target.replaceChildren(el("p", "Pick a team to see its ROI against baseline prices.", "muted"));
      return;
    }
    const r = await api("/v1/reports/roi", { team: view.roleIsTeam ? undefined : view.teamId, period });
    const grid = el("div", null, "roi");
    const cell = (name, value, big) => {
      const c = el("div");
      c.append(el("div", name, "muted"), el("div", value, big ? "big" : ""));
      return c;
    };
    const b = r.savings_breakdown_usd || {};
    grid.append(cell("Actual cost", usd(r.actual_cost_usd), true), cell("At baseline prices", usd(r.baseline_cost_usd), true),
      cell("Saved", usd(r.savings_usd) + " (" + (r.savings_pct ?? 0) + "%)", true),
      cell("of which cache / routing", usd(b.cache) + " / " + usd(b.routing)));
    target.replaceChildren(grid);
  }

  function fillTeams(d) {
    const select = $("team");
    const staff = d.role !== "team";
    select.parentElement.hidden = !staff;
    $("scope").textContent = staff ? "signed in as " + d.role : "team " + ((d.teams[0] && d.teams[0].name) || d.team_id);
    if (!staff) return;
    const current = select.value;
    const options = [el("option", "All teams")];
    options[0].value = "";
    for (const t of d.teams) {
      const o = el("option", t.name);
      o.value = t.team_id;
      options.push(o);
    }
    select.replaceChildren(...options);
    select.value = d.teams.some((t) => t.team_id === current) ? current : "";
  }

  async function load() {
    if (loading || !getToken()) return;
    loading = true;
    const error = $("error");
    try {
      const params = Object.assign(rangeParams(), {
        team: $("team").value || undefined,
        tag: $("filter-tag").value.trim() || undefined,
        end_user: $("filter-user").value.trim() || undefined,
      });
      const d = await api("/v1/dashboard/data", params);
      view = { role: d.role, teamId: d.team_id, roleIsTeam: d.role === "team" };
      fillTeams(d);
      drawKpis(d);
      drawCharts(d);
      drawKeys(d);
      // Quota and ROI are separate APIs: one failing leaves its own card with the message, not the page.
      const sections = [["quota", drawQuota], ["roi", drawRoi]];
      const results = await Promise.allSettled(sections.map(([, draw]) => draw(d.period)));
      results.forEach((r, i) => {
        if (r.status === "rejected") $(sections[i][0]).replaceChildren(el("p", "Could not load: " + r.reason.message, "error"));
      });
      const filter = d.filter ? Object.entries(d.filter).map(([k, v]) => k + " " + v).join(", ") : "";
      $("filter-note").textContent = filter ? "Showing only calls with " + filter + " (quota and ROI cards are the whole team's)" : "";
      $("filter-note").hidden = !filter;
      $("footer").textContent = "Updated " + d.generated_at + " · " + d.from + " to " + d.to + " per " + d.granularity +
        (filter ? " · ledger rows (filtered), " : " · hourly rollups, ") + d.query_ms + " ms";
      error.hidden = true;
      document.body.dataset.loaded = d.generated_at;
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) {
        signOut("That token was not accepted: " + e.message);
        return;
      }
      error.textContent = "Could not load: " + e.message;
      error.hidden = false;
    } finally {
      loading = false;
    }
  }

  function schedule() {
    clearInterval(timer);
    timer = null;
    if ($("autorefresh").checked) timer = setInterval(() => { if (!document.hidden) load(); }, REFRESH_MS);
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    clearInterval(timer);
    $("main").hidden = true;
    $("controls").hidden = true;
    $("login").hidden = false;
    $("scope").textContent = "";
    $("login-error").textContent = message || "";
    $("token").value = "";
    $("token").focus();
  }

  function signedIn() {
    $("login").hidden = true;
    $("main").hidden = false;
    $("controls").hidden = false;
    load();
    schedule();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const value = $("token").value.trim();
      if (!value) return;
      sessionStorage.setItem(TOKEN_KEY, value);
      $("token").value = "";
      signedIn();
    });
    $("signout").addEventListener("click", () => signOut());
    $("refresh").addEventListener("click", () => load());
    $("range").addEventListener("change", () => load());
    $("team").addEventListener("change", () => load());
    $("filter-tag").addEventListener("change", () => load());
    $("filter-user").addEventListener("change", () => load());
    $("autorefresh").addEventListener("change", schedule);
    if (getToken()) signedIn();
    else signOut();
  });
})();
