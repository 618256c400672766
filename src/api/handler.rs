//! The worker side of the API: what one worker thread does with one job.
//!
//! A [`Handler`] holds what a worker needs: the shared read connections, the writer, its LLM
//! client. It turns a job into a response (or an event stream), catching a panic as a 500 so the
//! thread lives on, and releases the job's ticket before the answer is written, so a client that
//! sends its next message the moment it has the reply never finds its own chat still busy.

use super::error::{log_detail, ApiError};
use super::request::{idempotency_key, parse_send_message, read_body};
use super::route::Route;
use super::sse::EventStream;
use super::{error_response, header, json_response, log_request, respond, HttpResponse};
use crate::admission::Ticket;
use crate::config::Config;
use crate::llm::prompt;
use crate::llm::wire::Usage;
use crate::llm::{LlmClient, UpstreamError};
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
            request,
            route,
            tenant,
            request_id,
            received,
            ticket,
        } = job;
        self.metrics.workers_busy.inc();
        let (method, url) = (request.method().to_string(), request.url().to_string());
        let mut call = Call {
            request: Some(request),
            request_id,
            ticket: Some(ticket),
            timings: Timings {
                received,
                queued: received.elapsed(),
                history: None,
                llm: None,
                store: None,
            },
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| self.handle(&mut call, &route, &tenant)));
        let response = match outcome {
            Ok(Ok(Outcome::Respond(response))) => Some(response),
            Ok(Ok(Outcome::Streamed)) => None,
            Ok(Err(error)) => {
                if let Some(detail) = log_detail(&error) {
                    log::warn!(
                        "request_id={} {} failed: {detail}",
                        call.request_id,
                        route.name()
                    );
                }
                Some(error_response(&error, &call.request_id))
            }
            Err(_) => {
                log::error!(
                    "request_id={} {} panicked; answered 500",
                    call.request_id,
                    route.name()
                );
                Some(error_response(
                    &ApiError::Internal("handler panicked".into()),
                    &call.request_id,
                ))
            }
        };
        call.ticket = None;
        let status = match (response, call.request.take()) {
            (Some(response), Some(request)) => {
                let status = response.status_code().0;
                respond(request, response, &call.request_id);
                status
            }
            // The response went out as an event stream, whose head said 200.
            _ => 200,
        };
        let total = received.elapsed();
        self.metrics.request(route.name(), status);
        let t = &call.timings;
        let stages = [Some(t.queued), t.history, t.llm, t.store, Some(total)];
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
            &call.request_id,
        );
        self.metrics.workers_busy.dec();
    }

    fn handle(
        &mut self,
        call: &mut Call,
        route: &Route,
        tenant: &str,
    ) -> Result<Outcome, ApiError> {
        let response = match route {
            Route::PostMessage { chat_id } => return self.post_message(call, tenant, chat_id),
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
                json_response(
                    200,
                    &json!({"chat_id": chat_id, "messages": messages, "has_more": page.has_more}),
                )
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
                json_response(200, &json!({ "chats": chats }))
            }
            Route::DeleteChat { chat_id } => {
                if !self.readers.get()?.delete_chat(tenant, chat_id)? {
                    return Err(no_such_chat(chat_id));
                }
                tiny_http::Response::from_data(Vec::new()).with_status_code(204)
            }
        };
        Ok(Outcome::Respond(response))
    }

    fn post_message(
        &mut self,
        call: &mut Call,
        tenant: &str,
        chat_id: &str,
    ) -> Result<Outcome, ApiError> {
        let request = call
            .request
            .as_mut()
            .ok_or_else(|| ApiError::Internal("request already answered".into()))?;
        let key = idempotency_key(header(request, "Idempotency-Key"))?;
        let body = read_body(request.as_reader(), self.config.server.max_body_bytes)?;
        let message = parse_send_message(&body)?;
        let history = &self.config.history;

        let started = Instant::now();
        // The connection goes back before the LLM call: it is never held across the network.
        let newest = {
            let mut store = self.readers.get()?;
            if let Some(key) = &key {
                if let Some(stored) = store.find_reply(tenant, chat_id, key)? {
                    call.timings.history = Some(started.elapsed());
                    let reply = reply_json(chat_id, stored, &call.timings);
                    return self.replay(call, reply, message.stream);
                }
            }
            store.newest_messages(tenant, chat_id, history.max_messages)?
        };
        let window = prompt::window(newest, history.max_chars);
        let messages = prompt::assemble(&history.system_prompt, &window, &message.content);
        call.timings.history = Some(started.elapsed());

        let started = Instant::now();
        let mut stream: Option<EventStream> = None;
        let completion = if message.stream {
            let (request, request_id) = (&mut call.request, call.request_id.as_str());
            let mut sink = |piece: &str| send_delta(&mut stream, request, request_id, piece);
            self.llm
                .complete(&messages, message.sampling, Some(&mut sink))
        } else {
            self.llm.complete(&messages, message.sampling, None)
        };
        call.timings.llm = Some(started.elapsed());
        let completion = match (completion, stream.as_mut()) {
            (Ok(completion), _) => completion,
            (Err(e), None) => return Err(e.into()),
            (Err(e), Some(_)) => return Ok(self.end_stream(call, stream, Err(e.into()))),
        };

        let started = Instant::now();
        let usage = completion
            .usage
            .map(|u| (u.prompt_tokens, u.completion_tokens));
        let stored = self.writer.append(Exchange {
            tenant: tenant.to_string(),
            chat_id: chat_id.to_string(),
            user: message.content,
            reply: completion.content.clone(),
            model: completion.model.clone(),
            usage,
            idempotency_key: key,
        });
        call.timings.store = Some(started.elapsed());
        let reply = stored.map(|message_id| {
            let stored = StoredReply {
                message_id,
                content: completion.content,
                model: completion.model,
                usage,
            };
            reply_json(chat_id, stored, &call.timings)
        });
        if !message.stream {
            return Ok(Outcome::Respond(json_response(200, &reply?)));
        }
        if stream.is_none() {
            // An empty reply streams no delta; the stream still opens to say `done`.
            stream = Some(self.open_stream(call)?);
        }
        Ok(self.end_stream(call, stream, reply.map_err(ApiError::from)))
    }

    /// Answers a replayed idempotent request, as JSON or as a stream holding only `done`.
    fn replay(
        &mut self,
        call: &mut Call,
        reply: serde_json::Value,
        stream: bool,
    ) -> Result<Outcome, ApiError> {
        if !stream {
            return Ok(Outcome::Respond(json_response(200, &reply)));
        }
        let events = self.open_stream(call)?;
        Ok(self.end_stream(call, Some(events), Ok(reply)))
    }

    fn open_stream(&self, call: &mut Call) -> Result<EventStream, ApiError> {
        let request = call
            .request
            .take()
            .ok_or_else(|| ApiError::Internal("request already answered".into()))?;
        EventStream::start(request, &call.request_id)
            .map_err(|e| ApiError::Internal(format!("could not start the event stream: {e}")))
    }

    /// Ends an event stream with `done` and the reply, or with `error`. The chat is released
    /// first, so a client that posts again on `done` does not find its chat busy.
    fn end_stream(
        &self,
        call: &mut Call,
        stream: Option<EventStream>,
        result: Result<serde_json::Value, ApiError>,
    ) -> Outcome {
        let Some(mut stream) = stream else {
            return Outcome::Streamed;
        };
        call.ticket = None;
        let sent = match &result {
            Ok(reply) => stream.send(Some("done"), &reply.to_string()),
            Err(ApiError::Upstream(UpstreamError::Cancelled)) => {
                log::info!(
                    "request_id={}: the client went away mid-stream; nothing stored",
                    call.request_id
                );
                return Outcome::Streamed;
            }
            Err(error) => {
                if let Some(detail) = log_detail(error) {
                    log::warn!("request_id={} stream failed: {detail}", call.request_id);
                }
                stream.send(Some("error"), &error.body(&call.request_id).to_string())
            }
        };
        if let Err(e) = sent.and_then(|()| stream.finish()) {
            log::debug!(
                "request_id={}: could not finish the event stream: {e}",
                call.request_id
            );
        }
        Outcome::Streamed
    }
}

