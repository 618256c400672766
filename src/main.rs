//! The `chatpool` command: parses flags, loads the config, starts, waits for a signal, and
//! turns the outcome into an exit status.

use chatpool::auth;
use chatpool::config::Config;
use chatpool::mock_llm::{self, MockOptions};
use chatpool::server::Server;
use chatpool::store::usage::{self, GroupBy, UsageQuery};
use chatpool::store::{transfer, Store, Unstored};
use chatpool::tenants::day::Day;
use clap::{Parser, Subcommand};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

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
    /// Write chats from the configured database to stdout, one JSON line per chat
    Export {
        /// Only this chat (repeatable) [default: every chat]
        #[arg(long = "chat", value_name = "ID")]
        chats: Vec<String>,
        /// The tenant of the chats named with --chat
        #[arg(long, default_value = chatpool::store::DEFAULT_TENANT)]
        tenant: String,
    },
    /// Read chats from stdin (lines of export) into the configured database; re-importing
    /// changes nothing, and a chat that diverged is reported and left alone
    Import,
    /// Delete the chats of stdin (lines of export) from the configured database, each only
    /// while it still holds exactly the exported messages
    Forget,
    /// Print the LLM calls and tokens each tenant used, from the configured database
    Usage {
        /// Only this tenant [default: every tenant]
        #[arg(long)]
        tenant: Option<String>,
        /// The first UTC day, YYYY-MM-DD [default: the earliest on record]
        #[arg(long, value_parser = parse_day)]
        from: Option<Day>,
        /// The last UTC day, YYYY-MM-DD, included [default: the latest on record]
        #[arg(long, value_parser = parse_day)]
        to: Option<Day>,
        /// A row per `day` or per `model` [default: one total row per tenant]
        #[arg(long, value_parser = parse_group_by)]
        group_by: Option<GroupBy>,
        /// Print JSON, {"object": "list", "data": [...]}, instead of a table
        #[arg(long)]
        json: bool,
    },
}

fn parse_day(text: &str) -> Result<Day, String> {
    Day::parse(text).ok_or_else(|| "expected a UTC day as YYYY-MM-DD".into())
}

fn parse_group_by(text: &str) -> Result<GroupBy, String> {
    GroupBy::parse(text).ok_or_else(|| "expected `day` or `model`".into())
}

/// Caps glibc's malloc at four arenas per core, unless `MALLOC_ARENA_MAX` says otherwise; call
/// before any thread starts.
///
/// glibc gives threads up to eight arenas per core, each holding on to its own free memory and
/// growing slowly to its own high-water mark. Fewer arenas hold less, but every allocation the
/// per-thread caches (below) do not serve takes its arena's lock, and a thread descheduled while
/// holding it makes the others sleep on it: with one arena per core, a chat POST paid about 5
/// more futex calls than with four (`scripts/load.py overhead`: 17.1 against 10.2), for the
/// same memory at the scale load (README, Memory).
fn bound_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas =
            libc::c_int::try_from(cores.max(2).saturating_mul(4)).unwrap_or(libc::c_int::MAX);
        // SAFETY: no other thread exists yet, and mallopt only sets a tunable.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
    }
}

/// The tunables chatpool gives glibc's malloc when `GLIBC_TUNABLES` is not set: per-thread
/// caches for allocations of at most 256 bytes, not glibc's 1,032.
const MALLOC_TUNABLES: &str = "glibc.malloc.tcache_max=256";

/// Runs the process again with [`MALLOC_TUNABLES`], unless `GLIBC_TUNABLES` is set; call first.
///
/// Each thread's cache keeps up to seven freed chunks of every size it covers for the thread's
/// next allocations. A request frees chunks of dozens of sizes on its worker's thread and on
/// its client connection's, so with 1,024 busy workers and as many connections the caches
/// held about 27 MB, a fifth of the process, memory that no other thread could use (README,
/// Memory). Capped at 256 bytes they hold little, and the small allocations of a request's
/// path (headers, ids, the hand-offs' slots) still take no lock: at 64 bytes, contention on the
/// arenas' locks cost a relayed request one futex call more. glibc reads its tunables only as a process starts, hence
/// the exec; should it fail, chatpool runs on with glibc's defaults.
fn bound_thread_caches() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        use std::os::unix::process::CommandExt;
        let mut args = std::env::args_os();
        let mut again = std::process::Command::new("/proc/self/exe");
        if let Some(name) = args.next() {
            again.arg0(name);
        }
        // exec returns only on failure, and then nothing is lost but the smaller caches.
        let _ = again
            .args(args)
            .env("GLIBC_TUNABLES", MALLOC_TUNABLES)
            .exec();
    }
}

/// Exit status for a configuration or start-up problem, as for a usage error.
const EXIT_BAD_START: u8 = 2;

fn main() -> ExitCode {
    bound_thread_caches();
    bound_malloc_arenas();
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match cli.command {
        Some(Command::MockLlm(options)) => match mock_llm::run(options) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Some(Command::Token { name }) => token(&name),
        Some(Command::Export { chats, tenant }) => {
            let only: Vec<_> = chats.into_iter().map(|c| (tenant.clone(), c)).collect();
            run_transfer(cli.config.as_deref(), "exported", |store| {
                transfer::export(store, &only, &mut std::io::stdout().lock())
            })
        }
        Some(Command::Import) => run_transfer(cli.config.as_deref(), "imported", |store| {
            transfer::import(store, &mut std::io::stdin().lock())
        }),
        Some(Command::Forget) => run_transfer(cli.config.as_deref(), "forgot", |store| {
            transfer::forget(store, &mut std::io::stdin().lock())
        }),
        Some(Command::Usage {
            tenant,
            from,
            to,
            group_by,
            json,
        }) => {
            let query = UsageQuery { from, to, group_by };
            print_usage(cli.config.as_deref(), tenant.as_deref(), &query, json)
        }
        None => serve(cli.config.as_deref(), cli.listen, cli.workers),
    }
}

