// The operator's accounts list (#/accounts): GET /v1/accounts, filtered by name or id in the
// page as the search box is typed in.
"use strict";

import { api } from "./api.js";
import { byId, el, clear, showError, busy, setReady, clearReady, formatTime } from "./dom.js";

let accounts = [];
/** The search the rows shown were filtered by. */
let shownQuery = "";

export function initAccounts() {
  // "change" too: a cleared field (by script, or a browser's clear button) may send only that.
  for (const type of ["input", "change", "search"]) byId("account-search").addEventListener(type, onSearch);
}

/** Loads and shows the list; `view.current()` is false once the user has moved on. */
export async function showAccounts(view) {
  clearReady();
  const region = byId("accounts-region");
  await busy(region, async () => {
    try {
      const answer = await api("GET", "accounts");
      if (!view.current()) return;
      accounts = answer.accounts || [];
      showError(byId("accounts-error"), "");
    } catch (error) {
      if (!view.current()) return;
      accounts = [];
      showError(byId("accounts-error"), error.describe());
    }
    renderRows();
  });
  if (view.current()) setReady("accounts");
}

/** Filters again only when the search changed, so that a row being clicked stays in place. */
function onSearch() {
  if (byId("account-search").value.trim().toLowerCase() !== shownQuery) renderRows();
}

function renderRows() {
  const query = byId("account-search").value.trim().toLowerCase();
  shownQuery = query;
  const shown = accounts.filter(
    (a) => !query || a.name.toLowerCase().includes(query) || a.id.toLowerCase().includes(query),
  );
  const tbody = byId("accounts").tBodies[0];
  clear(tbody);
  tbody.append(...shown.map(accountRow));
  const empty = byId("accounts-empty");
  empty.hidden = shown.length > 0 || !byId("accounts-error").hidden;
  empty.textContent = accounts.length ? "No account matches the search." : "No accounts yet.";
}

function accountRow(account) {
  const link = el("a", { href: `#/accounts/${encodeURIComponent(account.id)}`, text: account.name });
  return el(
    "tr",
    { dataset: { accountId: account.id } },
    el("th", { scope: "row", dataset: { field: "name" } }, link),
    el("td", { dataset: { field: "id" } }, el("code", { text: account.id })),
    el("td", { dataset: { field: "active" } }, statusBadge(account.active)),
    el("td", { dataset: { field: "auth_method" }, text: account.auth_method }),
    el("td", { dataset: { field: "created_at" }, text: formatTime(account.created_at) }),
  );
}

/** "active" / "inactive", styled. */
export function statusBadge(active) {
  return el("span", { class: active ? "badge ok" : "badge off", text: active ? "active" : "inactive" });
}
