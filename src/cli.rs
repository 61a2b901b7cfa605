//! The command line: `serve`, `keygen`, `check-config`, and `accounts` / `keys` over the admin
//! API. This file holds the clap types and the dispatch; it returns the process exit code: 0 ok,
//! 2 bad usage or config, 1 anything else.
//!
//! Layout of the admin commands: `admin_client` (HTTP to the admin API, one error type),
//! `accounts` and `keys` (one function per subcommand: the call, then a table or the JSON),
//! `table` (aligned plain-text columns).

mod accounts;
mod admin_client;
mod demo;
mod keys;
mod table;
mod usage;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use reqwest::Url;
use serde_json::Value;

use self::admin_client::{AdminClient, ClientError};
use crate::app::{self, StartOptions};
use crate::config;
use crate::credential::{self, Kind};

/// The variable that holds the admin credential. Not a flag, so it stays out of `ps` and shell
/// history.
const ADMIN_KEY_ENV: &str = "TOLLGATE_ADMIN_KEY";

/// tollgate: an edge gateway for API keys, limits and metering.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway: the proxy listener and the admin listener.
    Serve {
        /// Config file (TOML).
        #[arg(long, default_value = "config/tollgate.toml")]
        config: PathBuf,
    },
    /// Try it out: an embedded store in a temporary directory, an echo upstream, a demo key,
    /// and curl lines to paste; Ctrl-C stops it.
    Demo,
    /// Print a fresh, valid credential.
    Keygen {
        /// What kind of credential.
        #[arg(long, value_enum, default_value_t = KeygenKind::Secret)]
        kind: KeygenKind,
    },
    /// Validate a config: exit 0, or print every problem and exit 2.
    CheckConfig {
        /// Config file (TOML).
        #[arg(long, default_value = "config/tollgate.toml")]
        config: PathBuf,
    },
    /// Manage accounts over the admin API (needs the master key in TOLLGATE_ADMIN_KEY).
    Accounts {
        #[command(flatten)]
        admin: AdminOptions,
        #[command(subcommand)]
        command: AccountsCommand,
    },
    /// Show a key's usage buckets over the admin API, as a table or a text chart.
    Usage {
        #[command(flatten)]
        admin: AdminOptions,
        /// The key's account (`acc_…`); required with the master key.
        #[arg(long)]
        account: Option<String>,
        #[command(flatten)]
        args: UsageArgs,
    },
    /// Manage an account's API keys over the admin API (master key, or the account's own
    /// secret key, in TOLLGATE_ADMIN_KEY).
    Keys {
        #[command(flatten)]
        admin: AdminOptions,
        /// The account (`acc_…`). Required with the master key; with an account's own secret
        /// key it may be left out.
        #[arg(long, global = true)]
        account: Option<String>,
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KeygenKind {
    Secret,
    Master,
}

/// Where the admin API is and how to print its answers; the credential comes from
/// `TOLLGATE_ADMIN_KEY`.
#[derive(Debug, Args)]
struct AdminOptions {
    /// Base URL of the admin listener.
    #[arg(
        long,
        global = true,
        env = "TOLLGATE_ADMIN_URL",
        default_value = "http://127.0.0.1:9090",
        value_parser = parse_admin_url
    )]
    admin_url: Url,
    /// Print the API's JSON answer (pretty) instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum AccountsCommand {
    /// Create an account (POST /v1/accounts).
    Create(CreateAccountArgs),
    /// List every account (GET /v1/accounts).
    List,
    /// Delete an account and its keys, permanently (DELETE /v1/accounts/{id}).
    Delete {
        /// The account's id (`acc_…`).
        id: String,
    },
}

