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
use crate::credits::{self, CreditLease};
use crate::limits::global::Shortfall;
use crate::limits::{KeyLimits, LimitSnapshot, Window};
use crate::metering::{KeyState, WallClock};
use crate::policy;
use crate::refusal::Refusal;
use crate::store::{AuthMethod, KeyType};

/// A key as the request path needs it: its record reduced to decisions and precomputed header
/// values, plus handles to its buckets and usage counters.
///
/// Its key and account ids are its state's ([`CachedKey::key_id`]): held once per key, so
/// that an entry fits a 192-byte allocation.
pub struct CachedKey {
    /// Secret or publishable (also what the `Key-Type` identity header and the signed identity
    /// say).
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
    /// Limits are counted and shown but refuse nothing (the key's `shadow`).
    pub shadow: bool,
    /// Where and for what the key may be used; `None` for a key without IP, origin or scope
    /// rules (most keys), so that those cost one pointer.
    pub rules: Option<Box<KeyRules>>,
    /// The key's rate-limit buckets (this instance's, or leases of the fleet's).
    pub limiter: KeyLimits,
    /// Its account's `shared_rate_limit` buckets, drawn on by all the account's keys after
    /// their own; `None` when the account has none.
    pub shared_limits: Option<KeyLimits>,
    /// The key's credits on this instance; `None` for a key without credits (unlimited).
    pub credits: Option<Arc<CreditLease>>,
    /// The key's `metadata` for `/v1/verify`; `None` when it is the empty object (most keys).
    pub metadata: Option<Box<serde_json::Value>>,
    /// The key's usage counters (and, in the same allocation, its buckets on this instance).
    pub state: Arc<KeyState>,
    /// Identity header values, ready to send upstream (all but the key id's:
    /// [`CachedKey::identity`]).
    pub identity: IdentityValues,
}

impl CachedKey {
    /// Key id.
    pub fn key_id(&self) -> &Arc<str> {
        self.state.key_id()
    }

    /// What the identity headers say of the key.
    pub fn identity(&self) -> Identity<'_> {
        Identity {
            key_id: self.key_id(),
            key_type: self.key_type,
            values: &self.identity,
        }
    }

    /// Account id.
    pub fn account_id(&self) -> &Arc<str> {
        self.state.account_id()
    }
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
/// values with every key of the same quotas, `*` is static. The key type's header is one of two
/// statics, picked from [`CachedKey::key_type`] when sent.
#[derive(Clone)]
pub struct IdentityValues {
    /// Account id, shared with the account's other keys.
    pub account_id: Arc<HeaderValue>,
    /// Space-separated scopes; `None` for full access (sent as `*`).
    pub scopes: Option<Box<HeaderValue>>,
    /// The key's `external_id`; `None` (no header) when it has none. Boxed: most keys have none,
    /// and then it costs one pointer.
    pub external_id: Option<Box<HeaderValue>>,
    /// The limit header values of the key's quotas.
    pub limits: Arc<LimitValues>,
}

/// A key's identity as its headers say it ([`CachedKey::identity`]): the values kept on its
/// cache entry, and its key id as its state keeps it (the key id's header value is written per
/// request into the header arena rather than kept per key).
#[derive(Clone, Copy)]
pub struct Identity<'a> {
    /// Key id.
    pub key_id: &'a str,
    /// Secret or publishable.
    pub key_type: KeyType,
    /// The header values kept per key.
    pub values: &'a IdentityValues,
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
    /// The route counts limits without refusing for them (`shadow = true`).
    pub shadow: bool,
    /// Credits this request spends from a key with credits (the route's `cost`).
    pub cost: u32,
    /// A scope the caller requires beside the route's (`/v1/verify`'s `scope`); `None` on the
    /// proxy.
    pub required_scope: Option<&'a str>,
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
    /// In shadow mode (the route's or the key's), the window that would have refused the
    /// request: counted in `rate_limited_total{shadow="true"}`, not refused.
    pub shadowed: Option<Window>,
}

