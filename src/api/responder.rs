//! The one owner of a job's request while a worker serves it, and the only writer of its
//! answer: a JSON response, or an event stream.
//!
//! A stream opens at its first event, so an LLM that fails before its first piece is answered
//! with the ordinary JSON error. Pieces go to the connection's own thread as they come (see
//! [`EventStream`]); the end of the answer is written from the [`Answer`] the worker computed.
//! Nothing here waits on the client: a client that has gone shows up as a failed send.

use super::error::ApiError;
use super::openai;
use super::sse::EventStream;
use super::turn::{Format, Reply, Shape};
use super::{error_response, json_response, respond, HttpResponse};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// What a request is answered with, computed whole before the end of it is written.
pub enum Answer {
    /// A response computed whole: history, the chat list, a deletion, the models.
    Response(HttpResponse),
    /// A turn's reply, in the shape the turn asked for.
    Reply(Reply, Shape),
    /// The error that refuses the request, or ends its stream.
    Failed(ApiError),
    /// The last events of a stream the worker wrote as it went (the Responses API's), by name;
    /// the stream opens with them if nothing opened it.
    Events(Vec<(&'static str, Value)>),
    /// Nothing: the client left, and nothing was stored.
    Abandoned,
}

/// The status counted for a request whose client hung up before its answer (nginx's 499,
/// "client closed request"); no client sees it.
pub const CLIENT_GONE: u16 = 499;

/// Where a request's time went, for `timings_ms` and the stage histograms.
#[derive(Debug, Clone)]
pub struct Timings {
    /// When the acceptor received the request.
    pub received: Instant,
    /// Waiting for a worker.
    pub queued: Duration,
    /// Reading the history (or the stored reply of a replay).
    pub history: Option<Duration>,
    /// The LLM call.
    pub llm: Option<Duration>,
    /// Storing the exchange.
    pub store: Option<Duration>,
}

impl Timings {
    /// The timings of a request received at `received` and taken by a worker now.
    pub fn new(received: Instant) -> Timings {
        Timings {
            received,
            queued: received.elapsed(),
            history: None,
            llm: None,
            store: None,
        }
    }

    /// The stages in [`crate::metrics::STAGES`] order, the last (`total`) up to now.
    pub fn stages(&self) -> [Option<Duration>; 5] {
        let total = self.received.elapsed();
        [
            Some(self.queued),
            self.history,
            self.llm,
            self.store,
            Some(total),
        ]
    }

    fn as_json(&self) -> Value {
        let ms = |d: Option<Duration>| (d.unwrap_or_default().as_secs_f64() * 1e6).round() / 1e3;
        let [queued, history, llm, store, total] = self.stages().map(ms);
        json!({"queued": queued, "history": history, "llm": llm, "store": store, "total": total})
    }
}

/// Where the answer goes.
enum Out {
    /// Not answered yet.
    Waiting(tiny_http::Request),
    /// An event stream has begun, in this format.
    Streaming(EventStream, Format),
    /// The client has gone: a send failed. Nothing more is written.
    Gone,
}

/// The writer of one request's answer.
pub struct Responder {
    out: Out,
    request_id: String,
    /// What every OpenAI chunk of the answer shares: one id, `created` and model.
    chunks: openai::Chunks,
}

impl Responder {
    /// Takes charge of `request`, answered under `request_id` by `model`.
    pub fn new(request: tiny_http::Request, request_id: &str, model: &str) -> Responder {
        let id = completion_id(request_id);
        Responder {
            out: Out::Waiting(request),
            request_id: request_id.to_string(),
            chunks: openai::Chunks::new(&id, openai::now_secs(), model),
        }
    }

    /// Sends one piece of a reply as it arrives, opening the stream at the first; `false` once
    /// the client is gone.
    pub fn delta(&mut self, format: Format, piece: &str) -> bool {
        let first = matches!(self.out, Out::Waiting(_));
        let data = match format {
            Format::Native => json!({ "delta": piece }),
            Format::OpenAi { .. } => self.chunks.delta(piece, first),
        };
        self.send(format, None, &data.to_string())
    }

    /// Sends one named event, opening the stream at the first; `false` once the client is gone.
    /// A failure after it is written as OpenAI's front door writes one: a `data:` line holding
    /// the error, which OpenAI's SDK raises.
    pub fn event(&mut self, name: &str, data: &Value) -> bool {
        let format = Format::OpenAi {
            include_usage: false,
        };
        self.send(format, Some(name), &data.to_string())
    }

    /// Writes the answer, and returns the status to count for it.
    pub fn finish(mut self, answer: Answer, timings: &Timings) -> u16 {
        match answer {
            Answer::Abandoned => CLIENT_GONE,
            Answer::Response(response) => self.whole(response),
            Answer::Failed(error) => self.fail(&error),
            Answer::Events(events) => {
                for (name, data) in &events {
                    self.event(name, data);
                }
                self.end_stream()
            }
            Answer::Reply(reply, shape) if !shape.stream => {
                let body = self.reply_body(&reply, shape.format, timings);
                self.whole(json_response(200, &body))
            }
            Answer::Reply(reply, shape) => {
                let events = self.closing_events(&reply, shape.format, timings);
                for (name, data) in &events {
                    self.send(shape.format, *name, data);
                }
                self.end_stream()
            }
        }
    }

    /// A whole response, unless a stream has begun (a worker that panicked mid-stream), which
    /// is then cut off.
    fn whole(self, response: HttpResponse) -> u16 {
        match self.out {
            Out::Waiting(request) => {
                let status = response.status_code().0;
                respond(request, response, &self.request_id);
                status
            }
            Out::Streaming(..) => 200,
            Out::Gone => CLIENT_GONE,
        }
    }

    /// An error: JSON before the stream began, its last event after.
    fn fail(mut self, error: &ApiError) -> u16 {
        let format = match &self.out {
            Out::Streaming(_, format) => *format,
            _ => {
                let response = error_response(error, &self.request_id);
                return self.whole(response);
            }
        };
        let name = (format == Format::Native).then_some("error");
        let body = error.body(&self.request_id).to_string();
        self.send(format, name, &body);
        self.end_stream()
    }

    /// The events that end a streamed reply. A replay sends its stored reply whole, as one
    /// piece, so a client that builds the text from the pieces has it.
    fn closing_events(
        &self,
        reply: &Reply,
        format: Format,
        timings: &Timings,
    ) -> Vec<(Option<&'static str>, String)> {
        let mut events = Vec::new();
        match format {
            Format::Native => {
                if reply.replayed {
                    events.push((None, json!({ "delta": reply.content }).to_string()));
                }
                let done = self.reply_body(reply, format, timings);
                events.push((Some("done"), done.to_string()));
            }
            Format::OpenAi { include_usage } => {
                if reply.replayed {
                    events.push((None, self.chunks.delta(&reply.content, true).to_string()));
                }
                events.push((None, self.chunks.finish(&reply.finish_reason).to_string()));
                if include_usage {
                    events.push((None, self.chunks.usage(reply.usage).to_string()));
                }
                events.push((None, "[DONE]".to_string()));
            }
        }
        events
    }

    /// The body of a 200, and of a native stream's `done` event.
    fn reply_body(&self, reply: &Reply, format: Format, timings: &Timings) -> Value {
        match (&reply.stored, format) {
            (Some((chat_id, message_id)), Format::Native) => json!({
                "chat_id": chat_id,
                "message_id": message_id,
                "reply": reply.content,
                "model": reply.model,
                "usage": reply.usage,
                "timings_ms": timings.as_json(),
            }),
            _ => openai::completion(
                &completion_id(&self.request_id),
                &reply.model,
                &reply.content,
                reply.usage,
                &reply.finish_reason,
            ),
        }
    }

    /// Sends one event, opening the stream if it is the first; `false` once the client is gone.
    fn send(&mut self, format: Format, name: Option<&str>, data: &str) -> bool {
        self.out = match std::mem::replace(&mut self.out, Out::Gone) {
            Out::Waiting(request) => {
                Out::Streaming(EventStream::start(request, &self.request_id), format)
            }
            open => open,
        };
        let Out::Streaming(stream, _) = &mut self.out else {
            return false;
        };
        if stream.send(name, data).is_err() {
            self.out = Out::Gone;
            return false;
        }
        true
    }

    /// Ends an event stream, whose head said 200.
    fn end_stream(self) -> u16 {
        let Out::Streaming(stream, _) = self.out else {
            return CLIENT_GONE;
        };
        if let Err(e) = stream.finish() {
            log::debug!(
                "request_id={}: could not finish the event stream: {e}",
                self.request_id
            );
        }
        200
    }
}

/// The OpenAI `id` of the completion answering a request.
fn completion_id(request_id: &str) -> String {
    format!("chatcmpl-{request_id}")
}
