//! `/readyz`'s database check, on a thread of its own (`readiness`).
//!
//! The check reads the database, and a read can wait up to SQLite's busy timeout behind a lock
//! another process holds; the acceptor must never wait, so it hands the request here and goes
//! on. Checks queue up to a small bound; past it, and while one is stuck, the answer is that the
//! database is unavailable, which is what a stuck check would find.

use crate::api;
use crate::metrics::Metrics;
use crate::store::Store;
use crossbeam_channel::{Sender, TrySendError};
use serde_json::json;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

/// Checks waiting for the readiness thread; more are answered at once.
const WAITING: usize = 64;

/// The acceptor's handle on the readiness thread; the thread returns once it is dropped.
pub struct Readiness {
    checks: Sender<(tiny_http::Request, String)>,
    metrics: Arc<Metrics>,
}

impl Readiness {
    /// Starts the thread, which checks on `store` (a read-only connection).
    pub fn start(
        store: Store,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Readiness, JoinHandle<()>)> {
        let (checks, incoming) =
            crossbeam_channel::bounded::<(tiny_http::Request, String)>(WAITING);
        let counted = Arc::clone(&metrics);
        let thread = thread::Builder::new()
            .name("readiness".into())
            .spawn(move || {
                for (request, request_id) in incoming {
                    answer(&store, &counted, request, &request_id);
                }
            })?;
        Ok((Readiness { checks, metrics }, thread))
    }

    /// Hands a `/readyz` request to the thread, or answers it at once when too many wait.
    pub fn check(&self, request: tiny_http::Request, request_id: String) {
        match self.checks.try_send((request, request_id)) {
            Ok(()) => {}
            Err(TrySendError::Full((request, id)) | TrySendError::Disconnected((request, id))) => {
                self.metrics.request("readyz", 503);
                api::respond(request, unavailable(), &id);
            }
        }
    }
}

fn answer(store: &Store, metrics: &Metrics, request: tiny_http::Request, request_id: &str) {
    let response = match store.check_readable() {
        Ok(()) => api::json_response(200, &json!({"status": "ready"})),
        Err(e) => {
            log::warn!("readiness check: {e}");
            unavailable()
        }
    };
    metrics.request("readyz", response.status_code().0);
    api::respond(request, response, request_id);
}

fn unavailable() -> api::HttpResponse {
    api::json_response(503, &json!({"status": "database unavailable"}))
}
