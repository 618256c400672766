//! Microbenchmarks of chatpool's hot steps, with criterion: reading a history window from a
//! large database, writing an exchange, assembling a prompt, parsing an upstream response,
//! validating a request, and handing work to a sleeping thread and back.
//!
//!     cargo bench --bench micro
//!
//! The history benchmark reads from a database of 1,000,000 messages in 10,000 chats, built once
//! into target/bench-history.db (about 20 s) and reused by later runs.

use chatpool::api::request::parse_send_message;
use chatpool::api::route::route;
use chatpool::config::Synchronous;
use chatpool::handoff;
use chatpool::llm::prompt;
use chatpool::llm::wire::parse_completion;
use chatpool::store::{Exchange, Store, DEFAULT_TENANT};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use std::path::PathBuf;

const CHATS: usize = 10_000;
const MESSAGES_PER_CHAT: usize = 100;

fn exchange(chat: usize, n: usize) -> Exchange {
    Exchange {
        tenant: DEFAULT_TENANT.into(),
        chat_id: format!("chat-{chat}"),
        user: format!("Question {n}: how do thread pools size themselves under load?"),
        reply: format!(
            "Answer {n}: by Little's law, concurrency is throughput times latency; {}",
            "x".repeat(120)
        ),
        model: "bench-model".into(),
        usage: Some((40, 30)),
        idempotency_key: None,
    }
}

/// The large database, built on first use.
fn history_db() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-history.db");
    if path.exists() {
        return path;
    }
    let building = path.with_extension("building");
    let _ = std::fs::remove_file(&building);
    let mut store = Store::open_and_migrate(&building, Synchronous::Normal).expect("open");
    // Round after round over every chat, as real traffic interleaves chats.
    for round in 0..MESSAGES_PER_CHAT / 2 {
        let batch: Vec<_> = (0..CHATS).map(|chat| exchange(chat, round)).collect();
        for result in store.append_batch(&batch) {
            result.expect("insert");
        }
    }
    drop(store);
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", building.display()));
    }
    std::fs::rename(&building, &path).expect("rename");
    path
}

fn storage(c: &mut Criterion) {
    let store = Store::open_and_migrate(&history_db(), Synchronous::Normal).expect("open");
    let mut chat = 0usize;
    c.bench_function(
        "history window: 40 newest of 100, 1M messages in 10k chats",
        |b| {
            b.iter(|| {
                chat = (chat + 7919) % CHATS;
                let newest = store
                    .history_window(DEFAULT_TENANT, &format!("chat-{chat}"), 40, 32_000)
                    .expect("read");
                black_box(prompt::window(newest, 32_000))
            })
        },
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let mut store =
        Store::open_and_migrate(&dir.path().join("w.db"), Synchronous::Normal).expect("open");
    let mut n = 0;
    c.bench_function("write one exchange (one transaction)", |b| {
        b.iter(|| {
            n += 1;
            store
                .append_exchange(&exchange(n % CHATS, n))
                .expect("write")
        })
    });
    c.bench_function("write 16 exchanges (one group commit)", |b| {
        b.iter_batched(
            || {
                n += 16;
                (0..16)
                    .map(|i| exchange((n + i) % CHATS, n))
                    .collect::<Vec<_>>()
            },
            |batch| store.append_batch(&batch),
            BatchSize::SmallInput,
        )
    });
}

fn pure(c: &mut Criterion) {
    let history: Vec<_> = (0..40)
        .map(|i| chatpool::store::Message {
            id: 40 - i,
            role: if i % 2 == 0 { "assistant" } else { "user" }.into(),
            content: format!(
                "message {i} with a sentence or two of ordinary chat text in it, like this"
            ),
            created_at: "2026-11-29T10:00:00Z".into(),
        })
        .collect();
    c.bench_function("assemble a prompt from 40 messages", |b| {
        b.iter(|| {
            let window = prompt::window(black_box(history.clone()), 32_000);
            prompt::assemble(
                "You are a helpful assistant.",
                &window,
                "And the next question?",
            )
        })
    });

    let body = serde_json::json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "word ".repeat(60)}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 500, "completion_tokens": 60, "total_tokens": 560}
    })
    .to_string();
    c.bench_function("parse an upstream chat completion", |b| {
        b.iter(|| parse_completion(black_box(body.as_bytes()), "m").expect("parse"))
    });

    let request = br#"{"content": "Hello! How does a thread pool decide how many threads it needs?", "temperature": 0.7, "max_tokens": 256}"#;
    c.bench_function("route and validate a send-message request", |b| {
        b.iter(|| {
            let target = route(
                &tiny_http::Method::Post,
                black_box("/v1/chats/chat-42/messages"),
                &[],
            )
            .expect("route");
            (
                target,
                parse_send_message(black_box(request)).expect("valid"),
            )
        })
    });
}

/// The cost of the hand-offs every request pays: a job handed to a thread asleep on a
/// [`handoff::queue`] and its answer handed back through a [`handoff::reply`] to the sender,
/// asleep in turn. Each round trip is two wake-ups and two context switches; a request through
/// the acceptor and a worker pays at least three such wake-ups (connection → acceptor → worker
/// → connection), and the figure here is what each costs on the machine at hand.
fn handoffs(c: &mut Criterion) {
    let (jobs, incoming) = handoff::queue::<handoff::Reply<u64>>();
    let echo = std::thread::spawn(move || {
        while let Some(done) = incoming.recv() {
            done.send(1);
        }
    });
    c.bench_function("hand a job to a sleeping thread and its answer back", |b| {
        b.iter(|| {
            let (done, answer) = handoff::reply();
            if jobs.send(done).is_err() {
                panic!("the echo thread stopped");
            }
            answer.recv().expect("answered")
        })
    });
    drop(jobs);
    echo.join().expect("echo thread");
}

criterion_group!(benches, storage, pure, handoffs);
criterion_main!(benches);
