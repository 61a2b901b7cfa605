//! Who is calling and may they: the credential's checks as one decision.
//!
//! [`authorize`] runs the contract's checks in order — key state and expiry, account state, auth
//! method, client IP, origin (publishable keys), method (publishable keys), scope, rate limits —
//! on a [`CachedKey`] and returns a [`Permit`] or the first [`Refusal`]. It is synchronous and
//! does no I/O; [`decide`] wraps it with the wait global limits may need (an empty lease, until
//! it is refilled), and is what the proxy and a future verify endpoint call.
//! [`cache::KeyCache`] finds the `CachedKey` for a presented credential.

pub mod cache;
pub mod extract;

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderValue, Method};
use ipnet::IpNet;

use crate::config::RouteScopes;
use crate::limits::global::Shortfall;
use crate::limits::{KeyLimits, LimitSnapshot};
use crate::metering::UsageCell;
use crate::policy;
use crate::refusal::Refusal;
use crate::store::{AuthMethod, KeyType};

/// A key as the request path needs it: its record reduced to decisions and precomputed header
/// values, plus handles to its buckets and usage counters.
pub struct CachedKey {
    /// Key id.
    pub key_id: Arc<str>,
    /// Account id.
    pub account_id: Arc<str>,
    /// Secret or publishable.
    pub key_type: KeyType,
    /// Key deactivated or account inactive → refused.
    pub key_active: bool,
    /// Account active.
    pub account_active: bool,
    /// The account's accepted credentials.
    pub auth_method: AuthMethod,
    /// The credential is an OAuth access token (else an API key).
    pub access_token: bool,
    /// Expiry, milliseconds since the epoch.
    pub expires_at_ms: Option<i64>,
    /// Where and for what the key may be used; `None` for a key without IP, origin or scope
    /// rules (most keys), so that those cost one pointer.
    pub rules: Option<Box<KeyRules>>,
    /// The key's rate-limit buckets (this instance's, or leases of the fleet's).
    pub limiter: KeyLimits,
    /// The key's usage counters.
    pub usage: Arc<UsageCell>,
    /// Identity header values, ready to send upstream.
    pub identity: IdentityValues,
}

/// What limits where and for what a key may be used.
#[derive(Default)]
pub struct KeyRules {
    /// The account's CIDRs (empty = any).
    pub account_ips: Box<[IpNet]>,
    /// The key's CIDRs (empty = any).
    pub key_ips: Box<[IpNet]>,
    /// Where a publishable key may be used from: the key's `allowed_origins`, the account's
    /// `allowed_domains` and its sites, parsed once.
    pub origins: Box<[policy::OriginRule]>,
    /// Granted scopes; `None` = full access.
    pub scopes: Option<Box<[String]>>,
}

/// `X-Tollgate-*` values of one key, built once per cache load. Values that many keys have in
/// common are shared, not copied: the account id with the account's other keys, the limit
/// values with every key of the same quotas, `*` and the key types are static.
#[derive(Clone)]
pub struct IdentityValues {
    /// Account id.
    pub account_id: HeaderValue,
    /// Key id.
    pub key_id: HeaderValue,
    /// `secret` or `publishable` (a static value: the header is built from it when sent).
    pub key_type: KeyType,
    /// Space-separated scopes; `None` for full access (sent as `*`).
    pub scopes: Option<Box<HeaderValue>>,
    /// The key's `external_id`; `None` (no header) when it has none. Boxed: most keys have none,
    /// and then it costs one pointer.
    pub external_id: Option<Box<HeaderValue>>,
    /// The limit header values of the key's quotas.
    pub limits: Arc<LimitValues>,
}

/// The scopes header of a key with full access.
static ALL_SCOPES: HeaderValue = HeaderValue::from_static("*");

impl IdentityValues {
    /// The `X-Tollgate-Scopes` value: the key's scopes, or `*` for full access.
    pub fn scopes_header(&self) -> &HeaderValue {
        self.scopes.as_deref().unwrap_or(&ALL_SCOPES)
    }
}

/// The limit header values of one set of quotas, shared by every key that has them.
#[derive(Default)]
pub struct LimitValues {
    /// `RateLimit-Policy` for the windows in force; `None` when no window is limited.
    pub policy: Option<HeaderValue>,
    /// Each window's limit (minute, hour, day), for `RateLimit-Limit` and
    /// `X-RateLimit-Limit-*`; `None` for windows not limited.
    pub per_window: [Option<HeaderValue>; 3],
}

/// What the checks need to know about the request.
pub struct RequestFacts<'a> {
    /// Method.
    pub method: &'a Method,
    /// The client's address (after trusted proxies).
    pub client_ip: IpAddr,
    /// The `Origin` header, else the origin of `Referer`.
    pub origin: Option<&'a str>,
    /// `Referer`, used when there is no `Origin`.
    pub referer: Option<&'a str>,
    /// The route's scopes.
    pub scopes: &'a RouteScopes,
    /// Now, milliseconds since the epoch, as `WallClock::now_ms_near(key.expires_at_ms)` reads
    /// it: the coarse clock, or the exact one when the key's expiry is that close.
    pub now_ms: i64,
}

/// A request that passed every check, with what the limit headers need.
pub struct Permit<'a> {
    /// The key.
    pub key: &'a CachedKey,
    /// The windows after spending this request.
    pub limits: LimitSnapshot,
}

