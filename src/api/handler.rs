//! The worker side of the API: what one worker thread does with one job.
//!
//! A [`Handler`] holds what a worker needs: the shared read connections, the writer, its LLM
//! client. It turns a job into a response (or an event stream), catching a panic as a 500 so the
//! thread lives on, and releases the job's ticket before the answer is written, so a client that
//! sends its next message the moment it has the reply never finds its own chat still busy.

use super::error::{log_detail, ApiError};
use super::openai;
use super::request::{idempotency_key, parse_send_message, read_body};
use super::route::Route;
use super::sse::EventStream;
use super::{error_response, header, json_response, log_request, respond, HttpResponse};
use crate::admission::Ticket;
use crate::config::Config;
use crate::llm::prompt;
use crate::llm::wire::{ChatMessage, Completion, Sampling, Usage};
use crate::llm::{Cancel, LlmClient};
use crate::metrics::Metrics;
use crate::store::{Exchange, Message, Readers, StoredReply, Writer};
use serde_json::json;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
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
        let (method, url) = (request.method().to_string(), request.url().to_string());
        if request.client_gone() {
            log::info!("request_id={request_id} {method} {url}: the client left while it was queued; dropped");
            self.metrics.request(route.name(), CLIENT_GONE);
            return;
        }
        self.metrics.workers_busy.inc();
        let mut call = Call {
            hangup: request.hangup(),
            request: Some(request),
            request_id,
            created: openai::now_secs(),
            ticket: Some(ticket),
            timings: Timings {
                received,
                queued: received.elapsed(),
                history: None,
                llm: None,
                store: None,
            },
        };
        log::debug!(
            "request_id={} queued: {:.3} ms before a worker took it",
            call.request_id,
            call.timings.queued.as_secs_f64() * 1e3
        );
        let outcome = catch_unwind(AssertUnwindSafe(|| self.handle(&mut call, &route, &tenant)));
        let response = match outcome {
            Ok(Ok(Outcome::Respond(response))) => Some(response),
            Ok(Ok(Outcome::Streamed | Outcome::Abandoned)) => None,
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
            _ if call.client_gone() => CLIENT_GONE,
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
                if !self.writer.delete(tenant, chat_id)? {
                    return Err(no_such_chat(chat_id));
                }
                tiny_http::Response::from_data(Vec::new()).with_status_code(204)
            }
            Route::ChatCompletions { chat_id } => {
                return self.chat_completions(call, tenant, chat_id.as_deref())
            }
            Route::ListModels => json_response(200, &openai::models(self.llm.model())),
        };
        Ok(Outcome::Respond(response))
    }

    fn post_message(
        &mut self,
        call: &mut Call,
        tenant: &str,
        chat_id: &str,
    ) -> Result<Outcome, ApiError> {
        let request = call.request()?;
        let key = idempotency_key(header(request, "Idempotency-Key"))?;
        let body = read_body(request.as_reader(), self.config.server.max_body_bytes)?;
        let message = parse_send_message(&body)?;
        let turn = Turn {
            chat_id: Some(chat_id.to_string()),
            key,
            user: Some(message.content.clone()),
            messages: Vec::new(),
            sampling: message.sampling,
            stream: message.stream,
            format: Format::Native,
        };
        let system_prompt = self.config.history.system_prompt.clone();
        self.with_history(call, tenant, turn, |window| {
            prompt::assemble(&system_prompt, window, &message.content)
        })
    }

    fn chat_completions(
        &mut self,
        call: &mut Call,
        tenant: &str,
        chat_id: Option<&str>,
    ) -> Result<Outcome, ApiError> {
        let request = call.request()?;
        let key = idempotency_key(header(request, "Idempotency-Key"))?;
        let body = read_body(request.as_reader(), self.config.server.max_body_bytes)?;
        let parsed = openai::parse_request(&body)?;
        let format = Format::OpenAi {
            include_usage: parsed.include_usage,
        };
        let Some(chat_id) = chat_id else {
            if key.is_some() {
                return Err(ApiError::InvalidRequest(
                    "Idempotency-Key needs X-Chat-Id: a stateless relay stores no reply to \
                     replay"
                        .into(),
                ));
            }
            // A stateless relay: the conversation goes upstream as the client wrote it.
            let turn = Turn {
                chat_id: None,
                key: None,
                user: None,
                messages: parsed.messages,
                sampling: parsed.sampling,
                stream: parsed.stream,
                format,
            };
            return self.take_turn(call, tenant, turn);
        };
        let user = parsed.new_turn()?.to_string();
        let turn = Turn {
            chat_id: Some(chat_id.to_string()),
            key,
            user: Some(user),
            messages: Vec::new(),
            sampling: parsed.sampling,
            stream: parsed.stream,
            format,
        };
        let system_prompt = self.config.history.system_prompt.clone();
        self.with_history(call, tenant, turn, |window| {
            prompt::around_client(&system_prompt, window, parsed.messages)
        })
    }

    /// Answers a replay from the stored reply, or reads the chat's history window, lets
    /// `assemble` build the prompt around it, and takes the turn.
    fn with_history(
        &mut self,
        call: &mut Call,
        tenant: &str,
        mut turn: Turn,
        assemble: impl FnOnce(&[Message]) -> Vec<ChatMessage>,
    ) -> Result<Outcome, ApiError> {
        let chat_id = turn.chat_id.clone().unwrap_or_default();
        let (max_messages, max_chars) = (
            self.config.history.max_messages,
            self.config.history.max_chars,
        );
        let started = Instant::now();
        // The connection goes back before the LLM call: it is never held across the network.
        let newest = {
            let store = self.readers.get()?;
            if let Some(key) = &turn.key {
                if let Some(stored) = store.find_reply(tenant, &chat_id, key)? {
                    // A key stands for one message: reused for another, the stored reply
                    // would answer a question that was not asked.
                    let asked = store.message_before(tenant, &chat_id, stored.message_id)?;
                    if asked.is_some() && asked != turn.user {
                        return Err(ApiError::IdempotencyKeyReused);
                    }
                    drop(store);
                    call.timings.history = Some(started.elapsed());
                    let answer = Answer::Stored {
                        chat_id,
                        reply: stored,
                        replayed: true,
                        // Not stored with the reply; a stored reply was complete.
                        finish_reason: "stop".into(),
                    };
                    return self.answer(call, &turn, Ok(answer), None);
                }
            }
            store.history_window(tenant, &chat_id, max_messages, max_chars)?
        };
        let window = prompt::window(newest, max_chars);
        turn.messages = assemble(&window);
        call.timings.history = Some(started.elapsed());
        log::debug!(
            "request_id={} history: {} earlier messages in the window, {:.3} ms",
            call.request_id,
            window.len(),
            started.elapsed().as_secs_f64() * 1e3
        );
        self.take_turn(call, tenant, turn)
    }

    /// Calls the LLM (streaming pieces to the client if asked), stores the exchange when the
    /// turn belongs to a chat, and answers in the turn's format.
    fn take_turn(
        &mut self,
        call: &mut Call,
        tenant: &str,
        turn: Turn,
    ) -> Result<Outcome, ApiError> {
        let started = Instant::now();
        let mut stream: Option<EventStream> = None;
        // The client's connection sets the flag when it hangs up, and so does a stream's
        // write that finds it gone: either way the call is abandoned at its next wait.
        let cancel = Cancel::new(Arc::clone(&call.hangup));
        let completion = if turn.stream {
            let (request, request_id) = (&mut call.request, call.request_id.as_str());
            let hangup = &call.hangup;
            let format = turn.format;
            let chunks =
                openai::Chunks::new(&completion_id(request_id), call.created, self.llm.model());
            let mut first = true;
            let mut sink = |piece: &str| {
                let data = match format {
                    Format::Native => json!({ "delta": piece }),
                    Format::OpenAi { .. } => chunks.delta(piece, first),
                };
                first = false;
                if !send_event(&mut stream, request, request_id, &data.to_string()) {
                    hangup.store(true, Ordering::SeqCst);
                }
            };
            self.llm.complete(
                &turn.messages,
                turn.sampling.clone(),
                Some(&mut sink),
                &cancel,
            )
        } else {
            self.llm
                .complete(&turn.messages, turn.sampling.clone(), None, &cancel)
        };
        call.timings.llm = Some(started.elapsed());
        log::debug!(
            "request_id={} llm: {} after {:.1} ms",
            call.request_id,
            if completion.is_ok() {
                "answered"
            } else {
                "failed"
            },
            started.elapsed().as_secs_f64() * 1e3
        );
        if call.client_gone() {
            let when = if turn.stream {
                "mid-stream"
            } else {
                "during the LLM call"
            };
            log::info!(
                "request_id={}: the client went away {when}; nothing stored",
                call.request_id
            );
            return Ok(Outcome::Abandoned);
        }
        let completion = match completion {
            Ok(completion) => completion,
            Err(e) if stream.is_some() => return self.answer(call, &turn, Err(e.into()), stream),
            Err(e) => return Err(e.into()),
        };
        let (Some(chat_id), Some(user)) = (&turn.chat_id, &turn.user) else {
            return self.answer(call, &turn, Ok(Answer::Relayed(completion)), stream);
        };
        let started = Instant::now();
        let usage = completion
            .usage
            .map(|u| (u.prompt_tokens, u.completion_tokens));
        let stored = self.writer.append(Exchange {
            tenant: tenant.to_string(),
            chat_id: chat_id.clone(),
            user: user.clone(),
            reply: completion.content.clone(),
            model: completion.model.clone(),
            usage,
            idempotency_key: turn.key.clone(),
        });
        call.timings.store = Some(started.elapsed());
        log::debug!(
            "request_id={} store: {} in {:.3} ms",
            call.request_id,
            if stored.is_ok() {
                "committed"
            } else {
                "failed"
            },
            started.elapsed().as_secs_f64() * 1e3
        );
        let answer = stored
            .map_err(ApiError::from)
            .map(|message_id| Answer::Stored {
                chat_id: chat_id.clone(),
                reply: StoredReply {
                    message_id,
                    content: completion.content,
                    model: completion.model,
                    usage,
                },
                replayed: false,
                finish_reason: completion.finish_reason,
            });
        self.answer(call, &turn, answer, stream)
    }

    /// Writes the end of a turn: a JSON response, or the closing events of a stream (opening
    /// one if no piece did). The chat is released first, so a client that posts again the
    /// moment it has the answer does not find its chat busy.
    fn answer(
        &self,
        call: &mut Call,
        turn: &Turn,
        answer: Result<Answer, ApiError>,
        stream: Option<EventStream>,
    ) -> Result<Outcome, ApiError> {
        let id = completion_id(&call.request_id);
        let body = |answer: &Answer| match (answer, turn.format) {
            (Answer::Stored { chat_id, reply, .. }, Format::Native) => {
                reply_json(chat_id, reply, &call.timings)
            }
            (answer, _) => {
                let (content, model, usage) = answer.parts();
                openai::completion(&id, model, content, usage, answer.finish_reason())
            }
        };
        if !turn.stream {
            return Ok(Outcome::Respond(json_response(200, &body(&answer?))));
        }
        let mut stream = match stream {
            Some(stream) => stream,
            None => {
                let request = call.request.take().ok_or_else(answered)?;
                EventStream::start(request, &call.request_id)
            }
        };
        call.ticket = None;
        let sent = match (&answer, turn.format) {
            (Err(error), format) => {
                if let Some(detail) = log_detail(error) {
                    log::warn!("request_id={} stream failed: {detail}", call.request_id);
                }
                let name = (format == Format::Native).then_some("error");
                stream.send(name, &error.body(&call.request_id).to_string())
            }
            // A replay sends its stored reply whole, as one piece, so a client that builds the
            // text from the pieces has it.
            (Ok(answer), Format::Native) => {
                let replay = answer
                    .is_replay()
                    .then(|| json!({ "delta": answer.parts().0 }));
                replay
                    .map_or(Ok(()), |piece| stream.send(None, &piece.to_string()))
                    .and_then(|()| stream.send(Some("done"), &body(answer).to_string()))
            }
            (Ok(answer), Format::OpenAi { include_usage }) => {
                let (content, _, usage) = answer.parts();
                let chunks = openai::Chunks::new(&id, call.created, self.llm.model());
                let mut events = Vec::new();
                if answer.is_replay() {
                    events.push(chunks.delta(content, true));
                }
                events.push(chunks.finish(answer.finish_reason()));
                if include_usage {
                    events.push(chunks.usage(usage));
                }
                events
                    .iter()
                    .try_for_each(|e| stream.send(None, &e.to_string()))
                    .and_then(|()| stream.send(None, "[DONE]"))
            }
        };
        if let Err(e) = sent.and_then(|()| stream.finish()) {
            log::debug!(
                "request_id={}: could not finish the event stream: {e}",
                call.request_id
            );
        }
        Ok(Outcome::Streamed)
    }
}

