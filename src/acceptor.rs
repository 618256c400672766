//! The acceptor thread: every request passes through it, and it never waits on anything.
//!
//! For each request it decides, as a value, what happens to it: an operations endpoint it
//! answers itself, a refusal (401, 404, 409, 413, 429, 503 ...), or admission into the bounded
//! job channel with `try_send`, so a full pool is a 503 at once and never a wait. `/readyz`
//! reads the database, which can wait on a lock, so that check runs on a thread of its own. A
//! panic while deciding is caught: the request gets a 500 and admission goes on. The acceptor
//! owns the channel's only sender: draining drops it, which lets the workers finish the queue
//! and return.

use crate::admission::{Admission, Refusal, Ticket};
use crate::api::{self, ApiError, HttpResponse, Job, Ops, Route, Target};
use crate::auth::Auth;
use crate::config::Config;
use crate::handoff::{BoundedReceiver, BoundedSender};
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::store;
use crate::tenants::{Clock, Tenants};
use crossbeam_channel::TrySendError;
use serde_json::json;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Flags the main thread sets and the acceptor reads.
#[derive(Default)]
pub struct Control {
    /// Stop admitting; answer what comes meanwhile.
    pub draining: AtomicBool,
    /// Return at the next wake-up.
    pub stopping: AtomicBool,
    /// Makes the next decision panic, to show that the acceptor survives one.
    #[cfg(test)]
    pub panic_next: AtomicBool,
}

/// The acceptor thread's state; nothing else touches it.
pub struct Acceptor {
    /// Where requests come from.
    pub http: Arc<tiny_http::Server>,
    /// The only sender of the job channel; `None` once draining.
    pub jobs: Option<BoundedSender<Box<Job>>>,
    /// The workers' end of the channel, kept only to read the queue's length.
    pub queue: BoundedReceiver<Box<Job>>,
    /// How many requests are in flight, and which chats are busy.
    pub admission: Admission,
    /// Each tenant's limits and what it is using of them.
    pub tenants: Tenants,
    /// Tokens and their tenants.
    pub auth: Auth,
    /// Counted here.
    pub metrics: Arc<Metrics>,
    /// Set by the main thread.
    pub control: Arc<Control>,
    /// The thread that answers `/readyz`.
    pub readiness: Readiness,
    /// The settings.
    pub config: Arc<Config>,
    /// For `/status`'s uptime.
    pub started: Instant,
}

