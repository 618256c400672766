//! The server: start-up, the acceptor thread, and shutdown.
//!
//! One thread named `acceptor` receives every request from tiny_http. It answers the
//! operations endpoints itself, refuses what can be refused from the request line and headers
//! alone, and admits API calls into the bounded job channel with `try_send`, so a full pool is
//! a 503 at once and never a wait. It owns the channel's only sender: draining drops it, which
//! lets the workers finish the queue and return.
//!
//! Shutdown order: stop admitting (the acceptor drops the sender and keeps answering, so
//! `/healthz` and `/readyz` stay truthful), wait for the workers up to the grace period, then
//! stop the acceptor.

use crate::admission::{Admission, Refusal};
use crate::api::{self, ApiError, Job, Ops, Target};
use crate::auth::Auth;
use crate::config::{Config, ConfigError};
use crate::listen;
use crate::llm::LlmClient;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::store::{self, Readers, Store, StoreError, Writer, MAX_READERS};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use serde_json::json;
use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Flags the main thread sets and the acceptor reads.
struct Control {
    draining: AtomicBool,
    stopping: AtomicBool,
}

/// A running chatpool.
pub struct Server {
    addr: SocketAddr,
    http: Arc<tiny_http::Server>,
    acceptor: JoinHandle<()>,
    pool: Pool,
    writer: JoinHandle<()>,
    control: Arc<Control>,
    grace: Duration,
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Whether every admitted request finished within the grace period.
    pub drained: bool,
}

impl Server {
    /// Opens the database, binds the address, starts the workers and the acceptor.
    pub fn start(config: Config) -> Result<Server, StartError> {
        config.validate().map_err(StartError::Config)?;
        let config = Arc::new(config);
        let workers = config.server.max_concurrent_requests;
        let path = &config.storage.path;
        let sync = config.storage.synchronous;
        let store_error = |e| StartError::Store(path.clone(), e);
        let mut readiness = Store::open_and_migrate(path, sync).map_err(store_error)?;
        readiness
            .limit_page_cache(store::READ_CACHE_KIB)
            .map_err(store_error)?;
        let checkpoints = match config.storage.checkpoint_interval_ms {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        };
        let (writer, writer_thread) =
            Writer::start(path, sync, checkpoints).map_err(store_error)?;
        let readers = Readers::open(path, sync, workers.min(MAX_READERS)).map_err(store_error)?;

        let bind_error = |reason: String| StartError::Bind {
            addr: config.server.listen.clone(),
            reason,
        };
        // Each connection holds two descriptors (tiny_http reads and writes through two handles
        // of its socket); each SQLite connection up to three (database, WAL, shared memory).
        let sqlite_connections = workers.min(MAX_READERS) + 3;
        ensure_descriptors(2 * config.server.max_connections + 3 * sqlite_connections + 64);
        let listener =
            TcpListener::bind(&config.server.listen).map_err(|e| bind_error(e.to_string()))?;
        listen::set_nodelay(&listener)
            .and_then(|()| listen::widen_backlog(&listener))
            .map_err(|e| bind_error(e.to_string()))?;
        let metrics = Arc::new(Metrics::new(workers, config.server.queue_capacity));
        let limits = connection_limits(&config, Arc::clone(&metrics));
        let http = tiny_http::Server::from_listener_with_limits(listener, limits)
            .map_err(|e| bind_error(e.to_string()))?;
        let addr = http.server_addr().to_ip().ok_or_else(|| StartError::Bind {
            addr: config.server.listen.clone(),
            reason: "not an IP address".into(),
        })?;
        let http = Arc::new(http);

        let llm = LlmClient::new(&config.llm, Arc::clone(&metrics));
        if config.llm.provider == crate::config::Provider::Openai && !llm.has_key() {
            log::warn!(
                "no API key in ${}: calls to {} go without an Authorization header",
                config.llm.api_key_env,
                config.llm.base_url
            );
        }
        let handlers: Vec<_> = (0..workers)
            .map(|_| {
                let mut handler = api::Handler::new(
                    readers.clone(),
                    writer.clone(),
                    llm.clone(),
                    Arc::clone(&config),
                    Arc::clone(&metrics),
                );
                move |job: Job| handler.run(job)
            })
            .collect();
        // Sized for every request in flight, so `try_send` fails only if admission is wrong;
        // admission (not the channel's fullness) enforces workers + queue_capacity.
        let limit = workers + config.server.queue_capacity;
        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded(limit);
        let pool = Pool::start(jobs_rx.clone(), handlers).map_err(StartError::Thread)?;

        let control = Arc::new(Control {
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        });
        let acceptor = Acceptor {
            http: Arc::clone(&http),
            jobs: Some(jobs_tx),
            queue: jobs_rx,
            admission: Admission::new(limit),
            auth: Auth::new(&config.auth),
            metrics,
            control: Arc::clone(&control),
            readiness,
            config: Arc::clone(&config),
            started: Instant::now(),
            refusals: RefusalLog::new(),
        };
        let (running_tx, running) = crossbeam_channel::bounded(1);
        let acceptor = thread::Builder::new()
            .name("acceptor".into())
            .spawn(move || {
                let _ = running_tx.send(());
                acceptor.run()
            })
            .map_err(StartError::Thread)?;
        // As for the workers: once `start` returns, the acceptor is running under its name.
        let _ = running.recv();
        Ok(Server {
            addr,
            http,
            acceptor,
            pool,
            writer: writer_thread,
            control,
            grace: Duration::from_secs(config.server.shutdown_grace_secs),
        })
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
            // The workers held the writer's last handles; it returns once their writes are in.
            let _ = self.writer.join();
        }
        self.control.stopping.store(true, Ordering::SeqCst);
        self.http.unblock();
        // The acceptor only answers small requests; it returns at its next receive.
        let _ = self.acceptor.join();
        ShutdownReport { drained }
    }
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

