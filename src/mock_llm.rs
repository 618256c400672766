//! `chatpool mock-llm`: an OpenAI-compatible fake LLM over real HTTP, for tests, load and demos.
//!
//! It speaks just enough HTTP/1.1 itself, on plain sockets, because faults are about
//! connections: a reset, a hang or a slow drip of bytes cannot be staged through a server
//! library that owns the socket. Each connection gets its own thread, which is fine for a test
//! tool and lets a thousand slow calls wait at once. The answers come from
//! [`crate::llm::mock::reply`], so they are predictable from the request.

use crate::llm::mock;
use crate::llm::wire::ChatMessage;
use serde::Deserialize;
use serde_json::json;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime};

/// A fault `mock-llm` can inject into its answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// Answer with the HTTP status `--fault-status` (and `--retry-after`, if given).
    Error,
    /// Never answer; keep the connection open.
    Hang,
    /// Close the connection without answering.
    Reset,
    /// Answer 200 with a body that is not a chat completion.
    Malformed,
    /// Answer correctly, one byte every `--drip-ms`.
    Drip,
}

/// Options of `chatpool mock-llm`.
#[derive(Debug, Clone, clap::Args)]
pub struct MockOptions {
    /// Address to listen on (port 0 picks a free one)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8090")]
    pub listen: String,
    /// Fixed delay before every answer
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// Extra random delay, uniform from 0 to this, added to the latency
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub jitter_ms: u64,
    /// Words appended to every reply, for longer answers
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub reply_words: usize,
    /// Fault to inject into completions
    #[arg(long, value_enum, value_name = "KIND")]
    pub fault: Option<Fault>,
    /// Share of completions that get the fault, from 0 to 1
    #[arg(long, value_name = "P", default_value_t = 1.0)]
    pub fault_rate: f64,
    /// Inject the fault only into the first N completions, then answer normally (0: no limit)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub fault_first: u64,
    /// HTTP status of `--fault error` answers
    #[arg(long, value_name = "STATUS", default_value_t = 500)]
    pub fault_status: u16,
    /// Retry-After header, in seconds, on `--fault error` answers
    #[arg(long, value_name = "SECS")]
    pub retry_after: Option<u64>,
    /// Gap between bytes for `--fault drip`
    #[arg(long, value_name = "MS", default_value_t = 50)]
    pub drip_ms: u64,
    /// Streamed replies: number of chunks (0: one per word)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub chunks: usize,
    /// Streamed replies: delay before each chunk after the first
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub chunk_gap_ms: u64,
    /// Streamed replies: break the connection after sending this many chunks
    #[arg(long, value_name = "K")]
    pub fail_after_chunk: Option<usize>,
}

/// How long a hanging answer waits before the connection is dropped anyway.
const HANG: Duration = Duration::from_secs(600);
/// Largest request body read.
const MAX_BODY: usize = 16 << 20;

/// What the mock has seen, for `GET /stats` (completions asked for, and calls whose client
/// hung up before the answer was whole) and `GET /last-request`.
#[derive(Default)]
struct Stats {
    completions: AtomicU64,
    disconnects: AtomicU64,
    /// The messages of the latest completion request, so a test can see what chatpool sent.
    last_messages: parking_lot::Mutex<Vec<ChatMessage>>,
}

struct Mock {
    options: MockOptions,
    stats: Stats,
}

/// Serves until the process is killed; returns only when it cannot start.
pub fn run(options: MockOptions) -> Result<(), String> {
    let listener = TcpListener::bind(&options.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", options.listen))?;
    crate::listen::widen_backlog(&listener).map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    log::info!(
        "mock-llm listening on http://{addr}/v1 (latency {} ms, jitter {} ms, fault {:?})",
        options.latency_ms,
        options.jitter_ms,
        options.fault
    );
    let mock = Arc::new(Mock {
        options,
        stats: Stats::default(),
    });
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let mock = Arc::clone(&mock);
        let spawned = thread::Builder::new()
            .name("mock-conn".into())
            .spawn(move || mock.serve(stream));
        if let Err(e) = spawned {
            log::warn!("mock-llm: cannot start a connection thread: {e}");
        }
    }
    Ok(())
}

/// One parsed request.
struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
    close: bool,
    /// Echoed back, so a load generator aimed straight at the mock can time each request.
    request_id: Option<String>,
}

