//! `chatpool export` and `import` as an operator runs them: beside a running server, with bad
//! records among good ones.

use crate::support::*;
use serde_json::json;
use std::io::Write;
use std::process::{Command, Output, Stdio};

/// A line of export for chat `chat_id` of tenant `default` with one exchange.
fn record(chat_id: &str, text: &str, key: Option<&str>) -> String {
    json!({"tenant": "default", "chat_id": chat_id,
        "created_at": "2026-11-29T10:00:00Z", "updated_at": "2026-11-29T10:00:01Z",
        "messages": [
            {"role": "user", "content": text, "created_at": "2026-11-29T10:00:00Z",
             "model": null, "prompt_tokens": null, "completion_tokens": null, "idempotency_key": null},
            {"role": "assistant", "content": format!("re: {text}"), "created_at": "2026-11-29T10:00:01Z",
             "model": "m", "prompt_tokens": 1, "completion_tokens": 2, "idempotency_key": key}]})
    .to_string()
}

/// Starts `chatpool --config CONFIG COMMAND` with `input` on its stdin.
fn spawn(config: &std::path::Path, command: &str, input: &str) -> std::process::Child {
    let mut child = Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), command])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    child
}

fn run(config: &std::path::Path, command: &str, input: &str) -> Output {
    spawn(config, command, input).wait_with_output().unwrap()
}

#[test]
fn a_server_and_an_import_started_together_on_a_fresh_database_both_succeed() {
    let input: String = (0..20)
        .map(|i| record(&format!("c{i}"), "hi", None) + "\n")
        .collect();
    for attempt in 0..5 {
        let work = Workdir::new();
        let config = work.config("");
        let import = spawn(&config, "import", &input);
        let server = work.serve("");
        let out = import.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "attempt {attempt}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let chats = get(server.addr, "/v1/chats?limit=100").json();
        assert_eq!(
            chats["chats"].as_array().unwrap().len(),
            20,
            "attempt {attempt}"
        );
        assert_eq!(send(server.addr, "new", "hello").status, 200);
    }
}

#[test]
fn an_import_with_one_bad_record_imports_the_good_ones_and_names_the_bad_line() {
    let work = Workdir::new();
    let config = work.config("");
    let mut dup: serde_json::Value = serde_json::from_str(&record("dup", "x", Some("k1"))).unwrap();
    let again = dup["messages"].as_array().unwrap().clone();
    dup["messages"].as_array_mut().unwrap().extend(again);
    let mut input = Vec::new();
    input.extend(format!("{}\n", record("good1", "one", Some("a"))).bytes());
    input.extend(format!("{dup}\n").bytes());
    input.extend(b"{\"tenant\": \"default\", \"chat_id\": \"bin\xff\"}\n");
    input.extend(format!("{}\n", record("good2", "two", None)).bytes());
    let mut child = Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), "import"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 2: chat dup, message 4: its idempotency key is used twice"),
        "{stderr}"
    );
    assert!(stderr.contains("line 3: not UTF-8"), "{stderr}");
    assert!(
        !stderr.contains("database"),
        "the input is to blame: {stderr}"
    );
    assert!(stderr.contains("imported 2 chats, 4 messages"), "{stderr}");
    let server = work.serve("");
    for chat in ["good1", "good2"] {
        assert_eq!(
            get(server.addr, &format!("/v1/chats/{chat}/messages")).status,
            200
        );
    }
    assert_eq!(get(server.addr, "/v1/chats/dup/messages").status, 404);
}

#[test]
fn an_import_warns_of_tenants_no_token_reaches() {
    let work = Workdir::new();
    let config = work.config("");
    let other = record("c1", "hi", None).replace("\"default\"", "\"nobody\"");
    let out = run(
        &config,
        "import",
        &format!("{}\n{other}\n", record("c2", "hi", None)),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: no token in [auth] acts for tenant nobody"),
        "{stderr}"
    );
    assert!(!stderr.contains("tenant default;"), "{stderr}");
}

#[test]
fn an_export_whose_output_closes_fails_with_status_1_not_the_start_up_status() {
    let work = Workdir::new();
    let config = work.config("");
    // Larger than a pipe holds, so the export is still writing when its reader has gone.
    let big = "x".repeat(256 << 10);
    assert!(run(
        &config,
        "import",
        &format!("{}\n", record("big", &big, None))
    )
    .status
    .success());
    let mut export = spawn(&config, "export", "");
    drop(export.stdout.take());
    let out = export.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot write the output"), "{stderr}");
}
