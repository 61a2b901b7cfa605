// Small DOM and formatting helpers shared by the views.
//
// Everything the API says reaches the page through textContent or attributes set here, never
// through HTML parsing, so nothing it answers can run as script. Times are shown in UTC.
"use strict";

/** The element with this id (which the page is known to have). */
export function byId(id) {
  return document.getElementById(id);
}

/**
 * A new element. `props`: `class`, `text`, `dataset` (object), `attrs` (object of attributes),
 * `on` (object of event listeners), anything else set as a property. Children: nodes or strings.
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = String(value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "attrs") for (const [a, v] of Object.entries(value)) node.setAttribute(a, v);
    else if (name === "on") for (const [e, f] of Object.entries(value)) node.addEventListener(e, f);
    else node[name] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

export function clear(node) {
  node.replaceChildren();
}

/** Shows `message` in an error element (role="alert"), or hides it when message is empty. */
export function showError(node, message) {
  node.textContent = message || "";
  node.hidden = !message;
}

/** Marks a region as loading (aria-busy) for the time of `work`, and answers its result. */
export async function busy(region, work) {
  region.setAttribute("aria-busy", "true");
  try {
    return await work();
  } finally {
    region.removeAttribute("aria-busy");
  }
}

/** `document.body.dataset.ready`: the view whose data is on screen; tests wait on it. */
export function setReady(view) {
  document.body.dataset.ready = view;
}

export function clearReady() {
  delete document.body.dataset.ready;
}

// === Times (UTC) ===

const pad = (n) => String(n).padStart(2, "0");

/** "2026-12-06" of a Date, in UTC. */
export function utcDate(date) {
  return `${date.getUTCFullYear()}-${pad(date.getUTCMonth() + 1)}-${pad(date.getUTCDate())}`;
}

/** "2026-12-06 14:05 UTC" of an RFC 3339 time; "—" for none. */
export function formatTime(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  return `${utcDate(date)} ${pad(date.getUTCHours())}:${pad(date.getUTCMinutes())} UTC`;
}

/** A bucket's start for an interval: the date alone for day and longer buckets. */
export function formatBucket(iso, interval) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  if (interval === "minute" || interval === "hour") return formatTime(iso);
  return utcDate(date);
}

/** The UTC date `days` after the plain date "YYYY-MM-DD". */
export function addDays(plainDate, days) {
  const date = new Date(`${plainDate}T00:00:00Z`);
  date.setUTCDate(date.getUTCDate() + days);
  return utcDate(date);
}

export function todayUtc() {
  return utcDate(new Date());
}

/** Whether `value` is a plain date "YYYY-MM-DD" (what a date input gives). */
export function isPlainDate(value) {
  return /^\d{4}-\d{2}-\d{2}$/.test(value);
}
