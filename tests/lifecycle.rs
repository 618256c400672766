//! The process as an operator sees it: its threads, its start-up errors, draining on SIGTERM,
//! and what survives kill -9.

use crate::support::*;
use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

fn thread_names(pid: u32) -> Vec<String> {
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let comm = task.unwrap().path().join("comm");
        if let Ok(name) = std::fs::read_to_string(comm) {
            names.push(name.trim().to_string());
        }
    }
    names
}

#[test]
fn threads_are_one_acceptor_and_exactly_the_configured_workers() {
    let work = Workdir::new();
    let server = work.spawn("[server]\nmax_concurrent_requests = 5\n");
    // Serve a few requests first: threads must not appear per request.
    for i in 0..8 {
        assert_eq!(send(server.addr, &format!("c{i}"), "hi").status, 200);
    }
    let names = thread_names(server.pid());
    let workers: HashSet<_> = names
        .iter()
        .filter(|n| n.starts_with("worker-"))
        .cloned()
        .collect();
    let expected: HashSet<_> = (0..5).map(|i| format!("worker-{i}")).collect();
    assert_eq!(workers, expected, "{names:?}");
    assert_eq!(
        names.iter().filter(|n| n.starts_with("worker-")).count(),
        5,
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| *n == "acceptor").count(),
        1,
        "{names:?}"
    );
    // --workers overrides the file.
    let config = work.config("");
    let other = Proc::start(
        &[
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "3",
        ],
        &[],
        "listening on http://",
    );
    let count = thread_names(other.pid())
        .iter()
        .filter(|n| n.starts_with("worker-"))
        .count();
    assert_eq!(count, 3);
    assert!(
        other.log().contains("with 3 workers, queue 64"),
        "{}",
        other.log()
    );
}

/// The value of `name` in the environment the process `pid` was started with.
fn started_with(pid: u32, name: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let prefix = format!("{name}=");
    environ.split(|&b| b == 0).find_map(|entry| {
        let entry = String::from_utf8_lossy(entry);
        entry.strip_prefix(&prefix).map(str::to_string)
    })
}

#[test]
fn malloc_keeps_its_per_thread_caches_small_unless_the_operator_tunes_it() {
    let work = Workdir::new();
    let server = work.spawn("");
    assert_eq!(send(server.addr, "c", "hi").status, 200);
    // chatpool runs itself again with its own tunables only when none are set.
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        assert_eq!(
            started_with(server.pid(), "GLIBC_TUNABLES").as_deref(),
            Some("glibc.malloc.tcache_max=256")
        );
    }
    let other = Workdir::new();
    let tuned = other.spawn_with_env("", &[("GLIBC_TUNABLES", "glibc.malloc.tcache_count=2")]);
    assert_eq!(send(tuned.addr, "c", "hi").status, 200);
    assert_eq!(
        started_with(tuned.pid(), "GLIBC_TUNABLES").as_deref(),
        Some("glibc.malloc.tcache_count=2")
    );
}