/// Why [`authorize`] did not give a permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// A check failed; a `RateLimited` refusal comes with the windows' state for its headers.
    Refused(Refusal, Option<LimitSnapshot>),
    /// Global limits only: a lease is empty. Await `key.limiter.refill(now)` and decide again.
    NeedsLease,
}

/// The decision: every check in the contract's order, synchronously and without I/O.
pub fn authorize<'a>(key: &'a CachedKey, facts: &RequestFacts<'_>) -> Result<Permit<'a>, Denial> {
    check_state(key, facts.now_ms).map_err(|r| Denial::Refused(r, None))?;
    check_network(key, facts).map_err(|r| Denial::Refused(r, None))?;
    match key.limiter.check(facts.now_ms) {
        Ok(limits) => Ok(Permit { key, limits }),
        Err(Shortfall::Exhausted(exhausted)) => Err(Denial::Refused(
            Refusal::RateLimited {
                window: exhausted.window,
                retry_after: exhausted.retry_after,
            },
            Some(exhausted.snapshot),
        )),
        Err(Shortfall::StoreDown) => Err(Denial::Refused(Refusal::StoreUnavailable, None)),
        Err(Shortfall::NeedsLease) => Err(Denial::NeedsLease),
    }
}

/// [`authorize`], with the one wait it may need: under global limits, a request that finds a
/// lease empty waits for refills and decides again, until it gets a token or is refused for a
/// real reason (the window used up fleet-wide, or the store down). Each refill either adds
/// tokens (the shared counter moves towards the limit), marks the window used up, or marks the
/// store down, and leases never move back to an earlier window; so the loop ends.
pub async fn decide<'a>(
    key: &'a CachedKey,
    facts: &RequestFacts<'_>,
) -> Result<Permit<'a>, (Refusal, Option<LimitSnapshot>)> {
    let mut waiting = None;
    loop {
        match authorize(key, facts) {
            Ok(permit) => return Ok(permit),
            Err(Denial::Refused(refusal, limits)) => return Err((refusal, limits)),
            Err(Denial::NeedsLease) => {
                waiting.get_or_insert_with(|| key.limiter.wait());
                key.limiter.refill(facts.now_ms).await;
            }
        }
    }
}

fn check_state(key: &CachedKey, now_ms: i64) -> Result<(), Refusal> {
    CredentialState {
        key_active: key.key_active,
        account_active: key.account_active,
        expires_at_ms: key.expires_at_ms,
        auth_method: key.auth_method,
        access_token: key.access_token,
    }
    .check(now_ms)
}

/// What decides whether a credential may be used at all, before where and for what: the one
/// check that the proxy ([`authorize`]) and the admin API's credential check both make, in the
/// same order, so that one credential gets one answer from both.
#[derive(Debug, Clone, Copy)]
pub struct CredentialState {
    /// The key is active (a token is).
    pub key_active: bool,
    /// Its account is active.
    pub account_active: bool,
    /// Expiry, milliseconds since the epoch.
    pub expires_at_ms: Option<i64>,
    /// The account's accepted credentials.
    pub auth_method: AuthMethod,
    /// The credential is an OAuth access token (else an API key).
    pub access_token: bool,
}

impl CredentialState {
    /// The state's refusal at `now_ms` (the gateway's clock), if any: a deactivated key, then
    /// expiry, then an inactive account, then a credential the account does not accept.
    pub fn check(&self, now_ms: i64) -> Result<(), Refusal> {
        if !self.key_active {
            return Err(Refusal::InactiveCredential);
        }
        if self.expires_at_ms.is_some_and(|at| now_ms >= at) {
            return Err(Refusal::ExpiredCredential);
        }
        if !self.account_active {
            return Err(Refusal::InactiveCredential);
        }
        let accepted = match self.auth_method {
            AuthMethod::ApiKey => !self.access_token,
            AuthMethod::Oauth => self.access_token,
            AuthMethod::Any => true,
        };
        if !accepted {
            return Err(Refusal::AuthMethodNotAllowed);
        }
        Ok(())
    }
}

fn check_network(key: &CachedKey, facts: &RequestFacts<'_>) -> Result<(), Refusal> {
    // A key without rules has the empty ones (empty boxed slices: no allocation).
    let unrestricted = KeyRules::default();
    let rules = key.rules.as_deref().unwrap_or(&unrestricted);
    if !rules.account_ips.is_empty() && !policy::ip_in(&rules.account_ips, facts.client_ip) {
        return Err(Refusal::IpNotAllowed);
    }
    if !rules.key_ips.is_empty() && !policy::ip_in(&rules.key_ips, facts.client_ip) {
        return Err(Refusal::IpNotAllowed);
    }
    if key.key_type == KeyType::Publishable {
        let origin = match facts.origin {
            Some(o) => policy::Origin::parse(o),
            None => facts.referer.and_then(policy::Origin::of_referer),
        };
        if !origin.is_some_and(|o| policy::origin_allowed(&rules.origins, &o)) {
            return Err(Refusal::OriginNotAllowed);
        }
        if !policy::is_read_method(facts.method) {
            return Err(Refusal::PublishableKeyWrite);
        }
    }
    let needed = if policy::is_read_method(facts.method) {
        &facts.scopes.read
    } else {
        &facts.scopes.write
    };
    if let Some(scope) = needed {
        if !policy::has_scope(rules.scopes.as_deref(), scope) {
            return Err(Refusal::ScopeDenied);
        }
    }
    Ok(())
}
