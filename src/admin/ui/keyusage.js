// One key's page (#/accounts/{id}/keys/{key_id}, #/account/keys/{key_id}): its requests over
// time from GET …/keys/{key_id}/usage, drawn with uPlot (success, error, rate limited; bytes in
// and out in a second chart), the same buckets in a table, and a CSV of them.
//
// The date inputs are UTC days and both ends are included: the API's `to` excludes the bucket
// that starts at it, so the day after the picked `to` is sent.
"use strict";

import { api } from "./api.js";
import {
  byId, el, clear, showError, busy, setReady, clearReady, formatTime, formatBucket, addDays,
  todayUtc, isPlainDate,
} from "./dom.js";

/** Rows the table shows at most (a week of minutes); the chart and the CSV hold every bucket. */
const TABLE_ROWS = 7 * 24 * 60;
const FIELDS = ["request_count", "success_count", "error_count", "rate_limited_count", "bytes_in", "bytes_out"];
const COLORS = { success: "#15803d", error: "#b91c1c", rateLimited: "#b45309", bytesIn: "#1d4ed8", bytesOut: "#7c3aed" };

let view = null;
let latest = 0;
let plots = [];
let csvUrl = null;

export function initKeyUsage() {
  byId("usage-form").addEventListener("submit", (event) => {
    event.preventDefault();
    refresh(loadUsage);
  });
  new ResizeObserver(fitPlots).observe(byId("usage-chart"));
}

/** Shows key `v.keyId` with the last 7 days, by day. */
export async function showKey(v) {
  view = v;
  const today = todayUtc();
  byId("usage-from").value = addDays(today, -6);
  byId("usage-to").value = today;
  byId("usage-interval").value = "day";
  clearUsage();
  await refresh(() => Promise.all([loadHeader(), loadUsage()]));
}

async function refresh(work) {
  const v = view;
  clearReady();
  await work();
  if (v && v.current()) setReady("key");
}

// === Header ===

async function loadHeader() {
  const v = view;
  const crumbs = byId("key-crumbs");
  clear(crumbs);
  byId("key-title").textContent = "Key";
  byId("key-meta").textContent = "";
  if (v.role === "operator") crumbs.append(el("a", { href: "#/accounts", text: "Accounts" }), " › ");
  const accountLink = el("a", { href: v.hash, text: v.role === "operator" ? v.accountId : "Account" });
  crumbs.append(accountLink);
  const [account, key] = await Promise.allSettled([
    api("GET", v.base),
    api("GET", `${v.base}/keys/${encodeURIComponent(v.keyId)}`),
  ]);
  if (!v.current()) return;
  if (account.status === "fulfilled") accountLink.textContent = account.value.name;
  if (key.status === "fulfilled") {
    const k = key.value;
    byId("key-title").textContent = k.name;
    const expires = k.expires_at ? ` · expires ${formatTime(k.expires_at)}` : "";
    byId("key-meta").textContent =
      `${k.preview || k.prefix || "imported"} · ${k.type} · ${k.active ? "active" : "inactive"}${expires}`;
  } else {
    byId("key-title").textContent = v.keyId;
    byId("key-meta").textContent = "";
  }
}

// === Usage ===

async function loadUsage() {
  const from = byId("usage-from").value;
  const to = byId("usage-to").value;
  const interval = byId("usage-interval").value;
  if (!isPlainDate(from) || !isPlainDate(to)) return failUsage("Pick both dates.");
  if (from > to) return failUsage("“From” must not be after “To”.");
  const n = ++latest;
  const v = view;
  const query = { from, to: addDays(to, 1), interval };
  await busy(byId("usage-region"), async () => {
    try {
      const usage = await api("GET", `${v.base}/keys/${encodeURIComponent(v.keyId)}/usage`, { query });
      if (v.current() && n === latest) drawUsage(usage);
    } catch (error) {
      if (v.current() && n === latest) failUsage(error.describe());
    }
  });
}

function failUsage(message) {
  clearUsage();
  showError(byId("usage-error"), message);
}

function clearUsage() {
  showError(byId("usage-error"), "");
  for (const plot of plots) plot.destroy();
  plots = [];
  delete byId("usage-chart").dataset.series;
  clear(byId("usage-table").tBodies[0]);
  byId("usage-empty").hidden = true;
  byId("usage-note").hidden = true;
  byId("usage-summary").textContent = "";
  setCsv(null);
}

function drawUsage(usage) {
  clearUsage();
  const buckets = usage.buckets || [];
  const series = {
    bucket: buckets.map((b) => b.bucket),
    success: buckets.map((b) => b.success_count),
    error: buckets.map((b) => b.error_count),
    rate_limited: buckets.map((b) => b.rate_limited_count),
    bytes_in: buckets.map((b) => b.bytes_in),
    bytes_out: buckets.map((b) => b.bytes_out),
  };
  byId("usage-summary").textContent =
    `${buckets.length} ${usage.interval} bucket${buckets.length === 1 ? "" : "s"} from ${formatTime(usage.from)} to ${formatTime(usage.to)} (end excluded).`;
  byId("usage-empty").hidden = buckets.length > 0;
  if (buckets.length) drawCharts(series, usage.interval);
  byId("usage-chart").dataset.series = JSON.stringify(series);
  fillTable(buckets, usage.interval);
  setCsv(buckets, usage);
}

// === Charts ===