/// Runs chatpool expecting it to refuse to start: its exit code and stderr, or -1 if it was
/// still running (serving) after 20 s and had to be killed.
fn start_failure(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let exited = eventually(Duration::from_secs(20), || {
        child.try_wait().unwrap().is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
    let code = if exited {
        status.code().unwrap_or(-1)
    } else {
        -1
    };
    (code, text.trim().to_string())
}

#[test]
fn bad_configs_and_a_busy_port_exit_2_with_one_line() {
    let work = Workdir::new();
    let path = work.dir.path().join("bad.toml");
    let path_str = path.to_str().unwrap();
    let cases = [
        ("[server]\nworkerz = 4\n", "unknown field `workerz`"),
        ("[serverr]\n", "unknown field `serverr`"),
        (
            "[server]\nmax_concurrent_requests = 0\n",
            "server.max_concurrent_requests",
        ),
        ("[storage]\nsynchronous = \"sometimes\"\n", "sometimes"),
        // Once made SIGTERM panic: Instant + grace overflowed.
        (
            "[server]\nshutdown_grace_secs = 9223372036854775807\n",
            "server.shutdown_grace_secs",
        ),
        ("[llm]\nrequest_timeout_ms = 0\n", "llm.request_timeout_ms"),
        ("[server\n", "line 1"),
    ];
    for (text, needle) in cases {
        std::fs::write(&path, text).unwrap();
        let (code, stderr) = start_failure(&["--config", path_str]);
        assert_eq!(code, 2, "{text}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{text}: {stderr}");
        assert!(
            stderr.contains(needle) && stderr.contains("bad.toml"),
            "{text}: {stderr}"
        );
    }
    let (code, stderr) = start_failure(&["--config", "/nonexistent/chatpool.toml"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/chatpool.toml"), "{stderr}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let config = work.config("");
    let (code, stderr) = start_failure(&["--config", config.to_str().unwrap(), "--listen", &addr]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&addr), "{stderr}");
}

#[test]
fn sigterm_drains_admitted_requests_then_exits_0() {
    let work = Workdir::new();
    let config = "[server]\nmax_concurrent_requests = 2\nqueue_capacity = 4\n\n[llm]\nmock_latency_ms = 1500\n";
    let mut server = work.spawn(config);
    let addr = server.addr;
    let clients: Vec<_> = (0..3)
        .map(|i| thread::spawn(move || send(addr, &format!("drain-{i}"), &format!("message {i}"))))
        .collect();
    assert!(eventually(Duration::from_secs(10), || {
        let s = get(addr, "/status").json();
        s["workers_busy"] == 2 && s["queue_depth"] == 1
    }));
    server.signal(libc::SIGTERM);
    assert!(eventually(Duration::from_secs(5), || get(addr, "/status")
        .json()["draining"]
        == true));
    let refused = send(addr, "late", "too late");
    assert_eq!(
        (refused.status, refused.error_type().as_str()),
        (503, "shutting_down")
    );
    assert_eq!(get(addr, "/readyz").status, 503);
    assert_eq!(get(addr, "/healthz").status, 200);
    for client in clients {
        let r = client.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let status = server
        .wait(Duration::from_secs(20))
        .expect("exited after draining");
    assert_eq!(status.code(), Some(0), "{}", server.log());
    for i in 0..3 {
        let stored = stored_messages(&work.db(), &format!("drain-{i}"));
        assert_eq!(stored.len(), 2, "drain-{i}");
        assert_eq!(stored[0].2, format!("message {i}"));
    }
    assert!(stored_messages(&work.db(), "late").is_empty());
}

#[test]
fn sigint_with_nothing_in_flight_exits_0_at_once() {
    let work = Workdir::new();
    let mut server = work.spawn("");
    server.signal(libc::SIGINT);
    let status = server.wait(Duration::from_secs(10)).expect("exited");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_second_sigint_during_the_drain_exits_at_once() {
    let work = Workdir::new();
    let config = "[server]\nshutdown_grace_secs = 60\n\n[llm]\nmock_latency_ms = 30000\n";
    let mut server = work.spawn(config);
    let addr = server.addr;
    // Its answer never comes: the process ends under it.
    let _slow = thread::spawn(move || std::panic::catch_unwind(|| send(addr, "slow", "hi")));
    assert!(eventually(Duration::from_secs(10), || get(addr, "/status")
        .json()["workers_busy"]
        == 1));
    server.signal(libc::SIGINT);
    assert!(server.log_shows("draining"));
    assert!(
        server.wait(Duration::from_millis(500)).is_none(),
        "the first signal drains"
    );
    server.signal(libc::SIGINT);
    let status = server
        .wait(Duration::from_secs(10))
        .expect("exited at the second signal, not after the 30 s request");
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{}", server.log());
    assert!(stored_messages(&work.db(), "slow").is_empty());
}

#[test]
fn after_kill_9_every_acknowledged_exchange_is_stored_and_complete() {
    let work = Workdir::new();
    let config = "[server]\nmax_concurrent_requests = 4\n\n[llm]\nmock_latency_ms = 5\n";
    let server = work.spawn(config);
    let addr = server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..6)
        .map(|c| {
            let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
            thread::spawn(move || {
                for n in 0..10_000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let chat = format!("crash-{c}");
                    let content = format!("client {c} message {n}");
                    let body = serde_json::json!({ "content": content }).to_string();
                    // A refused connection or cut response after the kill is expected.
                    let Ok(r) = std::panic::catch_unwind(|| {
                        post(addr, &format!("/v1/chats/{chat}/messages"), &body)
                    }) else {
                        break;
                    };
                    if r.status == 200 {
                        let id = r.json()["message_id"].as_i64().unwrap();
                        acknowledged.lock().unwrap().push((chat, content, id));
                    }
                }
            })
        })
        .collect();
    assert!(eventually(Duration::from_secs(30), || acknowledged
        .lock()
        .unwrap()
        .len()
        >= 50));
    server.signal(libc::SIGKILL);
    drop(server);
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.join().unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();

    let server = work.serve(config);
    for (chat, content, reply_id) in &acknowledged {
        let stored = stored_messages(&work.db(), chat);
        let at = stored
            .iter()
            .position(|m| m.0 == *reply_id)
            .unwrap_or_else(|| panic!("reply {reply_id} of {chat} lost"));
        assert_eq!(stored[at].1, "assistant");
        assert_eq!(
            (stored[at - 1].1.as_str(), &stored[at - 1].2),
            ("user", content)
        );
    }
    for c in 0..6 {
        let stored = stored_messages(&work.db(), &format!("crash-{c}"));
        assert_eq!(
            stored.len() % 2,
            0,
            "a user message without its reply in crash-{c}"
        );
        for pair in stored.chunks(2) {
            assert_eq!(
                (pair[0].1.as_str(), pair[1].1.as_str()),
                ("user", "assistant")
            );
        }
    }
    // The restarted server serves the same history.
    let (chat, _, _) = &acknowledged[0];
    assert_eq!(
        get(server.addr, &format!("/v1/chats/{chat}/messages?limit=500")).status,
        200
    );
}