/// Why [`authorize`] did not give a permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// A check failed; a `RateLimited` refusal comes with the windows' state for its headers.
    Refused(Refusal, Option<LimitSnapshot>),
    /// Global limits only: a lease is empty. Await `key.limiter.refill(now)` and decide again.
    NeedsLease,
    /// The key's credit lease does not cover the cost: await its `take` ([`decide`] does).
    NeedsCredits,
}

/// The decision: every check in the contract's order, synchronously and without I/O.
pub fn authorize<'a>(key: &'a CachedKey, facts: &RequestFacts<'_>) -> Result<Permit<'a>, Denial> {
    authorize_from(key, facts, &mut Spent::default())
}

/// How far one decision's limit checks got: a decision that waits for a lease of the account's
/// shared buckets has already spent from the key's own, and must not spend from them again.
#[derive(Default)]
struct Spent {
    own: Option<(LimitSnapshot, Option<Window>)>,
    /// Every window, the key's and the account's, once both are spent.
    all: Option<(LimitSnapshot, Option<Window>)>,
    /// The credits were spent by a `take` that [`decide`] awaited.
    credits: bool,
}

/// [`authorize`], resuming after the limits already spent.
fn authorize_from<'a>(
    key: &'a CachedKey,
    facts: &RequestFacts<'_>,
    spent: &mut Spent,
) -> Result<Permit<'a>, Denial> {
    for (_, check) in CHECKS {
        check(key, facts).map_err(|r| Denial::Refused(r, None))?;
    }
    let shadow = key.shadow || facts.shadow;
    let (limits, shadowed) = match spent.all {
        Some(done) => done,
        None => {
            let (own, shadowed) = match spent.own {
                Some(done) => done,
                None => *spent
                    .own
                    .insert(spend(&key.limiter, facts.now_ms, shadow, None)?),
            };
            let all = match &key.shared_limits {
                None => (own, shadowed),
                Some(shared) => {
                    let (theirs, shared_shadowed) =
                        spend(shared, facts.now_ms, shadow, Some(&own))?;
                    (own.with_shared(&theirs), shadowed.or(shared_shadowed))
                }
            };
            *spent.all.insert(all)
        }
    };
    if let (Some(lease), false) = (&key.credits, spent.credits) {
        match lease.try_spend(facts.cost, facts.now_ms) {
            Ok(()) => {}
            Err(credits::Shortfall::NeedsTake) => return Err(Denial::NeedsCredits),
            Err(shortfall) => return Err(Denial::Refused(credit_refusal(shortfall), Some(limits))),
        }
    }
    Ok(Permit {
        key,
        limits,
        shadowed,
    })
}

/// The refusal of credits that could not be spent.
fn credit_refusal(shortfall: credits::Shortfall) -> Refusal {
    match shortfall {
        credits::Shortfall::Exhausted { retry_after } => Refusal::UsageExceeded { retry_after },
        credits::Shortfall::StoreDown | credits::Shortfall::NeedsTake => Refusal::StoreUnavailable,
    }
}

/// Spends one request from one set of buckets. In shadow mode a used-up window passes, named;
/// otherwise it refuses, with the headers' view of the windows (the key's `own`, when these
/// are the account's shared buckets).
fn spend(
    limits: &KeyLimits,
    now_ms: i64,
    shadow: bool,
    own: Option<&LimitSnapshot>,
) -> Result<(LimitSnapshot, Option<Window>), Denial> {
    match limits.check(now_ms) {
        Ok(snapshot) => Ok((snapshot, None)),
        Err(Shortfall::Exhausted(exhausted)) if shadow => {
            Ok((exhausted.snapshot, Some(exhausted.window)))
        }
        Err(Shortfall::Exhausted(exhausted)) => Err(Denial::Refused(
            Refusal::RateLimited {
                window: exhausted.window,
                retry_after: exhausted.retry_after,
            },
            Some(match own {
                Some(own) => own.with_shared(&exhausted.snapshot),
                None => exhausted.snapshot,
            }),
        )),
        Err(Shortfall::StoreDown) => Err(Denial::Refused(Refusal::StoreUnavailable, None)),
        Err(Shortfall::NeedsLease) => Err(Denial::NeedsLease),
    }
}

