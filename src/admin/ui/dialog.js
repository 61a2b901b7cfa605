// The one <dialog id="dialog">, reused by every action: a form whose fields, confirm button and
// handler are set by the caller, API errors shown in #dialog-error without closing, and the
// "raw key, shown once" panel after a create or roll. Esc and Cancel close it; Enter confirms.
"use strict";

import { ApiError } from "./api.js";
import { byId, el, clear, showError } from "./dom.js";

const dialog = () => byId("dialog");
let confirmHandler = null;
let pending = false;

/** Wires the dialog's form once, at start. */
export function initDialog() {
  byId("dialog-form").addEventListener("submit", onSubmit);
  dialog().addEventListener("close", onClose);
  dialog().addEventListener("cancel", (event) => {
    if (pending) event.preventDefault();
  });
}

/**
 * Opens the dialog. `fields`: nodes for its body. `onConfirm()` runs on submit: when it throws
 * an ApiError the message is shown and the dialog stays open; when it answers `{ rawKey }` the
 * key is shown once; otherwise the dialog closes.
 */
export function openDialog({ title, fields, confirmLabel, danger = false, onConfirm }) {
  fill(title, fields);
  confirmHandler = onConfirm;
  byId("dialog-actions").append(
    el("button", { type: "button", id: "dialog-cancel", class: "secondary", text: "Cancel", on: { click: close } }),
    el("button", { type: "submit", id: "dialog-confirm", class: danger ? "danger" : "", text: confirmLabel }),
  );
  show();
}

/** Opens the dialog with an API error alone (for actions that need no confirmation). */
export function openError(title, error) {
  fill(title, [el("p", { text: "The gateway refused this action." })]);
  showError(byId("dialog-error"), describe(error));
  confirmHandler = null;
  byId("dialog-actions").append(closeButton());
  show();
}

function fill(title, fields) {
  if (dialog().open) dialog().close();
  byId("dialog-title").textContent = title;
  clear(byId("dialog-body"));
  clear(byId("dialog-actions"));
  byId("dialog-body").append(...fields);
  showError(byId("dialog-error"), "");
}

function show() {
  dialog().showModal();
  const first = byId("dialog-body").querySelector("input:not([type=hidden]), select");
  // A confirmation without fields starts on Cancel, so that Enter alone does not delete.
  (first || byId("dialog-cancel") || byId("dialog-actions").querySelector("button"))?.focus();
}

function close() {
  if (!pending) dialog().close();
}

function closeButton() {
  return el("button", { type: "button", id: "dialog-close", text: "Close", on: { click: close } });
}

async function onSubmit(event) {
  event.preventDefault();
  if (pending) return;
  if (!confirmHandler) return close();
  const confirm = byId("dialog-confirm");
  const form = byId("dialog-form");
  let result = null;
  let failure = null;
  pending = true;
  confirm.disabled = true;
  form.setAttribute("aria-busy", "true");
  try {
    result = await confirmHandler();
  } catch (error) {
    failure = error;
  } finally {
    pending = false;
    confirm.disabled = false;
    form.removeAttribute("aria-busy");
  }
  if (failure) showError(byId("dialog-error"), describe(failure));
  else if (result && result.rawKey) showRawKey(result.rawKey, result.title);
  else close();
}

/** The new key's raw value, once, with a copy button and the warning. */
function showRawKey(rawKey, title) {
  confirmHandler = null;
  byId("dialog-title").textContent = title || "Your new key";
  showError(byId("dialog-error"), "");
  const raw = el("input", { id: "new-key-raw", type: "text", readOnly: true, value: rawKey, spellcheck: false, autocomplete: "off" });
  const status = el("p", { id: "new-key-copy-status", class: "hint", attrs: { "aria-live": "polite" } });
  const copy = el("button", { type: "button", id: "new-key-copy", class: "secondary", text: "Copy", on: { click: () => copyKey(raw, status) } });
  clear(byId("dialog-body"));
  byId("dialog-body").append(
    el("p", { class: "warning", id: "new-key-warning", text: "This key is shown only once. Copy it now and keep it somewhere safe: it cannot be shown again." }),
    el("label", { htmlFor: "new-key-raw", text: "New key" }),
    el("div", { class: "copy-row" }, raw, copy),
    status,
  );
  clear(byId("dialog-actions"));
  byId("dialog-actions").append(closeButton());
  raw.focus();
  raw.select();
}

async function copyKey(input, status) {
  try {
    await navigator.clipboard.writeText(input.value);
    status.textContent = "Copied to the clipboard.";
  } catch (e) {
    // No clipboard API (a plain-http page on another host) or no permission: select the text.
    input.focus();
    input.select();
    status.textContent = "Selected: press Ctrl+C (⌘C) to copy.";
  }
}

// The raw key leaves the page as soon as the dialog closes.
function onClose() {
  confirmHandler = null;
  clear(byId("dialog-body"));
  clear(byId("dialog-actions"));
  showError(byId("dialog-error"), "");
}

function describe(error) {
  return error instanceof ApiError ? error.describe() : String(error?.message || error);
}
