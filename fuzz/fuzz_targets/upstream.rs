//! What an upstream LLM may send back: a completion body, an error body, and a streamed (SSE)
//! reply. None of it may panic.

#![no_main]

use chatpool::llm::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wire::parse_completion(data, "gpt-4o-mini");
    let detail = wire::error_detail(data);
    // The detail goes into a log line and a client's error message: it must stay short.
    assert!(detail.chars().count() <= 201, "{} chars", detail.chars().count());
    let _ = wire::read_stream(data, "gpt-4o-mini", &mut |_: &str| true);
});
