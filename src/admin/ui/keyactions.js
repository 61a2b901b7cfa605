// What can be done to an account's keys from its page: create (raw key shown once), rename,
// deactivate / activate, roll with a grace period (new raw key shown once), delete after a
// confirmation. Each is one call to the API below the page's base path; its errors (409
// last_credential, name_taken, …) are shown in the dialog, and the lists reload after it.
"use strict";

import { api } from "./api.js";
import { openDialog, openError } from "./dialog.js";
import { byId, el, clearReady, setReady } from "./dom.js";

let currentView = () => null;
let reload = async () => {};

/** `getView()` answers the account page being shown; `afterChange()` reloads its lists. */
export function initKeyActions(getView, afterChange) {
  currentView = getView;
  reload = afterChange;
  byId("create-key").addEventListener("click", createKey);
}

/** The action buttons of one key's row. */
export function keyActionButtons(key) {
  const button = (action, text, handler, extra = "") => el("button", {
    type: "button",
    class: `small ${extra}`.trim(),
    dataset: { action },
    text,
    attrs: { "aria-label": `${text} key ${key.name}` },
    on: { click: (event) => handler(key, event.currentTarget) },
  });
  return [
    button("rename", "Rename", renameKey, "secondary"),
    key.active
      ? button("deactivate", "Deactivate", (k, b) => setActive(k, b, false), "secondary")
      : button("activate", "Activate", (k, b) => setActive(k, b, true), "secondary"),
    button("roll", "Roll", rollKey, "secondary"),
    button("delete", "Delete", deleteKey, "danger"),
  ];
}

function keysPath(suffix = "") {
  return `${currentView().base}/keys${suffix}`;
}

function keyPath(key, suffix = "") {
  return keysPath(`/${encodeURIComponent(key.id)}${suffix}`);
}

/**
 * Runs one change: the page is marked not ready from the start (tests wait for `ready` after a
 * click), the lists reload after it, and a refusal gives `ready` back before it is shown.
 */
async function change(work) {
  const view = currentView();
  clearReady();
  let answer;
  try {
    answer = await work();
  } catch (error) {
    if (view.current()) setReady("account");
    throw error;
  }
  await reload();
  return answer;
}

/** A label and its control, stacked. */
function field(label, control, hint) {
  return el("div", { class: "field" },
    el("label", { htmlFor: control.id, text: label }),
    control,
    hint ? el("p", { class: "hint", id: `${control.id}-hint`, text: hint }) : null);
}

function createKey() {
  const name = el("input", { id: "new-key-name", type: "text", required: true, maxLength: 100, autocomplete: "off" });
  const type = el("select", { id: "new-key-type" },
    el("option", { value: "secret", text: "secret (server side)" }),
    el("option", { value: "publishable", text: "publishable (browsers, limited to origins)" }));
  const origin = el("input", { id: "new-key-origin", type: "text", inputMode: "url", placeholder: "https://example.com", autocomplete: "off", spellcheck: false });
  const originField = field("Allowed origin", origin, "Required for a publishable key, e.g. https://example.com.");
  const showOrigin = () => {
    originField.hidden = type.value !== "publishable";
  };
  type.addEventListener("change", showOrigin);
  showOrigin();
  openDialog({
    title: "Create a key",
    fields: [field("Name", name), field("Type", type), originField],
    confirmLabel: "Create key",
    onConfirm: async () => {
      const body = { name: name.value, type: type.value };
      if (type.value === "publishable") body.allowed_origins = origin.value.trim() ? [origin.value.trim()] : [];
      const created = await change(() => api("POST", keysPath(), { body }));
      return { rawKey: created.key, title: `Key “${created.name}” created` };
    },
  });
}

function renameKey(key) {
  const name = el("input", { id: "rename-name", type: "text", required: true, maxLength: 100, value: key.name, autocomplete: "off" });
  openDialog({
    title: `Rename key “${key.name}”`,
    fields: [field("New name", name)],
    confirmLabel: "Rename",
    onConfirm: async () => {
      await change(() => api("PATCH", keyPath(key), { body: { name: name.value } }));
    },
  });
}

/** Deactivating and activating are reversible, so they run at once; a refusal opens the dialog. */
async function setActive(key, button, active) {
  button.disabled = true;
  try {
    await change(() => api("POST", keyPath(key, active ? "/activate" : "/deactivate")));
  } catch (error) {
    button.disabled = false;
    openError(`Could not ${active ? "activate" : "deactivate"} “${key.name}”`, error);
  }
}

function rollKey(key) {
  const grace = el("input", { id: "roll-grace", type: "text", required: true, value: "24h", autocomplete: "off", spellcheck: false });
  grace.setAttribute("aria-describedby", "roll-grace-hint");
  openDialog({
    title: `Roll key “${key.name}”`,
    fields: [
      el("p", { text: "A new key replaces this one. The old key keeps working until the grace period ends." }),
      field("Grace period", grace, "A number and a unit: 30m, 24h, 7d; 0s ends the old key at once."),
    ],
    confirmLabel: "Roll key",
    onConfirm: async () => {
      const rolled = await change(() => api("POST", keyPath(key, "/roll"), { body: { grace: grace.value.trim() } }));
      return { rawKey: rolled.key, title: `Key “${key.name}” rolled` };
    },
  });
}

function deleteKey(key) {
  openDialog({
    title: `Delete key “${key.name}”?`,
    fields: [el("p", { text: "Requests with this key are refused at once. This cannot be undone." })],
    confirmLabel: "Delete key",
    danger: true,
    onConfirm: async () => {
      await change(() => api("DELETE", keyPath(key)));
    },
  });
}
