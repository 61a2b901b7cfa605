// The one place that talks to the admin API, and the session's credential.
//
// Every call goes to `../v1/…` relative to the page, so the app works under any path prefix or
// host name. The credential lives only in sessionStorage and in the Authorization header: never
// in a URL, never logged. An answer that is not 2xx becomes an ApiError carrying the API's own
// `error.code` and `error.message`; a 401 on a signed-in call ends the session (onUnauthorized).
"use strict";

const STORAGE_KEY = "tollgate.credential";
const ROLE_KEY = "tollgate.role";

/** An API refusal (or a network failure, code "network"), with the API's own words. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }

  /** "message (code)": how errors are shown everywhere. */
  describe() {
    return this.code ? `${this.message} (${this.code})` : this.message;
  }
}

let unauthorizedHandler = () => {};

/** Called with the ApiError when a signed-in call answers 401. */
export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

export function storedCredential() {
  return sessionStorage.getItem(STORAGE_KEY);
}

/** Keeps the credential, and the role it was found to have ("operator" or "account"). */
export function storeCredential(credential, role) {
  sessionStorage.setItem(STORAGE_KEY, credential);
  sessionStorage.setItem(ROLE_KEY, role);
}

export function storedRole() {
  return sessionStorage.getItem(ROLE_KEY);
}

export function forgetCredential() {
  sessionStorage.clear();
}

/** The URL of an API path such as "accounts/acc_1/keys", with its query (nulls left out). */
export function apiUrl(path, query = {}) {
  const url = new URL(`../v1/${path}`, document.baseURI);
  for (const [name, value] of Object.entries(query)) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(name, value);
  }
  return url;
}

/**
 * Calls the API and answers the parsed JSON body (null for an empty one).
 * Options: `query` (object), `body` (sent as JSON), `credential` (default: the stored one),
 * `signOutOn401` (default true; sign-in's own probing turns it off).
 */
export async function api(method, path, options = {}) {
  const credential = options.credential ?? storedCredential();
  const headers = { Accept: "application/json" };
  if (credential) headers.Authorization = `Bearer ${credential}`;
  const init = { method, headers, cache: "no-store", credentials: "omit", redirect: "error" };
  if (options.body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body);
  }
  let response;
  try {
    response = await fetch(apiUrl(path, options.query), init);
  } catch (e) {
    throw new ApiError(0, "network", "The gateway could not be reached.");
  }
  const payload = await readJson(response);
  if (response.ok) return payload;
  const error = toApiError(response, payload);
  if (response.status === 401 && options.signOutOn401 !== false) unauthorizedHandler(error);
  throw error;
}

async function readJson(response) {
  const text = await response.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch (e) {
    return null;
  }
}

function toApiError(response, payload) {
  const error = payload && typeof payload === "object" ? payload.error : null;
  if (error && typeof error.message === "string") {
    return new ApiError(response.status, String(error.code ?? ""), error.message);
  }
  const reason = response.statusText ? ` ${response.statusText}` : "";
  return new ApiError(response.status, "", `The gateway answered ${response.status}${reason}.`);
}
