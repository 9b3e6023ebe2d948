//! Envoy's HTTP/1.1 codec rules, applied to the raw bytes before hyper parses them.
//!
//! hyper quietly repairs some requests Envoy refuses (it drops `Content-Length` beside chunked
//! framing, strips a `#fragment`, takes any method token) and refuses some Envoy accepts
//! (obs-folded header lines, runs of spaces in the request line) with a bare 400 of its own.
//! [`GuardedIo`] sits between the downstream socket and hyper and reads each request head
//! first:
//! - a head Envoy accepts goes to hyper unchanged, or normalized where hyper would refuse it;
//! - a head Envoy refuses goes to hyper as a stand-in head, and the refusal waits in
//!   [`Refusals`] for the request handler, which answers with Envoy's local reply. Nothing after
//!   a refused head reaches hyper: the reply closes the connection.
//!
//! Bodies pass through untouched; the guard follows their framing (length, chunks) only to find
//! the next head. Where it cannot follow (an upgrade, an HTTP/2 preface, framing it cannot
//! read) it steps aside for the rest of the connection and hyper alone judges.
//!
//! Every byte read and written passes the guard, so it also keeps the connection's [`Wire`]
//! counts: bytes each way, and whether the peer ended the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::stats::Stat;

/// The runtime's `envoy.reloadable_features.http_reject_path_with_fragment: false`: a target's
/// `#fragment` is cut off (hyper cuts it) instead of the request refused. Process-wide, as
/// Envoy's runtime is.
static STRIP_FRAGMENTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets [`STRIP_FRAGMENTS`], from the bootstrap's runtime.
pub fn strip_fragments(on: bool) {
    STRIP_FRAGMENTS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The connection manager's limits the guard enforces.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// `max_request_headers_kb` in bytes. Envoy holds both the raw head and the sum of the
    /// request target and every header name and value to it.
    pub max_head_bytes: usize,
    /// `max_headers_count`.
    pub max_headers: usize,
    /// `allow_chunked_length`: chunked framing with a `Content-Length` is accepted.
    pub allow_chunked_length: bool,
    /// `allow_custom_methods`: any method token is accepted, not only the codec's list.
    pub allow_custom_methods: bool,
    /// `request_headers_timeout`: how long a head may take from its first byte.
    pub headers_timeout: Option<std::time::Duration>,
}

/// A request head Envoy's codec refuses, with the local reply it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    /// The reply body: the reason phrase for codec errors, empty for the connection manager's.
    pub body: &'static str,
    /// Envoy's response code details, e.g. `http1.codec_error`.
    pub details: &'static str,
    /// The method and target as sent, for the access log.
    pub method: String,
    pub target: String,
}

/// The details of the refusals that are the connection manager's, not the codec's: a target
/// with a `#fragment`, and a head still arriving at `request_headers_timeout`.
pub const PATH_NORMALIZATION_FAILED: &str = "path_normalization_failed";
pub const REQUEST_HEADER_TIMEOUT: &str = "request_header_timeout";

/// The one refusal a connection can hold (the guard stops at it), keyed by the 0-based index
/// of the request it replaces.
#[derive(Debug, Default)]
pub struct Refusals(OnceLock<(u64, Refusal)>);

impl Refusals {
    /// The head refused, if any.
    pub fn refused(&self) -> Option<&Refusal> {
        self.0.get().map(|(_, refusal)| refusal)
    }

    /// The refusal for the connection's `index`th request, if its head was refused.
    pub fn take(&self, index: u64) -> Option<Refusal> {
        self.0
            .get()
            .filter(|(at, _)| *at == index)
            .map(|(_, refusal)| refusal.clone())
    }
}

/// What hyper parses in place of a refused head: a valid request without a body, whose reply
/// (with `connection: close`) ends the connection.
const STAND_IN: &[u8] = b"GET / HTTP/1.1\r\nhost: refused.invalid\r\n\r\n";

/// Where the guard is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Expecting a request head (empty lines before it are skipped, as parsers do).
    Head,
    /// This many body bytes to go.
    Length(u64),
    Chunked(Chunk),
    /// Not following: everything passes to hyper as it comes.
    Aside,
    /// A head was refused: nothing more reaches hyper.
    Refused,
}

/// Position inside a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// In a chunk-size line: the size so far and its digit count.
    Size { size: u64, digits: u8 },
    /// In a chunk extension, up to the line end.
    Extension { size: u64 },
    /// Chunk data still to come.
    Data(u64),
    /// The line end after chunk data.
    DataEnd,
    /// In the trailer section; `empty` while the current line has no bytes yet.
    Trailer { empty: bool },
}

/// The judgement on one complete head.
#[derive(Debug, PartialEq, Eq)]
enum Judgement {
    /// Passes unchanged; the body framing that follows.
    Pass(Framing),
    /// Passes as these bytes instead (Envoy reads it so; hyper would not).
    Rewrite(Vec<u8>, Framing),
    Refuse(Refusal),
}

/// The outcome of scanning bytes that arrived.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// All bytes may pass as they are.
    Clean,
    /// Bytes from this offset on start a head that is incomplete, or must be rewritten or
    /// refused: they must not reach hyper as they are.
    Stop(usize),
}

/// The guard's reading of the request stream.
#[derive(Debug)]
struct Scanner {
    rules: Rules,
    framing: Framing,
    /// Heads passed to hyper so far: the index of the next request.
    heads: u64,
}

