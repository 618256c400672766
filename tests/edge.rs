//! The edge holds: no client stalls the acceptor or pins a worker, a hang-up frees its work,
//! and request framing is strict. Each test plays one hostile client against a real server
//! while others check that they are still served at once.

use crate::support::*;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Asserts that a request on a fresh connection is answered with `status` in under a second
/// (it takes milliseconds when nothing stalls).
fn answered_at_once(what: &str, status: u16, call: impl FnOnce() -> Response) {
    let started = Instant::now();
    let response = call();
    let took = started.elapsed();
    assert_eq!(response.status, status, "{what}: {}", response.text());
    assert!(took < Duration::from_secs(1), "{what} took {took:?}");
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

fn workers_busy(addr: SocketAddr) -> u64 {
    get(addr, "/status").json()["workers_busy"]
        .as_u64()
        .unwrap()
}

/// A client that writes `bytes` and never reads; it stops writing when the socket is shut
/// down by [`Hostile::stop`].
struct Hostile {
    stream: TcpStream,
    writer: Option<thread::JoinHandle<()>>,
    reader: Option<thread::JoinHandle<()>>,
    stopped: Arc<AtomicBool>,
}

impl Hostile {
    fn start(addr: SocketAddr, bytes: Vec<u8>) -> Hostile {
        Hostile::with_receive_buffer(addr, bytes, None)
    }

    /// As [`Hostile::start`], with the client's receive buffer shrunk first, so the server
    /// cannot park a large answer in it.
    fn with_receive_buffer(addr: SocketAddr, bytes: Vec<u8>, rcvbuf: Option<i32>) -> Hostile {
        let stream = match rcvbuf {
            Some(size) => connect_with_receive_buffer(addr, size),
            None => TcpStream::connect(addr).unwrap(),
        };
        let mut out = stream.try_clone().unwrap();
        let writer = thread::spawn(move || {
            let _ = out.write_all(&bytes);
        });
        Hostile {
            stream,
            writer: Some(writer),
            reader: None,
            stopped: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Makes the client read its answers a few bytes at a time, each well within the timeout.
    fn trickle(mut self) -> Hostile {
        let mut input = self.stream.try_clone().unwrap();
        let stopped = Arc::clone(&self.stopped);
        self.reader = Some(thread::spawn(move || {
            let mut buf = [0u8; 16];
            while !stopped.load(Ordering::SeqCst) && matches!(input.read(&mut buf), Ok(n) if n > 0)
            {
                thread::sleep(Duration::from_millis(200));
            }
        }));
        self
    }

    fn stop(mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(Shutdown::Both);
        for thread in [self.writer.take(), self.reader.take()]
            .into_iter()
            .flatten()
        {
            thread.join().unwrap();
        }
    }
}

/// A loopback connection whose receive buffer is set to `size` bytes before the handshake,
/// so that the window it offers stays small.
fn connect_with_receive_buffer(addr: SocketAddr, size: i32) -> TcpStream {
    use std::os::fd::FromRawFd;
    // SAFETY: a fresh socket owned by this function until it becomes the TcpStream; the
    // option value and address point to locals that outlive each call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let set = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
        assert_eq!(set, 0);
        let SocketAddr::V4(v4) = addr else {
            panic!("IPv4 loopback expected")
        };
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        TcpStream::from_raw_fd(fd)
    }
}

fn pipelined(request: &str, times: usize) -> Vec<u8> {
    request.repeat(times).into_bytes()
}

#[test]
fn a_client_pipelining_20000_requests_without_reading_stalls_no_one() {
    let work = Workdir::new();
    let server = work.spawn("");
    let addr = server.addr;
    assert_eq!(get(addr, "/healthz").status, 200);
    let before = rss(server.pid());

    let hostile = Hostile::start(addr, pipelined("GET /healthz HTTP/1.1\r\n\r\n", 20_000));
    let until = Instant::now() + Duration::from_secs(10);
    let mut rounds = 0;
    while Instant::now() < until {
        answered_at_once("GET /healthz", 200, || get(addr, "/healthz"));
        answered_at_once("POST a message", 200, || {
            send(addr, "other", "still served?")
        });
        rounds += 1;
    }
    let grown = rss(server.pid()).saturating_sub(before);
    hostile.stop();
    assert!(rounds > 10, "{rounds} rounds");
    assert!(grown < 10 << 20, "RSS grew by {grown} bytes");
}

#[test]
fn pipelined_requests_behind_a_slow_llm_call_stall_no_one() {
    let mock = mock_llm(&["--latency-ms", "4000"]);
    let work = Workdir::new();
    let server = work.serve(&openai_llm(mock.addr, ""));
    let addr = server.addr;
    let body = r#"{"content": "slow"}"#;
    let mut bytes = format!(
        "POST /v1/chats/slow/messages HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    bytes.extend(pipelined("GET /healthz HTTP/1.1\r\n\r\n", 1000));
    let hostile = Hostile::start(addr, bytes);
    assert!(eventually(Duration::from_secs(5), || workers_busy(addr) == 1));

    // While the slow call runs, the acceptor and the other workers answer others at once.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        answered_at_once("GET /healthz", 200, || get(addr, "/healthz"));
        answered_at_once("GET /v1/chats", 200, || get(addr, "/v1/chats"));
    }
    hostile.stop();
}

#[test]
fn half_sent_upgrade_posts_pin_no_worker() {
    let work = Workdir::new();
    let server = work.spawn("[server]\nmax_concurrent_requests = 4\n");
    let addr = server.addr;
    let half = "POST /v1/chats/up/messages HTTP/1.1\r\nConnection: Upgrade\r\n\
                Upgrade: websocket\r\nContent-Length: 100\r\n\r\n{\"content\": ";
    let hostile: Vec<Hostile> = (0..4)
        .map(|_| Hostile::start(addr, half.as_bytes().to_vec()))
        .collect();
    // Their bodies are read on their connections' threads: no worker waits for them.
    assert!(eventually(Duration::from_secs(5), || threads_named(
        server.pid(),
        "http-conn"
    ) >= 4));
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        // The worker of the previous POST counts itself free a moment after its answer.
        assert!(eventually(Duration::from_secs(1), || workers_busy(addr) == 0));
        answered_at_once("POST a message", 200, || send(addr, "other", "served?"));
    }
    for h in hostile {
        h.stop();
    }
}

#[test]
fn clients_that_never_or_barely_read_a_large_history_free_their_workers() {
    let work = Workdir::new();
    let client_timeout = Duration::from_secs(5);
    let server = work.serve(&format!(
        "[server]\nmax_concurrent_requests = 4\nclient_timeout_secs = {}\n",
        client_timeout.as_secs()
    ));
    let addr = server.addr;
    let big = "h".repeat(25_000);
    for _ in 0..14 {
        assert_eq!(send(addr, "big", &big).status, 200);
    }
    let history = get(addr, "/v1/chats/big/messages?limit=500");
    assert!(history.body.len() > 690_000, "{} bytes", history.body.len());

    // More answers than the kernel buffers between them hold (about 7 MB).
    let ask = pipelined("GET /v1/chats/big/messages?limit=500 HTTP/1.1\r\n\r\n", 10);
    let started = Instant::now();
    // Two never read; two read a few bytes at a time, never silent for the timeout.
    let hostile: Vec<Hostile> = (0..4)
        .map(|i| {
            let client = Hostile::with_receive_buffer(addr, ask.clone(), Some(4096));
            if i % 2 == 0 {
                client
            } else {
                client.trickle()
            }
        })
        .collect();
    answered_at_once("GET /healthz", 200, || get(addr, "/healthz"));
    // Each connection reads its next request only once its answer is written, so the workers
    // render one answer per connection and then have nothing to do: free within the client
    // timeout and a second. A worker writing its own answer would stay pinned by the slow
    // readers for as long as they trickle, and by the others for the timeout on each answer.
    let freed = eventually(client_timeout + Duration::from_secs(1), || {
        workers_busy(addr) == 0
    });
    assert!(freed, "workers still busy after {:?}", started.elapsed());
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(
            workers_busy(addr),
            0,
            "busy again, the clients still connected"
        );
        thread::sleep(Duration::from_millis(100));
    }
    answered_at_once("POST a message", 200, || send(addr, "other", "served?"));
    for h in hostile {
        h.stop();
    }
}

