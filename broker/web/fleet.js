// The fleet page: the broker's sessions and counters, from its admin API, refreshed every few
// seconds. What a device sent (ids, metadata, health) is put in the page as text only
// (textContent, createTextNode, attributes): never parsed as HTML.
//
// The admin token comes from a `#token=...` fragment (then removed from the address bar) or
// from the form, and is kept in sessionStorage (gone with the tab); a 401 forgets it and asks.
// `#status=online|away` picks the filter (as its buttons do).
"use strict";

(() => {
  const REFRESH_MS = 3000;
  const MAX_PAGES = 10; // of 100 sessions each: the page says when there are more
  const TOKEN_KEY = "tether.adminToken";

  const $ = (id) => document.getElementById(id);
  let statusFilter = "";
  let timer = null;
  let running = false;
  let again = false; // a refresh asked for while one ran (a filter clicked): run it after

  class NeedToken extends Error {}

  // The fragment (never sent to the server) may carry `token=...` and `status=online|away`.
  // The token is taken out of the address bar; the filter stays there, so a filtered view
  // can be bookmarked.
  function readFragment() {
    const params = new URLSearchParams(window.location.hash.slice(1));
    const token = params.get("token");
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    const status = params.get("status");
    if (status === "online" || status === "away") statusFilter = status;
    writeFragment();
  }

  function writeFragment() {
    const hash = statusFilter ? "#status=" + statusFilter : "";
    history.replaceState(null, "", window.location.pathname + window.location.search + hash);
  }

  function showFilter() {
    for (const button of document.querySelectorAll(".filter button")) {
      button.setAttribute("aria-pressed", String(button.dataset.status === statusFilter));
    }
  }

  function askToken(why) {
    $("fleet").hidden = true;
    $("token-why").textContent = why;
    $("token-form").hidden = false;
    $("updated").textContent = "";
    $("token-input").focus();
  }

  async function api(path) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) throw new NeedToken("An admin token is needed to see the fleet.");
    const response = await fetch(path, {
      headers: { Authorization: "Bearer " + token, Accept: "application/json" },
      cache: "no-store",
      credentials: "omit",
    });
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      throw new NeedToken("The broker refused that token (401). Enter another one.");
    }
    if (!response.ok) {
      throw new Error(path + " answered " + response.status + " " + response.statusText);
    }
    return response.json();
  }

  async function loadSessions() {
    const sessions = [];
    let after = null;
    for (let page = 0; page < MAX_PAGES; page++) {
      const query = new URLSearchParams({ limit: "100" });
      if (statusFilter) query.set("status", statusFilter);
      if (after !== null) query.set("after", after);
      const answer = await api("/api/sessions?" + query.toString());
      sessions.push(...answer.sessions);
      after = answer.next;
      if (after === null || after === undefined) return { sessions, more: false };
    }
    return { sessions, more: true };
  }

  // --- rendering: text only ---------------------------------------------------------------

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function plain(value) {
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  function ago(iso, now) {
    const then = Date.parse(iso);
    if (!iso || Number.isNaN(then)) return "-";
    const s = Math.max(0, Math.round((now - then) / 1000));
    if (s >= 86400) return Math.floor(s / 86400) + "d ago";
    if (s >= 3600) return Math.floor(s / 3600) + "h ago";
    if (s >= 60) return Math.floor(s / 60) + "m ago";
    return s + "s ago";
  }

  function healthCell(health) {
    const td = el("td");
    if (!health || !health.status) {
      td.append(el("span", "-", "muted"));
      return td;
    }
    // The class comes from a fixed list, never from what the device said.
    const known = ["healthy", "degraded", "unhealthy"].includes(health.status);
    td.append(el("span", health.status, known ? "health-" + health.status : ""));
    if (health.stale) {
      const mark = el("span", "stale", "stale");
      mark.title = "no health report for 2 x keepalive";
      td.append(mark);
    }
    if (health.details && Object.keys(health.details).length) {
      td.append(el("span", plain(health.details), "details"));
    }
    if (health.at) td.title = "reported " + health.at;
    return td;
  }

  function metadataCell(metadata) {
    const td = el("td", null, "meta-cell");
    const keys = metadata ? Object.keys(metadata).sort() : [];
    if (!keys.length) td.append(el("span", "-", "muted"));
    for (const key of keys) {
      const pair = el("span", null, "meta-pair");
      pair.append(el("span", key + "=", "meta-key"), document.createTextNode(plain(metadata[key])));
      td.append(pair);
    }
    return td;
  }

  function sessionRow(s, now) {
    const tr = el("tr");
    const id = el("td", s.client_id, "id");
    id.title = "session " + s.session_id;
    tr.append(id);
    tr.append(el("td", s.username));
    const status = el("td", s.status, s.status === "online" ? "status-online" : "status-away");
    status.title = s.status === "online"
      ? "connected since " + s.connected_since + (s.peer ? " from " + s.peer : "")
      : "away since " + s.away_since + (s.expires_at ? ", expires " + s.expires_at : "");
    tr.append(status);
    tr.append(healthCell(s.health));
    const seen = el("td", ago(s.last_seen, now));
    seen.title = s.last_seen || "";
    tr.append(seen);
    const queued = (s.subscriptions || []).reduce((sum, sub) => sum + (sub.queued || 0), 0);
    tr.append(el("td", queued, "num"));
    tr.append(metadataCell(s.metadata));
    return tr;
  }

  function renderSessions(result) {
    const now = Date.now();
    const rows = result.sessions.map((s) => sessionRow(s, now));
    $("rows").replaceChildren(...rows);
    $("empty").hidden = rows.length > 0;
    $("count").textContent = "(" + rows.length + (result.more ? "+" : "") + ")";
    const truncated = $("truncated");
    truncated.hidden = !result.more;
    truncated.textContent = result.more
      ? "Showing the first " + rows.length + " sessions only: use `tether sessions` or the " +
        "API's filters for the rest."
      : "";
  }

  function renderCounters(stats) {
    const items = Object.keys(stats).sort().map((key) => {
      const box = el("div");
      box.append(el("dt", key.replaceAll("_", " ")), el("dd", plain(stats[key])));
      return box;
    });
    $("counters").replaceChildren(...items);
  }

  // --- the refresh loop -------------------------------------------------------------------

  async function refresh() {
    if (running) {
      again = true;
      return;
    }
    running = true;
    clearTimeout(timer);
    try {
      const [result, stats] = await Promise.all([loadSessions(), api("/api/stats")]);
      renderSessions(result);
      renderCounters(stats);
      $("token-form").hidden = true;
      $("fleet").hidden = false;
      $("error").hidden = true;
      $("updated").textContent = "updated " + new Date().toLocaleTimeString() +
        ", every " + REFRESH_MS / 1000 + " s";
      timer = setTimeout(refresh, REFRESH_MS);
    } catch (error) {
      if (error instanceof NeedToken) {
        askToken(error.message); // no retry until a token is given
      } else {
        $("error").textContent = "Could not refresh: " + error.message + " (retrying)";
        $("error").hidden = false;
        timer = setTimeout(refresh, REFRESH_MS);
      }
    } finally {
      running = false;
      if (again) {
        again = false;
        refresh();
      }
    }
  }

  function start() {
    readFragment();
    showFilter();
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token-input").value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      $("token-input").value = "";
      refresh();
    });
    for (const button of document.querySelectorAll(".filter button")) {
      button.addEventListener("click", () => {
        statusFilter = button.dataset.status;
        showFilter();
        writeFragment();
        refresh();
      });
    }
    refresh();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