/// Reads one request; `None` when the client closed the connection.
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut length = 0usize;
    let mut close = false;
    let mut request_id = None;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let name = name.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.trim().eq_ignore_ascii_case("close");
            } else if name.eq_ignore_ascii_case("x-request-id") {
                request_id = Some(value.trim().to_string());
            }
        }
    }
    if length > MAX_BODY {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "body too large"));
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Some(Request {
        method,
        path,
        body,
        close,
        request_id,
    }))
}

fn head(status: u16, content_type: &str, length: Option<usize>, extra: &str) -> String {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let length = match length {
        Some(n) => format!("Content-Length: {n}\r\n"),
        None => "Connection: close\r\n".to_string(),
    };
    format!("HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n{length}{extra}\r\n")
}

fn write_json(
    out: &mut impl Write,
    status: u16,
    body: &serde_json::Value,
    extra: &str,
) -> io::Result<()> {
    let bytes = body.to_string();
    out.write_all(head(status, "application/json", Some(bytes.len()), extra).as_bytes())?;
    out.write_all(bytes.as_bytes())?;
    out.flush()
}

#[derive(Deserialize)]
struct CompletionBody {
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
}

/// Whether the connection may carry another request.
enum After {
    KeepOpen,
    Close,
}

impl Mock {
    fn serve(&self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let Ok(read_half) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(read_half);
        let mut out = stream;
        while let Ok(Some(request)) = read_request(&mut reader) {
            let after = match (request.method.as_str(), request.path.split('?').next().unwrap_or("")) {
                ("POST", "/v1/chat/completions") => self.completion(&request, &mut out),
                ("GET", "/v1/models") => write_json(
                    &mut out,
                    200,
                    &json!({"object": "list", "data": [{"id": "mock", "object": "model", "created": 0, "owned_by": "chatpool"}]}),
                    "",
                )
                .map(|_| After::KeepOpen),
                ("GET", "/stats") => write_json(
                    &mut out,
                    200,
                    &json!({
                        "completions": self.stats.completions.load(Ordering::SeqCst),
                        "disconnects": self.stats.disconnects.load(Ordering::SeqCst),
                    }),
                    "",
                )
                .map(|_| After::KeepOpen),
                ("GET", "/last-request") => {
                    let messages = self.stats.last_messages.lock().clone();
                    write_json(&mut out, 200, &json!({ "messages": messages }), "")
                        .map(|_| After::KeepOpen)
                }
                _ => write_json(&mut out, 404, &error_body("no such endpoint in mock-llm"), "").map(|_| After::KeepOpen),
            };
            if request.close || !matches!(after, Ok(After::KeepOpen)) {
                return;
            }
        }
    }

    fn fault_for(&self, n: u64) -> Option<Fault> {
        let fault = self.options.fault?;
        let in_first = self.options.fault_first == 0 || n < self.options.fault_first;
        (in_first && fastrand::f64() < self.options.fault_rate).then_some(fault)
    }

    fn completion(&self, request: &Request, out: &mut TcpStream) -> io::Result<After> {
        let n = self.stats.completions.fetch_add(1, Ordering::SeqCst);
        let parsed: CompletionBody = match serde_json::from_slice(&request.body) {
            Ok(parsed) => parsed,
            Err(e) => {
                write_json(
                    out,
                    400,
                    &error_body(&format!("not a chat completion request: {e}")),
                    "",
                )?;
                return Ok(After::KeepOpen);
            }
        };
        self.stats.last_messages.lock().clone_from(&parsed.messages);
        let o = &self.options;
        let latency = Duration::from_millis(o.latency_ms + fastrand::u64(..=o.jitter_ms));
        if !self.client_stays(out, latency) {
            return Ok(After::Close);
        }
        let model = parsed.model.unwrap_or_else(|| "mock".into());
        let completion = mock::reply(&parsed.messages, &model, o.reply_words);
        let fault = self.fault_for(n);
        if let Some(after) = self.inject(fault, out)? {
            return Ok(after);
        }
        if parsed.stream {
            return self.stream(out, completion);
        }
        let drip = fault == Some(Fault::Drip);
        self.whole(n, completion, drip, request.request_id.as_deref(), out)
    }

    /// Answers with the fault, unless it is none or only slows the answer down (a drip).
    fn inject(&self, fault: Option<Fault>, out: &mut TcpStream) -> io::Result<Option<After>> {
        let o = &self.options;
        let after = match fault {
            Some(Fault::Error) => {
                let extra = o
                    .retry_after
                    .map(|s| format!("Retry-After: {s}\r\n"))
                    .unwrap_or_default();
                let message = format!("mock-llm injected HTTP {}", o.fault_status);
                write_json(out, o.fault_status, &error_body(&message), &extra)?;
                After::KeepOpen
            }
            Some(Fault::Hang) => {
                self.client_stays(out, HANG);
                After::Close
            }
            Some(Fault::Reset) => After::Close,
            Some(Fault::Malformed) => {
                let junk = b"{\"choices\": [{\"message\": ";
                out.write_all(head(200, "application/json", Some(junk.len()), "").as_bytes())?;
                out.write_all(junk)?;
                After::KeepOpen
            }
            Some(Fault::Drip) | None => return Ok(None),
        };
        Ok(Some(after))
    }