/// The acceptor thread's state; nothing else touches it.
struct Acceptor {
    http: Arc<tiny_http::Server>,
    /// The only sender of the job channel; `None` once draining.
    jobs: Option<Sender<Job>>,
    /// The workers' end of the channel, kept only to read the queue's length.
    queue: Receiver<Job>,
    admission: Admission,
    auth: Auth,
    metrics: Arc<Metrics>,
    control: Arc<Control>,
    readiness: Store,
    config: Arc<Config>,
    started: Instant,
    refusals: RefusalLog,
}

/// Requests refused by the acceptor in storms (401, 404, 409 and 503), summed up in one info
/// line a second.
struct RefusalLog {
    since: Instant,
    counts: Vec<(&'static str, u64)>,
}

impl RefusalLog {
    const EVERY: Duration = Duration::from_secs(1);

    fn new() -> RefusalLog {
        RefusalLog {
            since: Instant::now(),
            counts: Vec::new(),
        }
    }

    fn count(&mut self, kind: &'static str) {
        match self.counts.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => self.counts.push((kind, 1)),
        }
    }

    /// Logs what was refused since the last line, once a second at most.
    fn log_if_due(&mut self) {
        let elapsed = self.since.elapsed();
        if elapsed < Self::EVERY {
            return;
        }
        if !self.counts.is_empty() {
            let total: u64 = self.counts.iter().map(|(_, n)| n).sum();
            let kinds: Vec<String> = self
                .counts
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            log::info!(
                "refused {total} requests in {:.1}s ({}); a line each at debug level",
                elapsed.as_secs_f64(),
                kinds.join(", ")
            );
            self.counts.clear();
        }
        self.since = Instant::now();
    }
}

impl Acceptor {
    fn run(mut self) {
        loop {
            if self.control.draining.load(Ordering::SeqCst) && self.jobs.take().is_some() {
                log::info!(
                    "draining: no new requests are admitted; {} in flight",
                    self.admission.in_flight()
                );
            }
            self.refusals.log_if_due();
            // Wakes at least once a second for the refusals summary. `unblock()` ends the wait
            // too, behind the requests already received, which are answered first.
            let stopping = || self.control.stopping.load(Ordering::SeqCst);
            match self.http.recv_timeout(RefusalLog::EVERY) {
                Ok(Some(request)) => self.dispatch(request),
                Ok(None) if stopping() => return,
                Ok(None) => {}
                Err(_) if stopping() => return,
                Err(e) => {
                    if !self.control.draining.load(Ordering::SeqCst) {
                        log::warn!("accepting a connection failed: {e}");
                    }
                }
            }
        }
    }