/// Sends one event, opening the stream on the first; `false` when the client has gone.
fn send_event(
    stream: &mut Option<EventStream>,
    request: &mut Option<tiny_http::Request>,
    request_id: &str,
    data: &str,
) -> bool {
    if stream.is_none() {
        let Some(request) = request.take() else {
            return false;
        };
        *stream = Some(EventStream::start(request, request_id));
    }
    stream.as_mut().is_some_and(|s| s.send(None, data).is_ok())
}

/// The OpenAI `id` of the completion answering a request.
fn completion_id(request_id: &str) -> String {
    format!("chatcmpl-{request_id}")
}

fn answered() -> ApiError {
    ApiError::Internal("the request was already answered".into())
}

/// How a turn's answer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// chatpool's own API: `{"reply": ...}`, or `data: {"delta"}` events and `event: done`.
    Native,
    /// OpenAI's: `chat.completion`, or `chat.completion.chunk` events and `data: [DONE]`.
    OpenAi {
        /// Whether the stream ends with a usage chunk.
        include_usage: bool,
    },
}

/// One exchange with the LLM, as the API asked for it.
struct Turn {
    /// The chat it belongs to; `None` for a stateless relay, which stores nothing.
    chat_id: Option<String>,
    key: Option<String>,
    /// The user's message as stored with the reply.
    user: Option<String>,
    /// What goes to the LLM.
    messages: Vec<ChatMessage>,
    sampling: Sampling,
    stream: bool,
    format: Format,
}

