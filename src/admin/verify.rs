//! `POST /v1/verify` (contract 5b): a key checked for a service that is not behind the proxy,
//! by the proxy's own decision ([`auth::decide`]) on the proxy's key cache, buckets and credits,
//! counted in the key's usage like a request. The caller is the operator, or an account's
//! secret key with the `keys:verify` scope, which verifies only its own account's keys: another
//! account's key is answered exactly as an unknown one.
//!
//! A refused key is still a 200 with `valid: false` and the proxy's code. With `explain`, the
//! answer lists every check that ran, in order, with its outcome: the format and checksum, the
//! lookup (and which cache answered), the [`auth::CHECKS`], each window, and the credits.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::Json;
use http::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::body::JsonBody;
use super::error::ApiError;
use super::AdminState;
use crate::auth::cache::{Cached, Lookup};
use crate::auth::{self, extract, CachedKey, CredentialState, RequestFacts, CHECKS};
use crate::config::{RouteScopes, RouteSettings, MAX_COST};
use crate::credential::{self, KeyHash, Kind};
use crate::limits::{LimitSnapshot, Window};
use crate::metering::Outcome;
use crate::policy;
use crate::refusal::Refusal;
use crate::store::KeyType;

/// The scope an account key needs to call `/v1/verify`.
pub(crate) const SCOPE_VERIFY: &str = "keys:verify";

/// What a route means to a verification: its scopes and cost.
#[derive(Debug, Clone)]
pub(crate) struct RouteRules {
    scopes: RouteScopes,
    cost: u32,
    shadow: bool,
}

/// Routes by name.
pub(crate) type Routes = Arc<HashMap<String, RouteRules>>;

/// The body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VerifyRequest {
    key: String,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    origin: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    cost: Option<u32>,
    #[serde(default)]
    explain: bool,
}

/// The answer.
#[derive(Debug, Serialize)]
pub(crate) struct Verdict {
    valid: bool,
    code: &'static str,
    account_id: Option<String>,
    key_id: Option<String>,
    key_type: Option<KeyType>,
    scopes: Option<Vec<String>>,
    external_id: Option<String>,
    metadata: Option<Value>,
    ratelimit: HashMap<&'static str, WindowView>,
    remaining: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    checks: Option<Vec<CheckView>>,
}

/// One window in the answer.
#[derive(Debug, Serialize)]
struct WindowView {
    limit: u32,
    remaining: u32,
    reset: u64,
}

/// One check in an explanation.
#[derive(Debug, Serialize)]
struct CheckView {
    check: String,
    outcome: &'static str,
    detail: Value,
}

/// Who may verify: the operator (any key), or an account (its own keys).
pub(crate) enum Verifier {
    Operator,
    Account(Arc<str>),
}

/// `POST /v1/verify`.
pub(crate) async fn verify(
    State(state): State<AdminState>,
    verifier: Verifier,
    JsonBody(req): JsonBody<VerifyRequest>,
) -> Result<Json<Verdict>, ApiError> {
    let facts = Inputs::read(&req, &state.live().routes)?;
    let mut explain = Explain::new(req.explain);
    let hash = KeyHash::of(&req.key);
    let cached = state.cache.cached(&hash);
    let memory = match &cached {
        Cached::Fresh(_) => "memory",
        Cached::Stale(_) => "memory (stale, re-read in the background)",
        Cached::Absent => "store",
    };
    // As the proxy: a credential without tollgate's checksum is looked up only while the store
    // holds imported keys.
    let well_formed = match credential::parse(&req.key) {
        Ok(Kind::Secret | Kind::Publishable | Kind::AccessToken) => true,
        Ok(Kind::ClientSecret | Kind::Master) => false,
        Err(_) => state.cache.admits_unchecked(),
    };
    let found = match cached {
        // A key memory holds was well-formed when it was issued.
        Cached::Fresh(Lookup::Found(key)) => Some(key),
        _ if !well_formed => {
            explain.fail(
                "format",
                json!("not a tollgate key, or its checksum does not match"),
            );
            return Ok(Json(Verdict::refused(Refusal::InvalidCredential, explain)));
        }
        cached => {
            explain.pass("format", json!("prefix and checksum"));
            match state.cache.get_after(&hash, cached).await {
                Lookup::Found(key) => Some(key),
                Lookup::NotFound => None,
                Lookup::Unavailable => {
                    explain.fail("lookup", json!("the store could not be asked"));
                    return Ok(Json(Verdict::refused(Refusal::StoreUnavailable, explain)));
                }
            }
        }
    };
    // Another account's key is as unknown as a key that does not exist.
    let Some(key) = found.filter(|k| verifier.may_see(k)) else {
        explain.fail("lookup", json!({ "found": false, "answered_by": memory }));
        return Ok(Json(Verdict::refused(Refusal::InvalidCredential, explain)));
    };
    explain.pass("lookup", json!({ "found": true, "answered_by": memory }));
    let now_ms = state.clock.now_ms_near(key.expires_at_ms);
    let facts = facts.facts(now_ms);
    let decided = auth::decide(&key, &facts).await;
    let (limits, refusal) = match &decided {
        Ok(permit) => (permit.limits, None),
        Err((refusal, limits)) => (
            limits.unwrap_or_else(|| key.limiter.peek(now_ms)),
            Some(*refusal),
        ),
    };
    explain.decision(&key, &facts, refusal, &limits);
    let status = refusal.map_or(200, |r| r.status_and_code().0.as_u16());
    key.state.record(now_ms, Outcome { status });
    Ok(Json(Verdict::of(&key, refusal, &limits, explain)))
}

