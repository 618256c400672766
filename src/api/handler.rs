//! The worker side of the API: what one worker thread does with one job.
//!
//! A [`Handler`] owns the worker's database connection and LLM client. It turns a job into a
//! response, catching a panic as a 500 so the thread lives on, and releases the job's ticket
//! before the response is written, so a client that sends its next message the moment it has
//! the reply never finds its own chat still busy.

use super::error::{log_detail, ApiError};
use super::request::{idempotency_key, parse_send_message, read_body};
use super::route::Route;
use super::{error_response, header, json_response, log_request, respond, HttpResponse};
use crate::admission::Ticket;
use crate::config::Config;
use crate::llm::prompt;
use crate::llm::wire::Usage;
use crate::llm::LlmClient;
use crate::metrics::Metrics;
use crate::store::{Exchange, Readers, StoredReply, Writer};
use serde_json::json;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One admitted API request on its way to a worker.
pub struct Job {
    /// The client's request, body still unread.
    pub request: tiny_http::Request,
    /// Where it goes.
    pub route: Route,
    /// The tenant it acts for.
    pub tenant: String,
    /// Its id, the client's or a fresh one.
    pub request_id: String,
    /// When the acceptor received it.
    pub received: Instant,
    /// Its place in the pool, released when the job is done.
    pub ticket: Ticket,
}

/// A worker's resources for serving API requests.
pub struct Handler {
    readers: Readers,
    writer: Writer,
    llm: LlmClient,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
}

/// Where a request's time went.
struct Timings {
    received: Instant,
    queued: Duration,
    history: Option<Duration>,
    llm: Option<Duration>,
    store: Option<Duration>,
}

impl Timings {
    fn as_json(&self) -> serde_json::Value {
        let ms = |d: Option<Duration>| (d.unwrap_or_default().as_secs_f64() * 1e6).round() / 1e3;
        json!({
            "queued": ms(Some(self.queued)),
            "history": ms(self.history),
            "llm": ms(self.llm),
            "store": ms(self.store),
            "total": ms(Some(self.received.elapsed())),
        })
    }
}

impl Handler {
    /// A handler sharing the read connections and the writer, with its own LLM client.
    pub fn new(
        readers: Readers,
        writer: Writer,
        llm: LlmClient,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
    ) -> Handler {
        Handler {
            readers,
            writer,
            llm,
            config,
            metrics,
        }
    }