/// [`authorize`], with the one wait it may need: under global limits, a request that finds a
/// lease empty waits for refills and decides again, until it gets a token or is refused for a
/// real reason (the window used up fleet-wide, or the store down). Each refill either adds
/// tokens (the shared counter moves towards the limit), marks the window used up, or marks the
/// store down, and leases never move back to an earlier window; so the loop ends. The key's own
/// buckets are spent from once: a wait on the account's shared buckets resumes after them.
pub async fn decide<'a>(
    key: &'a CachedKey,
    facts: &RequestFacts<'_>,
) -> Result<Permit<'a>, (Refusal, Option<LimitSnapshot>)> {
    let mut spent = Spent::default();
    let mut waiting = None;
    loop {
        match authorize_from(key, facts, &mut spent) {
            Ok(permit) => return Ok(permit),
            Err(Denial::Refused(refusal, limits)) => return Err((refusal, limits)),
            Err(Denial::NeedsCredits) => {
                let lease = key
                    .credits
                    .as_ref()
                    .ok_or((Refusal::StoreUnavailable, None))?;
                match lease.take(facts.cost, facts.now_ms).await {
                    Ok(()) => spent.credits = true,
                    Err(shortfall) => {
                        let limits = spent.all.map(|(limits, _)| limits);
                        return Err((credit_refusal(shortfall), limits));
                    }
                }
            }
            Err(Denial::NeedsLease) => {
                let (limits, on_shared) = match (&spent.own, &key.shared_limits) {
                    (Some(_), Some(shared)) => (shared, true),
                    _ => (&key.limiter, false),
                };
                // Counted among the waiters of the buckets it waits on, from the first wait
                // on each.
                if waiting
                    .as_ref()
                    .is_none_or(|(shared, _)| *shared != on_shared)
                {
                    waiting = Some((on_shared, limits.wait()));
                }
                limits.refill(facts.now_ms).await;
            }
        }
    }
}

/// One named check of a credential before its limits ([`CHECKS`]).
pub type Check = fn(&CachedKey, &RequestFacts<'_>) -> Result<(), Refusal>;

/// The checks before the limits, in the contract's order, each with its name: what
/// [`authorize`] runs, and what an explanation lists (`/v1/verify` with `explain`).
pub const CHECKS: [(&str, Check); 8] = [
    ("active", |k, _| CredentialState::of(k).check_active()),
    ("expiry", |k, f| {
        CredentialState::of(k).check_expiry(f.now_ms)
    }),
    ("account", |k, _| CredentialState::of(k).check_account()),
    ("auth_method", |k, _| {
        CredentialState::of(k).check_auth_method()
    }),
    ("ip", check_ip),
    ("origin", check_origin),
    ("method", check_method),
    ("scope", check_scope),
];

/// What decides whether a credential may be used at all, before where and for what: the one
/// check that the proxy ([`authorize`]), the verify endpoint and the admin API's credential
/// check all make, in the same order, so that one credential gets one answer from each.
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
    /// A cached key's state.
    pub fn of(key: &CachedKey) -> Self {
        CredentialState {
            key_active: key.key_active,
            account_active: key.account_active,
            expires_at_ms: key.expires_at_ms,
            auth_method: key.auth_method,
            access_token: key.access_token,
        }
    }

    /// The state's refusal at `now_ms` (the gateway's clock), if any: a deactivated key, then
    /// expiry, then an inactive account, then a credential the account does not accept.
    pub fn check(&self, now_ms: i64) -> Result<(), Refusal> {
        self.check_active()?;
        self.check_expiry(now_ms)?;
        self.check_account()?;
        self.check_auth_method()
    }

    /// [`CredentialState::check`] now, on `clock` read exactly near the expiry as the proxy
    /// reads it (the coarse clock lags by up to a tick, and a key rolled with no grace must be
    /// refused at once): for a caller that needs no time of its own.
    pub fn check_on(&self, clock: &WallClock) -> Result<(), Refusal> {
        self.check(clock.now_ms_near(self.expires_at_ms))
    }

    fn check_active(&self) -> Result<(), Refusal> {
        if self.key_active {
            Ok(())
        } else {
            Err(Refusal::InactiveCredential)
        }
    }

    fn check_expiry(&self, now_ms: i64) -> Result<(), Refusal> {
        if self.expires_at_ms.is_some_and(|at| now_ms >= at) {
            Err(Refusal::ExpiredCredential)
        } else {
            Ok(())
        }
    }

    fn check_account(&self) -> Result<(), Refusal> {
        if self.account_active {
            Ok(())
        } else {
            Err(Refusal::InactiveCredential)
        }
    }

    fn check_auth_method(&self) -> Result<(), Refusal> {
        let accepted = match self.auth_method {
            AuthMethod::ApiKey => !self.access_token,
            AuthMethod::Oauth => self.access_token,
            AuthMethod::Any => true,
        };
        if accepted {
            Ok(())
        } else {
            Err(Refusal::AuthMethodNotAllowed)
        }
    }
}

