//! Tenants sharing the pool: `max_concurrent`, `requests_per_minute` and `tokens_per_day`
//! (429 `rate_limited` with `Retry-After`), and the usage they are billed from.

use crate::support::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A tenant's token (from `chatpool token`) and its `[auth]` entry.
fn token(name: &str) -> (String, String) {
    let out = Command::new(BIN).args(["token", name]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    (lines[0].to_string(), lines[lines.len() - 1].to_string())
}

/// Sends a message as the tenant whose token this is.
fn send_as(addr: std::net::SocketAddr, token: &str, chat: &str, content: &str) -> Response {
    let body = json!({ "content": content }).to_string();
    let bearer = format!("Bearer {token}");
    let path = format!("/v1/chats/{chat}/messages");
    request(
        addr,
        "POST",
        &path,
        Some(&body),
        &[("Authorization", &bearer)],
    )
}

fn get_as(addr: std::net::SocketAddr, token: &str, path: &str) -> Response {
    let bearer = format!("Bearer {token}");
    request(addr, "GET", path, None, &[("Authorization", &bearer)])
}

fn retry_after(response: &Response) -> u64 {
    response
        .header("Retry-After")
        .unwrap_or_else(|| panic!("no Retry-After on a {}", response.status))
        .parse()
        .unwrap()
}

/// An OpenAI-compatible upstream answering each call after `latency`, many at once, counting
/// the calls in progress for each tenant (the first word of the last message names it).
struct CountingUpstream {
    addr: std::net::SocketAddr,
    server: Arc<tiny_http::Server>,
    counts: Arc<Mutex<HashMap<String, (usize, usize)>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl CountingUpstream {
    fn start(latency: Duration, threads: usize) -> CountingUpstream {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let addr = server.server_addr().to_ip().unwrap();
        let counts = Arc::new(Mutex::new(HashMap::<String, (usize, usize)>::new()));
        let threads = (0..threads)
            .map(|_| {
                let (server, counts) = (Arc::clone(&server), Arc::clone(&counts));
                thread::spawn(move || {
                    while let Ok(mut request) = server.recv() {
                        let mut body = String::new();
                        request.as_reader().read_to_string(&mut body).unwrap();
                        let body: Value = serde_json::from_str(&body).unwrap();
                        let last = body["messages"].as_array().unwrap().last().unwrap().clone();
                        let tenant = last["content"].as_str().unwrap();
                        let tenant = tenant.split(' ').next().unwrap().to_string();
                        {
                            let mut counts = counts.lock().unwrap();
                            let (now, max) = counts.entry(tenant.clone()).or_default();
                            *now += 1;
                            *max = (*max).max(*now);
                        }
                        thread::sleep(latency);
                        counts.lock().unwrap().get_mut(&tenant).unwrap().0 -= 1;
                        let reply = tiny_http::Response::from_string(completion("ok"));
                        let _ = request.respond(reply);
                    }
                })
            })
            .collect();
        CountingUpstream {
            addr,
            server,
            counts,
            threads,
        }
    }

    /// (calls in progress now, most ever at once) for a tenant.
    fn counts(&self, tenant: &str) -> (usize, usize) {
        self.counts
            .lock()
            .unwrap()
            .get(tenant)
            .copied()
            .unwrap_or_default()
    }
}

impl Drop for CountingUpstream {
    fn drop(&mut self) {
        for _ in &self.threads {
            self.server.unblock();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A client connection kept open across requests, as a load generator's is.
struct KeptAlive {
    reader: std::io::BufReader<std::net::TcpStream>,
}

impl KeptAlive {
    fn connect(addr: std::net::SocketAddr) -> KeptAlive {
        let stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        KeptAlive {
            reader: std::io::BufReader::new(stream),
        }
    }

    /// Sends a POST and reads its answer, whose length chatpool always states.
    fn post(&mut self, path: &str, body: &str, bearer: &str) -> Response {
        use std::io::{BufRead, Read, Write};
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {bearer}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.reader.get_mut().write_all(head.as_bytes()).unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        let status = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).unwrap();
            match line.trim_end().split_once(':') {
                Some((k, v)) => headers.push((k.trim().to_string(), v.trim().to_string())),
                None => break,
            }
        }
        let response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        let length: usize = response.header("Content-Length").unwrap().parse().unwrap();
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).unwrap();
        Response { body, ..response }
    }
}

#[test]
fn a_flooding_tenant_gets_429s_past_its_share_while_another_gets_only_200s() {
    const LLM: Duration = Duration::from_millis(500);
    let upstream = CountingUpstream::start(LLM, 16);
    let (token_a, entry_a) = token("a");
    let (token_b, entry_b) = token("b");
    let work = Workdir::new();
    let server = work.serve(&format!(
        "[server]\nmax_concurrent_requests = 8\n\n[tenants.a]\nmax_concurrent = 4\n\n\
         [auth]\ntokens = [{entry_a}, {entry_b}]\n\n{}",
        openai_llm(upstream.addr, "max_retries = 0")
    ));
    let addr = server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    // Tenant A: 64 kept-alive connections, each sending again as soon as it has its answer
    // (a moment after a 429, so the flood does not starve the machine the test runs on).
    let flood: Vec<_> = (0..64)
        .map(|i| {
            let (stop, token) = (Arc::clone(&stop), token_a.clone());
            thread::spawn(move || {
                let mut answers = Vec::new();
                let mut connection = KeptAlive::connect(addr);
                let path = format!("/v1/chats/a-{i}/messages");
                let body = json!({"content": "a flood"}).to_string();
                let bearer = format!("Bearer {token}");
                while !stop.load(Ordering::SeqCst) {
                    let r = connection.post(&path, &body, &bearer);
                    if r.status == 429 {
                        assert_eq!(r.error_type(), "rate_limited");
                        answers.push((429, retry_after(&r)));
                        thread::sleep(Duration::from_millis(100));
                    } else {
                        answers.push((r.status, 0));
                    }
                }
                answers
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(10), || upstream.counts("a").0 == 4),
        "tenant A never had 4 calls in progress"
    );
    // Tenant B: 4 at a time, 5 rounds each.
    let b: Vec<_> = (0..4)
        .map(|i| {
            let token = token_b.clone();
            thread::spawn(move || {
                (0..5)
                    .map(|n| {
                        let started = Instant::now();
                        let r = send_as(addr, &token, &format!("b-{i}"), &format!("b {n}"));
                        (r.status, started.elapsed())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut b: Vec<(u16, Duration)> = b.into_iter().flat_map(|t| t.join().unwrap()).collect();
    stop.store(true, Ordering::SeqCst);
    let a: Vec<(u16, u64)> = flood.into_iter().flat_map(|t| t.join().unwrap()).collect();

    assert!(b.iter().all(|(status, _)| *status == 200), "{b:?}");
    b.sort_by_key(|(_, took)| *took);
    let p99 = b[(b.len() * 99).div_ceil(100) - 1].1;
    assert!(p99 < LLM * 3 / 2, "tenant B's p99 was {p99:?}: {b:?}");
    let limited = a.iter().filter(|(status, _)| *status == 429).count();
    assert!(limited > 0, "tenant A got no 429");
    assert!(
        a.iter().any(|(status, _)| *status == 200),
        "tenant A got no 200"
    );
    assert!(
        a.iter()
            .all(|&(status, wait)| status == 200 || (status == 429 && wait >= 1)),
        "tenant A got something other than 200 or 429 with Retry-After"
    );
    assert_eq!(upstream.counts("a").1, 4, "tenant A's most calls at once");
    assert!(upstream.counts("b").1 <= 4);
}

#[test]
fn the_sixth_request_in_a_minute_is_429_until_the_window_ends_for_that_tenant_only() {
    let (alice, entry_a) = token("alice");
    let (bob, entry_b) = token("bob");
    let work = Workdir::new();
    let server = work.serve(&format!(
        "[tenants.alice]\nrequests_per_minute = 5\n\n[metrics]\nper_tenant = true\n\n\
         [auth]\ntokens = [{entry_a}, {entry_b}]\n"
    ));
    let started = Instant::now();
    for n in 0..5 {
        assert_eq!(
            send_as(server.addr, &alice, "c", &format!("m{n}")).status,
            200
        );
    }
    let refused = send_as(server.addr, &alice, "c", "one too many");
    assert_eq!(refused.status, 429);
    assert_eq!(refused.error_type(), "rate_limited");
    let wait = retry_after(&refused);
    let rest = 60 - started.elapsed().as_secs();
    assert!(
        (rest.saturating_sub(1)..=60).contains(&wait),
        "Retry-After {wait} s, the window's rest {rest} s"
    );
    assert!(refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("requests_per_minute"));
    // Only alice's requests to the LLM are limited.
    assert_eq!(get_as(server.addr, &alice, "/v1/chats").status, 200);
    assert_eq!(send_as(server.addr, &bob, "c", "hi").status, 200);
    let metrics = get(server.addr, "/metrics").text();
    for line in [
        "chatpool_rejected_total{reason=\"rate_limited\"} 1",
        "chatpool_tenant_requests_total{outcome=\"rate_limited\",tenant=\"alice\"} 1",
        "chatpool_tenant_requests_total{outcome=\"admitted\",tenant=\"alice\"} 6",
        "chatpool_tenant_requests_total{outcome=\"admitted\",tenant=\"bob\"} 1",
    ] {
        assert!(metrics.contains(line), "no {line} in\n{metrics}");
    }
    assert!(metrics.contains("chatpool_tenant_tokens_total{kind=\"prompt\",tenant=\"bob\"}"));
}

/// Seconds from now to the next 00:00 UTC.
fn seconds_to_midnight() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    86_400 - now.as_secs() % 86_400
}

#[test]
fn a_day_s_token_budget_counts_streamed_replies_and_survives_a_restart() {
    // Every call uses 7 + 2 tokens, streamed or not; the budget is passed by the third.
    let upstream = upstream_streaming(sse_piece("Hi") + &sse_end("stop"), completion("Hi"));
    let work = Workdir::new();
    let config = format!(
        "[limits]\ntokens_per_day = 20\n\n{}",
        openai_llm(upstream.addr, "")
    );
    let mut server = work.spawn(&config);
    assert_eq!(send(server.addr, "c", "one").status, 200);
    // A streamed relay whose client did not ask for usage: counted, and not shown to it.
    let relay =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "two"}]});
    let mut events =
        EventReader::post(server.addr, "/v1/chat/completions", &relay.to_string(), &[]);
    let (chunks, done) = openai_chunks(&mut events);
    assert!(
        done && chunks.iter().all(|c| c.get("usage").is_none()),
        "{chunks:?}"
    );
    // At 18 of 20 a request still starts; a native stream's usage counts too.
    let stream = json!({"content": "three", "stream": true}).to_string();
    let mut events = EventReader::post(server.addr, "/v1/chats/c/messages", &stream, &[]);
    assert_eq!(native_deltas(&mut events).1.as_deref(), Some("done"));
    let refused = send(server.addr, "c", "four");
    assert_eq!(refused.status, 429);
    assert_eq!(refused.error_type(), "rate_limited");
    let wait = retry_after(&refused);
    let midnight = seconds_to_midnight();
    assert!(
        wait.abs_diff(midnight) <= 2,
        "Retry-After {wait}, midnight in {midnight}"
    );
    let refused = post(server.addr, "/v1/chat/completions", &relay.to_string());
    assert_eq!(refused.status, 429);
    assert_eq!(upstream.seen().len(), 3);
    let total = &get(server.addr, "/v1/usage").json()["data"][0];
    assert_eq!(total["total_tokens"], 27);

    server.signal(libc::SIGTERM);
    assert!(server.wait(Duration::from_secs(10)).is_some());
    let server = work.spawn(&config);
    let refused = send(server.addr, "c", "five");
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(upstream.seen().len(), 3);
}

#[test]
fn usage_sums_the_upstream_s_counts_per_day_and_model_for_the_calling_tenant_only() {
    // Each call reports its own counts and one of two models; the upstream keeps the truth.
    let truth = Arc::new(Mutex::new(Vec::<(String, String, u64, u64)>::new()));
    let log = Arc::clone(&truth);
    let upstream = FakeUpstream::start(Box::new(move |n, seen| {
        let messages = seen.body["messages"].as_array().unwrap();
        let content = messages.last().unwrap()["content"].as_str().unwrap();
        let tenant = content.split(' ').next().unwrap().to_string();
        let model = if n % 3 == 0 { "m-large" } else { "m-small" };
        let (prompt, completion) = (10 + n as u64, 1 + 2 * n as u64);
        log.lock()
            .unwrap()
            .push((tenant, model.to_string(), prompt, completion));
        let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion});
        if seen.body["stream"] == true {
            let chunk = |choices: Value| {
                json!({"id": "x", "object": "chat.completion.chunk", "model": model,
                       "choices": choices})
            };
            let piece = chunk(json!([{"index": 0, "delta": {"content": "x"}}]));
            let end = chunk(json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]));
            let mut usage_chunk = chunk(json!([]));
            usage_chunk["usage"] = usage;
            let usage = usage_chunk;
            (
                200,
                format!("data: {piece}\n\ndata: {end}\n\ndata: {usage}\n\ndata: [DONE]\n\n"),
            )
        } else {
            let body = json!({"id": "x", "object": "chat.completion", "model": model,
                "usage": usage, "choices": [{"index": 0,
                "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}]});
            (200, body.to_string())
        }
    }));
    let (alice, entry_a) = token("alice");
    let (bob, entry_b) = token("bob");
    let work = Workdir::new();
    let config = format!(
        "[auth]\ntokens = [{entry_a}, {entry_b}]\n\n{}",
        openai_llm(upstream.addr, "")
    );
    let server = work.serve(&config);
    let bearer_a = format!("Bearer {alice}");
    for n in 0..4 {
        assert_eq!(
            send_as(server.addr, &alice, "c1", &format!("alice {n}")).status,
            200
        );
        assert_eq!(
            send_as(server.addr, &bob, "c1", &format!("bob {n}")).status,
            200
        );
    }
    let relay = json!({"model": "m", "messages": [{"role": "user", "content": "alice relayed"}]});
    let auth = [("Authorization", bearer_a.as_str())];
    let r = request(
        server.addr,
        "POST",
        "/v1/chat/completions",
        Some(&relay.to_string()),
        &auth,
    );
    assert_eq!(r.status, 200);
    let stream = json!({"content": "alice streamed", "stream": true}).to_string();
    let mut events = EventReader::post(server.addr, "/v1/chats/c2/messages", &stream, &auth);
    assert_eq!(native_deltas(&mut events).1.as_deref(), Some("done"));
    // A deleted chat's tokens were still spent.
    let r = request(server.addr, "DELETE", "/v1/chats/c2", None, &auth);
    assert_eq!(r.status, 204);

    let truth = truth.lock().unwrap().clone();
    let today = get_as(server.addr, &alice, "/v1/usage?group_by=day").json()["data"][0]["day"]
        .as_str()
        .unwrap()
        .to_string();
    for (name, token) in [("alice", &alice), ("bob", &bob)] {
        let mine: Vec<_> = truth.iter().filter(|t| t.0 == name).collect();
        let sums = |model: Option<&str>| {
            let rows: Vec<_> = mine
                .iter()
                .filter(|t| model.is_none_or(|m| t.1 == m))
                .collect();
            let (p, c) = rows.iter().fold((0, 0), |(p, c), t| (p + t.2, c + t.3));
            json!({"requests": rows.len(), "prompt_tokens": p, "completion_tokens": c,
                   "total_tokens": p + c})
        };
        let with = |key: &str, value: &str, mut row: Value| {
            let mut keyed = serde_json::Map::new();
            keyed.insert(key.into(), json!(value));
            keyed.append(row.as_object_mut().unwrap());
            Value::Object(keyed)
        };
        let by_model = get_as(server.addr, token, "/v1/usage?group_by=model").json();
        let expected = json!({"object": "list", "data": [
            with("model", "m-large", sums(Some("m-large"))),
            with("model", "m-small", sums(Some("m-small"))),
        ]});
        assert_eq!(by_model, expected, "{name}");
        let path = format!("/v1/usage?from={today}&to={today}&group_by=day");
        let by_day = get_as(server.addr, token, &path).json();
        assert_eq!(
            by_day["data"],
            json!([with("day", &today, sums(None))]),
            "{name}"
        );
        let total = get_as(server.addr, token, "/v1/usage").json();
        assert_eq!(total["data"], json!([sums(None)]), "{name}");
    }
    let yesterday_only = get_as(server.addr, &alice, "/v1/usage?to=2000-01-01").json();
    assert_eq!(yesterday_only["data"][0]["requests"], 0);

    // The operator's view: every tenant, from the database file.
    let cfg = work.config(&config);
    let all = operator_usage(&cfg);
    let rows = all["data"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{all}");
    for (row, name) in rows.iter().zip(["alice", "bob"]) {
        let mine: Vec<_> = truth.iter().filter(|t| t.0 == name).collect();
        let prompt: u64 = mine.iter().map(|t| t.2).sum();
        assert_eq!(row["tenant"], name);
        assert_eq!(row["requests"], mine.len());
        assert_eq!(row["prompt_tokens"], prompt);
    }
    merged_twice_doubles(all.to_string().as_bytes(), rows);
    let out = Command::new(BIN)
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "usage",
            "--tenant",
            "bob",
        ])
        .args(["--group-by", "model"])
        .output()
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("TENANT  MODEL"), "{table}");
    assert!(
        lines[1].starts_with("bob") && lines[1].contains("m-large"),
        "{table}"
    );
}

/// A stateless relay's body: nothing stored but its usage.
fn relay_body() -> String {
    json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).to_string()
}

/// `chatpool usage --json` against `config`'s database, as an operator runs it.
fn operator_usage(config: &std::path::Path) -> Value {
    let out = Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), "usage", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// (requests, total tokens) of a usage report's first row, zeros when it has none.
fn first_row(report: &Value) -> (u64, u64) {
    let row = &report["data"][0];
    let count = |key: &str| row[key].as_u64().unwrap_or(0);
    (count("requests"), count("total_tokens"))
}

/// (requests, total tokens) in the database's usage table, read as a file.
fn stored_usage(db: &std::path::Path) -> (u64, u64) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(
        "SELECT coalesce(sum(requests), 0), coalesce(sum(prompt_tokens + completion_tokens), 0)
         FROM usage",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
    .unwrap()
}

#[test]
fn a_chat_message_s_200_means_its_usage_is_stored_too() {
    // The writer stores the tally before the exchanges it commits, not at its next tick.
    let upstream = FakeUpstream::replying("x");
    let work = Workdir::new();
    let server = work.serve(&openai_llm(upstream.addr, ""));
    for n in 1..=10 {
        let sent = send(server.addr, "c", &format!("message {n}"));
        assert_eq!(sent.status, 200, "{}", sent.text());
        assert_eq!(stored_usage(&work.db()), (n, 9 * n), "after message {n}");
    }
}

#[test]
fn relayed_calls_usage_is_in_v1_usage_the_moment_they_are_answered() {
    // A relay's usage waits in the writer's tally for its next tick (100 ms); /v1/usage asked
    // right after each 200 must count it all the same, every time.
    let upstream = FakeUpstream::replying("x");
    let work = Workdir::new();
    let server = work.serve(&openai_llm(upstream.addr, ""));
    for n in 1..=30 {
        let relayed = post(server.addr, "/v1/chat/completions", &relay_body());
        assert_eq!(relayed.status, 200, "{}", relayed.text());
        let report = get(server.addr, "/v1/usage").json();
        assert_eq!(first_row(&report), (n, 9 * n), "after relay {n}: {report}");
    }
}

#[test]
fn a_running_server_stores_relayed_usage_on_its_own_within_a_tick() {
    // Nothing but relays, and no /v1/usage to ask for a store: the writer's idle tick stores
    // their usage, where another process reads it.
    let upstream = FakeUpstream::replying("x");
    let work = Workdir::new();
    let config = openai_llm(upstream.addr, "");
    let server = work.serve(&config);
    for _ in 0..3 {
        assert_eq!(
            post(server.addr, "/v1/chat/completions", &relay_body()).status,
            200
        );
    }
    let cfg = work.config(&config);
    let mut seen = (0, 0);
    let stored = eventually(Duration::from_secs(5), || {
        seen = first_row(&operator_usage(&cfg));
        seen == (3, 27)
    });
    assert!(stored, "the database holds {seen:?}");
}

/// An upstream that answers every call but those asking to "hang", which it never answers.
fn answer_all_but_hang(body: &str) -> Answer {
    if body.contains("hang") {
        Answer::Hang
    } else {
        Answer::Keep(http_200(&completion("x")))
    }
}

/// Sends a relay the upstream never answers and returns once a worker holds it; the
/// connection returned keeps it held.
fn hold_a_worker_on_a_hanging_relay(addr: std::net::SocketAddr) -> std::net::TcpStream {
    let hanging = json!({"model": "m", "messages": [{"role": "user", "content": "hang"}]});
    let mut held = std::net::TcpStream::connect(addr).unwrap();
    write!(
        held,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{hanging}",
        hanging.to_string().len()
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(10), || {
        get(addr, "/status").json()["workers_busy"] == 1
    }));
    held
}

/// Four clients relaying ten calls each at once; every one must be answered 200.
fn relay_40_calls_from_4_clients(addr: std::net::SocketAddr) {
    let clients: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(move || {
                (0..10)
                    .map(|_| post(addr, "/v1/chat/completions", &relay_body()).status)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for client in clients {
        assert!(client.join().unwrap().iter().all(|&s| s == 200));
    }
}

#[test]
fn a_sigterm_right_after_relayed_calls_keeps_their_usage() {
    let upstream = FakeUpstream::replying("x");
    let work = Workdir::new();
    let config = openai_llm(upstream.addr, "");
    let mut server = work.spawn(&config);
    let addr = server.addr;
    relay_40_calls_from_4_clients(addr);
    server.signal(libc::SIGTERM);
    let status = server.wait(Duration::from_secs(20)).expect("exited");
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert_eq!(first_row(&operator_usage(&work.config(&config))), (40, 360));
    // A restarted server reads the same back.
    let restarted = work.serve(&config);
    let report = get(restarted.addr, "/v1/usage").json();
    assert_eq!(first_row(&report), (40, 360), "{report}");
}

#[test]
fn a_drain_cut_short_by_its_grace_still_stores_the_usage_of_relays_answered_before() {
    // One call hangs, so the drain ends with its grace (none here), before the workers return.
    // Every relay answered before the signal was counted, so its usage must be stored, not
    // left in the writer's tally for a tick that never comes.
    let upstream = ThreadedUpstream::start(answer_all_but_hang);
    let work = Workdir::new();
    let config = format!(
        "[server]\nshutdown_grace_secs = 0\n\n{}",
        openai_llm(upstream.addr, "")
    );
    let mut server = work.spawn(&config);
    let addr = server.addr;
    let _held = hold_a_worker_on_a_hanging_relay(addr);
    relay_40_calls_from_4_clients(addr);
    server.signal(libc::SIGTERM);
    let status = server.wait(Duration::from_secs(20)).expect("exited");
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(
        server.log().contains("grace period ended"),
        "{}",
        server.log()
    );
    assert_eq!(first_row(&operator_usage(&work.config(&config))), (40, 360));
}

/// `scripts/merge-usage.jq`, as docs/scale-out.md runs it, over the same instance's report
/// twice: every count doubles. Needs jq, which the docs ask the operator for.
fn merged_twice_doubles(report: &[u8], rows: &[Value]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/merge-usage.jq");
    let jq = Command::new("jq")
        .args(["-s", "-f", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn();
    let Ok(mut jq) = jq else {
        eprintln!("jq is not installed: scripts/merge-usage.jq was not checked");
        return;
    };
    let mut input = jq.stdin.take().unwrap();
    std::io::Write::write_all(&mut input, &[report, report].concat()).unwrap();
    drop(input);
    let out = jq.wait_with_output().unwrap();
    assert!(out.status.success());
    let merged: Value = serde_json::from_slice(&out.stdout).unwrap();
    let merged = merged["data"].as_array().unwrap();
    assert_eq!(merged.len(), rows.len());
    for (sum, row) in merged.iter().zip(rows) {
        assert_eq!(sum["tenant"], row["tenant"]);
        for key in [
            "requests",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
        ] {
            assert_eq!(
                sum[key].as_u64().unwrap(),
                2 * row[key].as_u64().unwrap(),
                "{key}"
            );
        }
    }
}

#[test]
fn a_second_signal_during_a_drain_still_stores_the_usage_of_relays_answered_before() {
    let upstream = ThreadedUpstream::start(answer_all_but_hang);
    let work = Workdir::new();
    let config = openai_llm(upstream.addr, "");
    let mut server = work.spawn(&config);
    let addr = server.addr;
    let _held = hold_a_worker_on_a_hanging_relay(addr);
    for _ in 0..10 {
        assert_eq!(
            post(addr, "/v1/chat/completions", &relay_body()).status,
            200
        );
    }
    server.signal(libc::SIGTERM);
    assert!(eventually(Duration::from_secs(10), || server.log_shows("draining")));
    server.signal(libc::SIGINT);
    let status = server.wait(Duration::from_secs(20)).expect("exited");
    assert_eq!(status.code(), Some(130), "{}", server.log());
    assert_eq!(first_row(&operator_usage(&work.config(&config))), (10, 90));
}
