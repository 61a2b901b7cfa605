//! [`AdminClient`]: the admin API over plain HTTP for the `accounts` and `keys` commands. It
//! holds the base URL and the caller's credential, sends JSON, and turns every answer into either
//! the JSON body or one [`ClientError`]. It knows no endpoint; the commands name the paths.

use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use crate::credential::Kind;

/// How long to wait for a connection to the admin listener.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one admin request may take in all.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of an unexpected (non-API) answer is quoted in the error.
const QUOTE_CHARS: usize = 200;

/// One admin listener, called with one credential.
pub(crate) struct AdminClient {
    http: reqwest::Client,
    base: Url,
    /// Sent as `Authorization: Bearer`; never printed.
    credential: String,
}

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// Nothing answered at the URL (refused, unresolvable, timed out).
    #[error("could not reach the admin API at {url}: {reason}")]
    Unreachable {
        /// The URL that was called.
        url: Url,
        /// The innermost cause, e.g. `Connection refused (os error 111)`.
        reason: String,
    },
    /// The API refused the call with its own `{"error":{"code","message"}}`.
    #[error("{code}: {message}")]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The contract's error code, e.g. `invalid_credential`.
        code: String,
        /// The API's explanation.
        message: String,
    },
    /// Something answered, but not the way the admin API does.
    #[error("unexpected answer from {url}: HTTP {status}: {body}")]
    Unexpected {
        /// The URL that was called.
        url: Url,
        /// The HTTP status.
        status: StatusCode,
        /// The start of the body.
        body: String,
    },
}

// === impl AdminClient ===

impl AdminClient {
    /// A client for the admin API at `base`, authenticating with `credential`.
    pub(crate) fn new(base: Url, credential: String) -> reqwest::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("tollgate-cli/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(AdminClient {
            http,
            base,
            credential,
        })
    }

    /// Whether the credential is the operator's master key (else an account's own key).
    pub(crate) fn is_operator(&self) -> bool {
        self.credential.starts_with(Kind::Master.prefix())
    }

    /// `GET` the path made of `segments`.
    pub(crate) async fn get(&self, segments: &[&str]) -> Result<Value, ClientError> {
        self.send(Method::GET, segments, None).await
    }

    /// `GET` the path made of `segments` with a query string.
    pub(crate) async fn get_query(
        &self,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<Value, ClientError> {
        self.send_query(Method::GET, segments, query, None).await
    }

    /// `POST` `body` (JSON) to the path made of `segments`.
    pub(crate) async fn post(&self, segments: &[&str], body: &Value) -> Result<Value, ClientError> {
        self.send(Method::POST, segments, Some(body)).await
    }

    /// `DELETE` the path made of `segments`.
    pub(crate) async fn delete(&self, segments: &[&str]) -> Result<Value, ClientError> {
        self.send(Method::DELETE, segments, None).await
    }

    /// One call; a 2xx answer's JSON (`Null` when the body is empty), else the error.
    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        self.send_query(method, segments, &[], body).await
    }

    async fn send_query(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let mut url = self.url(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut request = self
            .http
            .request(method, url.clone())
            .bearer_auth(&self.credential);
        if let Some(body) = body {
            request = request.json(body);
        }
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            url: url.clone(),
            reason: innermost_cause(&e),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let text = response.text().await.map_err(unreachable)?;
        let json = if text.trim().is_empty() {
            Ok(Value::Null)
        } else {
            serde_json::from_str::<Value>(&text)
        };
        match json {
            Ok(json) if status.is_success() => Ok(json),
            Ok(json) => match api_error(&json) {
                Some((code, message)) => Err(ClientError::Api {
                    status,
                    code,
                    message,
                }),
                None => Err(unexpected(url, status, &text)),
            },
            Err(_) => Err(unexpected(url, status, &text)),
        }
    }

    /// The base URL with `segments` appended, each percent-encoded as one path segment.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }
}

// === functions ===

/// The `code` and `message` of `{"error":{"code","message"}}`.
fn api_error(json: &Value) -> Option<(String, String)> {
    let error = json.get("error")?;
    let code = error.get("code")?.as_str()?.to_owned();
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    Some((code, message))
}

fn unexpected(url: Url, status: StatusCode, text: &str) -> ClientError {
    let mut body: String = text.trim().chars().take(QUOTE_CHARS).collect();
    if body.is_empty() {
        body = "(empty body)".to_owned();
    }
    ClientError::Unexpected { url, status, body }
}

/// reqwest's own message is "error sending request for url (…)"; the useful part is at the end
/// of the source chain.
fn innermost_cause(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "timed out".to_owned();
    }
    let mut cause: &dyn std::error::Error = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(base: &str) -> AdminClient {
        let base = Url::parse(base).expect("url");
        AdminClient::new(base, "tgmk_x".to_owned()).expect("client")
    }

    #[test]
    fn segments_are_appended_and_encoded() {
        let c = client("http://127.0.0.1:9090");
        assert_eq!(
            c.url(&["v1", "accounts", "a/b?c", "keys"]).as_str(),
            "http://127.0.0.1:9090/v1/accounts/a%2Fb%3Fc/keys"
        );
        let c = client("http://gw.internal/admin/");
        assert_eq!(
            c.url(&["v1", "account"]).as_str(),
            "http://gw.internal/admin/v1/account"
        );
    }

    #[test]
    fn api_errors_are_read_from_the_contract_shape() {
        let json = serde_json::json!({"error": {"code": "not_found", "message": "key not found"}});
        assert_eq!(
            api_error(&json),
            Some(("not_found".to_owned(), "key not found".to_owned()))
        );
        assert_eq!(api_error(&serde_json::json!({"status": "ok"})), None);
    }
}
