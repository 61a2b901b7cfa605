// One account's page (#/accounts/{id} for the operator, #/account for an account session):
// request totals (today, this month, this year, and a custom range), the keys joined with their
// usage glance, the sites, and the audit log with its filter and paging. Every path is below
// `view.base` ("accounts/acc_…" or "account"), so both kinds of session share this file.
"use strict";

import { api } from "./api.js";
import { statusBadge } from "./accounts.js";
import { keyActionButtons, initKeyActions } from "./keyactions.js";
import {
  byId, el, clear, showError, busy, setReady, clearReady, formatTime, isPlainDate,
} from "./dom.js";

const AUDIT_PAGE = 20;
/** The contract's audit action names (section 5), and the account ones the API also writes. */
const AUDIT_ACTIONS = [
  "create_key", "update_key", "delete_key", "activate_key", "deactivate_key", "renew_key",
  "roll_key", "create_site", "delete_site", "create_secret", "delete_secret", "update_account",
  "create_account", "delete_account",
];
const TOTALS = [
  ["today", "Today"],
  ["this_month", "This month"],
  ["this_year", "This year"],
];

/** The view being shown, its custom range and audit page; replaced on each visit. */
let view = null;
let range = null;
let auditOffset = 0;
/** The search of the audit page shown (or being loaded). */
let auditSearch = "";
/** Per region, the number of its latest load: an older answer arriving late is dropped. */
const latest = {};

export function initAccount() {
  const select = byId("audit-action");
  select.append(el("option", { value: "all", text: "all" }));
  for (const action of AUDIT_ACTIONS) select.append(el("option", { value: action, text: action }));
  select.addEventListener("change", () => refresh(firstAuditPage));
  byId("audit-filter").addEventListener("submit", (event) => {
    event.preventDefault();
    refresh(firstAuditPage);
  });
  let typing = null;
  const search = byId("audit-search");
  search.addEventListener("input", () => {
    clearReady(); // at once, though the load waits for a pause in the typing
    clearTimeout(typing);
    typing = setTimeout(() => refresh(firstAuditPage), 300);
  });
  search.addEventListener("change", searchAudit);
  byId("audit-prev").addEventListener("click", () => refresh(() => pageAudit(-AUDIT_PAGE)));
  byId("audit-next").addEventListener("click", () => refresh(() => pageAudit(AUDIT_PAGE)));
  byId("range").addEventListener("submit", onRange);
  initKeyActions(() => view, reloadAfterAction);
}

/** Loads every region of the page; `v.current()` is false once the user has moved on. */
export async function showAccount(v) {
  view = v;
  range = null;
  auditOffset = 0;
  byId("range-start").value = "";
  byId("range-end").value = "";
  byId("audit-action").value = "all";
  byId("audit-search").value = "";
  showError(byId("totals-error"), "");
  clear(byId("account-totals"));
  await refresh(() => Promise.all([loadHeader(), loadTotals(), loadKeys(), loadSites(), loadAudit()]));
}

/** After a key action: the lists that it changed. */
function reloadAfterAction() {
  return refresh(() => Promise.all([loadKeys(), loadAudit()]));
}

/** Runs `work` with the page marked not ready, then ready again if still shown. */
async function refresh(work) {
  const v = view;
  clearReady();
  await work();
  if (v && v.current()) setReady("account");
}

/** Starts a load of `region`: answers a check that is true while it is still the latest one. */
function ticket(region) {
  const v = view;
  const n = (latest[region] = (latest[region] || 0) + 1);
  return () => v.current() && latest[region] === n;
}

/** Loads into a region: `fetch()` answers data, `render(data)` shows it; errors go to errorId. */
async function load(region, errorId, fetchData, render) {
  const fresh = ticket(region);
  await busy(byId(region), async () => {
    try {
      const data = await fetchData();
      if (!fresh()) return;
      showError(byId(errorId), "");
      render(data);
    } catch (error) {
      if (!fresh()) return;
      showError(byId(errorId), error.describe());
      render(null);
    }
  });
}

// === Header ===

async function loadHeader() {
  const fresh = ticket("header");
  const crumbs = byId("account-crumbs");
  clear(crumbs);
  byId("account-title").textContent = "Account";
  byId("account-meta").textContent = "";
  if (view.role === "operator") crumbs.append(el("a", { href: "#/accounts", text: "Accounts" }));
  try {
    const account = await api("GET", view.base);
    if (!fresh()) return;
    showError(byId("account-error"), "");
    byId("account-title").textContent = account.name;
    const status = "active" in account ? (account.active ? " · active" : " · inactive") : "";
    byId("account-meta").textContent =
      `${account.id} · auth ${account.auth_method} · created ${formatTime(account.created_at)}${status}`;
  } catch (error) {
    if (!fresh()) return;
    byId("account-title").textContent = "Account";
    byId("account-meta").textContent = "";
    showError(byId("account-error"), error.describe());
  }
}

// === Totals ===

function loadTotals() {
  const query = range ? { start_date: range.start, end_date: range.end } : {};
  return load("account-totals", "totals-error", () => api("GET", `${view.base}/usage`, { query }), renderTotals);
}

function renderTotals(usage) {
  const box = byId("account-totals");
  clear(box);
  if (!usage) return;
  for (const [name, label] of TOTALS) box.append(totalCard(name, label, usage[name]));
  if (usage.custom && range) {
    box.append(totalCard("custom", `${range.start} to ${range.end}`, usage.custom));
  }
}