/// `f` of the key's rules; a key without rules has the empty ones (empty boxed slices: no
/// allocation).
fn with_rules<T>(key: &CachedKey, f: impl FnOnce(&KeyRules) -> T) -> T {
    match key.rules.as_deref() {
        Some(rules) => f(rules),
        None => f(&KeyRules::default()),
    }
}

fn check_ip(key: &CachedKey, facts: &RequestFacts<'_>) -> Result<(), Refusal> {
    with_rules(key, |rules| {
        let within = |cidrs: &[IpNet]| cidrs.is_empty() || policy::ip_in(cidrs, facts.client_ip);
        if within(&rules.account_ips) && within(&rules.key_ips) {
            Ok(())
        } else {
            Err(Refusal::IpNotAllowed)
        }
    })
}

/// A publishable key's `Origin` (else `Referer`) must be allowed.
fn check_origin(key: &CachedKey, facts: &RequestFacts<'_>) -> Result<(), Refusal> {
    if key.key_type != KeyType::Publishable {
        return Ok(());
    }
    let origin = match facts.origin {
        Some(o) => policy::Origin::parse(o),
        None => facts.referer.and_then(policy::Origin::of_referer),
    };
    if origin.is_some_and(|o| with_rules(key, |r| policy::origin_allowed(&r.origins, &o))) {
        Ok(())
    } else {
        Err(Refusal::OriginNotAllowed)
    }
}

/// A publishable key reads only.
fn check_method(key: &CachedKey, facts: &RequestFacts<'_>) -> Result<(), Refusal> {
    if key.key_type == KeyType::Publishable && !policy::is_read_method(facts.method) {
        Err(Refusal::PublishableKeyWrite)
    } else {
        Ok(())
    }
}

/// The route's scope for the method, and the one the caller requires (verify's `scope`).
fn check_scope(key: &CachedKey, facts: &RequestFacts<'_>) -> Result<(), Refusal> {
    let needed = if policy::is_read_method(facts.method) {
        &facts.scopes.read
    } else {
        &facts.scopes.write
    };
    with_rules(key, |rules| {
        let granted = rules.scopes.as_deref();
        let mut wanted = needed
            .iter()
            .map(String::as_str)
            .chain(facts.required_scope);
        if wanted.all(|scope| policy::has_scope(granted, scope)) {
            Ok(())
        } else {
            Err(Refusal::ScopeDenied)
        }
    })
}
