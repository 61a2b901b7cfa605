//! The command line: `serve`, `keygen`, `check-config`. Returns the process exit code: 0 ok,
//! 2 bad usage or config, 1 anything else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::app::{self, StartOptions};
use crate::config;
use crate::credential::{self, Kind};

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
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KeygenKind {
    Secret,
    Master,
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
    }
}

fn serve(path: &std::path::Path) -> ExitCode {
    let settings = match config::load(path) {
        Ok(s) => s,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::from(2);
        }
    };
    let master_key = std::env::var(&settings.admin.master_key_env)
        .ok()
        .filter(|v| !v.is_empty());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
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
        crate::shutdown::signal().await;
        tracing::info!("shutting down: draining requests and flushing usage");
        running.shutdown().await;
        ExitCode::SUCCESS
    })
}

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
