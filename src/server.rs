//! The server: start-up and shutdown of chatpool's threads.
//!
//! [`Server::start`] opens the database (the writer thread, the shared read connections, the
//! readiness thread's connection), binds the address, starts the workers and then the
//! [`acceptor`](crate::acceptor), which admits requests into the workers' bounded channel.
//!
//! Shutdown order: stop admitting (the acceptor drops the channel's sender and keeps
//! answering, so `/healthz` and `/readyz` stay truthful), wait for the workers up to the grace
//! period (then for the writer; or, when the grace ran out first, have the writer store the
//! usage counted so far, which it otherwise stores only on its next tick), then stop the
//! acceptor, and with it the readiness thread.

use crate::acceptor::{Acceptor, Control};
use crate::admission::Admission;
use crate::api::{self, ApiError, Job};
use crate::auth::Auth;
use crate::config::{Config, ConfigError};
use crate::handoff;
use crate::listen;
use crate::llm::LlmClient;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::readiness::Readiness;
use crate::store::{
    Readers, Recent, Store, StoreError, Unstored, Writer, MAX_READERS, READ_CACHE_KIB,
};
use crate::tenants::day::Day;
use crate::tenants::Tenants;
use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Why the server could not start.
#[derive(Debug)]
pub enum StartError {
    /// The configuration is unusable.
    Config(ConfigError),
    /// The database could not be opened or migrated.
    Store(std::path::PathBuf, StoreError),
    /// The address could not be bound (in use, not local, no permission).
    Bind {
        /// The address asked for.
        addr: String,
        /// Why.
        reason: String,
    },
    /// A thread could not be started.
    Thread(std::io::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(e) => write!(f, "invalid configuration: {e}"),
            StartError::Store(path, e) => {
                write!(f, "cannot open the database {}: {e}", path.display())
            }
            StartError::Bind { addr, reason } => write!(f, "cannot listen on {addr}: {reason}"),
            StartError::Thread(e) => write!(f, "cannot start a thread: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// A running chatpool.
pub struct Server {
    addr: SocketAddr,
    http: Arc<tiny_http::Server>,
    acceptor: JoinHandle<()>,
    readiness: JoinHandle<()>,
    pool: Pool,
    writer: JoinHandle<()>,
    /// A handle on the writer for shutdown alone: when the grace period ends before the
    /// workers do, the writer thread outlives the process's last moments, and the usage the
    /// workers counted but the writer has not yet stored would go with them.
    usage: Writer,
    unstored: Unstored,
    control: Arc<Control>,
    grace: Duration,
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Whether every admitted request finished within the grace period.
    pub drained: bool,
}

/// The database as the server uses it: one writer, shared readers, and readiness's connection.
struct Storage {
    writer: Writer,
    writer_thread: JoinHandle<()>,
    readers: Readers,
    readiness: Store,
}

/// The tenants' limits, with the day's token budgets going on from what is stored: the
/// acceptor never reads them per request.
fn tenants_as_stored(
    config: &Arc<Config>,
    store: &Store,
    metrics: &Metrics,
) -> Result<Tenants, StartError> {
    let today = Day::of(std::time::SystemTime::now());
    let spent_today = store
        .tokens_on(today)
        .map_err(|e| StartError::Store(config.storage.path.clone(), e))?;
    Ok(Tenants::new(
        Arc::clone(config),
        today,
        spent_today,
        metrics,
    ))
}

/// The workers' LLM client; warns when an OpenAI-compatible upstream gets no key.
fn llm_client(config: &Config, metrics: &Arc<Metrics>) -> LlmClient {
    let llm = LlmClient::new(&config.llm, Arc::clone(metrics));
    if config.llm.provider == crate::config::Provider::Openai && !llm.has_key() {
        log::warn!(
            "no API key in ${}: calls to {} go without an Authorization header",
            config.llm.api_key_env,
            config.llm.base_url
        );
    }
    llm
}

/// How long a drained server waits for the answers handed back to be written: to a client
/// that reads, moments; to one that does not, never.
const ANSWERS_WRITTEN_WITHIN: Duration = Duration::from_secs(2);

impl Server {
    /// Opens the database, binds the address, starts the workers and the acceptor.
    pub fn start(config: Config) -> Result<Server, StartError> {
        config.validate().map_err(StartError::Config)?;
        let config = Arc::new(config);
        let workers = config.server.max_concurrent_requests;
        let storage = open_storage(&config)?;
        let metrics = Arc::new(Metrics::new(workers, config.server.queue_capacity));
        let (http, addr) = bind(&config, &metrics)?;
        let tenants = tenants_as_stored(&config, &storage.readiness, &metrics)?;
        let llm = llm_client(&config, &metrics);
        // Admission enforces workers + queue_capacity in flight. A job holds its ticket from
        // admission until it is done, so the channel, with room for as many, is never full
        // while admission admits: a job that a woken worker has not yet taken is no false 503,
        // and with queue_capacity = 0 the channel still has room for the one a worker is about
        // to take (a channel of the queue's size alone would be a rendezvous, and refuse every
        // job, since workers never wait in crossbeam's `recv`).
        let limit = workers + config.server.queue_capacity;
        let (jobs_tx, jobs_rx) = handoff::bounded(limit);
        let pool = start_workers(&config, &storage, &llm, &metrics, &tenants, jobs_rx.clone())?;
        let (readiness, readiness_thread) =
            Readiness::start(storage.readiness, Arc::clone(&metrics))
                .map_err(StartError::Thread)?;
        let control = Arc::new(Control::default());
        let acceptor = Acceptor {
            http: Arc::clone(&http),
            jobs: Some(jobs_tx),
            queue: jobs_rx,
            admission: Admission::new(limit),
            tenants,
            auth: Auth::new(&config.auth),
            metrics,
            control: Arc::clone(&control),
            readiness,
            config: Arc::clone(&config),
            started: Instant::now(),
        };
        Ok(Server {
            addr,
            http,
            acceptor: start_acceptor(acceptor)?,
            readiness: readiness_thread,
            pool,
            writer: storage.writer_thread,
            unstored: storage
                .writer
                .unstored(&config.storage.path, config.storage.synchronous),
            usage: storage.writer,
            control,
            grace: Duration::from_secs(config.server.shutdown_grace_secs),
        })
    }

    /// A handle that stores the usage counted but not yet stored, for an exit that cannot
    /// wait for [`Server::shutdown`].
    pub fn unstored_usage(&self) -> Unstored {
        self.unstored.clone()
    }

    /// The address actually bound (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops admitting, lets admitted requests finish for up to the grace period, then stops.
    pub fn shutdown(self) -> ShutdownReport {
        self.control.draining.store(true, Ordering::SeqCst);
        self.http.unblock();
        let drained = self.pool.join_until(Instant::now() + self.grace);
        if drained {
            // The workers held the writer's other handles; it returns once their writes are in.
            drop(self.usage);
            joined("store-writer", self.writer);
            // Every answer is handed back to its connection's thread; the process must not
            // end before those threads have written them.
            let deadline = Instant::now() + ANSWERS_WRITTEN_WITHIN;
            while self.http.answers_unwritten() > 0 && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
        } else if let Err(e) = self.usage.flush_usage() {
            log::warn!("the usage of the calls answered so far could not be stored: {e}");
        }
        self.control.stopping.store(true, Ordering::SeqCst);
        self.http.unblock();
        // The acceptor only answers small requests; it returns at its next receive, and the
        // readiness thread once the acceptor's handle on it is gone.
        joined("acceptor", self.acceptor);
        joined("readiness", self.readiness);
        ShutdownReport { drained }
    }

    /// Lets a test make the acceptor's next decision panic.
    #[cfg(test)]
    fn panic_acceptor_once(&self) {
        self.control.panic_next.store(true, Ordering::SeqCst);
    }
}

/// Starts the workers, each with a handler of its own, taking jobs from `jobs`.
fn start_workers(
    config: &Arc<Config>,
    storage: &Storage,
    llm: &LlmClient,
    metrics: &Arc<Metrics>,
    tenants: &Tenants,
    jobs: handoff::BoundedReceiver<Box<Job>>,
) -> Result<Pool, StartError> {
    let handlers: Vec<_> = (0..config.server.max_concurrent_requests)
        .map(|_| {
            let mut handler = api::Handler::new(
                storage.readers.clone(),
                storage.writer.clone(),
                llm.clone(),
                Arc::clone(config),
                Arc::clone(metrics),
                tenants.clone(),
            );
            move |job: Box<Job>| handler.run(*job)
        })
        .collect();
    Pool::start(jobs, handlers).map_err(StartError::Thread)
}

/// Joins a thread, logging it if the thread panicked: its work may be unfinished.
fn joined(name: &str, thread: JoinHandle<()>) {
    if thread.join().is_err() {
        log::error!("the {name} thread panicked; what it had in hand may be lost");
    }
}

/// Opens and migrates the database, and opens every connection the server keeps.
fn open_storage(config: &Config) -> Result<Storage, StartError> {
    let path = &config.storage.path;
    let sync = config.storage.synchronous;
    let store_error = |e| StartError::Store(path.clone(), e);
    Store::open_and_migrate(path, sync).map_err(store_error)?;
    let checkpoints = match config.storage.checkpoint_interval_ms {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    };
    let history = &config.history;
    let recent = Arc::new(Recent::new(history.max_messages, history.max_chars));
    let (writer, writer_thread) =
        Writer::start(path, sync, checkpoints, Arc::clone(&recent)).map_err(store_error)?;
    let count = config.server.max_concurrent_requests.min(MAX_READERS);
    let mut readiness = Store::open_read_only(path, sync).map_err(store_error)?;
    readiness
        .limit_page_cache(READ_CACHE_KIB)
        .map_err(store_error)?;
    Ok(Storage {
        writer,
        writer_thread,
        readers: Readers::open(path, sync, count, recent).map_err(store_error)?,
        readiness,
    })
}

/// Binds the listening socket and starts tiny_http on it; returns it and the address bound.
fn bind(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<(Arc<tiny_http::Server>, SocketAddr), StartError> {
    let bind_error = |reason: String| StartError::Bind {
        addr: config.server.listen.clone(),
        reason,
    };
    // Each connection holds two descriptors (tiny_http reads and writes through two handles
    // of its socket); each SQLite connection up to three (database, WAL, shared memory).
    let sqlite_connections = config.server.max_concurrent_requests.min(MAX_READERS) + 3;
    ensure_descriptors(2 * config.server.max_connections + 3 * sqlite_connections + 64);
    let listener =
        TcpListener::bind(&config.server.listen).map_err(|e| bind_error(e.to_string()))?;
    listen::set_nodelay(&listener)
        .and_then(|()| listen::widen_backlog(&listener))
        .map_err(|e| bind_error(e.to_string()))?;
    let limits = connection_limits(config, Arc::clone(metrics));
    let http = tiny_http::Server::from_listener_with_limits(listener, limits)
        .map_err(|e| bind_error(e.to_string()))?;
    let addr = http
        .server_addr()
        .to_ip()
        .ok_or_else(|| bind_error("not an IP address".into()))?;
    Ok((Arc::new(http), addr))
}

/// Starts the acceptor thread; once this returns, it is running under its name.
fn start_acceptor(acceptor: Acceptor) -> Result<JoinHandle<()>, StartError> {
    let (running_tx, running) = crossbeam_channel::bounded(1);
    let thread = thread::Builder::new()
        .name("acceptor".into())
        .spawn(move || {
            let _ = running_tx.send(());
            acceptor.run()
        })
        .map_err(StartError::Thread)?;
    let _ = running.recv();
    Ok(thread)
}

/// The longest request line plus headers a client may send; more is a 414 or 431.
const MAX_HEAD_BYTES: usize = 16 << 10;

/// What tiny_http lets one client connection hold, and the answer when it refuses one: the
/// contract's error shape, counted and logged like every other refusal.
fn connection_limits(config: &Config, metrics: Arc<Metrics>) -> tiny_http::ConnectionLimits {
    tiny_http::ConnectionLimits {
        timeout: Some(Duration::from_secs(config.server.client_timeout_secs)),
        max_connections: config.server.max_connections,
        max_head_bytes: MAX_HEAD_BYTES,
        max_body_bytes: config.server.max_body_bytes,
        respond: Arc::new(move |refusal| {
            let error = ApiError::Refused(refusal);
            let request_id = api::new_request_id();
            let (status, kind) = error.status_and_type();
            if refusal == tiny_http::Refusal::TooManyConnections {
                metrics.rejected("too_many_connections");
            }
            metrics.request("refused", status);
            log::info!("refused {status} {kind}: {error} request_id={request_id}");
            api::with_header(
                api::error_response(&error, &request_id),
                "X-Request-Id",
                &request_id,
            )
        }),
    }
}

/// Raises the soft limit on open files to the hard limit (as Go's runtime does at start-up),
/// and warns when even that is below what `max_connections` needs: past it, accepting fails
/// with EMFILE and new clients wait in the listen backlog.
fn ensure_descriptors(needed: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or fill the one struct passed, which lives across
    // each call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    if (limit.rlim_cur as u128) < needed as u128 {
        log::warn!(
            "server.max_connections needs about {needed} open files but the limit is {}; \
             raise it (ulimit -n, or LimitNOFILE= under systemd) or lower max_connections",
            limit.rlim_cur
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// A server on a free loopback port with the built-in mock LLM, and its temp folder.
    fn serve(workers: usize, queue: usize, latency_ms: u64) -> (Server, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".into();
        config.server.max_concurrent_requests = workers;
        config.server.queue_capacity = queue;
        config.storage.path = dir.path().join("chat.db");
        config.llm.mock_latency_ms = latency_ms;
        (Server::start(config).unwrap(), dir)
    }

    /// Sends one request and returns the status and body.
    fn ask(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(addr).unwrap();
        // A dead acceptor would leave the client waiting: fail instead.
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    fn post(addr: SocketAddr, chat: &str) -> (u16, String) {
        ask(
            addr,
            "POST",
            &format!("/v1/chats/{chat}/messages"),
            r#"{"content":"hi"}"#,
        )
    }

    fn workers_busy(addr: SocketAddr) -> i64 {
        let (_, body) = ask(addr, "GET", "/status", "");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["workers_busy"]
            .as_i64()
            .unwrap()
    }

    #[test]
    fn a_panic_in_the_acceptor_is_a_500_and_admission_goes_on() {
        let (server, _dir) = serve(1, 4, 0);
        let addr = server.addr();
        server.panic_acceptor_once();
        let (status, body) = post(addr, "c");
        assert_eq!(status, 500, "{body}");
        assert!(body.contains(r#""type":"internal""#), "{body}");
        assert_eq!(post(addr, "c").0, 200);
        assert_eq!(ask(addr, "GET", "/healthz", "").0, 200);
        assert!(server.shutdown().drained);
    }

    #[test]
    fn the_acceptor_routes_refuses_and_admits_without_waiting_on_workers() {
        let (server, _dir) = serve(1, 0, 2_000);
        let addr = server.addr();
        let held = std::thread::spawn(move || post(addr, "slow"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while workers_busy(addr) == 0 {
            assert!(
                Instant::now() < deadline,
                "the first POST never reached a worker"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let started = Instant::now();
        assert_eq!(ask(addr, "GET", "/healthz", "").0, 200);
        assert_eq!(ask(addr, "GET", "/readyz", "").0, 200);
        assert_eq!(post(addr, "slow").0, 409, "the chat is busy");
        assert_eq!(post(addr, "other").0, 503, "the pool is full");
        assert_eq!(ask(addr, "GET", "/nowhere", "").0, 404);
        assert_eq!(ask(addr, "PUT", "/v1/chats", "").0, 405);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(held.join().unwrap().0, 200);
        assert!(server.shutdown().drained);
    }
}
