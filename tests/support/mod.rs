//! What the tests share: a real chatpool on an ephemeral port (in this process, or as a process
//! of its own for what only a process shows: signals, exit codes, `kill -9`, its log and its
//! memory), a raw HTTP client, and a scripted fake upstream. Every server is stopped, and every
//! process killed, when its handle drops, also when a test fails.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_chatpool");

/// A child process that is killed on drop, with its stderr collected.
pub struct Proc {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Proc {
    /// Starts `chatpool ARGS` and waits for the line naming the address it listens on.
    pub fn start(args: &[&str], envs: &[(&str, &str)], marker: &str) -> Proc {
        Proc::start_program(BIN, args, envs, marker)
    }

    /// As [`Proc::start`], for a program that ends up exec'ing chatpool (such as `unshare`).
    pub fn start_program(
        program: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        marker: &str,
    ) -> Proc {
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command.env("RUST_LOG", "info");
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn chatpool");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        let marker = marker.to_string();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                {
                    let mut log = sink.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
                if let Some(rest) = line.split(&marker).nth(1) {
                    let addr = rest.split(['/', ' ']).next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
            }
        });
        let mut proc = Proc {
            child,
            addr: "127.0.0.1:1".parse().unwrap(),
            log,
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => proc.addr = addr.parse().expect("address in the ready line"),
            Err(_) => panic!("no ready line; log:\n{}", proc.log()),
        }
        proc
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log holds `text`; lines reach it from another thread, a moment late.
    pub fn log_shows(&self, text: &str) -> bool {
        eventually(Duration::from_secs(5), || self.log().contains(text))
    }