function totalCard(name, label, totals) {
  const counts = totals || { request_count: 0, success_count: 0, error_count: 0 };
  const item = (field, text) => [
    el("dt", { text }),
    el("dd", { dataset: { field }, text: String(counts[field]) }),
  ];
  return el(
    "section",
    { class: "total card", dataset: { total: name }, attrs: { "aria-label": `${label} (UTC)` } },
    el("h3", { text: label }),
    el("dl", {}, ...item("request_count", "Requests"), ...item("success_count", "Success"),
      ...item("error_count", "Error")),
  );
}

function onRange(event) {
  event.preventDefault();
  const start = byId("range-start").value;
  const end = byId("range-end").value;
  if (!isPlainDate(start) || !isPlainDate(end)) {
    showError(byId("totals-error"), "Pick both dates of the range.");
    return;
  }
  range = { start, end };
  refresh(loadTotals);
}

// === Keys ===

function loadKeys() {
  const fetchKeys = async () => {
    const [list, glance] = await Promise.all([
      api("GET", `${view.base}/keys`),
      api("GET", `${view.base}/usage/keys`),
    ]);
    const byKey = new Map((glance.keys || []).map((g) => [g.key_id, g]));
    return (list.keys || []).map((key) => ({ key, glance: byKey.get(key.id) || null }));
  };
  return load("keys-region", "keys-error", fetchKeys, renderKeys);
}

function renderKeys(rows) {
  const tbody = byId("keys").tBodies[0];
  clear(tbody);
  tbody.append(...(rows || []).map(({ key, glance }) => keyRow(key, glance)));
  byId("keys-empty").hidden = !rows || rows.length > 0;
}

function keyRow(key, glance) {
  const link = el("a", { href: `${view.hash}/keys/${encodeURIComponent(key.id)}`, dataset: { link: "usage" }, text: key.name });
  const shown = key.preview || key.prefix || "imported";
  const type = key.protected ? `${key.type} · protected` : key.type;
  return el(
    "tr",
    { dataset: { keyId: key.id } },
    el("th", { scope: "row", dataset: { field: "name" } }, link),
    el("td", { dataset: { field: "preview" } }, el("code", { text: shown })),
    el("td", { dataset: { field: "type" }, text: type }),
    el("td", { dataset: { field: "active" } }, statusBadge(key.active)),
    el("td", { dataset: { field: "last_used_at" }, text: glance?.last_used_at ? formatTime(glance.last_used_at) : "never" }),
    el("td", { dataset: { field: "rate_limit" }, text: rateLimitText(glance) }),
    el("td", { class: "actions" }, el("div", { class: "action-row" }, ...keyActionButtons(key))),
  );
}

function rateLimitText(glance) {
  if (!glance || glance.rate_limit_max === null || glance.rate_limit_max === undefined) return "no limit";
  return `${glance.rate_limit_remaining ?? glance.rate_limit_max} of ${glance.rate_limit_max}`;
}

// === Sites ===

function loadSites() {
  return load("sites-region", "sites-error", () => api("GET", `${view.base}/sites`), renderSites);
}

function renderSites(answer) {
  const list = byId("sites");
  clear(list);
  const sites = answer?.sites || [];
  list.append(...sites.map((site) => el(
    "li",
    { dataset: { siteId: site.id } },
    el("span", { class: "site-name", text: site.name }),
    el("span", { class: "meta", text: ` added ${formatTime(site.created_at)}` }),
  )));
  byId("sites-empty").hidden = !answer || sites.length > 0;
}

// === Audit ===

/** A search typed (or changed) that differs from the one shown: its first page. */
function searchAudit() {
  if (byId("audit-search").value.trim() !== auditSearch) refresh(firstAuditPage);
}

function firstAuditPage() {
  auditOffset = 0;
  return loadAudit();
}

function pageAudit(delta) {
  auditOffset = Math.max(0, auditOffset + delta);
  return loadAudit();
}

function loadAudit() {
  const action = byId("audit-action").value;
  const query = {
    limit: AUDIT_PAGE,
    offset: auditOffset,
    action: action === "all" ? null : action,
    search: byId("audit-search").value.trim(),
  };
  auditSearch = query.search;
  return load("audit-region", "audit-error", () => api("GET", `${view.base}/audit`, { query }), renderAudit);
}

function renderAudit(page) {
  const tbody = byId("audit").tBodies[0];
  clear(tbody);
  const logs = page?.logs || [];
  tbody.append(...logs.map(auditRow));
  byId("audit-empty").hidden = !page || logs.length > 0;
  const total = page?.total || 0;
  const offset = page?.offset || 0;
  byId("audit-range").textContent = logs.length
    ? `${offset + 1}–${offset + logs.length} of ${total}`
    : `0 of ${total}`;
  byId("audit-prev").disabled = offset === 0;
  byId("audit-next").disabled = offset + logs.length >= total;
}

function auditRow(entry) {
  const detail = entry.detail === null || entry.detail === undefined ? "" : JSON.stringify(entry.detail);
  return el(
    "tr",
    { dataset: { auditId: entry.id } },
    el("td", { dataset: { field: "created_at" }, text: formatTime(entry.created_at) }),
    el("td", { dataset: { field: "action" }, text: entry.action }),
    el("td", { dataset: { field: "actor_id" } }, el("code", { text: entry.actor_id })),
    el("td", { dataset: { field: "target" } }, `${entry.target_type} `, el("code", { text: entry.target_id })),
    el("td", { class: "detail", dataset: { field: "detail" }, text: detail }),
    el("td", { dataset: { field: "ip" }, text: entry.ip || "—" }),
  );
}