/// Hands one piece of a streamed reply to the client, opening the stream on the first; `false`
/// when the client has gone.
fn send_delta(
    stream: &mut Option<EventStream>,
    request: &mut Option<tiny_http::Request>,
    request_id: &str,
    piece: &str,
) -> bool {
    if stream.is_none() {
        let Some(request) = request.take() else {
            return false;
        };
        match EventStream::start(request, request_id) {
            Ok(opened) => *stream = Some(opened),
            Err(_) => return false,
        }
    }
    let data = json!({ "delta": piece }).to_string();
    stream.as_mut().is_some_and(|s| s.send(None, &data).is_ok())
}

/// A job's request while a worker serves it.
struct Call {
    /// `None` once answered, or once an event stream has taken the connection.
    request: Option<tiny_http::Request>,
    request_id: String,
    /// Released as soon as the answer is settled.
    ticket: Option<Ticket>,
    timings: Timings,
}

/// How a request was answered.
enum Outcome {
    /// With this response, still to be sent.
    Respond(HttpResponse),
    /// With an event stream, already sent.
    Streamed,
}

/// The body of a 200, and of the `done` event of a stream.
fn reply_json(chat_id: &str, reply: StoredReply, timings: &Timings) -> serde_json::Value {
    let usage = reply.usage.map(|(p, c)| Usage::new(p, c));
    json!({
        "chat_id": chat_id,
        "message_id": reply.message_id,
        "reply": reply.content,
        "model": reply.model,
        "usage": usage,
        "timings_ms": timings.as_json(),
    })
}

fn no_such_chat(chat_id: &str) -> ApiError {
    ApiError::NotFound(format!("no chat `{chat_id}`"))
}