    /// Sends a signal such as `libc::SIGTERM` to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid; it touches no memory of ours.
        let rc = unsafe { libc::kill(self.pid() as i32, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A chatpool running in the test's process, stopped when dropped.
pub struct Running {
    pub addr: SocketAddr,
    server: Option<chatpool::server::Server>,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
    }
}

/// `chatpool mock-llm` with extra flags, on a free port.
pub fn mock_llm(flags: &[&str]) -> Proc {
    let mut args = vec!["mock-llm", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(flags);
    Proc::start(&args, &[], "listening on http://")
}

/// A temp folder holding a config file and the database.
pub struct Workdir {
    pub dir: tempfile::TempDir,
}

impl Workdir {
    pub fn new() -> Workdir {
        Workdir {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn db(&self) -> PathBuf {
        self.dir.path().join("chat.db")
    }

    /// Writes a config whose `[storage] path` is this folder's database, with `extra` TOML
    /// appended (sections other than `[storage]`), and returns its path.
    pub fn config(&self, extra: &str) -> PathBuf {
        let path = self.dir.path().join("config.toml");
        let text = format!(
            "[storage]\npath = {:?}\n\n{extra}\n",
            self.db().to_str().unwrap()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts chatpool in this process, on a free port, with `extra` config.
    pub fn serve(&self, extra: &str) -> Running {
        let mut config = chatpool::config::Config::load(&self.config(extra)).unwrap();
        config.server.listen = "127.0.0.1:0".into();
        // Dropping the handle stops the server without waiting for requests still running:
        // draining is shown by a process of its own, under a signal.
        config.server.shutdown_grace_secs = 0;
        let server = chatpool::server::Server::start(config).expect("chatpool starts");
        Running {
            addr: server.addr(),
            server: Some(server),
        }
    }

    /// Starts chatpool as a process of its own, on a free port, with `extra` config.
    pub fn spawn(&self, extra: &str) -> Proc {
        self.spawn_with_env(extra, &[])
    }

    pub fn spawn_with_env(&self, extra: &str, envs: &[(&str, &str)]) -> Proc {
        let config = self.config(extra);
        let config = config.to_str().unwrap();
        Proc::start(
            &["--config", config, "--listen", "127.0.0.1:0"],
            envs,
            "listening on http://",
        )
    }
}

/// An `[llm]` section pointing at an OpenAI-compatible server.
pub fn openai_llm(upstream: SocketAddr, extra: &str) -> String {
    format!("[llm]\nprovider = \"openai\"\nbase_url = \"http://{upstream}/v1\"\n{extra}\n")
}

/// A response as the raw client read it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts the contract's error shape and returns the type.
    pub fn error_type(&self) -> String {
        let body = self.json();
        let error = &body["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert_eq!(
            error["request_id"].as_str(),
            self.header("X-Request-Id"),
            "{body}"
        );
        assert_eq!(error.as_object().unwrap().len(), 3, "{body}");
        error["type"].as_str().unwrap().to_string()
    }
}

/// Sends raw bytes and reads the whole response (the request must ask to close).
pub fn raw(addr: SocketAddr, bytes: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let mut data = Vec::new();
    stream.read_to_end(&mut data).unwrap();
    parse_response(&data)
}

fn parse_response(data: &[u8]) -> Response {
    let split = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&data[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Response {
        status,
        headers,
        body: data[split + 4..].to_vec(),
    }
}

/// An HTTP request over a fresh connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Response {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" {
        text.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    text.push_str("\r\n");
    text.push_str(body);
    raw(addr, text.as_bytes())
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, None, &[])
}

pub fn post(addr: SocketAddr, path: &str, body: &str) -> Response {
    request(addr, "POST", path, Some(body), &[])
}

/// Sends a message to a chat and returns the response.
pub fn send(addr: SocketAddr, chat: &str, content: &str) -> Response {
    let body = serde_json::json!({ "content": content }).to_string();
    post(addr, &format!("/v1/chats/{chat}/messages"), &body)
}

/// Threads of `pid` whose name starts with `prefix`.
pub fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(Result::ok)
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .filter(|name| name.starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    false
}

/// One request the fake upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub headers: Vec<(String, String)>,
    pub body: serde_json::Value,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The messages as (role, content) pairs.
    pub fn messages(&self) -> Vec<(String, String)> {
        self.body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().unwrap().to_string(),
                    m["content"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

/// (role, content) pairs as [`Seen::messages`] gives them, from string literals.
pub fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(r, c)| (r.to_string(), c.to_string()))
        .collect()
}

/// What the fake upstream answers to its n-th request (0-based).
pub type Script = dyn Fn(usize, &Seen) -> (u16, String) + Send + Sync;

/// As [`Script`], with headers for the answer.
pub type HeadedScript =
    dyn Fn(usize, &Seen) -> (u16, Vec<(&'static str, String)>, String) + Send + Sync;

/// A scripted OpenAI-compatible upstream in the test process, recording what it receives.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    server: Arc<tiny_http::Server>,
    seen: Arc<Mutex<Vec<Seen>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FakeUpstream {
    pub fn start(script: Box<Script>) -> FakeUpstream {
        FakeUpstream::start_with_headers(Box::new(move |n, seen| {
            let (status, reply) = script(n, seen);
            (status, Vec::new(), reply)
        }))
    }

    pub fn start_with_headers(script: Box<HeadedScript>) -> FakeUpstream {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let addr = server.server_addr().to_ip().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (srv, log) = (Arc::clone(&server), Arc::clone(&seen));
        let thread = thread::spawn(move || {
            while let Ok(mut request) = srv.recv() {
                let mut body = String::new();
                request.as_reader().read_to_string(&mut body).unwrap();
                let seen = Seen {
                    headers: request
                        .headers()
                        .iter()
                        .map(|h| (h.field.to_string(), h.value.to_string()))
                        .collect(),
                    body: serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
                };
                let n = {
                    let mut log = log.lock().unwrap();
                    log.push(seen.clone());
                    log.len() - 1
                };
                let (status, headers, reply) = script(n, &seen);
                let mut response = tiny_http::Response::from_string(reply).with_status_code(status);
                for (name, value) in headers {
                    let header = tiny_http::Header::from_bytes(name, value.as_bytes()).unwrap();
                    response = response.with_header(header);
                }
                let _ = request.respond(response);
            }
        });
        FakeUpstream {
            addr,
            server,
            seen,
            thread: Some(thread),
        }
    }

    /// Answers every request with a completion whose content is `reply`.
    pub fn replying(reply: &'static str) -> FakeUpstream {
        FakeUpstream::start(Box::new(move |_, _| (200, completion(reply))))
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A `chat.completion` body with `content` and usage.
pub fn completion(content: &str) -> String {
    serde_json::json!({
        "id": "x", "object": "chat.completion", "model": "upstream-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    })
    .to_string()
}

/// Every message of a chat, read straight from the database file.
pub fn stored_messages(db: &Path, chat: &str) -> Vec<(i64, String, String)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT id, role, content FROM messages WHERE chat_id = ?1 ORDER BY id")
        .unwrap();
    let rows = stmt
        .query_map([chat], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap();
    rows.map(Result::unwrap).collect()
}

/// A client reading a `text/event-stream` response event by event, as it arrives.
pub struct EventReader {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pending: String,
    chunked: bool,
    done: bool,
}

impl EventReader {
    /// Sends a POST and reads the response head.
    pub fn post(addr: SocketAddr, path: &str, body: &str, headers: &[(&str, &str)]) -> EventReader {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut text = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        text.push_str("\r\n");
        text.push_str(body);
        stream.write_all(text.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let status = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').unwrap();
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let chunked = headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("Transfer-Encoding") && v == "chunked");
        EventReader {
            reader,
            status,
            headers,
            pending: String::new(),
            chunked,
            done: false,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The whole response, for one that is not a stream.
    pub fn into_response(self) -> Response {
        let (status, headers) = (self.status, self.headers.clone());
        Response {
            status,
            headers,
            body: self.body().into_bytes(),
        }
    }

    /// The rest of the body, for a response that is not a stream.
    pub fn body(mut self) -> String {
        let mut body = String::new();
        while let Some(piece) = self.read_piece() {
            body.push_str(&piece);
        }
        body
    }

    fn read_piece(&mut self) -> Option<String> {
        if self.done {
            return None;
        }
        if !self.chunked {
            let mut rest = String::new();
            self.reader.read_to_string(&mut rest).ok()?;
            self.done = true;
            return Some(rest);
        }
        let mut size = String::new();
        self.reader.read_line(&mut size).ok()?;
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        if size == 0 {
            self.done = true;
            return None;
        }
        let mut data = vec![0; size + 2];
        self.reader.read_exact(&mut data).ok()?;
        data.truncate(size);
        Some(String::from_utf8(data).unwrap())
    }

    /// The next event as (event name, data); `None` at the end of the stream.
    pub fn next_event(&mut self) -> Option<(Option<String>, String)> {
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..end + 2).collect();
                let mut name = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        name = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                return Some((name, data));
            }
            let piece = self.read_piece()?;
            self.pending.push_str(&piece);
        }
    }
}

/// One `chat.completion.chunk` event carrying `text`, with every field OpenAI's have.
pub fn sse_piece(text: &str) -> String {
    let chunk = serde_json::json!({"id": "chatcmpl-AXk1pQ9mZr3vT7yLb2nC4dE6fG8hJ", "object": "chat.completion.chunk",
        "created": 1_764_460_800, "model": "upstream-model", "system_fingerprint": "fp_0ba0d124f1",
        "choices": [{"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null}]});
    format!("data: {chunk}\n\n")
}

/// The chunk that ends a streamed reply with `reason`, then usage and `[DONE]`.
pub fn sse_end(reason: &str) -> String {
    let finish = serde_json::json!({"id": "x", "object": "chat.completion.chunk", "model": "upstream-model",
        "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]});
    let usage = serde_json::json!({"id": "x", "object": "chat.completion.chunk", "model": "upstream-model",
        "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}});
    format!("data: {finish}\n\ndata: {usage}\n\ndata: [DONE]\n\n")
}

/// The error object vLLM streams when generation fails part-way.
pub const SSE_ERROR: &str =
    "data: {\"error\": {\"object\": \"error\", \"message\": \"generation failed\", \"code\": 500}}\n\n";

/// A fake upstream answering a streamed call with `stream` and a plain one with `plain`.
pub fn upstream_streaming(stream: String, plain: String) -> FakeUpstream {
    FakeUpstream::start(Box::new(move |_, seen| {
        if seen.body["stream"] == true {
            (200, stream.clone())
        } else {
            (200, plain.clone())
        }
    }))
}

/// The text of a native stream's `data: {"delta"}` events, and its closing event.
pub fn native_deltas(events: &mut EventReader) -> (String, Option<String>, serde_json::Value) {
    let mut text = String::new();
    while let Some((name, data)) = events.next_event() {
        let data: serde_json::Value = serde_json::from_str(&data).unwrap();
        match name {
            None => text.push_str(data["delta"].as_str().unwrap()),
            Some(name) => return (text, Some(name), data),
        }
    }
    (text, None, serde_json::Value::Null)
}

/// The chunks of a front-door stream up to `[DONE]`, and whether `[DONE]` came.
pub fn openai_chunks(events: &mut EventReader) -> (Vec<serde_json::Value>, bool) {
    let mut chunks = Vec::new();
    while let Some((name, data)) = events.next_event() {
        assert_eq!(name, None, "{data}");
        if data == "[DONE]" {
            return (chunks, true);
        }
        chunks.push(serde_json::from_str(&data).unwrap());
    }
    (chunks, false)
}

/// An upstream that answers every request with a `text/event-stream` head and `body` as raw
/// bytes (valid UTF-8 or not), then closes the connection, or with `hold_open` keeps it open
/// until dropped, as a server that never ends its stream. Counts the requests.
pub struct RawUpstream {
    pub addr: SocketAddr,
    requests: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    release: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl RawUpstream {
    pub fn start(body: Vec<u8>, hold_open: bool) -> RawUpstream {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (count, stopped) = (Arc::clone(&requests), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                read_request_head_and_body(&stream);
                count.fetch_add(1, Ordering::SeqCst);
                let mut out = stream;
                let _ =
                    out.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n");
                let _ = out.write_all(&body);
                let _ = out.flush();
                if hold_open {
                    let _ = held.recv();
                    return;
                }
            }
        });
        RawUpstream {
            addr,
            requests,
            stop,
            release: Some(release),
            thread: Some(thread),
        }
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn read_request_head_and_body(stream: &TcpStream) {
    let mut reader = BufReader::new(stream);
    let mut length = 0;
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 2 {
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        line.clear();
    }
    let mut request = vec![0; length];
    let _ = reader.read_exact(&mut request);
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.release.take();
        // Wakes the accept loop so it sees the stop.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a [`ThreadedUpstream`] does with one request.
pub enum Answer {
    /// Writes these bytes (a whole HTTP response) and reads the connection's next request.
    Keep(Vec<u8>),
    /// Writes these bytes, then closes the connection, whatever the response's headers say.
    Close(Vec<u8>),
    /// Answers nothing, until the caller hangs up.
    Hang,
    /// Writes the first bytes, then after a moment, when the caller has read them, the
    /// second on the same connection (counted in [`ThreadedUpstream::trailers`]), and keeps
    /// reading.
    Trail(Vec<u8>, Vec<u8>),
}

/// An HTTP/1.1 upstream in the test process serving each connection on a thread of its own,
/// so that one call can hang while others are answered. The script gets each request's body.
/// Counts the connections it accepted.
pub struct ThreadedUpstream {
    pub addr: SocketAddr,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    trailers: Arc<std::sync::atomic::AtomicUsize>,
    closed: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

/// A 200 with `body` and its length, as a keep-alive response.
pub fn http_200(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl ThreadedUpstream {
    pub fn start(script: impl Fn(&str) -> Answer + Send + Sync + 'static) -> ThreadedUpstream {
        ThreadedUpstream::start_reading(script, Duration::ZERO)
    }

    /// As [`ThreadedUpstream::start`], stopping for `stall` after the first 64 KiB of each
    /// request body, so that a large body's sender finds the socket full for a while.
    pub fn start_reading(
        script: impl Fn(&str) -> Answer + Send + Sync + 'static,
        stall: Duration,
    ) -> ThreadedUpstream {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let trailers = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (Arc::clone(&connections), Arc::clone(&stop));
        let (trailed, shut) = (Arc::clone(&trailers), Arc::clone(&closed));
        let script = Arc::new(script);
        let thread = thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let (script, trailed) = (Arc::clone(&script), Arc::clone(&trailed));
                let shut = Arc::clone(&shut);
                thread::spawn(move || serve_connection(stream, &*script, &trailed, &shut, stall));
            }
        });
        ThreadedUpstream {
            addr,
            connections,
            trailers,
            closed,
            stop,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections closed after an [`Answer::Close`] so far.
    pub fn closed(&self) -> usize {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Trailing bytes of [`Answer::Trail`] written so far.
    pub fn trailers(&self) -> usize {
        self.trailers.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Answers the requests of one connection as `script` says, until it closes.
fn serve_connection(
    stream: TcpStream,
    script: &(impl Fn(&str) -> Answer + ?Sized),
    trailed: &std::sync::atomic::AtomicUsize,
    closed: &std::sync::atomic::AtomicUsize,
    stall: Duration,
) {
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut length = None;
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => {}
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse::<usize>().ok();
            }
        }
        let mut body = vec![0; length.unwrap_or(0)];
        let head = body.len().min(64 << 10);
        let (first, rest) = body.split_at_mut(head);
        if reader.read_exact(first).is_err() {
            return;
        }
        thread::sleep(stall);
        if reader.read_exact(rest).is_err() {
            return;
        }
        match script(&String::from_utf8_lossy(&body)) {
            Answer::Keep(bytes) => {
                if out.write_all(&bytes).is_err() {
                    return;
                }
            }
            Answer::Close(bytes) => {
                let _ = out.write_all(&bytes);
                drop((out, reader));
                closed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return;
            }
            Answer::Trail(answer, trailer) => {
                let _ = out.write_all(&answer);
                thread::sleep(Duration::from_millis(50));
                if out.write_all(&trailer).is_err() {
                    return;
                }
                trailed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Answer::Hang => {
                let mut rest = Vec::new();
                let _ = reader.read_to_end(&mut rest);
                return;
            }
        }
    }
}

impl Drop for ThreadedUpstream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept loop so it sees the stop.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
