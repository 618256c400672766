//! Reading one request off a connection: the head, then the whole body, framed by HTTP/1.1's
//! rules (RFC 9112) applied strictly.
//!
//! Where two parsers of the same bytes disagree on where a request ends (a proxy in front and
//! this server behind it), a client can hide a second request inside the first: request
//! smuggling. So anything whose framing is not unambiguous is refused, never guessed at:
//! `Content-Length` together with `Transfer-Encoding`, several or malformed `Content-Length`
//! values, any coding but `chunked`, a chunk size that is not plain hex, bare LF line ends,
//! control characters, folded header lines. A refusal ends the connection, so the bytes after
//! it are never read as a request.

use std::io::{BufRead, ErrorKind, Read};

use ascii::AsciiString;

use crate::common::{HTTPVersion, Header, HeaderField, Method};
use crate::limits::Refusal;

/// A request line and headers.
#[derive(Debug)]
pub(crate) struct Head {
    pub method: Method,
    pub path: String,
    pub version: HTTPVersion,
    pub headers: Vec<Header>,
}

impl Head {
    /// The values of every header named `name`.
    fn values<'a>(&'a self, name: &'static str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |h| h.field.equiv(name))
            .map(|h| h.value.as_str())
    }

    /// Whether the client asked for `100 Continue` before sending its body; any other
    /// expectation is refused.
    pub fn expects_continue(&self) -> Result<bool, Refusal> {
        match self.values("Expect").next() {
            None => Ok(false),
            Some(v) if v.eq_ignore_ascii_case("100-continue") => Ok(true),
            Some(_) => Err(Refusal::ExpectationFailed),
        }
    }

    /// Whether the client lets the connection carry another request after this one.
    pub fn keeps_alive(&self) -> bool {
        let tokens = || {
            self.values("Connection")
                .flat_map(|v| v.split(','))
                .map(str::trim)
        };
        if tokens().any(|t| t.eq_ignore_ascii_case("close")) {
            return false;
        }
        self.version >= HTTPVersion(1, 1) || tokens().any(|t| t.eq_ignore_ascii_case("keep-alive"))
    }
}

/// How the body of a request is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Why no request could be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReadError {
    /// The client sent nothing of a next request before the timeout.
    Idle,
    /// The client closed the connection, or its socket failed.
    Closed,
    /// Answered with this refusal, then the connection closes.
    Refused(Refusal),
}

impl From<Refusal> for ReadError {
    fn from(refusal: Refusal) -> ReadError {
        ReadError::Refused(refusal)
    }
}

/// A read that hit the socket's timeout (`WouldBlock` on Unix).
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Empty lines a client may send before a request line (RFC 9112 section 2.2).
const LEADING_EMPTY_LINES: usize = 4;

/// Reads a request line and headers, at most `max_head` bytes of them.
pub(crate) fn read_head<R: BufRead>(reader: &mut R, max_head: usize) -> Result<Head, ReadError> {
    let mut budget = max_head;
    let mut line = Vec::new();
    for skipped in 0..=LEADING_EMPTY_LINES {
        let first = skipped == 0;
        read_line(reader, &mut line, &mut budget, Refusal::UriTooLong, first)?;
        if !line.is_empty() {
            break;
        }
    }
    let (method, path, version) = parse_request_line(&line)?;
    let mut headers = Vec::new();
    loop {
        read_line(
            reader,
            &mut line,
            &mut budget,
            Refusal::HeadersTooLarge,
            false,
        )?;
        if line.is_empty() {
            break;
        }
        headers.push(parse_header(&line)?);
    }
    Ok(Head {
        method,
        path,
        version,
        headers,
    })
}