/// The request's facts, checked, before the key is known.
struct Inputs {
    method: Method,
    ip: IpAddr,
    origin: Option<String>,
    scope: Option<String>,
    route: RouteRules,
}

impl Inputs {
    fn read(req: &VerifyRequest, routes: &Routes) -> Result<Self, ApiError> {
        let route = match &req.route {
            None => RouteRules {
                scopes: RouteScopes::default(),
                cost: 1,
                shadow: false,
            },
            Some(name) => routes
                .get(name)
                .cloned()
                .ok_or_else(|| ApiError::field("route", format!("{name:?} is not a route")))?,
        };
        let method = match &req.method {
            None => Method::GET,
            Some(m) => Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| ApiError::field("method", format!("{m:?} is not an HTTP method")))?,
        };
        // Without an address, a key with IP rules cannot show that it may be used from here:
        // the unspecified address is within no rule but one that allows everything.
        let ip = match &req.ip {
            None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Some(text) => text
                .parse::<IpAddr>()
                .map(policy::canonical)
                .map_err(|_| ApiError::field("ip", format!("{text:?} is not an IP address")))?,
        };
        let cost = req.cost.unwrap_or(route.cost);
        if cost > MAX_COST {
            return Err(ApiError::field("cost", format!("at most {MAX_COST}")));
        }
        if req.key.len() > credential::MAX_PRESENTED_LEN {
            return Err(ApiError::field("key", "is too long to be a credential"));
        }
        Ok(Inputs {
            method,
            ip,
            origin: req.origin.clone(),
            scope: req.scope.clone(),
            route: RouteRules { cost, ..route },
        })
    }

    fn facts(&self, now_ms: i64) -> RequestFacts<'_> {
        RequestFacts {
            method: &self.method,
            client_ip: self.ip,
            origin: self.origin.as_deref(),
            referer: None,
            scopes: &self.route.scopes,
            shadow: self.route.shadow,
            cost: self.route.cost,
            required_scope: self.scope.as_deref(),
            now_ms,
        }
    }
}

/// The explanation being written, when asked for.
struct Explain(Option<Vec<CheckView>>);

impl Explain {
    fn new(asked: bool) -> Self {
        Explain(asked.then(Vec::new))
    }

    fn push(&mut self, check: &str, outcome: &'static str, detail: Value) {
        if let Some(checks) = &mut self.0 {
            checks.push(CheckView {
                check: check.to_owned(),
                outcome,
                detail,
            });
        }
    }

    fn pass(&mut self, check: &str, detail: Value) {
        self.push(check, "pass", detail);
    }

    fn fail(&mut self, check: &str, detail: Value) {
        self.push(check, "fail", detail);
    }

    /// The decision's checks, as far as they ran: the named checks (pure, so run again here
    /// without effect), each window, and the credits.
    fn decision(
        &mut self,
        key: &CachedKey,
        facts: &RequestFacts<'_>,
        refusal: Option<Refusal>,
        limits: &LimitSnapshot,
    ) {
        if self.0.is_none() {
            return;
        }
        for (name, check) in CHECKS {
            match check(key, facts) {
                Ok(()) => self.pass(name, check_detail(name, key, facts)),
                Err(r) => {
                    self.fail(name, json!({ "code": r.status_and_code().1 }));
                    return;
                }
            }
        }
        let limited = matches!(refusal, Some(Refusal::RateLimited { .. }));
        for w in limits.windows.iter().flatten() {
            let name = format!(
                "{}{}",
                if w.shared { "shared-" } else { "" },
                w.window.name()
            );
            let refused_here = limited
                && matches!(refusal, Some(Refusal::RateLimited { window, .. }) if window == w.window)
                && w.remaining == 0;
            let detail = json!({ "limit": w.limit, "remaining": w.remaining, "reset": w.reset });
            if refused_here {
                self.fail(&name, detail);
                return;
            }
            self.pass(&name, detail);
        }
        if matches!(refusal, Some(Refusal::StoreUnavailable)) {
            self.fail(
                "store",
                json!("the store could not be reached for the fleet's counters or the credits"),
            );
            return;
        }
        match (&key.credits, refusal) {
            (None, _) => self.pass("credits", json!("unlimited")),
            (Some(_), Some(Refusal::UsageExceeded { retry_after })) => self.fail(
                "credits",
                json!({ "cost": facts.cost, "retry_after": retry_after }),
            ),
            (Some(lease), _) => self.pass(
                "credits",
                json!({ "cost": facts.cost, "remaining": lease.remaining() }),
            ),
        }
    }
}

