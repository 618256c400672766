//! The `chatpool` command: parses flags, loads the config, starts, waits for a signal, and
//! turns the outcome into an exit status.

use chatpool::auth;
use chatpool::config::Config;
use chatpool::mock_llm::{self, MockOptions};
use chatpool::server::Server;
use clap::{Parser, Subcommand};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// A chat backend for one machine: SQLite history, an OpenAI-compatible LLM, and a fixed pool
/// of worker threads.
#[derive(Parser)]
#[command(name = "chatpool", version, about)]
struct Cli {
    /// Config file [default: ./config.toml when it exists, else built-in defaults]
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Address to listen on, overriding [server] listen
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Worker threads, overriding [server] max_concurrent_requests
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve an OpenAI-compatible fake LLM, for tests, load and demos
    MockLlm(MockOptions),
    /// Print a new random token for tenant NAME and the [auth] entry that admits it
    Token {
        /// The tenant the token acts for (1-64 of A-Z a-z 0-9 . _ -)
        name: String,
    },
}

/// Exit status for a configuration or start-up problem, as for a usage error.
const EXIT_BAD_START: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match cli.command {
        Some(Command::MockLlm(options)) => match mock_llm::run(options) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Some(Command::Token { name }) => token(&name),
        None => serve(cli.config.as_deref(), cli.listen, cli.workers),
    }
}

fn token(tenant: &str) -> ExitCode {
    if !chatpool::config::is_valid_tenant(tenant) {
        return fail("a tenant name is 1 to 64 characters of A-Z a-z 0-9 . _ -");
    }
    let token = match auth::new_token() {
        Ok(token) => token,
        Err(e) => return fail(&format!("cannot read the OS's random source: {e}")),
    };
    println!("{token}");
    println!("# Give the token above to {tenant}; it is shown only this once.");
    println!("# Add this entry to [auth] tokens in config.toml and restart chatpool:");
    println!(
        "{{ tenant = \"{tenant}\", sha256 = \"{}\" }}",
        auth::digest_hex(&token)
    );
    ExitCode::SUCCESS
}

fn serve(config_path: Option<&Path>, listen: Option<String>, workers: Option<usize>) -> ExitCode {
    let default_path = Path::new("config.toml");
    let config = match config_path {
        Some(path) => Config::load(path),
        None if default_path.exists() => Config::load(default_path),
        None => Ok(Config::default()),
    };
    let mut config = match config {
        Ok(config) => config,
        Err(e) => return fail(&e.to_string()),
    };
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    if let Some(workers) = workers {
        config.server.max_concurrent_requests = workers;
    }
    // Signals are caught before serving, so a SIGTERM during start-up still drains cleanly.
    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
        Ok(signals) => signals,
        Err(e) => return fail(&format!("cannot install signal handlers: {e}")),
    };
    let auth_on = !config.auth.tokens.is_empty();
    let summary = (
        config.server.max_concurrent_requests,
        config.server.queue_capacity,
        config.storage.path.display().to_string(),
        config.llm.provider,
        config.llm.model.clone(),
    );
    let server = match Server::start(config) {
        Ok(server) => server,
        Err(e) => return fail(&e.to_string()),
    };
    let (workers, queue, db, provider, model) = summary;
    let addr = server.addr();
    if !addr.ip().is_loopback() && !auth_on {
        log::warn!(
            "listening beyond loopback on {addr} with auth off: anyone who can reach it can use it"
        );
    }
    log::info!(
        "chatpool {} listening on http://{addr} with {workers} workers, queue {queue}, database {db}, llm {provider} ({model})",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(signal) = signals.forever().next() {
        log::info!("signal {signal}: draining");
    }
    let report = server.shutdown();
    if report.drained {
        log::info!("drained; exiting");
    } else {
        log::warn!("the grace period ended with requests still running; exiting anyway");
    }
    ExitCode::SUCCESS
}

fn fail(message: &str) -> ExitCode {
    eprintln!("chatpool: {message}");
    ExitCode::from(EXIT_BAD_START)
}