/// Sends `request` with a well-formed `GET /healthz` behind it on one connection and reads
/// until the server closes it.
fn refused_alone(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut bytes = request.to_vec();
    bytes.extend_from_slice(b"GET /healthz HTTP/1.1\r\n\r\n");
    stream.write_all(&bytes).unwrap();
    let mut data = Vec::new();
    match stream.read_to_end(&mut data) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("not closed: {e}; got {}", String::from_utf8_lossy(&data)),
    }
    String::from_utf8_lossy(&data).into_owned()
}

#[test]
fn ambiguous_framing_is_refused_once_and_ends_the_connection() {
    let work = Workdir::new();
    let server = work.serve("[server]\nclient_timeout_secs = 5\n");
    let addr = server.addr;
    let post = |headers: &str, body: &str| {
        format!("POST /v1/chats/smuggle/messages HTTP/1.1\r\n{headers}\r\n{body}")
    };
    let message = r#"{"content":"x"}"#;
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "Content-Length with Transfer-Encoding",
            post(
                "Content-Length: 15\r\nTransfer-Encoding: chunked\r\n",
                &format!("f\r\n{message}\r\n0\r\n\r\n"),
            ),
            400,
            "invalid_request",
        ),
        (
            "two differing Content-Lengths",
            post("Content-Length: 15\r\nContent-Length: 4\r\n", message),
            400,
            "invalid_request",
        ),
        (
            "a duplicated Content-Length",
            post("Content-Length: 15\r\nContent-Length: 15\r\n", message),
            400,
            "invalid_request",
        ),
        (
            "Content-Length -1",
            post("Content-Length: -1\r\n", message),
            400,
            "invalid_request",
        ),
        (
            "Content-Length +15",
            post("Content-Length: +15\r\n", message),
            400,
            "invalid_request",
        ),
        (
            "Content-Length past u64",
            post("Content-Length: 99999999999999999999\r\n", message),
            413,
            "payload_too_large",
        ),
        (
            "Transfer-Encoding gzip",
            post("Transfer-Encoding: gzip\r\n", message),
            501,
            "not_implemented",
        ),
        (
            "Transfer-Encoding chunked, then gzip",
            post(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n",
                "",
            ),
            501,
            "not_implemented",
        ),
        (
            "a chunk size with a plus",
            post(
                "Transfer-Encoding: chunked\r\n",
                &format!("+f\r\n{message}\r\n0\r\n\r\n"),
            ),
            400,
            "invalid_request",
        ),
        (
            "a chunk size with 0x",
            post(
                "Transfer-Encoding: chunked\r\n",
                &format!("0xf\r\n{message}\r\n0\r\n\r\n"),
            ),
            400,
            "invalid_request",
        ),
        (
            "a control character in the request line",
            "GET /healthz\x0b HTTP/1.1\r\n\r\n".to_string(),
            400,
            "invalid_request",
        ),
        (
            "a bare LF in the request head",
            "GET /healthz HTTP/1.1\nHost: x\r\n\r\n".to_string(),
            400,
            "invalid_request",
        ),
        (
            "a folded header line",
            "GET /healthz HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n".to_string(),
            400,
            "invalid_request",
        ),
    ];
    let mut wrong = Vec::new();
    for (name, request, status, kind) in &cases {
        let text = refused_alone(addr, request.as_bytes());
        let answers = text.matches("HTTP/1.1 ").count();
        let expected = format!("HTTP/1.1 {status} ");
        let typed = format!(r#""type":"{kind}""#);
        if answers != 1 || !text.starts_with(&expected) || !text.contains(&typed) {
            wrong.push(format!("{name}: {answers} answers: {text}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(stored_messages(&work.db(), "smuggle").is_empty());
    assert_eq!(get(addr, "/healthz").status, 200);
}

#[test]
fn a_request_whose_client_left_while_queued_never_reaches_the_llm() {
    let mock = mock_llm(&["--latency-ms", "1500"]);
    let work = Workdir::new();
    let server = work.spawn(&format!(
        "[server]\nmax_concurrent_requests = 1\n\n{}",
        openai_llm(mock.addr, "")
    ));
    let addr = server.addr;
    let first = thread::spawn(move || send(addr, "first", "takes the only worker"));
    assert!(eventually(Duration::from_secs(5), || workers_busy(addr) == 1));

    let body = r#"{"content": "queued, then gone"}"#;
    let queued = Hostile::start(
        addr,
        format!(
            "POST /v1/chats/left/messages HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    );
    assert!(eventually(Duration::from_secs(5), || get(addr, "/status")
        .json()["queue_depth"]
        == 1));
    queued.stop();

    assert_eq!(first.join().unwrap().status, 200);
    assert!(
        server.log_shows("the client left while it was queued"),
        "{}",
        server.log()
    );
    assert_eq!(get(mock.addr, "/stats").json()["completions"], 1);
    assert!(stored_messages(&work.db(), "left").is_empty());
    answered_at_once("GET /healthz", 200, || get(addr, "/healthz"));
}

#[test]
fn a_stream_whose_client_stops_reading_is_cancelled_after_the_client_timeout() {
    // About 6 MB of reply, more than the socket buffers between server and client hold.
    let mock = mock_llm(&["--reply-words", "1000000", "--chunks", "1000"]);
    let work = Workdir::new();
    let server = work.spawn(&format!(
        "[server]\nclient_timeout_secs = 2\n\n{}",
        openai_llm(mock.addr, "")
    ));
    let addr = server.addr;
    let body = r#"{"content": "a long one", "stream": true}"#;
    let request = format!(
        "POST /v1/chats/unread/messages HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let started = Instant::now();
    let stalled = Hostile::with_receive_buffer(addr, request.into_bytes(), Some(4096));
    assert!(eventually(Duration::from_secs(5), || workers_busy(addr) == 1));
    answered_at_once("GET /healthz", 200, || get(addr, "/healthz"));
    // Once the buffers are full, the connection gives up after 2 s without progress, and its
    // worker stops at its next piece. Filling them takes seconds of work in a debug build, many
    // more on a loaded machine; a stream nobody cancelled would run to its end and be stored.
    assert!(
        eventually(Duration::from_secs(60), || workers_busy(addr) == 0),
        "worker still busy after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(server.log_shows("went away mid-stream"), "{}", server.log());
    assert!(stored_messages(&work.db(), "unread").is_empty());
    stalled.stop();
}
