//! The fork's request parser on arbitrary bytes: a request line, headers, framing and a body
//! (plain or chunked), as a connection reads them. Whatever the input, it must give a request
//! or a refusal without panicking, and never a request whose framing was ambiguous.

#![no_main]

use libfuzzer_sys::fuzz_target;

const MAX_HEAD: usize = 4096;
const MAX_BODY: usize = 1024;

fuzz_target!(|data: &[u8]| {
    match tiny_http::parse_request(data, MAX_HEAD, MAX_BODY) {
        Ok(tiny_http::ParsedRequest {
            path,
            headers,
            body,
            ..
        }) => {
            assert!(!path.is_empty());
            assert!(path.bytes().all(|b| b.is_ascii_graphic()), "{path:?}");
            let count = |name: &'static str| headers.iter().filter(|h| h.field.equiv(name)).count();
            let (lengths, codings) = (count("Content-Length"), count("Transfer-Encoding"));
            assert!(
                lengths <= 1 && (lengths == 0 || codings == 0),
                "{headers:?}"
            );
            if let Some(body) = body {
                assert!(body.len() <= MAX_BODY);
            }
        }
        Err(Some(refusal)) => {
            let status = refusal.status();
            assert!((400..=505).contains(&status), "{status}");
            assert!(!refusal.to_string().is_empty());
        }
        // The input ended before a request did.
        Err(None) => {}
    }
});