    /// Serves one job to the end: handle, respond, count, log.
    pub fn run(&mut self, job: Job) {
        let Job {
            mut request,
            route,
            tenant,
            request_id,
            received,
            ticket,
        } = job;
        self.metrics.workers_busy.inc();
        let mut timings = Timings {
            received,
            queued: received.elapsed(),
            history: None,
            llm: None,
            store: None,
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            self.handle(&mut request, &route, &tenant, &mut timings)
        }));
        let response = match outcome {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                if let Some(detail) = log_detail(&error) {
                    log::warn!("request_id={request_id} {} failed: {detail}", route.name());
                }
                error_response(&error, &request_id)
            }
            Err(_) => {
                log::error!(
                    "request_id={request_id} {} panicked; answered 500",
                    route.name()
                );
                error_response(&ApiError::Internal("handler panicked".into()), &request_id)
            }
        };
        drop(ticket);
        let status = response.status_code().0;
        let (method, url) = (request.method().to_string(), request.url().to_string());
        respond(request, response, &request_id);
        let total = received.elapsed();
        self.metrics.request(route.name(), status);
        let stages = [
            Some(timings.queued),
            timings.history,
            timings.llm,
            timings.store,
            Some(total),
        ];
        for (index, stage) in stages.into_iter().enumerate() {
            if let Some(d) = stage {
                self.metrics.observe_stage(index, d.as_secs_f64());
            }
        }
        log_request(
            &method,
            &url,
            status,
            total.as_secs_f64() * 1e3,
            &request_id,
        );
        self.metrics.workers_busy.dec();
    }

    fn handle(
        &mut self,
        request: &mut tiny_http::Request,
        route: &Route,
        tenant: &str,
        timings: &mut Timings,
    ) -> Result<HttpResponse, ApiError> {
        match route {
            Route::PostMessage { chat_id } => self.post_message(request, tenant, chat_id, timings),
            Route::GetMessages {
                chat_id,
                limit,
                before,
            } => {
                let page = self
                    .readers
                    .get()?
                    .page(tenant, chat_id, *limit, *before)?
                    .ok_or_else(|| no_such_chat(chat_id))?;
                let messages: Vec<_> = page
                    .messages
                    .iter()
                    .map(|m| json!({"id": m.id, "role": m.role, "content": m.content, "created_at": m.created_at}))
                    .collect();
                Ok(json_response(
                    200,
                    &json!({"chat_id": chat_id, "messages": messages, "has_more": page.has_more}),
                ))
            }
            Route::ListChats { limit } => {
                let chats: Vec<_> = self
                    .readers
                    .get()?
                    .list_chats(tenant, *limit)?
                    .into_iter()
                    .map(|c| {
                        json!({"chat_id": c.chat_id, "message_count": c.message_count,
                               "created_at": c.created_at, "updated_at": c.updated_at})
                    })
                    .collect();
                Ok(json_response(200, &json!({ "chats": chats })))
            }
            Route::DeleteChat { chat_id } => {
                if self.readers.get()?.delete_chat(tenant, chat_id)? {
                    Ok(tiny_http::Response::from_data(Vec::new()).with_status_code(204))
                } else {
                    Err(no_such_chat(chat_id))
                }
            }
        }
    }

    fn post_message(
        &mut self,
        request: &mut tiny_http::Request,
        tenant: &str,
        chat_id: &str,
        timings: &mut Timings,
    ) -> Result<HttpResponse, ApiError> {
        let key = idempotency_key(header(request, "Idempotency-Key"))?;
        let body = read_body(request.as_reader(), self.config.server.max_body_bytes)?;
        let message = parse_send_message(&body)?;
        if message.stream {
            return Err(ApiError::InvalidRequest(
                "stream: true is not supported by this version; send stream: false".into(),
            ));
        }
        let history = &self.config.history;

        let started = Instant::now();
        // The connection goes back before the LLM call: it is never held across the network.
        let newest = {
            let mut store = self.readers.get()?;
            if let Some(key) = &key {
                if let Some(stored) = store.find_reply(tenant, chat_id, key)? {
                    timings.history = Some(started.elapsed());
                    return Ok(reply_response(chat_id, stored, timings));
                }
            }
            store.newest_messages(tenant, chat_id, history.max_messages)?
        };
        let window = prompt::window(newest, history.max_chars);
        let messages = prompt::assemble(&history.system_prompt, &window, &message.content);
        timings.history = Some(started.elapsed());

        let started = Instant::now();
        let completion = self.llm.complete(&messages, message.sampling);
        timings.llm = Some(started.elapsed());
        let completion = completion?;

        let started = Instant::now();
        let usage = completion
            .usage
            .map(|u| (u.prompt_tokens, u.completion_tokens));
        let message_id = self.writer.append(Exchange {
            tenant: tenant.to_string(),
            chat_id: chat_id.to_string(),
            user: message.content,
            reply: completion.content.clone(),
            model: completion.model.clone(),
            usage,
            idempotency_key: key,
        })?;
        timings.store = Some(started.elapsed());
        let stored = StoredReply {
            message_id,
            content: completion.content,
            model: completion.model,
            usage,
        };
        Ok(reply_response(chat_id, stored, timings))
    }
}

fn reply_response(chat_id: &str, reply: StoredReply, timings: &Timings) -> HttpResponse {
    let usage = reply.usage.map(|(p, c)| Usage::new(p, c));
    json_response(
        200,
        &json!({
            "chat_id": chat_id,
            "message_id": reply.message_id,
            "reply": reply.content,
            "model": reply.model,
            "usage": usage,
            "timings_ms": timings.as_json(),
        }),
    )
}

fn no_such_chat(chat_id: &str) -> ApiError {
    ApiError::NotFound(format!("no chat `{chat_id}`"))
}