    fn dispatch(&mut self, request: tiny_http::Request) {
        let received = Instant::now();
        let request_id = api::header(&request, "X-Request-Id")
            .filter(|id| api::request::is_sane_token(id))
            .map(str::to_string)
            .unwrap_or_else(api::new_request_id);
        let chat_headers: Vec<&str> = api::headers(&request, "X-Chat-Id").collect();
        match api::route(request.method(), request.url(), &chat_headers) {
            Ok(Target::Ops(ops)) => {
                let response = self.ops(ops);
                self.metrics.request(ops.name(), response.status_code().0);
                api::respond(request, response, &request_id);
            }
            Ok(Target::Api(route)) => {
                let name = route.name();
                if let Err(error) = self.admit(request, route, &request_id, received) {
                    let (request, error) = *error;
                    self.reject(request, name, &error, &request_id, received);
                }
            }
            Err(error) => self.reject(request, "unknown", &error, &request_id, received),
        }
    }

    /// Queues an API call, or gives the request back with the error that refuses it.
    fn admit(
        &mut self,
        request: tiny_http::Request,
        route: api::Route,
        request_id: &str,
        received: Instant,
    ) -> Result<(), Box<(tiny_http::Request, ApiError)>> {
        let Some(jobs) = &self.jobs else {
            return Err(Box::new((request, ApiError::ShuttingDown)));
        };
        let authorization: Vec<&str> = api::headers(&request, "Authorization").collect();
        let tenant = match self.auth.tenant(&authorization) {
            Ok(tenant) => tenant.to_string(),
            Err(e) => return Err(Box::new((request, ApiError::Unauthorized(e.message())))),
        };
        // Read whole by the connection's thread, unless longer than the limit.
        if request.body_exceeds_limit() {
            let limit = self.config.server.max_body_bytes;
            return Err(Box::new((request, ApiError::PayloadTooLarge { limit })));
        }
        let busy_key = route.busy_chat().map(|chat| format!("{tenant}/{chat}"));
        let ticket = match self.admission.admit(busy_key.as_deref()) {
            Ok(ticket) => ticket,
            Err(Refusal::Full) => return Err(Box::new((request, ApiError::Overloaded))),
            Err(Refusal::ChatBusy) => return Err(Box::new((request, ApiError::ChatBusy))),
        };
        let job = Job {
            request,
            route,
            tenant,
            request_id: request_id.to_string(),
            received,
            ticket,
        };
        match jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                Err(Box::new((job.request, ApiError::Overloaded)))
            }
        }
    }

    fn reject(
        &mut self,
        request: tiny_http::Request,
        route: &'static str,
        error: &ApiError,
        request_id: &str,
        received: Instant,
    ) {
        let (status, kind) = error.status_and_type();
        if status == 503 || status == 409 {
            self.metrics.rejected(kind);
        }
        // Refusals come in storms: a client retrying each 503 at once, or one with a wrong
        // token or a wrong path in a loop, can send tens of thousands a second.
        let summarised = matches!(status, 401 | 404 | 409 | 503);
        let (method, url) = (request.method().to_string(), request.url().to_string());
        api::respond(request, api::error_response(error, request_id), request_id);
        self.metrics.request(route, status);
        let millis = received.elapsed().as_secs_f64() * 1e3;
        if summarised {
            // A line for each would cost more than the answer and could fill the disk; each
            // one still has a debug line, and the info log a summary a second.
            log::debug!("{method} {url} {status} {millis:.1}ms request_id={request_id}");
            self.refusals.count(kind);
        } else {
            api::log_request(&method, &url, status, millis, request_id);
        }
    }

    fn ops(&mut self, ops: Ops) -> api::HttpResponse {
        let draining = self.jobs.is_none();
        match ops {
            Ops::Healthz => api::json_response(200, &json!({"status": "ok"})),
            Ops::Readyz => {
                if draining {
                    return api::json_response(503, &json!({"status": "draining"}));
                }
                match self.readiness.check_readable() {
                    Ok(()) => api::json_response(200, &json!({"status": "ready"})),
                    Err(e) => {
                        log::warn!("readiness check: {e}");
                        api::json_response(503, &json!({"status": "database unavailable"}))
                    }
                }
            }
            Ops::Status => api::json_response(
                200,
                &json!({
                    "version": env!("CARGO_PKG_VERSION"),
                    "uptime_secs": self.started.elapsed().as_secs(),
                    "workers": self.config.server.max_concurrent_requests,
                    "workers_busy": self.metrics.workers_busy.get(),
                    "queue_depth": self.queue.len(),
                    "queue_capacity": self.config.server.queue_capacity,
                    "draining": draining,
                    "sqlite_version": store::sqlite_version(),
                }),
            ),
            Ops::Metrics => {
                self.metrics.queue_depth.set(self.queue.len() as i64);
                api::with_header(
                    tiny_http::Response::from_data(self.metrics.render()),
                    "Content-Type",
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            }
        }
    }
}