/// What a successful turn answers with.
enum Answer {
    /// A reply stored in a chat: just now, or earlier under the same idempotency key.
    Stored {
        chat_id: String,
        reply: StoredReply,
        replayed: bool,
        /// Why the reply ended, as the LLM said (a replay's was complete: `stop`).
        finish_reason: String,
    },
    /// A relayed completion, stored nowhere.
    Relayed(Completion),
}

impl Answer {
    fn parts(&self) -> (&str, &str, Option<Usage>) {
        match self {
            Answer::Stored { reply, .. } => (
                &reply.content,
                &reply.model,
                reply.usage.map(|(p, c)| Usage::new(p, c)),
            ),
            Answer::Relayed(c) => (&c.content, &c.model, c.usage),
        }
    }

    fn finish_reason(&self) -> &str {
        match self {
            Answer::Stored { finish_reason, .. } => finish_reason,
            Answer::Relayed(c) => &c.finish_reason,
        }
    }

    fn is_replay(&self) -> bool {
        matches!(self, Answer::Stored { replayed: true, .. })
    }
}

/// A job's request while a worker serves it.
struct Call {
    /// `None` once answered, or once an event stream has taken the connection.
    request: Option<tiny_http::Request>,
    request_id: String,
    /// When the request started, for OpenAI's `created`: one value for every chunk.
    created: u64,
    /// Released as soon as the answer is settled.
    ticket: Option<Ticket>,
    timings: Timings,
    /// Set by the client's connection when the client hangs up.
    hangup: Arc<AtomicBool>,
}

impl Call {
    /// Whether the client has hung up: the answer would go nowhere.
    fn client_gone(&self) -> bool {
        self.hangup.load(Ordering::SeqCst)
    }

    /// The request, while it has not been answered.
    fn request(&mut self) -> Result<&mut tiny_http::Request, ApiError> {
        self.request.as_mut().ok_or_else(answered)
    }
}

/// How a request was answered.
enum Outcome {
    /// With this response, still to be sent.
    Respond(HttpResponse),
    /// With an event stream, already sent.
    Streamed,
    /// Not at all: the client hung up, and nothing was stored.
    Abandoned,
}

/// The status counted for a request whose client hung up before its answer (nginx's 499,
/// "client closed request"); no client sees it.
const CLIENT_GONE: u16 = 499;

/// The body of a 200, and of the `done` event of a stream.
fn reply_json(chat_id: &str, reply: &StoredReply, timings: &Timings) -> serde_json::Value {
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
