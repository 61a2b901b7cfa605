// tollgate's usage dashboard: the entry point. Sign-in and sign-out, the session's role, and the
// hash router that shows one view at a time:
//   #/accounts                          operator: accounts.js
//   #/accounts/{id}, #/account          an account's page: account.js (+ keyactions.js, dialog.js)
//   #/accounts/{id}/keys/{key_id},
//   #/account/keys/{key_id}             a key's usage: keyusage.js
// api.js is the only file that calls the API; dom.js builds every element from text.
"use strict";

import {
  api, ApiError, onUnauthorized, storedCredential, storedRole, storeCredential, forgetCredential,
} from "./api.js";
import { byId, showError, setReady, clearReady } from "./dom.js";
import { initDialog } from "./dialog.js";
import { initAccounts, showAccounts } from "./accounts.js";
import { initAccount, showAccount } from "./account.js";
import { initKeyUsage, showKey } from "./keyusage.js";

const VIEWS = ["signin", "accounts", "account", "key"];

/** Who is signed in: `role` "operator" or "account", `name` for the header. Null: nobody. */
let session = null;
/** Bumped on every navigation and sign-out: a view's late answers check it before drawing. */
let generation = 0;

// Anything the Content-Security-Policy blocked is counted on the page (`data-csp-violations`),
// where the tests look: a blocked script or style would otherwise fail silently.
document.addEventListener("securitypolicyviolation", (event) => {
  const seen = Number(document.body.dataset.cspViolations || 0);
  document.body.dataset.cspViolations = String(seen + 1);
  document.body.dataset.cspLast = `${event.violatedDirective} ${event.blockedURI}`;
});

function start() {
  initDialog();
  initAccounts();
  initAccount();
  initKeyUsage();
  byId("signin").addEventListener("submit", onSignIn);
  byId("signout").addEventListener("click", () => signOut(""));
  window.addEventListener("hashchange", () => route(true));
  onUnauthorized((error) => signOut(`Signed out: ${error.describe()}`));
  resume();
}

// === Session ===

/**
 * The role a credential has: the operator's master key may list accounts; an account's key or
 * token may read its own account. Anything else throws the API's error for the latter.
 * `known`: the role found at sign-in, tried first on a reload so that it costs one call.
 */
async function detectRole(credential, known = null) {
  const asAccount = async () => {
    const own = await api("GET", "account", { credential, signOutOn401: false });
    return { role: "account", name: own.name, accountId: own.id };
  };
  if (known === "account") return asAccount();
  try {
    await api("GET", "accounts", { credential, signOutOn401: false });
    return { role: "operator", name: "Operator" };
  } catch (error) {
    if (error.code === "network") throw error;
  }
  return asAccount();
}

/** On load: a credential kept in this tab signs in again without asking. */
async function resume() {
  const credential = storedCredential();
  if (!credential) return showSignIn("");
  clearReady();
  try {
    session = await detectRole(credential, storedRole());
  } catch (error) {
    forgetCredential();
    return showSignIn(error instanceof ApiError ? error.describe() : String(error));
  }
  enterSession();
}

async function onSignIn(event) {
  event.preventDefault();
  const input = byId("credential");
  const credential = input.value.trim();
  if (!credential) return showError(byId("signin-error"), "Enter a credential.");
  const form = byId("signin");
  const submit = byId("signin-submit");
  submit.disabled = true;
  form.setAttribute("aria-busy", "true");
  clearReady();
  try {
    session = await detectRole(credential);
    storeCredential(credential, session.role);
    input.value = "";
    enterSession();
  } catch (error) {
    showSignIn(error instanceof ApiError ? error.describe() : String(error));
  } finally {
    submit.disabled = false;
    form.removeAttribute("aria-busy");
  }
}

function enterSession() {
  showError(byId("signin-error"), "");
  byId("whoami").textContent = session.name;
  byId("session").hidden = false;
  route(true);
}

/** Forgets the credential and returns to sign-in, with `message` there if any. */
function signOut(message) {
  forgetCredential();
  session = null;
  generation += 1;
  const dialog = byId("dialog");
  if (dialog.open) dialog.close();
  history.replaceState(null, "", location.pathname + location.search);
  showSignIn(message);
}

function showSignIn(message) {
  session = null;
  byId("session").hidden = true;
  byId("whoami").textContent = "";
  showView("signin");
  showError(byId("signin-error"), message);
  byId("credential").focus();
  setReady("signin");
}

// === Routing ===

/** The view for the current hash, or null when it is not one of this role's. */
function parseRoute(hash) {
  const parts = hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  if (session.role === "operator" && parts[0] === "accounts") {
    if (parts.length === 1) return { name: "accounts" };
    const account = { accountId: parts[1], base: `accounts/${encodeURIComponent(parts[1])}`, hash: `#/accounts/${encodeURIComponent(parts[1])}` };
    if (parts.length === 2) return { name: "account", ...account };
    if (parts.length === 4 && parts[2] === "keys") return { name: "key", ...account, keyId: parts[3] };
  }
  if (session.role === "account" && parts[0] === "account") {
    const account = { accountId: session.accountId, base: "account", hash: "#/account" };
    if (parts.length === 1) return { name: "account", ...account };
    if (parts.length === 3 && parts[1] === "keys") return { name: "key", ...account, keyId: parts[2] };
  }
  return null;
}

function route(moveFocus) {
  if (!session) return;
  let target;
  try {
    target = parseRoute(location.hash);
  } catch (e) {
    target = null; // a malformed %-escape
  }
  if (!target) {
    location.replace(session.role === "operator" ? "#/accounts" : "#/account");
    return; // the hashchange comes back here
  }
  generation += 1;
  const mine = generation;
  const view = { ...target, role: session.role, current: () => mine === generation };
  showView(target.name);
  if (moveFocus) {
    // Screen readers and keyboards start again at the new view's content.
    byId("main").focus({ preventScroll: true });
    window.scrollTo(0, 0);
  }
  if (target.name === "accounts") showAccounts(view);
  else if (target.name === "account") showAccount(view);
  else showKey(view);
}

function showView(name) {
  for (const v of VIEWS) byId(`view-${v}`).hidden = v !== name;
  document.title = {
    signin: "Sign in · tollgate", accounts: "Accounts · tollgate", account: "Account · tollgate", key: "Key usage · tollgate",
  }[name];
}

start();