#[derive(Debug, Args)]
struct CreateAccountArgs {
    /// Display name.
    #[arg(long)]
    name: String,
    /// How the account's callers authenticate on the proxy (API default: api_key).
    #[arg(long, value_enum)]
    auth_method: Option<AuthMethodArg>,
    #[command(flatten)]
    limits: RateLimitArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AuthMethodArg {
    #[value(name = "api_key", alias = "api-key")]
    ApiKey,
    Oauth,
    Any,
}

/// Per-window request limits; a window left out falls back to the next level.
#[derive(Debug, Args)]
struct RateLimitArgs {
    /// Requests per minute.
    #[arg(long)]
    per_minute: Option<u32>,
    /// Requests per hour.
    #[arg(long)]
    per_hour: Option<u32>,
    /// Requests per day.
    #[arg(long)]
    per_day: Option<u32>,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key; its raw value is printed this once (POST …/keys).
    Create(CreateKeyArgs),
    /// List the account's keys, metadata only (GET …/keys).
    List,
    /// Stop a key working, reversibly (POST …/keys/{id}/deactivate).
    Deactivate {
        /// The key's id (`key_…`).
        key_id: String,
    },
    /// Let a deactivated key work again (POST …/keys/{id}/activate).
    Activate {
        /// The key's id (`key_…`).
        key_id: String,
    },
    /// Replace a key: a new raw key now, the old one until the grace period ends
    /// (POST …/keys/{id}/roll).
    Roll {
        /// The key's id (`key_…`).
        key_id: String,
        /// How long the old key keeps working, e.g. `1h` (API default: 24h).
        #[arg(long)]
        grace: Option<String>,
    },
    /// Delete a key, permanently (DELETE …/keys/{id}).
    Delete {
        /// The key's id (`key_…`).
        key_id: String,
    },
}

#[derive(Debug, Args)]
struct CreateKeyArgs {
    /// Name, unique in the account (at most 100 characters).
    #[arg(long)]
    name: String,
    /// Secret (server-side) or publishable (browsers; needs --origin).
    #[arg(long = "type", value_enum, default_value_t = KeyTypeArg::Secret)]
    key_type: KeyTypeArg,
    /// A scope the key holds; repeat for more. Without any, the key has full access.
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// An origin a publishable key may be used from, e.g. `https://app.example.com`; repeat.
    #[arg(long = "origin")]
    origins: Vec<String>,
    /// A CIDR the key may be used from, e.g. `203.0.113.0/24`; repeat.
    #[arg(long = "allowed-ip")]
    allowed_ips: Vec<String>,
    /// Lifetime, e.g. `30d` or `12h`; without it the key does not expire.
    #[arg(long)]
    ttl: Option<String>,
    #[command(flatten)]
    limits: RateLimitArgs,
}

/// `tollgate usage KEY_ID …`.
#[derive(Debug, Args)]
struct UsageArgs {
    /// The key's id (`key_…`).
    key_id: String,
    /// Start, RFC 3339 (API default: 90 days back).
    #[arg(long)]
    from: Option<String>,
    /// End, RFC 3339 (API default: now).
    #[arg(long)]
    to: Option<String>,
    /// minute, hour, day, week or month.
    #[arg(long, default_value = "day")]
    interval: String,
    /// A bar per bucket instead of the table.
    #[arg(long)]
    chart: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KeyTypeArg {
    Secret,
    Publishable,
}

/// An admin command, with what it needs beyond [`AdminOptions`].
enum AdminCommand {
    Accounts(AccountsCommand),
    Usage {
        account: Option<String>,
        args: UsageArgs,
    },
    Keys {
        account: Option<String>,
        command: KeysCommand,
    },
}

/// Why an admin command stopped; the exit code follows from it.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// Exit 2: the command cannot work as given.
    #[error("{0}")]
    Usage(String),
    /// Exit 1: the API refused, or could not be reached.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Parses arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(cli.log_format);
    match cli.command {
        Command::Keygen { kind } => {
            let kind = match kind {
                KeygenKind::Secret => Kind::Secret,
                KeygenKind::Master => Kind::Master,
            };
            println!("{}", credential::generate(kind));
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => match config::load(&config) {
            Ok(settings) => {
                if let Err(e) = configured_master_key(&settings) {
                    eprintln!("{}: admin.master_key_env: {e}", config.display());
                    return ExitCode::from(2);
                }
                println!(
                    "{}: ok ({} routes)",
                    config.display(),
                    settings.routes.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config } => serve(&config),
        Command::Demo => match runtime_for_the_cores().build() {
            Ok(runtime) => runtime.block_on(demo::run()),
            Err(e) => {
                eprintln!("tollgate demo: cannot start the runtime: {e}");
                ExitCode::from(1)
            }
        },
        Command::Accounts { admin, command } => {
            admin_command(&admin, AdminCommand::Accounts(command))
        }
        Command::Keys {
            admin,
            account,
            command,
        } => admin_command(&admin, AdminCommand::Keys { account, command }),
        Command::Usage {
            admin,
            account,
            args,
        } => admin_command(&admin, AdminCommand::Usage { account, args }),
    }
}

/// Reads the credential, builds the client and a current-thread runtime, runs `command`, and
/// prints its failure.
fn admin_command(admin: &AdminOptions, command: AdminCommand) -> ExitCode {
    let Some(credential) = std::env::var(ADMIN_KEY_ENV)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
    else {
        eprintln!(
            "error: {ADMIN_KEY_ENV} is not set; put the master key (tgmk_…) or an account's \
             secret key (tgsk_…) in it"
        );
        return ExitCode::from(2);
    };
    let client = match AdminClient::new(admin.admin_url.clone(), credential) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("error: cannot build the HTTP client: {e}");
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let outcome = runtime.block_on(async {
        match command {
            AdminCommand::Accounts(command) => accounts::run(&client, command, admin.json).await,
            AdminCommand::Usage { account, args } => {
                usage::run(&client, account.as_deref(), args, admin.json).await
            }
            AdminCommand::Keys { account, command } => {
                keys::run(&client, account.as_deref(), command, admin.json).await
            }
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Client(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `--admin-url`: an `http://` URL (TLS is not built in).
fn parse_admin_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    match url.scheme() {
        "http" if url.host().is_some() => Ok(url),
        "http" => Err(format!("{text:?} has no host")),
        other => Err(format!(
            "{other}:// is not supported; the admin API is reached over plain http://"
        )),
    }
}

/// The API's answer as pretty JSON on stdout (nothing for an empty answer).
fn print_json(answer: &Value) {
    if !answer.is_null() {
        println!(
            "{}",
            serde_json::to_string_pretty(answer).unwrap_or_else(|_| answer.to_string())
        );
    }
}

/// `per_minute`/`per_hour`/`per_day` as the API's `rate_limit`, or `None` when none is given.
fn rate_limit_json(limits: &RateLimitArgs) -> Option<Value> {
    let mut spec = serde_json::Map::new();
    for (field, value) in [
        ("per_minute", limits.per_minute),
        ("per_hour", limits.per_hour),
        ("per_day", limits.per_day),
    ] {
        if let Some(n) = value {
            spec.insert(field.to_owned(), n.into());
        }
    }
    (!spec.is_empty()).then_some(Value::Object(spec))
}

fn serve(path: &std::path::Path) -> ExitCode {
    let settings = match config::load(path) {
        Ok(s) => s,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::from(2);
        }
    };
    let master_key = match configured_master_key(&settings) {
        Ok(key) => key,
        Err(e) => {
            eprintln!("{}: admin.master_key_env: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let runtime = match runtime_for_the_cores().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async move {
        let stop = crate::shutdown::signal();
        let mut reloads = crate::shutdown::reloads();
        let running = match app::start(settings, StartOptions { master_key, ..Default::default() }).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "tollgate could not start");
                return ExitCode::from(1);
            }
        };
        if let Some(raw) = &running.generated_master_key {
            // Printed once, on stdout, so it can be captured; only its hash is stored.
            println!("Generated the operator's master key (shown only this once; store it safely):\n  {raw}");
        }
        let mut stop = std::pin::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                Some(()) = reloads.recv() => {
                    // Read and checked exactly as at start; the outcome is logged and counted.
                    let _ = running.reload(config::load(path));
                }
            }
        }
        tracing::info!("shutting down: draining requests and flushing usage");
        running.shutdown().await;
        ExitCode::SUCCESS
    });
    exit_runtime(runtime);
    code
}

/// Stops the runtime, waiting [`EXIT_WAIT`] at most for blocking tasks still running (a store
/// read abandoned at its deadline on a hung disk, say): dropping the runtime would wait for
/// them without end, and the process would not exit after its shutdown signal. redb is
/// crash-safe, so leaving a transaction unfinished at exit loses nothing committed.
fn exit_runtime(runtime: tokio::runtime::Runtime) {
    runtime.shutdown_timeout(EXIT_WAIT);
}

/// The raw master key from the configured variable (`None` when unset or empty), checked.
fn configured_master_key(
    settings: &config::Settings,
) -> Result<Option<String>, crate::admin::master::MasterKeyError> {
    let raw = std::env::var(&settings.admin.master_key_env)
        .ok()
        .filter(|v| !v.is_empty());
    if let Some(raw) = &raw {
        crate::admin::master::check_master_key(raw)?;
    }
    Ok(raw)
}

/// The runtime shape that fits the cores this process may use (`available_parallelism`
/// honours `taskset` and cgroup limits): on one core a current-thread runtime, which saves the
/// multi-thread scheduler's cross-thread bookkeeping (a few % per request, docs/PERFORMANCE.md);
/// on more, a multi-thread runtime with one worker per core. Either way the blocking pool (the
/// embedded store's transactions) has [`BLOCKING_THREADS_PER_CORE`] threads a core at most.
fn runtime_for_the_cores() -> tokio::runtime::Builder {
    let cores = cores();
    let mut builder = if cores == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(cores);
        b
    };
    builder
        .max_blocking_threads(blocking_threads())
        .enable_all();
    builder
}

/// The cores this process may use (`available_parallelism` honours `taskset` and cgroup
/// limits); 1 when it cannot tell.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// The blocking pool's most threads: [`BLOCKING_THREADS_PER_CORE`] for each of [`cores`].
fn blocking_threads() -> usize {
    cores().saturating_mul(BLOCKING_THREADS_PER_CORE)
}

/// The blocking pool's threads a core. tokio's default is 512 threads whatever the cores: a
/// burst of cold keys (64 connections warming a million keys) grew it to all 512 on one core,
/// each thread with its own stack and allocator pages, for transactions that are CPU work on a
/// file in the page cache. Past the cap, work waits in the pool's queue (as it did past 512).
/// Writers never wait for a thread that is not running: the group commit's leader is one of
/// the writers already on the pool. But a writer holds its thread while its round's fsync
/// runs, so the cap is also how many writes one round can gather and how many can wait on a
/// sync while reads still find threads: 16 a core keeps sixteen concurrent key changes in one
/// round with room for reads; the million-key warm pass measured 8 and 16 alike
/// (docs/PERFORMANCE.md, round eight).
const BLOCKING_THREADS_PER_CORE: usize = 16;

/// How long the process waits at exit for blocking tasks still running ([`exit_runtime`]).
const EXIT_WAIT: Duration = Duration::from_secs(5);

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A burst of blocking work runs on at most [`BLOCKING_THREADS_PER_CORE`] threads a core
    /// (tokio alone would start a thread for each task, up to 512), and all of it runs.
    #[test]
    fn the_blocking_pool_is_bounded_by_the_cores() {
        let cap = blocking_threads();
        let runtime = runtime_for_the_cores().build().expect("runtime");
        let (running, most, done) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        runtime.block_on(async {
            let tasks: Vec<_> = (0..cap * 4)
                .map(|_| {
                    let (running, most, done) =
                        (Arc::clone(&running), Arc::clone(&most), Arc::clone(&done));
                    tokio::task::spawn_blocking(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        running.fetch_sub(1, Ordering::SeqCst);
                        done.fetch_add(1, Ordering::SeqCst);
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("blocking task");
            }
        });
        assert_eq!(done.load(Ordering::SeqCst), cap * 4);
        let most = most.load(Ordering::SeqCst);
        assert!((2..=cap).contains(&most), "{most} at once, cap {cap}");
    }

    /// A blocking task that never ends (a read on a hung disk) does not keep the process from
    /// exiting: the runtime stops within [`EXIT_WAIT`] of being asked, where dropping it would
    /// wait for the task for ever.
    #[test]
    fn a_blocking_task_that_never_ends_does_not_hold_the_exit() {
        let runtime = runtime_for_the_cores().build().expect("runtime");
        let (hold, held) = std::sync::mpsc::channel::<()>();
        let started = runtime.block_on(async {
            let (started, begun) = tokio::sync::oneshot::channel();
            drop(tokio::task::spawn_blocking(move || {
                let _ = started.send(());
                let _ = held.recv();
            }));
            begun.await
        });
        assert!(started.is_ok(), "the blocking task did not start");
        let (exited, exit) = std::sync::mpsc::channel();
        let at = std::time::Instant::now();
        std::thread::spawn(move || {
            exit_runtime(runtime);
            let _ = exited.send(());
        });
        let waited = exit.recv_timeout(EXIT_WAIT * 4);
        drop(hold);
        assert!(
            waited.is_ok(),
            "the runtime was still stopping after {:?}",
            at.elapsed()
        );
        assert!(at.elapsed() >= EXIT_WAIT, "{:?}", at.elapsed());
    }

    /// Three times as many writes at once as the pool has threads all finish: each group
    /// commit's round is led by one of the writers already on the pool, so none waits for a
    /// thread that cannot come.
    #[test]
    fn more_writes_than_blocking_threads_all_finish() {
        use crate::store::embedded::EmbeddedStore;
        use crate::store::{BatchId, Usage, UsageCounts, UsageDelta};

        let writes = blocking_threads() * 3;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("db")).expect("store"));
        let runtime = runtime_for_the_cores().build().expect("runtime");
        let minute = 29_000_000;
        runtime.block_on(async {
            let tasks: Vec<_> = (0..writes)
                .map(|i| {
                    let store = Arc::clone(&store);
                    tokio::spawn(async move {
                        let delta = UsageDelta {
                            key_id: format!("key_{i}").into(),
                            account_id: "acc_a".into(),
                            minute,
                            counts: UsageCounts {
                                requests: 1,
                                ..UsageCounts::default()
                            },
                            last_used_ms: minute * 60_000,
                        };
                        store.add_usage(BatchId::first(), &[delta]).await
                    })
                })
                .collect();
            let all = futures_util::future::join_all(tasks);
            let all = tokio::time::timeout(std::time::Duration::from_secs(60), all)
                .await
                .expect("every write finished");
            for written in all {
                written.expect("write task").expect("write");
            }
            let day = crate::store::Granularity::Day.of_minute(minute);
            let days = store
                .account_usage("acc_a", day, day + 1)
                .await
                .expect("account usage");
            let requests: u64 = days.iter().map(|(_, c)| c.requests).sum();
            assert_eq!(requests, u64::try_from(writes).expect("fits"));
        });
    }
}