/// Reads one CRLF-ended line into `line` (without the CRLF), taking its bytes from `budget`.
fn read_line<R: BufRead>(
    reader: &mut R,
    line: &mut Vec<u8>,
    budget: &mut usize,
    too_long: Refusal,
    first_of_request: bool,
) -> Result<(), ReadError> {
    line.clear();
    loop {
        let available = match reader.fill_buf() {
            Ok(bytes) => bytes,
            Err(e) if is_timeout(&e) => {
                return Err(if first_of_request && line.is_empty() {
                    ReadError::Idle
                } else {
                    ReadError::Refused(Refusal::Timeout)
                });
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return Err(ReadError::Closed),
        };
        if available.is_empty() {
            return Err(ReadError::Closed);
        }
        let (taken, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        *budget = budget.checked_sub(taken).ok_or(too_long)?;
        line.extend_from_slice(&available[..taken]);
        reader.consume(taken);
        if done {
            line.pop();
            if line.pop() != Some(b'\r') {
                return Err(bad("a line of the request head ends without CR"));
            }
            return Ok(());
        }
    }
}

fn bad(why: &'static str) -> ReadError {
    ReadError::Refused(Refusal::BadRequest(why))
}

/// A `tchar` of RFC 9110: what methods and header names are made of.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `METHOD SP request-target SP HTTP-version`, single spaces, no control characters.
fn parse_request_line(line: &[u8]) -> Result<(Method, String, HTTPVersion), ReadError> {
    if !line.iter().all(|&b| b == b' ' || b.is_ascii_graphic()) {
        return Err(bad(
            "the request line holds control or non-ASCII characters",
        ));
    }
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("the request line is malformed"));
    };
    if method.is_empty() || !method.iter().all(|&b| is_token_char(b)) || target.is_empty() {
        return Err(bad("the request line is malformed"));
    }
    let version = match version {
        b"HTTP/1.1" => HTTPVersion(1, 1),
        b"HTTP/1.0" => HTTPVersion(1, 0),
        b"HTTP/2.0" | b"HTTP/3.0" => return Err(Refusal::VersionNotSupported.into()),
        _ => return Err(bad("the request line is malformed")),
    };
    // Only ASCII graphic characters are left: each is valid UTF-8.
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let method = text(method)
        .parse()
        .map_err(|()| bad("the request line is malformed"))?;
    Ok((method, text(target), version))
}

/// `name: value`, the name a token right before the colon, the value visible ASCII with
/// spaces and tabs inside.
fn parse_header(line: &[u8]) -> Result<Header, ReadError> {
    let malformed = || bad("a header line is malformed");
    let colon = line.iter().position(|&b| b == b':').ok_or_else(malformed)?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    // A line starting with whitespace is an obsolete folded continuation; whitespace before
    // the colon is refused by RFC 9112 section 5.1.
    if name.is_empty() || !name.iter().all(|&b| is_token_char(b)) {
        return Err(malformed());
    }
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !is_ows(b)).unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    let value = &value[start..end];
    if !value
        .iter()
        .all(|&b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
    {
        return Err(bad("a header value holds control or non-ASCII characters"));
    }
    let to_ascii = |bytes: &[u8]| AsciiString::from_ascii(bytes.to_vec()).map_err(|_| malformed());
    Ok(Header {
        field: HeaderField::from_bytes(name.to_vec()).map_err(|_| malformed())?,
        value: to_ascii(value)?,
    })
}

/// How the body is delimited (RFC 9112 section 6), or the refusal of an ambiguous head.
pub(crate) fn framing(head: &Head) -> Result<Framing, Refusal> {
    let mut codings = head.values("Transfer-Encoding").peekable();
    let lengths: Vec<&str> = head.values("Content-Length").collect();
    if codings.peek().is_some() {
        if !lengths.is_empty() {
            return Err(Refusal::BadRequest(
                "Content-Length and Transfer-Encoding together",
            ));
        }
        if head.version < HTTPVersion(1, 1) {
            return Err(Refusal::BadRequest(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        let codings: Vec<&str> = codings
            .flat_map(|v| v.split(','))
            .map(|c| c.trim_matches([' ', '\t']))
            .collect();
        return match codings.as_slice() {
            [only] if only.eq_ignore_ascii_case("chunked") => Ok(Framing::Chunked),
            _ => Err(Refusal::NotImplemented(
                "the only transfer coding accepted is `chunked`, alone",
            )),
        };
    }
    match lengths.as_slice() {
        [] => Ok(Framing::Empty),
        [one] => parse_length(one),
        _ => Err(Refusal::BadRequest("more than one Content-Length")),
    }
}

/// A `Content-Length` value: decimal digits only. One too large for any body is a body over
/// any limit.
fn parse_length(value: &str) -> Result<Framing, Refusal> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Refusal::BadRequest(
            "Content-Length is not a decimal number",
        ));
    }
    match value.parse::<u64>() {
        Ok(0) => Ok(Framing::Empty),
        Ok(n) => Ok(Framing::Length(n)),
        Err(_) => Ok(Framing::Length(u64::MAX)),
    }
}