impl Scanner {
    /// Follows `bytes` from the current position; stops at a head that cannot pass as is.
    fn scan(&mut self, bytes: &[u8]) -> Scan {
        let mut at = 0;
        while at < bytes.len() {
            match self.framing {
                Framing::Aside | Framing::Refused => return Scan::Clean,
                Framing::Head => {
                    if matches!(bytes[at], b'\r' | b'\n') {
                        at += 1;
                        continue;
                    }
                    match judge(&bytes[at..], &self.rules) {
                        Some((len, Judgement::Pass(next))) => {
                            self.framing = next;
                            self.heads += 1;
                            at += len;
                        }
                        _ => return Scan::Stop(at),
                    }
                }
                Framing::Length(left) => {
                    let take = left.min((bytes.len() - at) as u64);
                    at += take as usize;
                    self.framing = match left - take {
                        0 => Framing::Head,
                        left => Framing::Length(left),
                    };
                }
                Framing::Chunked(Chunk::Data(left)) => {
                    let take = left.min((bytes.len() - at) as u64);
                    at += take as usize;
                    self.framing = Framing::Chunked(match left - take {
                        0 => Chunk::DataEnd,
                        left => Chunk::Data(left),
                    });
                }
                Framing::Chunked(chunk) => {
                    self.framing = chunk_step(chunk, bytes[at]);
                    at += 1;
                }
            }
        }
        Scan::Clean
    }
}

/// One byte of chunk framing outside chunk data. Anything unexpected leaves the body to hyper
/// (which refuses it) and the guard steps aside.
fn chunk_step(chunk: Chunk, byte: u8) -> Framing {
    let next = match (chunk, byte) {
        (Chunk::Size { size, digits }, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') if digits < 15 => {
            let digit = (byte as char).to_digit(16).unwrap_or(0) as u64;
            Chunk::Size {
                size: size * 16 + digit,
                digits: digits + 1,
            }
        }
        (Chunk::Size { size, digits }, b';' | b' ' | b'\t') if digits > 0 => {
            Chunk::Extension { size }
        }
        (Chunk::Size { digits, .. }, b'\r') if digits > 0 => chunk,
        (Chunk::Size { size, digits }, b'\n') if digits > 0 => end_of_size_line(size),
        (Chunk::Extension { size }, b'\n') => end_of_size_line(size),
        (Chunk::Extension { .. }, _) => chunk,
        (Chunk::DataEnd, b'\r') => chunk,
        (Chunk::DataEnd, b'\n') => Chunk::Size { size: 0, digits: 0 },
        (Chunk::Trailer { empty: true }, b'\n') => return Framing::Head,
        (Chunk::Trailer { .. }, b'\n') => Chunk::Trailer { empty: true },
        (Chunk::Trailer { empty }, b'\r') => Chunk::Trailer { empty },
        (Chunk::Trailer { .. }, _) => Chunk::Trailer { empty: false },
        _ => return Framing::Aside,
    };
    Framing::Chunked(next)
}

fn end_of_size_line(size: u64) -> Chunk {
    match size {
        0 => Chunk::Trailer { empty: true },
        size => Chunk::Data(size),
    }
}

/// The length of the head at the start of `bytes` (through its empty line), if complete.
fn head_len(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(offset) = memchr::memchr(b'\n', &bytes[from..]) {
        let at = from + offset;
        match (bytes.get(at + 1), bytes.get(at + 2)) {
            (Some(b'\n'), _) => return Some(at + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(at + 3),
            (None, _) | (Some(b'\r'), None) => return None,
            _ => from = at + 1,
        }
    }
    None
}

/// The longest method [`is_known_method`] knows.
const MAX_METHOD_LEN: usize = 11;

/// Whether Envoy's codec knows `method` (http-parser's list); any other is refused.
fn is_known_method(method: &[u8]) -> bool {
    matches!(
        method,
        b"ACL"
            | b"BIND"
            | b"CHECKOUT"
            | b"CONNECT"
            | b"COPY"
            | b"DELETE"
            | b"GET"
            | b"HEAD"
            | b"LINK"
            | b"LOCK"
            | b"MERGE"
            | b"MKACTIVITY"
            | b"MKCALENDAR"
            | b"MKCOL"
            | b"MOVE"
            | b"MSEARCH"
            | b"NOTIFY"
            | b"OPTIONS"
            | b"PATCH"
            | b"POST"
            | b"PROPFIND"
            | b"PROPPATCH"
            | b"PURGE"
            | b"PUT"
            | b"REBIND"
            | b"REPORT"
            | b"SEARCH"
            | b"SOURCE"
            | b"SUBSCRIBE"
            | b"TRACE"
            | b"UNBIND"
            | b"UNLINK"
            | b"UNLOCK"
            | b"UNSUBSCRIBE"
    )
}

/// A byte class as a table: one load per byte on the request path, where a head's every byte
/// is tested.
struct ByteClass([bool; 256]);

impl ByteClass {
    #[inline]
    fn has(&self, byte: u8) -> bool {
        self.0[byte as usize]
    }

    #[inline]
    fn all(&self, bytes: &[u8]) -> bool {
        bytes.iter().all(|b| self.has(*b))
    }

    /// How many bytes at the start of `bytes` are in the class.
    #[inline]
    fn run(&self, bytes: &[u8]) -> usize {
        bytes.iter().take_while(|b| self.has(**b)).count()
    }
}

/// How many bytes at the start of `bytes` are header-value characters ([`VALUE_CHAR`]):
/// eight at a time while none is a control character (a value's bytes, the bulk of a head,
/// are tested with a few instructions per word), then byte by byte.
fn value_run(bytes: &[u8]) -> usize {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH_BITS: u64 = ONES * 0x80;
    let mut at = 0;
    while let Some(word) = bytes.get(at..at + 8) {
        let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
        // A byte below 0x20 (tab included: the byte loop takes it), or 0x7f (DEL).
        let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGH_BITS;
        let del = word ^ (ONES * 0x7f);
        let is_del = del.wrapping_sub(ONES) & !del & HIGH_BITS;
        if below_space | is_del != 0 {
            break;
        }
        at += 8;
    }
    at + VALUE_CHAR.run(&bytes[at..])
}

/// Header-name characters (RFC 9110 `tchar`).
const TCHAR: ByteClass = ByteClass({
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        table[byte] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        byte += 1;
    }
    table
});

