//! `tollgate accounts create|list|delete`: the operator's account endpoints under `/v1/accounts`,
//! printed as a table (ID, NAME, AUTH, ACTIVE, CREATED) or as the API's JSON.

use serde_json::{json, Value};

use super::admin_client::AdminClient;
use super::table::{self, Table};
use super::{print_json, rate_limit_json, AccountsCommand, AuthMethodArg, Failure};

/// Runs one `accounts` subcommand; `json` prints the API's answer instead of a table.
pub(super) async fn run(
    client: &AdminClient,
    command: AccountsCommand,
    json: bool,
) -> Result<(), Failure> {
    match command {
        AccountsCommand::Create(args) => {
            let mut body = json!({ "name": args.name });
            if let Some(method) = args.auth_method {
                body["auth_method"] = json!(auth_method_name(method));
            }
            if let Some(limits) = rate_limit_json(&args.limits) {
                body["rate_limit"] = limits;
            }
            let account = client.post(&["v1", "accounts"], &body).await?;
            print(json, &account, std::slice::from_ref(&account));
        }
        AccountsCommand::List => {
            let answer = client.get(&["v1", "accounts"]).await?;
            let accounts = answer["accounts"].as_array().map_or(&[][..], Vec::as_slice);
            print(json, &answer, accounts);
        }
        AccountsCommand::Delete { id } => {
            let answer = client.delete(&["v1", "accounts", &id]).await?;
            if json {
                print_json(&answer);
            } else {
                println!("deleted account {id}");
            }
        }
    }
    Ok(())
}

/// The answer as JSON, or `accounts` as a table.
fn print(json: bool, answer: &Value, accounts: &[Value]) {
    if json {
        print_json(answer);
        return;
    }
    let mut out = Table::new(&["ID", "NAME", "AUTH", "ACTIVE", "CREATED"]);
    for a in accounts {
        out.row(vec![
            table::text(&a["id"]),
            table::text(&a["name"]),
            table::text(&a["auth_method"]),
            table::yes_no(&a["active"]),
            table::time(&a["created_at"], "-"),
        ]);
    }
    print!("{out}");
}

/// The API's spelling of an auth method.
fn auth_method_name(method: AuthMethodArg) -> &'static str {
    match method {
        AuthMethodArg::ApiKey => "api_key",
        AuthMethodArg::Oauth => "oauth",
        AuthMethodArg::Any => "any",
    }
}