/// What becomes of a request, decided before anything is written.
enum Decision {
    /// Answered at once by the acceptor: an operations endpoint, under its route name.
    Answer(&'static str, HttpResponse),
    /// `/readyz`, checked on the readiness thread.
    CheckReady,
    /// Admitted: queued for a worker, holding its ticket.
    Admit(Route, String, Ticket),
    /// Refused, under its route name.
    Refuse(&'static str, ApiError),
}

impl Acceptor {
    /// Receives and dispatches requests until told to stop.
    pub fn run(mut self) {
        let mut refusals = RefusalLog::new();
        loop {
            if self.control.draining.load(Ordering::SeqCst) && self.jobs.take().is_some() {
                log::info!(
                    "draining: no new requests are admitted; {} in flight",
                    self.admission.in_flight()
                );
            }
            refusals.log_if_due();
            // Wakes at least once a second for the refusals summary. `unblock()` ends the wait
            // too, behind the requests already received, which are answered first.
            let stopping = || self.control.stopping.load(Ordering::SeqCst);
            match self.http.recv_timeout(RefusalLog::EVERY) {
                Ok(Some(request)) => self.dispatch(request, &mut refusals),
                Ok(None) | Err(_) if stopping() => return,
                Ok(None) => {}
                Err(e) => {
                    if !self.control.draining.load(Ordering::SeqCst) {
                        log::warn!("accepting a connection failed: {e}");
                    }
                }
            }
        }
    }

    /// Decides what becomes of `request`, then does it.
    fn dispatch(&mut self, request: tiny_http::Request, refusals: &mut RefusalLog) {
        let received = Instant::now();
        let request_id = api::header(&request, "X-Request-Id")
            .filter(|id| api::request::is_sane_token(id))
            .map(str::to_string)
            .unwrap_or_else(api::new_request_id);
        let decision = self.guarded(&request, &request_id);
        let refusal = match decision {
            Decision::Answer(name, response) => {
                self.metrics.request(name, response.status_code().0);
                api::respond(request, response, &request_id);
                return;
            }
            Decision::CheckReady => return self.readiness.check(request, request_id),
            Decision::Admit(route, tenant, ticket) => {
                let name = route.name();
                let job = Job {
                    request,
                    route,
                    tenant,
                    request_id: request_id.clone(),
                    received,
                    ticket,
                };
                match self.queue_job(job) {
                    None => return,
                    Some((request, error)) => (request, name, error),
                }
            }
            Decision::Refuse(name, error) => (request, name, error),
        };
        let (request, name, error) = refusal;
        reject(
            &self.metrics,
            refusals,
            request,
            name,
            &error,
            &request_id,
            received,
        );
    }

    /// [`Acceptor::decide`], with a panic caught as a 500, so admission goes on.
    fn guarded(&mut self, request: &tiny_http::Request, request_id: &str) -> Decision {
        let decision = catch_unwind(AssertUnwindSafe(|| self.decide(request)));
        decision.unwrap_or_else(|_| {
            log::error!(
                "request_id={request_id} {} {}: the acceptor panicked deciding it; answered 500",
                request.method(),
                request.url()
            );
            Decision::Refuse(
                "unknown",
                ApiError::Internal("the acceptor panicked".into()),
            )
        })
    }

    /// What becomes of a request, from its request line and headers.
    fn decide(&mut self, request: &tiny_http::Request) -> Decision {
        #[cfg(test)]
        if self.control.panic_next.swap(false, Ordering::SeqCst) {
            panic!("a panic injected by a test");
        }
        let chat_headers: Vec<&str> = api::headers(request, "X-Chat-Id").collect();
        match api::route(request.method(), request.url(), &chat_headers) {
            Ok(Target::Ops(Ops::Readyz)) if self.jobs.is_some() => Decision::CheckReady,
            Ok(Target::Ops(ops)) => Decision::Answer(ops.name(), self.ops(ops)),
            Ok(Target::Api(route)) => {
                let name = route.name();
                self.admit(request, route)
                    .unwrap_or_else(|error| Decision::Refuse(name, error))
            }
            Err(error) => Decision::Refuse("unknown", error),
        }
    }

    /// Admits an API call, or says which error refuses it.
    fn admit(&mut self, request: &tiny_http::Request, route: Route) -> Result<Decision, ApiError> {
        if self.jobs.is_none() {
            return Err(ApiError::ShuttingDown);
        }
        let authorization: Vec<&str> = api::headers(request, "Authorization").collect();
        let tenant = self
            .auth
            .tenant(&authorization)
            .map_err(|e| ApiError::Unauthorized(e.message()))?
            .to_string();
        // Read whole by the connection's thread, unless longer than the limit.
        if request.body_exceeds_limit() {
            let limit = self.config.server.max_body_bytes;
            return Err(ApiError::PayloadTooLarge { limit });
        }
        let busy_key = route.busy_chat().map(|chat| format!("{tenant}/{chat}"));
        let mut ticket = match self.admission.admit(busy_key.as_deref()) {
            Ok(ticket) => ticket,
            Err(Refusal::Full) => return Err(ApiError::Overloaded),
            Err(Refusal::ChatBusy) => return Err(ApiError::ChatBusy),
        };
        // After the pool's own admission, so that a refused request counts against none of
        // the tenant's limits; dropping the ticket gives its place back.
        let pass = self
            .tenants
            .admit(&tenant, route.calls_llm(), Clock::now())
            .map_err(ApiError::RateLimited)?;
        ticket.hold(pass);
        Ok(Decision::Admit(route, tenant, ticket))
    }

    /// Hands an admitted job to the workers; gives its request back with the refusal when the
    /// channel has no room for it.
    fn queue_job(&self, job: Job) -> Option<(tiny_http::Request, ApiError)> {
        let Some(jobs) = &self.jobs else {
            return Some((job.request, ApiError::ShuttingDown));
        };
        // The channel has room for every ticket admission hands out (see `Server::start`), so
        // admission's 503 comes first; a full channel is the same answer.
        // Boxed, so that each of the channel's slots, all allocated at start, is a pointer
        // rather than a whole request: a queue of 65,536 would otherwise hold 24 MB idle.
        match jobs.try_send(Box::new(job)) {
            Ok(()) => None,
            Err(TrySendError::Full(job)) => Some((job.request, ApiError::Overloaded)),
            Err(TrySendError::Disconnected(job)) => Some((job.request, ApiError::ShuttingDown)),
        }
    }

    /// An operations endpoint's answer (`/readyz` only while draining: else it reads the
    /// database, on the readiness thread).
    fn ops(&self, ops: Ops) -> HttpResponse {
        let draining = self.jobs.is_none();
        match ops {
            Ops::Healthz => api::json_response(200, &json!({"status": "ok"})),
            Ops::Readyz => api::json_response(503, &json!({"status": "draining"})),
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

/// Answers a refusal, counts it, and logs it (in storms, as a summary).
fn reject(
    metrics: &Metrics,
    refusals: &mut RefusalLog,
    request: tiny_http::Request,
    route: &'static str,
    error: &ApiError,
    request_id: &str,
    received: Instant,
) {
    let (status, kind) = error.status_and_type();
    if matches!(status, 409 | 429 | 503) {
        metrics.rejected(kind);
    }
    let (method, url) = (request.method().to_string(), request.url().to_string());
    api::respond(request, api::error_response(error, request_id), request_id);
    metrics.request(route, status);
    let millis = received.elapsed().as_secs_f64() * 1e3;
    // Refusals come in storms: a client retrying each 503 at once, or one with a wrong token
    // or a wrong path in a loop, can send tens of thousands a second. A line for each would
    // cost more than the answer and could fill the disk; each one still has a debug line, and
    // the info log a summary a second.
    if matches!(status, 401 | 404 | 409 | 429 | 503) {
        log::debug!("{method} {url} {status} {millis:.1}ms request_id={request_id}");
        refusals.count(kind);
    } else {
        api::log_request(&method, &url, status, millis, request_id);
    }
}

/// Requests refused by the acceptor in storms (401, 404, 409, 429 and 503), summed up in one info
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