/// Header-value characters: visible ASCII, space, tab, or obs-text.
const VALUE_CHAR: ByteClass = ByteClass({
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        table[byte] = matches!(byte as u8, b'\t' | b' '..=b'~' | 0x80..=0xff);
        byte += 1;
    }
    table
});

/// Header-value characters and a bare CR (which Envoy's parser drops).
const VALUE_CHAR_OR_CR: ByteClass = ByteClass({
    let mut table = VALUE_CHAR.0;
    table[b'\r' as usize] = true;
    table
});

/// Request-target characters outside the authority (http-parser's set).
const TARGET_CHAR: ByteClass = ByteClass({
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        table[byte] = matches!(byte as u8, 9 | 12 | b'!'..=b'~');
        byte += 1;
    }
    table
});

/// What [`plain_head`] takes in a target: [`TARGET_CHAR`] without the blanks (word separators
/// in a request line) and `#` (a fragment, refused).
const PLAIN_TARGET_CHAR: ByteClass = ByteClass({
    let mut table = TARGET_CHAR.0;
    table[b'\t' as usize] = false;
    table[12] = false;
    table[b'#' as usize] = false;
    table
});

/// http-parser's test of a request target: origin-form (or `*`), or absolute-form.
fn target_is_valid(target: &[u8], connect: bool) -> bool {
    let Some(first) = target.first() else {
        return false;
    };
    if matches!(first, b'/' | b'*') {
        return TARGET_CHAR.all(&target[1..]);
    }
    let mut rest = target;
    if !connect {
        let scheme = rest.iter().take_while(|b| b.is_ascii_alphabetic()).count();
        if scheme == 0 || !rest[scheme..].starts_with(b"://") {
            return false;
        }
        rest = &rest[scheme + 3..];
    }
    let host_end = rest
        .iter()
        .position(|b| matches!(b, b'/' | b'?'))
        .unwrap_or(rest.len());
    let (host, path) = rest.split_at(host_end);
    host.iter()
        .all(|b| b.is_ascii_alphanumeric() || b"!$%&'()*+,-.:;=@[]_~".contains(b))
        && !host.windows(2).any(|w| w == b"@@")
        && TARGET_CHAR.all(path)
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// Judges the complete head at the start of `bytes`: its length and judgement, or `None` while
/// it is incomplete.
fn judge(bytes: &[u8], rules: &Rules) -> Option<(usize, Judgement)> {
    match plain_head(bytes, rules) {
        Plain::Pass(len, next) => return Some((len, Judgement::Pass(next))),
        Plain::Incomplete => return None,
        Plain::Unsure => {}
    }
    let len = head_len(bytes)?;
    Some((len, judge_head(&bytes[..len], rules)))
}

/// What [`plain_head`] made of the bytes.
#[derive(Debug, PartialEq, Eq)]
enum Plain {
    /// A plain head of this length that passes unchanged, and the framing after it.
    Pass(usize, Framing),
    /// Plain so far, and not complete.
    Incomplete,
    /// Not plain: the full judgement decides.
    Unsure,
}

/// The common head, recognized in one pass over its bytes: a known method other than
/// `CONNECT`, an origin-form target, `HTTP/1.1` or `HTTP/1.0`, single spaces, CRLF line ends,
/// header lines with valid names and values, within the limits, at most one
/// `Content-Length`, no `Transfer-Encoding` or `Upgrade`. Such a head passes unchanged;
/// [`judge_head`] would say the same, only slower (it splits lines and words first). Anything
/// else, refusals and rewrites included, is left to it.
fn plain_head(bytes: &[u8], rules: &Rules) -> Plain {
    let Some(space) = memchr::memchr(b' ', &bytes[..bytes.len().min(MAX_METHOD_LEN + 1)]) else {
        return match bytes.len() > MAX_METHOD_LEN || !TCHAR.all(bytes) {
            true => Plain::Unsure,
            false => Plain::Incomplete,
        };
    };
    let method = &bytes[..space];
    if !is_known_method(method) || method == b"CONNECT" {
        return Plain::Unsure;
    }
    let mut at = space + 1;
    let target_start = at;
    if bytes.get(at).is_some_and(|b| *b != b'/') {
        return Plain::Unsure;
    }
    at += PLAIN_TARGET_CHAR.run(&bytes[at..]);
    let mut counted = at - target_start;
    match bytes.get(at) {
        None => return Plain::Incomplete,
        Some(b' ') if counted > 0 => at += 1,
        Some(_) => return Plain::Unsure,
    }
    let version = &bytes[at..bytes.len().min(at + 10)];
    let (full_11, full_10) = (b"HTTP/1.1\r\n", b"HTTP/1.0\r\n");
    if version.len() < 10 {
        let prefix = |full: &[u8]| full.starts_with(version);
        return match prefix(full_11) || prefix(full_10) {
            true => Plain::Incomplete,
            false => Plain::Unsure,
        };
    }
    if version != full_11 && version != full_10 {
        return Plain::Unsure;
    }
    at += 10;

    let mut count = 0;
    let mut length: Option<u64> = None;
    loop {
        if at > rules.max_head_bytes {
            return Plain::Unsure;
        }
        match bytes.get(at) {
            None => return Plain::Incomplete,
            Some(b'\r') => {
                return match bytes.get(at + 1) {
                    None => Plain::Incomplete,
                    Some(b'\n') if at + 2 <= rules.max_head_bytes => {
                        let next = match length {
                            Some(n) if n > 0 => Framing::Length(n),
                            _ => Framing::Head,
                        };
                        Plain::Pass(at + 2, next)
                    }
                    Some(_) => Plain::Unsure,
                };
            }
            Some(_) => {}
        }
        let name_start = at;
        at += TCHAR.run(&bytes[at..]);
        let name = &bytes[name_start..at];
        match bytes.get(at) {
            None => return Plain::Incomplete,
            Some(b':') if !name.is_empty() => at += 1,
            Some(_) => return Plain::Unsure,
        }
        while bytes.get(at).is_some_and(|b| matches!(b, b' ' | b'\t')) {
            at += 1;
        }
        let value_start = at;
        at += value_run(&bytes[at..]);
        let value = trim_ows(&bytes[value_start..at]);
        match (bytes.get(at), bytes.get(at + 1)) {
            (None, _) | (Some(b'\r'), None) => return Plain::Incomplete,
            (Some(b'\r'), Some(b'\n')) => at += 2,
            _ => return Plain::Unsure,
        }
        count += 1;
        counted += name.len() + value.len();
        if count > rules.max_headers || counted > rules.max_head_bytes {
            return Plain::Unsure;
        }
        match name.len() {
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                let digits = value.len() <= 19 && value.iter().all(u8::is_ascii_digit);
                match (length, digits && !value.is_empty()) {
                    (None, true) => {
                        length = Some(value.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
                    }
                    _ => return Plain::Unsure,
                }
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => return Plain::Unsure,
            7 if name.eq_ignore_ascii_case(b"upgrade") => return Plain::Unsure,
            _ => {}
        }
    }
}

fn judge_head(head: &[u8], rules: &Rules) -> Judgement {
    let mut lines = head.split(|b| *b == b'\n').map(strip_cr);
    let request_line = lines.next().unwrap_or_default();
    if request_line == b"PRI * HTTP/2.0" {
        return Judgement::Pass(Framing::Aside);
    }
    let mut words = request_line
        .split(|b| matches!(b, b' ' | b'\t'))
        .filter(|word| !word.is_empty());
    let method = words.next().unwrap_or_default();
    let target = words.next().unwrap_or_default();
    let version = words.next();
    let extra_word = words.next().is_some();
    let refuse = |status: StatusCode, body: &'static str, details: &'static str| {
        Judgement::Refuse(Refusal {
            status,
            body,
            details,
            method: String::from_utf8_lossy(method).into_owned(),
            target: String::from_utf8_lossy(target).into_owned(),
        })
    };
    let bad_request = || refuse(StatusCode::BAD_REQUEST, "Bad Request", "http1.codec_error");
    let invalid_characters = || {
        refuse(
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "http1.invalid_characters",
        )
    };
    let low_version = || {
        refuse(
            StatusCode::UPGRADE_REQUIRED,
            "Upgrade Required",
            "low_version",
        )
    };
    let too_large = |details| {
        refuse(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "Request Header Fields Too Large",
            details,
        )
    };
    if head.len() > rules.max_head_bytes {
        return too_large("http1.headers_too_large");
    }
    let known_method = is_known_method(method)
        || (rules.allow_custom_methods && !method.is_empty() && TCHAR.all(method));
    if request_line.contains(&b'\r') || !known_method || extra_word {
        return bad_request();
    }
    let connect = method == b"CONNECT";
    if !target_is_valid(target, connect) {
        return bad_request();
    }
    if target[0] == b'*' && method != b"OPTIONS" {
        return refuse(StatusCode::BAD_REQUEST, "Bad Request", "http1.invalid_url");
    }
    // Envoy reads words separated by any run of blanks; hyper wants single spaces.
    let single_spaced = method.len() + target.len() + version.map_or(0, |v| v.len() + 1) + 1;
    let mut rewrite = request_line.len() != single_spaced || request_line.contains(&b'\t');

    // One pass over the header lines, allocating nothing: limits, characters, framing.
    let mut count = 0;
    let mut counted = target.len();
    let mut chunked = false;
    let mut bad_coding = false;
    let mut length: Option<u64> = None;
    let mut upgrade = false;
    for line in lines.clone().take_while(|line| !line.is_empty()) {
        if matches!(line[0], b' ' | b'\t') {
            // obs-fold: Envoy joins the continuation to its line with one space.
            let more = trim_ows(line);
            if count == 0 {
                return bad_request();
            }
            if !VALUE_CHAR.all(more) {
                return invalid_characters();
            }
            counted += more.len() + usize::from(!more.is_empty());
            rewrite = true;
            continue;
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            return bad_request();
        };
        let name = &line[..colon];
        if name.is_empty() || !TCHAR.all(name) {
            return bad_request();
        }
        let value = trim_ows(&line[colon + 1..]);
        if !VALUE_CHAR_OR_CR.all(value) {
            return invalid_characters();
        }
        // A bare CR inside a value is dropped, as Envoy's parser does; hyper would refuse it.
        rewrite |= memchr::memchr(b'\r', value).is_some();
        count += 1;
        counted += name.len() + value.len();
        if count > rules.max_headers {
            return too_large("http1.too_many_headers");
        }
        if counted > rules.max_head_bytes {
            return too_large("http1.headers_too_large");
        }
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Only `chunked`, once, is a transfer coding Envoy decodes.
            bad_coding |= chunked || !value.eq_ignore_ascii_case(b"chunked");
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let parsed = std::str::from_utf8(value)
                .ok()
                .filter(|text| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|text| text.parse::<u64>().ok());
            // One length, once: a repeated line is refused even when it agrees.
            match (parsed, length) {
                (Some(new), None) => length = Some(new),
                _ => return bad_request(),
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            // An h2c upgrade is served as plain HTTP/1.1, as Envoy does.
            upgrade |= !value.eq_ignore_ascii_case(b"h2c");
        }
    }
    if bad_coding {
        return refuse(
            StatusCode::NOT_IMPLEMENTED,
            "Not Implemented",
            "http1.invalid_transfer_encoding",
        );
    }
    match version {
        Some(b"HTTP/1.1" | b"HTTP/1.0") => {}
        // HTTP/0.9 (no version) and other HTTP versions: Envoy asks for an upgrade.
        None => return low_version(),
        Some(other) if other.starts_with(b"HTTP/") => return low_version(),
        Some(_) => return bad_request(),
    }
    if chunked && length.is_some() && !rules.allow_chunked_length {
        return refuse(
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "http1.content_length_and_chunked_not_allowed",
        );
    }
    // The connection manager refuses a fragment (Envoy's default); hyper would strip it.
    if target.contains(&b'#') && !STRIP_FRAGMENTS.load(std::sync::atomic::Ordering::Relaxed) {
        return refuse(StatusCode::BAD_REQUEST, "", PATH_NORMALIZATION_FAILED);
    }

    let next = if upgrade || connect {
        // Whether the upstream accepts is not known here: the rest is hyper's to read.
        Framing::Aside
    } else if chunked {
        Framing::Chunked(Chunk::Size { size: 0, digits: 0 })
    } else {
        match length {
            Some(n) if n > 0 => Framing::Length(n),
            _ => Framing::Head,
        }
    };
    if !rewrite {
        return Judgement::Pass(next);
    }
    let mut normalized = Vec::with_capacity(head.len());
    for (i, word) in [Some(method), Some(target), version]
        .into_iter()
        .flatten()
        .enumerate()
    {
        if i > 0 {
            normalized.push(b' ');
        }
        normalized.extend_from_slice(word);
    }
    normalized.extend_from_slice(b"\r\n");
    for line in lines.take_while(|line| !line.is_empty()) {
        if matches!(line[0], b' ' | b'\t') {
            let more = trim_ows(line);
            if !more.is_empty() {
                normalized.truncate(normalized.len() - 2);
                normalized.push(b' ');
                normalized.extend_from_slice(more);
                normalized.extend_from_slice(b"\r\n");
            }
            continue;
        }
        let colon = line.iter().position(|b| *b == b':').unwrap_or(0);
        normalized.extend_from_slice(&line[..colon]);
        normalized.extend_from_slice(b": ");
        normalized.extend(trim_ows(&line[colon + 1..]).iter().filter(|b| **b != b'\r'));
        normalized.extend_from_slice(b"\r\n");
    }
    normalized.extend_from_slice(b"\r\n");
    Judgement::Rewrite(normalized, next)
}

/// What hyper serves a downstream connection through: the guard over the connection `S`.
/// An upgrade hands this type back (see `hyper_util`'s `auto::upgrade::downcast`).
pub type ServedIo<S> = hyper_util::rt::TokioIo<GuardedIo<S>>;

/// What the guard sees of a connection's traffic: bytes each way (the connection manager's
/// `downstream_cx_rx|tx_bytes_total`), and whether the peer ended the connection, so its end
/// counts as remote or local.
#[derive(Debug, Default)]
pub struct Wire {
    pub rx_bytes: Arc<Stat>,
    pub tx_bytes: Arc<Stat>,
    /// A read saw the peer's end of the stream or an error (a reset).
    pub peer_ended: AtomicBool,
    /// Whether requests were in flight when the peer ended it.
    pub peer_ended_active: AtomicBool,
    /// The connection's requests in flight.
    pub in_flight: Arc<Stat>,
}

impl Wire {
    /// `room`: the read had room, so nothing read means the stream's end.
    fn count_read(&self, read: usize, room: bool, result: &io::Result<()>) {
        match result {
            Ok(()) if read > 0 => self.rx_bytes.add(read as u64),
            Ok(()) if !room => {}
            _ => self.ended_by_peer(),
        }
    }

    fn count_written(&self, result: &Poll<io::Result<usize>>) {
        match result {
            Poll::Ready(Ok(n)) => self.tx_bytes.add(*n as u64),
            Poll::Ready(Err(_)) => self.ended_by_peer(),
            Poll::Pending => {}
        }
    }

    fn ended_by_peer(&self) {
        if !self.peer_ended.swap(true, Ordering::Relaxed) {
            let active = self.in_flight.get() > 0;
            self.peer_ended_active.store(active, Ordering::Relaxed);
        }
    }
}

/// A downstream connection read through the guard.
pub struct GuardedIo<S> {
    inner: S,
    scanner: Scanner,
    /// Judged bytes waiting for hyper (a rewritten head and what followed it).
    ready: BytesMut,
    /// Unjudged bytes: a head still arriving.
    held: BytesMut,
    refusals: Arc<Refusals>,
    wire: Arc<Wire>,
    /// When a head still arriving runs out of `request_headers_timeout`.
    head_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> GuardedIo<S> {
    /// Guards `inner` by `rules`; refusals are left in `refusals`, traffic counted in `wire`.
    /// `aside`: the connection speaks HTTP/2 only, and the guard has nothing to judge.
    pub fn new(
        inner: S,
        rules: Rules,
        refusals: Arc<Refusals>,
        wire: Arc<Wire>,
        aside: bool,
    ) -> Self {
        GuardedIo {
            inner,
            scanner: Scanner {
                rules,
                framing: if aside { Framing::Aside } else { Framing::Head },
                heads: 0,
            },
            ready: BytesMut::new(),
            held: BytesMut::new(),
            refusals,
            wire,
            head_deadline: None,
        }
    }

    /// Judges what is held: passes what it can to `ready`, keeps an incomplete head.
    fn judge_held(&mut self) {
        while !self.held.is_empty() {
            let at = match self.scanner.scan(&self.held) {
                Scan::Clean => {
                    let all = self.held.split();
                    self.ready.unsplit(all);
                    return;
                }
                Scan::Stop(at) => at,
            };
            self.ready.extend_from_slice(&self.held[..at]);
            self.held.advance(at);
            match judge(&self.held, &self.scanner.rules) {
                None => {
                    if self.held.len() > self.scanner.rules.max_head_bytes {
                        let method_end = self
                            .held
                            .iter()
                            .position(|b| *b == b' ')
                            .unwrap_or(0)
                            .min(32);
                        self.refuse(Refusal {
                            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            body: "Request Header Fields Too Large",
                            details: "http1.headers_too_large",
                            method: String::from_utf8_lossy(&self.held[..method_end]).into_owned(),
                            target: String::new(),
                        });
                    }
                    return;
                }
                Some((len, Judgement::Pass(next))) => {
                    let head = self.held.split_to(len);
                    self.ready.extend_from_slice(&head);
                    self.scanner.framing = next;
                    self.scanner.heads += 1;
                }
                Some((len, Judgement::Rewrite(bytes, next))) => {
                    self.held.advance(len);
                    self.ready.extend_from_slice(&bytes);
                    self.scanner.framing = next;
                    self.scanner.heads += 1;
                }
                Some((_, Judgement::Refuse(refusal))) => {
                    self.refuse(refusal);
                    return;
                }
            }
        }
    }

    /// The connection and what the guard read from it that hyper has not yet: after an upgrade,
    /// bytes the tunnel must pass on before any it reads itself.
    pub fn into_parts(self) -> (S, BytesMut) {
        let mut unread = self.ready;
        unread.unsplit(self.held);
        (self.inner, unread)
    }

    fn refuse(&mut self, refusal: Refusal) {
        let _ = self.refusals.0.set((self.scanner.heads, refusal));
        self.ready.extend_from_slice(STAND_IN);
        self.held.clear();
        self.scanner.framing = Framing::Refused;
    }
}

impl<S: AsyncRead + Unpin> GuardedIo<S> {
    /// Reads from the connection into `buf`, counting what came.
    fn read_inner(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let (before, room) = (buf.filled().len(), buf.remaining() > 0);
        let result = ready!(Pin::new(&mut self.inner).poll_read(cx, buf));
        self.wire
            .count_read(buf.filled().len() - before, room, &result);
        Poll::Ready(result)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for GuardedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            match this.scanner.framing {
                // Nothing after a refused head is read: the reply closes the connection.
                Framing::Refused => return Poll::Pending,
                Framing::Aside if this.held.is_empty() => return this.read_inner(cx, buf),
                _ => {}
            }
            if this.held.is_empty() {
                // The common case: read straight into hyper's buffer and judge it there.
                let start = buf.filled().len();
                ready!(this.read_inner(cx, buf))?;
                let filled = buf.filled().len();
                if filled == start {
                    return Poll::Ready(Ok(()));
                }
                match this.scanner.scan(&buf.filled()[start..]) {
                    Scan::Clean => return Poll::Ready(Ok(())),
                    Scan::Stop(at) => {
                        this.held.extend_from_slice(&buf.filled()[start + at..]);
                        buf.set_filled(start + at);
                        this.judge_held();
                        if at > 0 {
                            return Poll::Ready(Ok(()));
                        }
                    }
                }
            } else {
                // A head is still arriving (rare: most heads come in one read): read more
                // behind it, until `request_headers_timeout` says no more, as Envoy's 408.
                if let Some(timeout) = this.scanner.rules.headers_timeout {
                    let deadline = this
                        .head_deadline
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    if deadline.as_mut().poll(cx).is_ready() {
                        this.head_deadline = None;
                        this.refuse(Refusal {
                            status: StatusCode::REQUEST_TIMEOUT,
                            body: "request header timeout",
                            details: REQUEST_HEADER_TIMEOUT,
                            method: String::new(),
                            target: String::new(),
                        });
                        continue;
                    }
                }
                let mut chunk = [0u8; 4096];
                let mut more = ReadBuf::new(&mut chunk);
                ready!(this.read_inner(cx, &mut more))?;
                if more.filled().is_empty() {
                    // The peer stopped mid-head: hyper sees what came, then the end.
                    let held = this.held.split();
                    this.ready.unsplit(held);
                    this.scanner.framing = Framing::Aside;
                    if this.ready.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    continue;
                }
                this.held.extend_from_slice(more.filled());
                let heads = this.scanner.heads;
                this.judge_held();
                // The head came whole: a next one still arriving gets a timeout of its own.
                if this.scanner.heads != heads || this.held.is_empty() {
                    this.head_deadline = None;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GuardedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, data);
        self.wire.count_written(&written);
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written =
            crate::gathered_write::poll_write_gathered(Pin::new(&mut self.inner), cx, data);
        self.wire.count_written(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delivers `data` in pieces of the given sizes (cycled), then the end of the stream.
    struct Pieces {
        data: Vec<u8>,
        sizes: Vec<usize>,
        turn: usize,
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let size = self.sizes[self.turn % self.sizes.len()];
            self.turn += 1;
            let n = size.min(self.data.len()).min(buf.remaining());
            let piece: Vec<u8> = self.data.drain(..n).collect();
            buf.put_slice(&piece);
            Poll::Ready(Ok(()))
        }
    }

    const RULES: Rules = Rules {
        max_head_bytes: 1024,
        max_headers: 10,
        allow_chunked_length: false,
        allow_custom_methods: false,
        headers_timeout: None,
    };

    /// What hyper would read through the guard, for `input` arriving in pieces of `sizes`,
    /// read into buffers of `buffer` bytes; and the refusal left, if any.
    /// Also: how many heads passed, and whether the guard still follows the stream.
    fn through(input: &[u8], sizes: &[usize], buffer: usize) -> Outcome {
        let refusals = Arc::new(Refusals::default());
        let pieces = Pieces {
            data: input.to_vec(),
            sizes: sizes.to_vec(),
            turn: 0,
        };
        let mut guard = GuardedIo::new(pieces, RULES, refusals.clone(), Arc::default(), false);
        let mut out = Vec::new();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        loop {
            let mut space = vec![0u8; buffer];
            let mut buf = ReadBuf::new(&mut space);
            match Pin::new(&mut guard).poll_read(&mut cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => break,
                Poll::Ready(Ok(())) => out.extend_from_slice(buf.filled()),
                Poll::Ready(Err(error)) => panic!("read failed: {error}"),
                // Only a refusal stops the stream short of its end.
                Poll::Pending => break,
            }
        }
        let refusal = refusals.0.get().map(|(_, refusal)| refusal.clone());
        let following = guard.scanner.framing == Framing::Head;
        (out, refusal, guard.scanner.heads, following)
    }

    type Outcome = (Vec<u8>, Option<Refusal>, u64, bool);

    /// Every way `input` can be cut up arrives the same.
    fn all_cuts(input: &[u8]) -> Outcome {
        let whole = through(input, &[input.len().max(1)], 64 * 1024);
        for sizes in [&[1][..], &[2], &[3, 1], &[7], &[64], &[5, 100, 1]] {
            for buffer in [1, 16, 4096] {
                assert_eq!(
                    through(input, sizes, buffer),
                    whole,
                    "pieces {sizes:?}, buffer {buffer}"
                );
            }
        }
        whole
    }

    #[test]
    fn valid_pipelined_requests_pass_unchanged_however_they_arrive() {
        let input: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n\
            GET /inside-a-body HTTP/1.1\r\n\r\n\
            POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
            4;ext=1\r\nGET \r\n19\r\n/also-inside HTTP/1.1\r\n\r\n\r\n0\r\nx-trailer: 1\r\n\r\n\
            \r\nGET /c HTTP/1.1\nHost: x\n\n\
            GET /d HTTP/1.1\r\nHost: x\r\n\r\n";
        let (out, refusal, heads, following) = all_cuts(input);
        assert_eq!(refusal, None);
        assert_eq!(out, input);
        assert_eq!(heads, 4, "the bodies' insides are not heads");
        assert!(following, "the guard kept its place to the end");
    }

    #[test]
    fn a_refused_head_becomes_the_stand_in_and_nothing_after_it_passes() {
        let first: &[u8] = b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n";
        let input = [
            first,
            b"get /second HTTP/1.1\r\nHost: x\r\n\r\nGET /third HTTP/1.1\r\n\r\n",
        ]
        .concat();
        let (out, refusal, heads, _) = all_cuts(&input);
        assert_eq!(out, [first, STAND_IN].concat());
        assert_eq!(heads, 1);
        let refusal = refusal.expect("refused");
        assert_eq!(refusal.status, StatusCode::BAD_REQUEST);
        assert_eq!(refusal.details, "http1.codec_error");
        assert_eq!(
            (refusal.method.as_str(), refusal.target.as_str()),
            ("get", "/second")
        );
    }

    #[test]
    fn heads_are_judged_as_envoy_judges_them() {
        type Expected = Option<(u16, &'static str)>;
        let cases: [(&[u8], Expected); 14] = [
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", Some((400, "http1.content_length_and_chunked_not_allowed"))),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n", Some((400, "http1.content_length_and_chunked_not_allowed"))),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", Some((501, "http1.invalid_transfer_encoding"))),
            (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", Some((400, "http1.codec_error"))),
            (b"GET / HTTP/1.2\r\n\r\n", Some((426, "low_version"))),
            (b"GET /\r\n\r\n", Some((426, "low_version"))),
            (b"GET / http/1.1\r\n\r\n", Some((400, "http1.codec_error"))),
            (b"FOO / HTTP/1.1\r\n\r\n", Some((400, "http1.codec_error"))),
            (b"GET noslash HTTP/1.1\r\n\r\n", Some((400, "http1.codec_error"))),
            (b"GET /a#b HTTP/1.1\r\n\r\n", Some((400, "path_normalization_failed"))),
            (b"GET / HTTP/1.1\r\nx-a: \x01\r\n\r\n", Some((400, "http1.invalid_characters"))),
            (b"GET / HTTP/1.1\r\nbad name: 1\r\n\r\n", Some((400, "http1.codec_error"))),
            (b"GET / HTTP/1.1\r\na:1\r\nb:1\r\nc:1\r\nd:1\r\ne:1\r\nf:1\r\ng:1\r\nh:1\r\ni:1\r\nj:1\r\nk:1\r\n\r\n", Some((431, "http1.too_many_headers"))),
            (b"PURGE /a?q=1 HTTP/1.0\r\nHost: x\r\n\r\n", None),
        ];
        for (head, expected) in cases {
            let (out, refusal, _, _) = all_cuts(head);
            let got = refusal.as_ref().map(|r| (r.status.as_u16(), r.details));
            assert_eq!(got, expected, "{}", String::from_utf8_lossy(head));
            if expected.is_none() {
                assert_eq!(out, head);
            }
        }
    }

    #[test]
    fn what_envoy_accepts_and_hyper_would_not_is_normalized() {
        let (out, refusal, heads, _) = all_cuts(b"GET\t/a  HTTP/1.1\r\nx-fold: a\r\n  b\r\nx-cr: 1\r2\r\n\r\nGET /next HTTP/1.1\r\n\r\n");
        assert_eq!((refusal, heads), (None, 2));
        assert_eq!(
            String::from_utf8_lossy(&out),
            "GET /a HTTP/1.1\r\nx-fold: a b\r\nx-cr: 12\r\n\r\nGET /next HTTP/1.1\r\n\r\n"
        );
    }

    #[test]
    fn a_head_over_the_limit_is_refused_before_it_ends() {
        let mut input = b"GET / HTTP/1.1\r\nx-big: ".to_vec();
        input.extend(std::iter::repeat_n(b'a', 2 * RULES.max_head_bytes));
        let (out, refusal, _, _) = through(&input, &[100], 4096);
        assert_eq!(out, STAND_IN);
        assert_eq!(
            refusal.map(|r| r.status),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
    }

    #[test]
    fn value_runs_stop_at_the_first_control_character() {
        for length in 0..40 {
            for stop in [b'\r', b'\n', 0x00, 0x1f, 0x7f] {
                let mut bytes = vec![b'v'; length];
                bytes.extend_from_slice(b"\t\x80 ~");
                let run = bytes.len();
                assert_eq!(value_run(&bytes), run);
                bytes.push(stop);
                bytes.extend_from_slice(b"after");
                assert_eq!(value_run(&bytes), run, "length {length}, stop {stop:#x}");
            }
        }
    }

    /// The one-pass recognizer of plain heads never disagrees with the full judgement: on
    /// every prefix of thousands of mutated heads, what it passes the full judgement passes
    /// alike (same length, same framing), and what it calls incomplete has no end yet.
    #[test]
    fn plain_heads_are_judged_as_the_full_judgement_judges_them() {
        let seeds: [&[u8]; 6] = [
            b"GET /a?b=c HTTP/1.1\r\nHost: example.com\r\nUser-Agent: x/1\r\n\r\n",
            b"POST /upload HTTP/1.0\r\nhost: x\r\ncontent-length: 12\r\naccept: */*\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length:  0 \r\nx-a:\t\xc3\xa9\r\n\r\n",
            b"UNSUBSCRIBE /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
        ];
        let alphabet = b" \t\r\n:/#*?x0A\x01\x7f\xff-";
        let rules = Rules {
            max_head_bytes: 70,
            max_headers: 3,
            ..RULES
        };
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut passed, mut unsure) = (0, 0);
        for round in 0..4000 {
            let mut head = seeds[round % seeds.len()].to_vec();
            for _ in 0..(round % 4) {
                let at = (next() as usize) % head.len();
                let byte = alphabet[(next() as usize) % alphabet.len()];
                match next() % 3 {
                    0 => head[at] = byte,
                    1 => head.insert(at, byte),
                    _ => drop(head.remove(at)),
                }
            }
            for end in 1..=head.len() {
                let bytes = &head[..end];
                if matches!(bytes[0], b'\r' | b'\n') {
                    continue;
                }
                let full = head_len(bytes).map(|len| (len, judge_head(&bytes[..len], &rules)));
                match plain_head(bytes, &rules) {
                    Plain::Pass(len, framing) => {
                        passed += 1;
                        assert_eq!(
                            full,
                            Some((len, Judgement::Pass(framing))),
                            "{:?}",
                            String::from_utf8_lossy(bytes)
                        );
                    }
                    Plain::Incomplete => {
                        assert_eq!(full, None, "{:?}", String::from_utf8_lossy(bytes))
                    }
                    Plain::Unsure => unsure += 1,
                }
            }
        }
        assert!(
            passed > 1000 && unsure > 1000,
            "{passed} passed, {unsure} unsure"
        );
    }

    #[test]
    fn http2_and_upgrades_are_left_to_hyper() {
        let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        h2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0, b'g', b'e', b't', b' ', 0xff]);
        assert_eq!(all_cuts(&h2), (h2.clone(), None, 1, false));
        let upgrade: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hello get / HTTP/1.1\r\n\r\n";
        assert_eq!(all_cuts(upgrade), (upgrade.to_vec(), None, 1, false));
    }

    /// `request_headers_timeout` runs from each head's first byte: a head that came whole
    /// late does not hand its clock to the one behind it.
    #[tokio::test(start_paused = true)]
    async fn each_head_gets_its_own_headers_timeout() {
        use std::time::Duration;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(4096);
        let rules = Rules {
            headers_timeout: Some(Duration::from_millis(300)),
            ..RULES
        };
        let refusals = Arc::new(Refusals::default());
        let mut guard = GuardedIo::new(server, rules, refusals.clone(), Arc::default(), false);
        let mut buf = vec![0u8; 4096];
        let wait = Duration::from_millis(200);
        client.write_all(b"GET /ok HTTP/1.1\r\nho").await.unwrap();
        assert!(
            tokio::time::timeout(wait, guard.read(&mut buf))
                .await
                .is_err()
        );
        client
            .write_all(b"st: a\r\n\r\nGET /b HTTP/1.1\r\nho")
            .await
            .unwrap();
        let n = guard.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET /ok HTTP/1.1\r\nhost: a\r\n\r\n");
        // The first head's 300 ms have run out; the second's have not.
        assert!(
            tokio::time::timeout(wait, guard.read(&mut buf))
                .await
                .is_err()
        );
        assert!(refusals.refused().is_none());
        let n = guard.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], STAND_IN);
        let refused = refusals.refused().map(|r| (r.status, r.details));
        assert_eq!(
            refused,
            Some((StatusCode::REQUEST_TIMEOUT, REQUEST_HEADER_TIMEOUT))
        );
    }
}
