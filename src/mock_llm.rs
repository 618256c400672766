//! `chatpool mock-llm`: an OpenAI-compatible fake LLM over real HTTP, for tests, load and demos.
//!
//! A few threads take requests from tiny_http and build the answer at once; an answer that
//! must wait (latency, jitter) goes to one timer thread that sends it when due. Waiting
//! requests therefore cost memory, not threads, so the mock can hold a thousand slow calls.

use crate::llm::mock;
use crate::llm::wire::ChatMessage;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde::Deserialize;
use serde_json::json;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::io::{Cursor, Read};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

/// Options of `chatpool mock-llm`.
#[derive(Debug, Clone, clap::Args)]
pub struct MockOptions {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8090")]
    pub listen: String,
    /// Fixed delay before every answer.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// Extra random delay, uniform from 0 to this, added to the latency.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub jitter_ms: u64,
    /// Words appended to every reply, for longer answers.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub reply_words: usize,
    /// Threads that read requests and build answers.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub threads: usize,
}

type Response = tiny_http::Response<Cursor<Vec<u8>>>;

/// Serves until the process is killed; returns only when it cannot start.
pub fn run(options: MockOptions) -> Result<(), String> {
    let server = tiny_http::Server::http(&options.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", options.listen))?;
    let addr = server.server_addr().to_ip().ok_or("not an IP address")?;
    log::info!(
        "mock-llm listening on http://{addr}/v1 (latency {} ms, jitter {} ms)",
        options.latency_ms,
        options.jitter_ms
    );
    let server = Arc::new(server);
    let (delayed_tx, delayed_rx) = crossbeam_channel::unbounded();
    thread::Builder::new()
        .name("mock-timer".into())
        .spawn(move || timer(delayed_rx))
        .map_err(|e| e.to_string())?;
    let mut handles = Vec::new();
    for i in 0..options.threads.max(1) {
        let server = Arc::clone(&server);
        let delayed_tx = delayed_tx.clone();
        let options = options.clone();
        let handle = thread::Builder::new()
            .name(format!("mock-http-{i}"))
            .spawn(move || loop {
                let Ok(mut request) = server.recv() else {
                    continue;
                };
                let response = answer(&mut request, &options);
                let delay =
                    Duration::from_millis(options.latency_ms + fastrand::u64(..=options.jitter_ms));
                if delay.is_zero() {
                    let _ = request.respond(response);
                } else {
                    let _ = delayed_tx.send(Delayed {
                        due: Instant::now() + delay,
                        request,
                        response,
                    });
                }
            })
            .map_err(|e| e.to_string())?;
        handles.push(handle);
    }
    for handle in handles {
        let _ = handle.join();
    }
    Ok(())
}

#[derive(Deserialize)]
struct CompletionBody {
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
}

fn answer(request: &mut tiny_http::Request, options: &MockOptions) -> Response {
    let url = request.url().split('?').next().unwrap_or("").to_string();
    match (request.method(), url.as_str()) {
        (tiny_http::Method::Post, "/v1/chat/completions") => {
            let mut body = Vec::new();
            if request
                .as_reader()
                .take(16 << 20)
                .read_to_end(&mut body)
                .is_err()
            {
                return error(400, "could not read the body");
            }
            let parsed: CompletionBody = match serde_json::from_slice(&body) {
                Ok(parsed) => parsed,
                Err(e) => return error(400, &format!("not a chat completion request: {e}")),
            };
            if parsed.stream {
                return error(400, "this mock-llm does not stream");
            }
            let model = parsed.model.unwrap_or_else(|| "mock".into());
            let completion = mock::reply(&parsed.messages, &model, options.reply_words);
            let created = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            json(
                200,
                &json!({
                    "id": format!("chatcmpl-mock-{:x}", fastrand::u64(..)),
                    "object": "chat.completion",
                    "created": created,
                    "model": completion.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.content},
                                 "finish_reason": "stop"}],
                    "usage": completion.usage,
                }),
            )
        }
        (tiny_http::Method::Get, "/v1/models") => json(
            200,
            &json!({"object": "list", "data": [{"id": "mock", "object": "model", "created": 0, "owned_by": "chatpool"}]}),
        ),
        _ => error(404, "no such endpoint in mock-llm"),
    }
}

fn json(status: u16, body: &serde_json::Value) -> Response {
    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]);
    let response = tiny_http::Response::from_data(serde_json::to_vec(body).unwrap_or_default())
        .with_status_code(status);
    match header {
        Ok(h) => response.with_header(h),
        Err(()) => response,
    }
}

fn error(status: u16, message: &str) -> Response {
    json(
        status,
        &json!({"error": {"message": message, "type": "invalid_request_error"}}),
    )
}

/// An answer waiting for its time.
struct Delayed {
    due: Instant,
    request: tiny_http::Request,
    response: Response,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due
    }
}

impl Eq for Delayed {}

impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Delayed {
    // Reversed, so the max-heap pops the earliest due first.
    fn cmp(&self, other: &Self) -> Ordering {
        other.due.cmp(&self.due)
    }
}

fn timer(incoming: Receiver<Delayed>) {
    let mut waiting = BinaryHeap::new();
    loop {
        let next = match waiting.peek() {
            Some(Delayed { due, .. }) => incoming.recv_deadline(*due),
            None => incoming.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(delayed) => waiting.push(delayed),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        while waiting.peek().is_some_and(|d| d.due <= now) {
            if let Some(Delayed {
                request, response, ..
            }) = waiting.pop()
            {
                let _ = request.respond(response);
            }
        }
    }
}