/// A body read off the connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Body {
    /// All of it.
    Whole(Vec<u8>),
    /// Longer than the limit: not read on; the connection cannot carry another request.
    TooLong,
}

/// Reads the whole body, or up to just past `limit` bytes of it.
pub(crate) fn read_body<R: BufRead>(
    reader: &mut R,
    framing: Framing,
    limit: usize,
) -> Result<Body, ReadError> {
    match framing {
        Framing::Empty => Ok(Body::Whole(Vec::new())),
        Framing::Length(n) if n > limit as u64 => Ok(Body::TooLong),
        Framing::Length(n) => {
            let mut body = Vec::with_capacity(n as usize);
            reader
                .take(n)
                .read_to_end(&mut body)
                .map_err(body_read_error)?;
            if (body.len() as u64) < n {
                return Err(ReadError::Closed);
            }
            Ok(Body::Whole(body))
        }
        Framing::Chunked => read_chunked(reader, limit),
    }
}

fn body_read_error(e: std::io::Error) -> ReadError {
    if is_timeout(&e) {
        ReadError::Refused(Refusal::Timeout)
    } else {
        ReadError::Closed
    }
}

/// Longest chunk-size line, extensions included, and longest trailer section.
const MAX_CHUNK_LINE: usize = 1024;
const MAX_TRAILERS: usize = 8 << 10;

/// A chunked body: `size[;ext] CRLF data CRLF` … `0 CRLF` trailers `CRLF`, the size plain hex.
fn read_chunked<R: BufRead>(reader: &mut R, limit: usize) -> Result<Body, ReadError> {
    let mut body = Vec::new();
    let mut line = Vec::new();
    let malformed = || bad("the chunked body is malformed");
    loop {
        let mut budget = MAX_CHUNK_LINE;
        read_line(reader, &mut line, &mut budget, malformed_refusal(), false)?;
        let digits = line.split(|&b| b == b';').next().unwrap_or_default();
        if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(malformed());
        }
        let size =
            u64::from_str_radix(&String::from_utf8_lossy(digits), 16).map_err(|_| malformed())?;
        if size == 0 {
            break;
        }
        if body.len() as u64 + size > limit as u64 {
            return Ok(Body::TooLong);
        }
        let start = body.len();
        reader
            .take(size)
            .read_to_end(&mut body)
            .map_err(body_read_error)?;
        if ((body.len() - start) as u64) < size {
            return Err(ReadError::Closed);
        }
        let mut budget = 2;
        read_line(reader, &mut line, &mut budget, malformed_refusal(), false)?;
        if !line.is_empty() {
            return Err(malformed());
        }
    }
    let mut budget = MAX_TRAILERS;
    loop {
        read_line(
            reader,
            &mut line,
            &mut budget,
            Refusal::HeadersTooLarge,
            false,
        )?;
        if line.is_empty() {
            return Ok(Body::Whole(body));
        }
        parse_header(&line)?;
    }
}

fn malformed_refusal() -> Refusal {
    Refusal::BadRequest("the chunked body is malformed")
}

/// A request as [`parse_request`] reads it.
#[derive(Debug)]
pub struct ParsedRequest {
    pub method: Method,
    pub path: String,
    pub version: HTTPVersion,
    pub headers: Vec<Header>,
    /// `None` when longer than the limit.
    pub body: Option<Vec<u8>>,
}