function drawCharts(series, interval) {
  const xs = series.bucket.map((b) => Date.parse(b) / 1000);
  const points = { show: xs.length <= 60 };
  plots.push(plot(byId("usage-chart"), 260, interval, [xs, series.success, series.error, series.rate_limited], [
    { label: "Success", stroke: COLORS.success, width: 2, points },
    { label: "Error", stroke: COLORS.error, width: 3, points },
    { label: "Rate limited", stroke: COLORS.rateLimited, width: 2, dash: [6, 4], points },
  ], (n) => String(n)));
  plots.push(plot(byId("usage-bytes-chart"), 180, interval, [xs, series.bytes_in, series.bytes_out], [
    { label: "Bytes in", stroke: COLORS.bytesIn, width: 2, points },
    { label: "Bytes out", stroke: COLORS.bytesOut, width: 2, dash: [6, 4], points },
  ], formatBytes));
}

/** One uPlot chart in `container`, with time in UTC on x and `format` for the y values. */
function plot(container, height, interval, data, series, format) {
  const { uPlot } = window;
  const options = {
    width: chartWidth(container),
    height,
    // Room on the right for the last time label, which uPlot centres on its tick.
    padding: [12, 36, 0, 4],
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max)] } },
    series: [
      { label: "Bucket (UTC)", value: (u, x) => (x === null ? "—" : formatBucket(new Date(x * 1000).toISOString(), interval)) },
      ...series.map((s) => ({ ...s, value: (u, y) => (y === null ? "—" : format(y)) })),
    ],
    axes: [
      { space: 90, incrs: TICKS[interval], values: (u, ticks) => ticks.map((t) => tickLabel(t, interval)) },
      { size: 64, values: (u, ticks) => ticks.map(format) },
    ],
    cursor: { focus: { prox: 16 } },
  };
  return new uPlot(options, data, container);
}

const MIN = 60;
const HOUR = 3600;
const DAY = 86400;
/** Time-axis tick steps (seconds) per interval: never finer than one bucket. */
const TICKS = {
  minute: [MIN, 5 * MIN, 10 * MIN, 15 * MIN, 30 * MIN, HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR, DAY, 7 * DAY, 30 * DAY],
  hour: [HOUR, 2 * HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR, DAY, 2 * DAY, 7 * DAY, 14 * DAY, 30 * DAY, 91 * DAY],
  day: [DAY, 2 * DAY, 7 * DAY, 14 * DAY, 30 * DAY, 91 * DAY, 182 * DAY, 365 * DAY],
  week: [7 * DAY, 14 * DAY, 28 * DAY, 91 * DAY, 182 * DAY, 365 * DAY],
  month: [30 * DAY, 91 * DAY, 182 * DAY, 365 * DAY, 730 * DAY],
};

/** A tick's label in UTC: the time for minute and hour buckets, else the date. */
function tickLabel(seconds, interval) {
  const iso = new Date(seconds * 1000).toISOString();
  if (interval === "minute" || interval === "hour") return `${iso.slice(5, 10)} ${iso.slice(11, 16)}`;
  if (interval === "month") return iso.slice(0, 7);
  return iso.slice(0, 10);
}

function chartWidth(container) {
  return Math.max(240, Math.floor(container.clientWidth || 600));
}

function fitPlots() {
  for (const p of plots) {
    const width = chartWidth(p.root.parentElement);
    if (width !== p.width) p.setSize({ width, height: p.height });
  }
}

function formatBytes(n) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let value = n;
  let unit = 0;
  while (Math.abs(value) >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  const digits = unit === 0 || value >= 100 ? 0 : 1;
  return `${value.toFixed(digits)} ${units[unit]}`;
}

// === Table and CSV ===

function fillTable(buckets, interval) {
  const shown = buckets.length > TABLE_ROWS ? buckets.slice(-TABLE_ROWS) : buckets;
  const tbody = byId("usage-table").tBodies[0];
  tbody.append(...shown.map((b) => el(
    "tr",
    { dataset: { bucket: b.bucket } },
    el("th", { scope: "row", dataset: { field: "bucket" } }, el("time", { dateTime: b.bucket, text: formatBucket(b.bucket, interval) })),
    ...FIELDS.map((f) => el("td", { class: "num", dataset: { field: f }, text: String(b[f]) })),
  )));
  const note = byId("usage-note");
  note.hidden = shown.length === buckets.length;
  note.textContent = `The table shows the last ${shown.length} of ${buckets.length} buckets; the chart and the CSV hold them all.`;
}

function setCsv(buckets, usage) {
  const link = byId("usage-csv");
  if (csvUrl) URL.revokeObjectURL(csvUrl);
  csvUrl = null;
  if (!buckets) {
    link.removeAttribute("href");
    link.setAttribute("aria-disabled", "true");
    return;
  }
  const lines = [["bucket", ...FIELDS].join(",")];
  for (const b of buckets) lines.push([b.bucket, ...FIELDS.map((f) => b[f])].map(csvField).join(","));
  csvUrl = URL.createObjectURL(new Blob([`${lines.join("\r\n")}\r\n`], { type: "text/csv" }));
  link.href = csvUrl;
  link.download = `usage-${usage.key_id}-${usage.interval}-${usage.from.slice(0, 10)}-${usage.to.slice(0, 10)}.csv`;
  link.removeAttribute("aria-disabled");
}

function csvField(value) {
  const text = String(value);
  return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}
