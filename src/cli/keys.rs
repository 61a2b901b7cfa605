//! `tollgate keys create|list|deactivate|activate|roll|delete`: an account's key endpoints,
//! printed as a table (ID, NAME, TYPE, PREVIEW, ACTIVE, SCOPES, EXPIRES) or as the API's JSON.
//!
//! The master key reaches an account at `/v1/accounts/{id}/keys` and needs `--account`; an
//! account's own secret key reaches itself at `/v1/account/keys`, so `--account` may be left out.
//! A raw key (create, roll) is printed once, under the table; the API never shows it again.

use serde_json::{json, Value};

use super::admin_client::AdminClient;
use super::table::{self, Table};
use super::{print_json, rate_limit_json, CreateKeyArgs, Failure, KeyTypeArg, KeysCommand};

/// The path of one account's keys, as this caller reaches them.
pub(super) struct KeysPath(Vec<String>);

/// Runs one `keys` subcommand for `account` (or the caller's own account); `json` prints the
/// API's answer instead of a table.
pub(super) async fn run(
    client: &AdminClient,
    account: Option<&str>,
    command: KeysCommand,
    json: bool,
) -> Result<(), Failure> {
    let keys = KeysPath::resolve(client, account).await?;
    match command {
        KeysCommand::Create(args) => {
            let created = client.post(&keys.at(&[]), &create_body(&args)).await?;
            print_created(json, &created);
        }
        KeysCommand::List => {
            let answer = client.get(&keys.at(&[])).await?;
            let list = answer["keys"].as_array().map_or(&[][..], Vec::as_slice);
            print(json, &answer, list);
        }
        KeysCommand::Deactivate { key_id } => {
            let key = client
                .post(&keys.at(&[&key_id, "deactivate"]), &json!({}))
                .await?;
            print(json, &key, std::slice::from_ref(&key));
        }
        KeysCommand::Activate { key_id } => {
            let key = client
                .post(&keys.at(&[&key_id, "activate"]), &json!({}))
                .await?;
            print(json, &key, std::slice::from_ref(&key));
        }
        KeysCommand::Roll { key_id, grace } => {
            let body = match grace {
                Some(grace) => json!({ "grace": grace }),
                None => json!({}),
            };
            let created = client.post(&keys.at(&[&key_id, "roll"]), &body).await?;
            print_created(json, &created);
        }
        KeysCommand::Delete { key_id } => {
            let answer = client.delete(&keys.at(&[&key_id])).await?;
            if json {
                print_json(&answer);
            } else {
                println!("deleted key {key_id}");
            }
        }
    }
    Ok(())
}

// === impl KeysPath ===

impl KeysPath {
    /// `/v1/accounts/{account}/keys` for the operator, `/v1/account/keys` for an account's own
    /// key. An account key given `--account` is checked against its own account, so a typo
    /// cannot act on the wrong one silently.
    pub(super) async fn resolve(
        client: &AdminClient,
        account: Option<&str>,
    ) -> Result<Self, Failure> {
        let segments: &[&str] =
            match (client.is_operator(), account) {
                (true, Some(id)) => &["v1", "accounts", id, "keys"],
                (true, None) => return Err(Failure::Usage(
                    "--account ID is required with the master key (an account's own secret key \
                     may leave it out)"
                        .to_owned(),
                )),
                (false, None) => &["v1", "account", "keys"],
                (false, Some(id)) => {
                    let own = client.get(&["v1", "account"]).await?;
                    if own["id"].as_str() != Some(id) {
                        return Err(Failure::Usage(format!(
                            "the key in TOLLGATE_ADMIN_KEY belongs to account {}, not {id}; leave \
                         out --account or use the master key",
                            table::text(&own["id"])
                        )));
                    }
                    &["v1", "account", "keys"]
                }
            };
        Ok(KeysPath(segments.iter().map(|s| (*s).to_owned()).collect()))
    }

    /// The keys path followed by `tail`.
    pub(super) fn at<'a>(&'a self, tail: &[&'a str]) -> Vec<&'a str> {
        self.0
            .iter()
            .map(String::as_str)
            .chain(tail.iter().copied())
            .collect()
    }
}

// === functions ===

/// The `POST …/keys` body; a field left out takes the API's default (no scopes = full access).
fn create_body(args: &CreateKeyArgs) -> Value {
    let mut body = json!({
        "name": args.name,
        "type": match args.key_type {
            KeyTypeArg::Secret => "secret",
            KeyTypeArg::Publishable => "publishable",
        },
    });
    if !args.scopes.is_empty() {
        body["scopes"] = json!(args.scopes);
    }
    if !args.origins.is_empty() {
        body["allowed_origins"] = json!(args.origins);
    }
    if !args.allowed_ips.is_empty() {
        body["allowed_ips"] = json!(args.allowed_ips);
    }
    if let Some(ttl) = &args.ttl {
        body["ttl"] = json!(ttl);
    }
    if let Some(limits) = rate_limit_json(&args.limits) {
        body["rate_limit"] = limits;
    }
    body
}

/// A new key (create, roll): its metadata and, this once, the raw key.
fn print_created(json: bool, created: &Value) {
    print(json, created, std::slice::from_ref(created));
    if !json {
        println!();
        println!(
            "key: {}  (shown once; store it now)",
            table::text(&created["key"])
        );
    }
}

/// The answer as JSON, or `keys` as a table. The table never shows a raw key.
fn print(json: bool, answer: &Value, keys: &[Value]) {
    if json {
        print_json(answer);
        return;
    }
    let mut out = Table::new(&[
        "ID", "NAME", "TYPE", "PREVIEW", "ACTIVE", "SCOPES", "EXPIRES",
    ]);
    for k in keys {
        out.row(vec![
            table::text(&k["id"]),
            table::text(&k["name"]),
            table::text(&k["type"]),
            table::text(&k["preview"]),
            table::yes_no(&k["active"]),
            scopes(&k["scopes"]),
            table::time(&k["expires_at"], "never"),
        ]);
    }
    print!("{out}");
}

/// `null` is full access; a list is comma-separated.
fn scopes(value: &Value) -> String {
    match value.as_array() {
        None => "(full)".to_owned(),
        Some(list) if list.is_empty() => "(none)".to_owned(),
        Some(list) => list.iter().map(table::text).collect::<Vec<_>>().join(","),
    }
}