    /// A whole `chat.completion`, the `n`-th, echoing the request's id; with `drip`, a byte at
    /// a time.
    fn whole(
        &self,
        n: u64,
        completion: crate::llm::wire::Completion,
        drip: bool,
        request_id: Option<&str>,
        out: &mut TcpStream,
    ) -> io::Result<After> {
        let created = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let body = json!({
            "id": format!("chatcmpl-mock-{n}"),
            "object": "chat.completion",
            "created": created,
            "model": completion.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.content},
                         "finish_reason": "stop"}],
            "usage": completion.usage,
        })
        .to_string();
        let echo = request_id
            .map(|id| format!("X-Request-Id: {id}\r\n"))
            .unwrap_or_default();
        let mut answer = head(200, "application/json", Some(body.len()), &echo);
        if !drip {
            // One write, so the answer leaves in one segment as a real server's would, and the
            // client reads it with one call.
            answer.push_str(&body);
            out.write_all(answer.as_bytes())?;
            return Ok(After::KeepOpen);
        }
        out.write_all(answer.as_bytes())?;
        for byte in body.as_bytes() {
            out.write_all(std::slice::from_ref(byte))?;
            out.flush()?;
            thread::sleep(Duration::from_millis(self.options.drip_ms));
        }
        Ok(After::KeepOpen)
    }

    /// Server-sent events in OpenAI's chunk format, then `[DONE]`; the connection closes after.
    fn stream(
        &self,
        out: &mut TcpStream,
        completion: crate::llm::wire::Completion,
    ) -> io::Result<After> {
        let o = &self.options;
        let words: Vec<&str> = completion.content.split_inclusive(' ').collect();
        let pieces = if o.chunks == 0 {
            words.len().max(1)
        } else {
            o.chunks
        };
        let per_piece = words.len().div_ceil(pieces).max(1);
        out.write_all(
            head(
                200,
                "text/event-stream",
                None,
                "Cache-Control: no-cache\r\n",
            )
            .as_bytes(),
        )?;
        let chunk = |delta: serde_json::Value, finish: Option<&str>| {
            json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": completion.model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        for (i, group) in words.chunks(per_piece).enumerate() {
            if o.fail_after_chunk == Some(i) {
                return Ok(After::Close);
            }
            if i > 0 && !self.client_stays(out, Duration::from_millis(o.chunk_gap_ms)) {
                return Ok(After::Close);
            }
            let delta = if i == 0 {
                json!({"role": "assistant", "content": group.concat()})
            } else {
                json!({"content": group.concat()})
            };
            self.send_event(out, &chunk(delta, None))?;
        }
        self.send_event(out, &chunk(json!({}), Some("stop")))?;
        let usage = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": completion.model,
                           "choices": [], "usage": completion.usage});
        self.send_event(out, &usage)?;
        out.write_all(b"data: [DONE]\n\n")?;
        out.flush()?;
        Ok(After::Close)
    }

    /// Waits for `wait` while watching the connection; a client that hangs up meanwhile is
    /// counted as a disconnect, and `false` says it is gone.
    fn client_stays(&self, out: &TcpStream, wait: Duration) -> bool {
        let until = std::time::Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return true;
            }
            let mut watch = libc::pollfd {
                fd: out.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: poll(2) on one pollfd we own, for a descriptor `out` keeps open.
            let ready = unsafe { libc::poll(&mut watch, 1, ms) };
            let hung_up = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR;
            if ready > 0 && watch.revents & hung_up != 0 {
                self.stats.disconnects.fetch_add(1, Ordering::SeqCst);
                return false;
            }
        }
    }

    fn send_event(&self, out: &mut TcpStream, data: &serde_json::Value) -> io::Result<()> {
        let sent = out
            .write_all(format!("data: {data}\n\n").as_bytes())
            .and_then(|_| out.flush());
        if sent.is_err() {
            self.stats.disconnects.fetch_add(1, Ordering::SeqCst);
        }
        sent
    }
}

fn error_body(message: &str) -> serde_json::Value {
    json!({"error": {"message": message, "type": "mock_error"}})
}