/// What a passed check saw, for people reading an explanation.
fn check_detail(name: &str, key: &CachedKey, facts: &RequestFacts<'_>) -> Value {
    match name {
        "active" => json!("the key is active"),
        "expiry" => json!({ "expires_at_ms": key.expires_at_ms }),
        "account" => json!("the account is active"),
        "auth_method" => json!({ "auth_method": CredentialState::of(key).auth_method }),
        "ip" => json!({ "ip": facts.client_ip.to_string() }),
        "origin" => {
            json!({ "origin": facts.origin, "checked": key.key_type == KeyType::Publishable })
        }
        "method" => json!({ "method": facts.method.as_str() }),
        "scope" => json!({ "required": facts.required_scope }),
        _ => Value::Null,
    }
}

impl Verdict {
    /// A key refused before it was found (or found in another account): nothing about it.
    fn refused(refusal: Refusal, explain: Explain) -> Self {
        Verdict {
            valid: false,
            code: refusal.status_and_code().1,
            account_id: None,
            key_id: None,
            key_type: None,
            scopes: None,
            external_id: None,
            metadata: None,
            ratelimit: HashMap::new(),
            remaining: None,
            checks: explain.0,
        }
    }

    fn of(
        key: &CachedKey,
        refusal: Option<Refusal>,
        limits: &LimitSnapshot,
        explain: Explain,
    ) -> Self {
        let mut ratelimit = HashMap::new();
        for i in 0..Window::ALL.len() {
            if let Some(w) = limits.windows[i] {
                ratelimit.insert(
                    w.window.name(),
                    WindowView {
                        limit: w.limit,
                        remaining: w.remaining,
                        reset: w.reset,
                    },
                );
            }
        }
        Verdict {
            valid: refusal.is_none(),
            code: refusal.map_or("valid", |r| r.status_and_code().1),
            account_id: Some(key.account_id().to_string()),
            key_id: Some(key.key_id().to_string()),
            key_type: Some(key.key_type),
            scopes: key
                .rules
                .as_ref()
                .and_then(|r| r.scopes.as_ref())
                .map(|s| s.to_vec()),
            external_id: key
                .identity
                .external_id
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            metadata: Some(
                key.metadata
                    .as_deref()
                    .cloned()
                    .unwrap_or_else(|| json!({})),
            ),
            ratelimit,
            remaining: key.credits.as_ref().map(|lease| lease.remaining()),
            checks: explain.0,
        }
    }
}

impl Verifier {
    fn may_see(&self, key: &CachedKey) -> bool {
        match self {
            Verifier::Operator => true,
            Verifier::Account(id) => **id == **key.account_id(),
        }
    }
}

impl FromRequestParts<AdminState> for Verifier {
    type Rejection = ApiError;

    /// The master key, or an account's secret key (or access token) that may be used (the
    /// proxy's state check, on the key cache) and holds `keys:verify` (or full access).
    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, ApiError> {
        let presented = extract::credential(&parts.headers).ok_or(ApiError::MissingCredential)?;
        let kind = credential::parse(&presented.raw).map_err(|_| ApiError::InvalidCredential)?;
        let hash = KeyHash::of(&presented.raw);
        match kind {
            Kind::Master => match &state.master {
                Some(master) if master.ct_eq(&hash) => Ok(Verifier::Operator),
                _ => Err(ApiError::InvalidCredential),
            },
            Kind::Secret | Kind::AccessToken => {
                let key = match state.cache.get(&hash).await {
                    Lookup::Found(key) => key,
                    Lookup::NotFound => return Err(ApiError::InvalidCredential),
                    Lookup::Unavailable => {
                        return Err(ApiError::StoreUnavailable(
                            "the calling key could not be looked up".into(),
                        ))
                    }
                };
                super::auth::credential_error(CredentialState::of(&key).check_on(&state.clock))?;
                let scopes = key.rules.as_ref().and_then(|r| r.scopes.as_deref());
                if !policy::has_scope(scopes, SCOPE_VERIFY) {
                    return Err(ApiError::ScopeDenied(
                        "this key lacks the keys:verify scope",
                    ));
                }
                Ok(Verifier::Account(Arc::clone(key.account_id())))
            }
            Kind::Publishable => Err(ApiError::WrongCredentialKind("publishable")),
            Kind::ClientSecret => Err(ApiError::WrongCredentialKind("client secret")),
        }
    }
}

/// The routes of the config, by name, as a verification needs them.
pub(crate) fn routes(settings: &[RouteSettings]) -> Routes {
    Arc::new(
        settings
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    RouteRules {
                        scopes: r.scopes.clone(),
                        cost: r.cost,
                        shadow: r.shadow,
                    },
                )
            })
            .collect(),
    )
}
