//! Hostile and broken clients: idle and half-sent connections, the connection cap, a corpus of
//! malformed requests, and storage faults.

use crate::support::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Reads until the server closes the connection; what it sent, or `None` if it kept it open.
fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut data = Vec::new();
    match stream.read_to_end(&mut data) {
        Ok(_) => Some(data),
        // A reset after the response still ends the connection.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(data),
        Err(_) => None,
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).expect("connect")
}

#[test]
fn idle_and_half_sent_sockets_neither_starve_others_nor_stay_open() {
    let work = Workdir::new();
    let server = work.spawn("[server]\nclient_timeout_secs = 2\n");
    let addr = server.addr;

    let idle: Vec<TcpStream> = (0..500).map(|_| connect(addr)).collect();
    let half: Vec<TcpStream> = (0..100)
        .map(|i| {
            let mut s = connect(addr);
            s.write_all(format!("GET /v1/chats/half-{i}/mess").as_bytes())
                .unwrap();
            s
        })
        .collect();
    // Every one of them holds a connection thread by now.
    assert!(
        eventually(Duration::from_secs(10), || threads_named(
            server.pid(),
            "http-conn"
        ) >= 600),
        "{} connection threads",
        threads_named(server.pid(), "http-conn")
    );

    let started = Instant::now();
    let answer = send(addr, "normal", "still there?");
    let took = started.elapsed();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(
        took < Duration::from_secs(1),
        "a normal client waited {took:?}"
    );

    // Past the 2 s timeout: the idle ones are closed without a word, the half-sent ones get a
    // 408 in the contract's error shape, then a close.
    for (i, mut s) in idle.into_iter().enumerate() {
        let data = read_until_closed(&mut s, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("idle socket {i} still open"));
        assert!(data.is_empty(), "idle socket {i} got {data:?}");
    }
    for (i, mut s) in half.into_iter().enumerate() {
        let data = read_until_closed(&mut s, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("half-sent socket {i} still open"));
        let text = String::from_utf8_lossy(&data);
        assert!(text.starts_with("HTTP/1.1 408 "), "socket {i}: {text}");
        assert!(text.contains(r#""type":"request_timeout""#), "{text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
    }
    // Their threads end, and the server goes on serving.
    assert!(
        eventually(Duration::from_secs(20), || threads_named(
            server.pid(),
            "http-conn"
        ) < 50),
        "{} connection threads left",
        threads_named(server.pid(), "http-conn")
    );
    assert_eq!(send(addr, "normal", "and now?").status, 200);
}

/// Reads one response with a Content-Length off a kept-alive connection: (status, body).
fn read_one_response(stream: &mut TcpStream) -> (u16, String) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("a response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .expect("Content-Length");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    (status, String::from_utf8(body).unwrap())
}

#[test]
fn the_client_timeout_counts_from_the_last_answer_not_while_one_is_worked_on() {
    let mock = mock_llm(&["--latency-ms", "2500"]);
    let work = Workdir::new();
    let server = work.serve(&format!(
        "[server]\nclient_timeout_secs = 1\n\n{}",
        openai_llm(mock.addr, "")
    ));
    let mut stream = connect(server.addr);
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let body = r#"{"content": "slow"}"#;
    let request = format!(
        "POST /v1/chats/kept/messages HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // Each answer takes 2.5 s, longer than the 1 s timeout; the connection stays usable.
    for round in 0..2 {
        stream.write_all(request.as_bytes()).unwrap();
        let (status, text) = read_one_response(&mut stream);
        assert_eq!(status, 200, "round {round}: {text}");
    }
    // Idle after its last answer, it is closed after about the timeout.
    let started = Instant::now();
    let rest = read_until_closed(&mut stream, Duration::from_secs(10)).expect("closed");
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn connections_past_the_cap_get_503_at_once_and_the_rest_are_served() {
    let work = Workdir::new();
    let server = work.spawn("[server]\nmax_connections = 8\n");
    let addr = server.addr;
    let held: Vec<TcpStream> = (0..8).map(|_| connect(addr)).collect();
    assert!(eventually(Duration::from_secs(10), || threads_named(
        server.pid(),
        "http-conn"
    ) >= 8));

    let mut ninth = connect(addr);
    let data = read_until_closed(&mut ninth, Duration::from_secs(5)).expect("closed at once");
    let text = String::from_utf8_lossy(&data);
    assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
    assert!(text.contains(r#""type":"overloaded""#), "{text}");
    assert!(text.contains("Retry-After: 1"), "{text}");

    drop(held);
    assert!(eventually(Duration::from_secs(5), || {
        TcpStream::connect(addr)
            .ok()
            .and_then(|mut s| {
                s.write_all(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
                    .ok()?;
                read_until_closed(&mut s, Duration::from_secs(5))
            })
            .is_some_and(|d| d.starts_with(b"HTTP/1.1 200 "))
    }));
    let metrics = get(addr, "/metrics").text();
    assert!(
        metrics.contains(r#"chatpool_rejected_total{reason="too_many_connections"} 1"#),
        "{metrics}"
    );
}

/// A request whose head is `head` (CRLF line ends added, `Connection: close` and the blank line
/// too) and whose body follows as given.
fn req(head: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = head.replace('\n', "\r\n").into_bytes();
    bytes.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    bytes.extend_from_slice(body);
    bytes
}

/// A POST of `body` to a chat, with its Content-Length.
fn post_body(body: &[u8]) -> Vec<u8> {
    req(
        &format!(
            "POST /v1/chats/corpus/messages HTTP/1.1\nContent-Length: {}",
            body.len()
        ),
        body,
    )
}

/// A POST of `body` to the OpenAI front door.
fn completion_body(body: &str) -> Vec<u8> {
    req(
        &format!(
            "POST /v1/chat/completions HTTP/1.1\nContent-Length: {}",
            body.len()
        ),
        body.as_bytes(),
    )
}

fn get_path(path: &str) -> Vec<u8> {
    req(&format!("GET {path} HTTP/1.1"), b"")
}

#[test]
fn a_corpus_of_malformed_requests_gets_the_contracts_errors() {
    let work = Workdir::new();
    let server = work.serve("[server]\nmax_body_bytes = 4096\nclient_timeout_secs = 2\n");
    let addr = server.addr;
    let big = vec![b'a'; 5000];
    let nested = format!("{}{}", "[".repeat(2000), "]".repeat(2000));
    let long_name = "c".repeat(129);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        // Bodies.
        ("empty body", post_body(b""), 400, "invalid_json"),
        ("blank body", post_body(b"   \n "), 400, "invalid_json"),
        ("not JSON", post_body(b"hello"), 400, "invalid_json"),
        (
            "cut-off JSON",
            post_body(br#"{"content": "#),
            400,
            "invalid_json",
        ),
        (
            "invalid UTF-8",
            post_body(b"{\"content\": \"\xff\xfe\"}"),
            400,
            "invalid_json",
        ),
        ("NUL bytes", post_body(b"\0\0\0\0"), 400, "invalid_json"),
        (
            "nesting past any sane depth",
            post_body(nested.as_bytes()),
            400,
            "invalid_json",
        ),
        (
            "a number past f64",
            post_body(br#"{"content":"x","temperature":1e999}"#),
            400,
            "invalid_json",
        ),
        ("array", post_body(b"[1, 2]"), 400, "invalid_request"),
        ("string", post_body(br#""content""#), 400, "invalid_request"),
        ("null", post_body(b"null"), 400, "invalid_request"),
        ("no content", post_body(b"{}"), 400, "invalid_request"),
        (
            "content a number",
            post_body(br#"{"content": 5}"#),
            400,
            "invalid_request",
        ),
        (
            "content an object",
            post_body(br#"{"content": {"a": 1}}"#),
            400,
            "invalid_request",
        ),
        (
            "empty content",
            post_body(br#"{"content": ""}"#),
            400,
            "invalid_request",
        ),
        (
            "stream a string",
            post_body(br#"{"content":"x","stream":"yes"}"#),
            400,
            "invalid_request",
        ),
        (
            "temperature a string",
            post_body(br#"{"content":"x","temperature":"hot"}"#),
            400,
            "invalid_request",
        ),
        (
            "temperature out of range",
            post_body(br#"{"content":"x","temperature":7}"#),
            400,
            "invalid_request",
        ),
        (
            "max_tokens negative",
            post_body(br#"{"content":"x","max_tokens":-1}"#),
            400,
            "invalid_request",
        ),
        (
            "max_tokens a fraction",
            post_body(br#"{"content":"x","max_tokens":1.5}"#),
            400,
            "invalid_request",
        ),
        (
            "unknown field",
            post_body(br#"{"content":"x","role":"system"}"#),
            400,
            "invalid_request",
        ),
        (
            "bad Idempotency-Key",
            req(
                "POST /v1/chats/corpus/messages HTTP/1.1\nIdempotency-Key: \nContent-Length: 15",
                br#"{"content":"x"}"#,
            ),
            400,
            "invalid_request",
        ),
        (
            "body over the limit",
            post_body(&big),
            413,
            "payload_too_large",
        ),
        (
            "chunked body over the limit",
            req(
                "POST /v1/chats/corpus/messages HTTP/1.1\nTransfer-Encoding: chunked",
                format!("1388\r\n{}\r\n0\r\n\r\n", "a".repeat(5000)).as_bytes(),
            ),
            413,
            "payload_too_large",
        ),
        (
            "Content-Length over the limit, nothing sent",
            req(
                "POST /v1/chats/corpus/messages HTTP/1.1\nContent-Length: 999999999999",
                b"",
            ),
            413,
            "payload_too_large",
        ),
        (
            "malformed chunk size",
            req(
                "POST /v1/chats/corpus/messages HTTP/1.1\nTransfer-Encoding: chunked",
                b"zz\r\nhello\r\n0\r\n\r\n",
            ),
            400,
            "invalid_request",
        ),
        (
            "body shorter than its Content-Length",
            req(
                "POST /v1/chats/corpus/messages HTTP/1.1\nContent-Length: 100",
                br#"{"content":"x"}"#,
            ),
            408,
            "request_timeout",
        ),
        (
            "unknown Expect",
            req(
                "POST /v1/chats/corpus/messages HTTP/1.1\nExpect: teapot\nContent-Length: 15",
                br#"{"content":"x"}"#,
            ),
            417,
            "expectation_failed",
        ),
        // Methods and paths.
        (
            "PUT on messages",
            req(
                "PUT /v1/chats/corpus/messages HTTP/1.1\nContent-Length: 0",
                b"",
            ),
            405,
            "method_not_allowed",
        ),
        (
            "made-up method",
            req("BREW /v1/chats HTTP/1.1", b""),
            405,
            "method_not_allowed",
        ),
        (
            "no such route",
            get_path("/v2/everything"),
            404,
            "not_found",
        ),
        ("root", get_path("/"), 404, "not_found"),
        (
            "asterisk-form",
            req("OPTIONS * HTTP/1.1", b""),
            404,
            "not_found",
        ),
        (
            "unknown chat",
            get_path("/v1/chats/nobody-here/messages"),
            404,
            "not_found",
        ),
        (
            "delete unknown chat",
            req("DELETE /v1/chats/nobody-here HTTP/1.1", b""),
            404,
            "not_found",
        ),
        (
            "space in chat id",
            get_path("/v1/chats/a%20b/messages"),
            400,
            "invalid_request",
        ),
        (
            "chat id of invalid UTF-8",
            get_path("/v1/chats/%ff%fe/messages"),
            400,
            "invalid_request",
        ),
        (
            "chat id of 129 characters",
            get_path(&format!("/v1/chats/{long_name}/messages")),
            400,
            "invalid_request",
        ),
        (
            "limit not a number",
            get_path("/v1/chats/corpus/messages?limit=abc"),
            400,
            "invalid_request",
        ),
        (
            "limit 0",
            get_path("/v1/chats/corpus/messages?limit=0"),
            400,
            "invalid_request",
        ),
        (
            "limit 501",
            get_path("/v1/chats/corpus/messages?limit=501"),
            400,
            "invalid_request",
        ),
        (
            "limit past u64",
            get_path("/v1/chats?limit=99999999999999999999999"),
            400,
            "invalid_request",
        ),
        (
            "before negative",
            get_path("/v1/chats/corpus/messages?before=-5"),
            400,
            "invalid_request",
        ),
        (
            "bad X-Chat-Id",
            req(
                "POST /v1/chat/completions HTTP/1.1\nX-Chat-Id: no/slashes\nContent-Length: 2",
                b"{}",
            ),
            400,
            "invalid_request",
        ),
        (
            "OpenAI body without messages",
            completion_body(r#"{"model":"m"}"#),
            400,
            "invalid_request",
        ),
        (
            "OpenAI messages not a list",
            completion_body(r#"{"messages":"hi"}"#),
            400,
            "invalid_request",
        ),
        (
            "OpenAI message without role",
            completion_body(r#"{"messages":[{"content":"hi"}]}"#),
            400,
            "invalid_request",
        ),
        (
            "OpenAI body not JSON",
            completion_body("{{{{"),
            400,
            "invalid_json",
        ),
        // The request head itself.
        (
            "garbage request line",
            b"HELLO\r\n\r\n".to_vec(),
            400,
            "invalid_request",
        ),
        (
            "unknown HTTP version",
            b"GET /healthz HTTP/9.9\r\n\r\n".to_vec(),
            400,
            "invalid_request",
        ),
        (
            "HTTP/2.0 request line",
            b"GET /healthz HTTP/2.0\r\n\r\n".to_vec(),
            505,
            "http_version_not_supported",
        ),
        (
            "non-ASCII request line",
            "GET /v1/chats/ü/messages HTTP/1.1\r\n\r\n"
                .as_bytes()
                .to_vec(),
            400,
            "invalid_request",
        ),
        (
            "header without a colon",
            req("GET /healthz HTTP/1.1\nThis is not a header", b""),
            400,
            "invalid_request",
        ),
        (
            "request line of 20 KiB",
            get_path(&format!("/v1/chats/{}", "x".repeat(20 << 10))),
            414,
            "uri_too_long",
        ),
        (
            "one header of 20 KiB",
            req(
                &format!("GET /healthz HTTP/1.1\nX-Big: {}", "y".repeat(20 << 10)),
                b"",
            ),
            431,
            "headers_too_large",
        ),
        (
            "two thousand small headers",
            req(
                &format!(
                    "GET /healthz HTTP/1.1{}",
                    (0..2000)
                        .map(|i| format!("\nX-H{i}: v"))
                        .collect::<String>()
                ),
                b"",
            ),
            431,
            "headers_too_large",
        ),
        (
            "half a request line, then silence",
            b"GET /v1/chats/corpus/mess".to_vec(),
            408,
            "request_timeout",
        ),
        (
            "headers never finished",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec(),
            408,
            "request_timeout",
        ),
    ];
    assert!(cases.len() >= 40, "{} cases", cases.len());

    let mut wrong = Vec::new();
    for (name, bytes, status, kind) in &cases {
        let mut s = connect(addr);
        s.write_all(bytes).unwrap();
        let data = read_until_closed(&mut s, Duration::from_secs(15))
            .unwrap_or_else(|| panic!("{name}: no answer and no close"));
        let text = String::from_utf8_lossy(&data).into_owned();
        let got_status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        let got_kind = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"]["type"].as_str().map(str::to_string))
            .unwrap_or_default();
        if (got_status, got_kind.as_str()) != (*status, *kind) {
            wrong.push(format!(
                "{name}: expected {status} {kind}, got {got_status} {got_kind}: {}",
                text.chars().take(300).collect::<String>()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // Still serving, and none of it left a trace in history.
    let ok = send(addr, "corpus", "a well-formed message");
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(get(addr, "/healthz").status, 200);
    let history = get(addr, "/v1/chats/corpus/messages").json();
    assert_eq!(
        history["messages"].as_array().unwrap().len(),
        2,
        "{history}"
    );
}

#[test]
fn a_database_locked_by_another_process_is_503_then_heals() {
    let work = Workdir::new();
    let server = work.spawn("[server]\nmax_concurrent_requests = 2\n");
    let addr = server.addr;
    assert_eq!(send(addr, "locked", "before").status, 200);

    let other = rusqlite::Connection::open(work.db()).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = Instant::now();
    let refused = send(addr, "locked", "during");
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.error_type(), "storage_unavailable");
    assert_eq!(refused.header("Retry-After"), Some("1"));
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "refused before the busy timeout: {:?}",
        started.elapsed()
    );
    let id = refused.header("X-Request-Id").unwrap().to_string();
    assert!(
        server.log_shows("the database is locked"),
        "{}",
        server.log()
    );
    assert!(server
        .log()
        .lines()
        .any(|l| l.contains(&id) && l.contains("locked")));
    // Reads go on beside the lock (WAL).
    assert_eq!(get(addr, "/v1/chats/locked/messages").status, 200);
    assert_eq!(get(addr, "/readyz").status, 200);

    other.execute_batch("COMMIT").unwrap();
    drop(other);
    let healed = send(addr, "locked", "after");
    assert_eq!(healed.status, 200, "{}", healed.text());
    let contents: Vec<_> = stored_messages(&work.db(), "locked")
        .into_iter()
        .map(|(_, _, content)| content)
        .collect();
    assert_eq!(
        contents,
        ["before", "You said: before", "after", "You said: after"]
    );
    assert_eq!(get(addr, "/status").json()["workers"], 2);
    assert_eq!(threads_named(server.pid(), "worker-"), 2);
}

#[test]
fn a_corrupt_or_foreign_database_is_refused_and_left_alone() {
    let work = Workdir::new();
    let config = work.config("");
    let config = config.to_str().unwrap();
    let foreign = {
        let path = work.dir.path().join("foreign.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE users (name TEXT); INSERT INTO users VALUES ('ada');")
            .unwrap();
        drop(conn);
        std::fs::read(&path).unwrap()
    };
    let corrupt = b"this is not SQLite at all, just some text".repeat(200);
    for (what, bytes, needle) in [
        ("corrupt", corrupt, "not a database"),
        ("foreign", foreign, "not a chatpool database"),
    ] {
        std::fs::write(work.db(), &bytes).unwrap();
        let out = std::process::Command::new(BIN)
            .args(["--config", config, "--listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{what}: {stderr}");
        assert!(stderr.contains(needle), "{what}: {stderr}");
        assert!(
            stderr.contains(work.db().to_str().unwrap()),
            "{what}: {stderr}"
        );
        assert_eq!(
            std::fs::read(work.db()).unwrap(),
            bytes,
            "{what} was changed"
        );
    }
}

#[test]
fn a_full_disk_is_503_with_a_clear_log_line_and_heals_when_space_is_freed() {
    // A small tmpfs of our own, in a mount namespace only chatpool sees; the test reaches into
    // it through /proc/PID/root. Without mount namespaces (no CAP_SYS_ADMIN) there is no disk
    // to fill, and the test says so.
    let probe = std::process::Command::new("unshare")
        .args(["-m", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: no mount namespaces here (unshare -m failed)");
        return;
    }
    let work = Workdir::new();
    let disk = work.dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let db = disk.join("chat.db");
    let config = work.dir.path().join("full.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nmax_concurrent_requests = 2\n\n[storage]\npath = {:?}\n",
            db.to_str().unwrap()
        ),
    )
    .unwrap();
    let script =
        r#"mount -t tmpfs -o size=24m tmpfs "$1" && exec "$2" --config "$3" --listen 127.0.0.1:0"#;
    let server = Proc::start_program(
        "unshare",
        &[
            "-m",
            "sh",
            "-c",
            script,
            "sh",
            disk.to_str().unwrap(),
            BIN,
            config.to_str().unwrap(),
        ],
        &[],
        "listening on http://",
    );
    let addr = server.addr;
    assert_eq!(send(addr, "full", "before").status, 200);

    // Leave about 64 KB free, less than the next exchange needs.
    let inside =
        PathBuf::from(format!("/proc/{}/root", server.pid())).join(disk.strip_prefix("/").unwrap());
    let filler = inside.join("filler");
    let statvfs = |path: &std::path::Path| {
        let out = std::process::Command::new("stat")
            .args(["-f", "-c", "%a %S", path.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let mut parts = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
        parts.next().unwrap() * parts.next().unwrap()
    };
    let free = statvfs(&inside);
    std::fs::write(&filler, vec![0u8; (free - (64 << 10)) as usize]).unwrap();

    let big = "x".repeat(60_000);
    let refused = send(addr, "full", &big);
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.error_type(), "storage_unavailable");
    let id = refused.header("X-Request-Id").unwrap().to_string();
    assert!(server.log_shows("disk is full"), "{}", server.log());
    assert!(server
        .log()
        .lines()
        .any(|l| l.contains(&id) && l.contains("full")));

    std::fs::remove_file(&filler).unwrap();
    let healed = send(addr, "full", &big);
    assert_eq!(healed.status, 200, "{}", healed.text());
    let history = get(addr, "/v1/chats/full/messages").json();
    let contents: Vec<_> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap().len())
        .collect();
    assert_eq!(contents.len(), 4, "{history}");
    assert_eq!(contents[2], 60_000);
    assert_eq!(threads_named(server.pid(), "worker-"), 2);
}

#[test]
fn running_out_of_file_descriptors_does_not_stop_the_accept_loop() {
    let work = Workdir::new();
    let config = work.config("[server]\nmax_concurrent_requests = 2\n");
    // A hard limit of 64 open files, far below what 4,096 connections need.
    let server = Proc::start_program(
        "sh",
        &[
            "-c",
            r#"ulimit -n 64 && exec "$0" --config "$1" --listen 127.0.0.1:0"#,
            BIN,
            config.to_str().unwrap(),
        ],
        &[],
        "listening on http://",
    );
    assert!(server.log_shows("but the limit is 64"), "{}", server.log());
    let addr = server.addr;
    let crowd: Vec<TcpStream> = (0..100).map(|_| connect(addr)).collect();
    assert!(
        server.log_shows("Error accepting new client"),
        "{}",
        server.log()
    );
    drop(crowd);
    assert!(
        eventually(Duration::from_secs(10), || send(
            addr,
            "after",
            "still accepting?"
        )
        .status
            == 200),
        "{}",
        server.log()
    );
}