/// Parses one request from `bytes` as a connection reads it: the head within `max_head`
/// bytes, then the body within `max_body`. Gives the request, or the refusal the client would
/// get (`None` when the bytes end before a request does). For fuzzing and tests of the parser;
/// the server reads sockets.
pub fn parse_request(
    bytes: &[u8],
    max_head: usize,
    max_body: usize,
) -> Result<ParsedRequest, Option<Refusal>> {
    let mut reader = bytes;
    let refusal = |e: ReadError| match e {
        ReadError::Refused(refusal) => Some(refusal),
        ReadError::Idle | ReadError::Closed => None,
    };
    let head = read_head(&mut reader, max_head).map_err(refusal)?;
    head.expects_continue().map_err(Some)?;
    let framing = framing(&head).map_err(Some)?;
    let body = match read_body(&mut reader, framing, max_body).map_err(refusal)? {
        Body::Whole(body) => Some(body),
        Body::TooLong => None,
    };
    Ok(ParsedRequest {
        method: head.method,
        path: head.path,
        version: head.version,
        headers: head.headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<(Head, Body), ReadError> {
        let mut reader = bytes;
        let head = read_head(&mut reader, 4096)?;
        let framing = framing(&head)?;
        let body = read_body(&mut reader, framing, 64)?;
        Ok((head, body))
    }

    fn refused(bytes: &[u8]) -> Refusal {
        match parse(bytes) {
            Err(ReadError::Refused(refusal)) => refusal,
            other => panic!("{:?}: {:?}", String::from_utf8_lossy(bytes), other),
        }
    }

    #[test]
    fn a_plain_request_and_its_body() {
        let (head, body) =
            parse(b"POST /a?b=c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcdef").unwrap();
        assert_eq!(head.method, Method::Post);
        assert_eq!(head.path, "/a?b=c");
        assert_eq!(head.headers.len(), 2);
        assert_eq!(body, Body::Whole(b"abc".to_vec()));
        let (_, body) = parse(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n1\r\nd\r\n0\r\nT: v\r\n\r\n",
        )
        .unwrap();
        assert_eq!(body, Body::Whole(b"abcd".to_vec()));
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        let cases: &[&[u8]] = &[
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n+3\r\nabc\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n 3\r\nabc\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET /\tx HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
        ];
        for case in cases {
            let refusal = refused(case);
            assert_eq!(refusal.status(), 400, "{:?}", String::from_utf8_lossy(case));
        }
    }

    #[test]
    fn codings_other_than_chunked_are_not_implemented() {
        for coding in [
            "gzip",
            "chunked, gzip",
            "gzip, chunked",
            "identity",
            "chunked, chunked",
        ] {
            let request = format!("POST / HTTP/1.1\r\nTransfer-Encoding: {coding}\r\n\r\n");
            assert_eq!(refused(request.as_bytes()).status(), 501, "{coding}");
        }
    }

    #[test]
    fn bodies_over_the_limit_are_not_read() {
        let huge = b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert_eq!(parse(huge).unwrap().1, Body::TooLong);
        let chunked = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n41\r\n{}\r\n0\r\n\r\n",
            "a".repeat(65)
        );
        assert_eq!(parse(chunked.as_bytes()).unwrap().1, Body::TooLong);
    }

    #[test]
    fn versions_and_keep_alive() {
        assert_eq!(
            refused(b"GET / HTTP/2.0\r\n\r\n"),
            Refusal::VersionNotSupported
        );
        assert_eq!(refused(b"GET / HTTP/0.9\r\n\r\n").status(), 400);
        let (head, _) = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(!head.keeps_alive());
        let (head, _) = parse(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap();
        assert!(head.keeps_alive());
        let (head, _) = parse(b"GET / HTTP/1.1\r\nConnection: upgrade, close\r\n\r\n").unwrap();
        assert!(!head.keeps_alive());
        let (head, _) = parse(b"\r\nGET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n").unwrap();
        assert!(head.keeps_alive());
    }

    #[test]
    fn a_head_past_the_limit_is_refused() {
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(5000));
        assert_eq!(refused(long.as_bytes()), Refusal::UriTooLong);
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(1000));
        assert_eq!(refused(many.as_bytes()), Refusal::HeadersTooLarge);
    }
}