/// Prints `chatpool usage`: every tenant's (or one's) usage as a table or as JSON.
fn print_usage(
    config_path: Option<&Path>,
    tenant: Option<&str>,
    query: &UsageQuery,
    json: bool,
) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(config) => config,
        Err(e) => return fail(&e),
    };
    let path = &config.storage.path;
    let rows = Store::open_and_migrate(path, config.storage.synchronous)
        .and_then(|store| store.usage(tenant, query));
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => return fail(&format!("{}: {e}", path.display())),
    };
    if json {
        let data: Vec<_> = rows
            .iter()
            .map(|row| row.to_json(query.group_by, true))
            .collect();
        println!("{}", serde_json::json!({"object": "list", "data": data}));
    } else {
        print!("{}", usage::table(&rows, query.group_by));
    }
    ExitCode::SUCCESS
}

/// Runs one of export, import and forget on the configured database (a running server's
/// too: SQLite's locking lets both write), then prints a summary and each problem on stderr.
fn run_transfer(
    config_path: Option<&Path>,
    done: &str,
    run: impl FnOnce(&mut Store) -> Result<transfer::Report, transfer::TransferError>,
) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(config) => config,
        Err(e) => return fail(&e),
    };
    let path = &config.storage.path;
    let mut store = match Store::open_and_migrate(path, config.storage.synchronous) {
        Ok(store) => store,
        Err(e) => return fail(&format!("cannot open the database {}: {e}", path.display())),
    };
    match run(&mut store) {
        Ok(report) => {
            for problem in &report.problems {
                eprintln!("chatpool: {problem}");
            }
            for tenant in unreachable(&config, &report.tenants) {
                eprintln!(
                    "chatpool: warning: no token in [auth] acts for tenant {tenant}; its chats are \
                     stored but no client can reach them until one does"
                );
            }
            eprintln!(
                "chatpool: {done} {} chats, {} messages; {} unchanged; {} problems ({})",
                report.chats,
                report.messages,
                report.unchanged,
                report.problems.len(),
                path.display()
            );
            if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        // Started, then failed: not a start-up problem, so the ordinary failure status.
        Err(e @ transfer::TransferError::Store(_)) => failed(&format!("{}: {e}", path.display())),
        Err(e) => failed(&e.to_string()),
    }
}

/// The tenants among `tenants` that no request can act for: with auth off every request acts
/// for the default tenant, with auth on each token for its own.
fn unreachable<'a>(
    config: &Config,
    tenants: &'a std::collections::BTreeSet<String>,
) -> impl Iterator<Item = &'a String> {
    let reachable: Vec<String> = if config.auth.tokens.is_empty() {
        vec![chatpool::store::DEFAULT_TENANT.to_string()]
    } else {
        config
            .auth
            .tokens
            .iter()
            .map(|t| t.tenant.clone())
            .collect()
    };
    tenants.iter().filter(move |t| !reachable.contains(t))
}

/// The config file named, or `./config.toml` when it exists, or the defaults.
fn load_config(config_path: Option<&Path>) -> Result<Config, String> {
    let default_path = Path::new("config.toml");
    let config = match config_path {
        Some(path) => Config::load(path),
        None if default_path.exists() => Config::load(default_path),
        None => Ok(Config::default()),
    };
    config.map_err(|e| e.to_string())
}

fn token(tenant: &str) -> ExitCode {
    if let Err(e) = chatpool::validate::tenant(tenant, "a tenant name") {
        return fail(&e.0);
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
    let mut config = match load_config(config_path) {
        Ok(config) => config,
        Err(e) => return fail(&e),
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
        log::info!("signal {signal}: draining (a second signal exits at once)");
    }
    exit_on_second_signal(signals, server.unstored_usage());
    let report = server.shutdown();
    if report.drained {
        log::info!("drained; exiting");
    } else {
        log::warn!("the grace period ended with requests still running; exiting anyway");
    }
    ExitCode::SUCCESS
}

/// Ends the process at the next signal: an operator who presses Ctrl-C again during the drain
/// wants it over now, not after `shutdown_grace_secs`. What was acknowledged is in the database
/// already, but for the usage counted since the writer's last store, which is stored first
/// (waiting a second at most for the database); the requests still running get no answer.
/// Exits 128 + the signal, as a shell does.
fn exit_on_second_signal(mut signals: Signals, unstored: Unstored) {
    let watcher = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                log::warn!("signal {signal} again: exiting now, without finishing the drain");
                if let Err(e) = unstored.store(Duration::from_secs(1)) {
                    log::warn!("the usage counted since the last store is lost: {e}");
                }
                std::process::exit(128 + signal);
            }
        });
    if let Err(e) = watcher {
        log::warn!("cannot watch for a second signal ({e}); the drain runs its course");
    }
}

/// Says why chatpool could not start, and exits with [`EXIT_BAD_START`].
fn fail(message: &str) -> ExitCode {
    eprintln!("chatpool: {message}");
    ExitCode::from(EXIT_BAD_START)
}

/// Says why a command that had started failed, and exits with the ordinary failure status.
fn failed(message: &str) -> ExitCode {
    eprintln!("chatpool: {message}");
    ExitCode::FAILURE
}
