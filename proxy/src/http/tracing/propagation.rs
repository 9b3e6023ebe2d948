//! Trace context on the wire: W3C `traceparent`/`tracestate` and B3 (the `x-b3-*` headers, or
//! the single `b3` header), read from a request and written on the upstream request.
//!
//! Reading never fails a request: a header that does not parse is as good as absent, and the
//! tracer starts a new trace. Headers longer than a trace context can be are refused unread.

use crate::hex;
use crate::http::headers::Present;
use crate::http::tracing::request_id::{Forcing, X_CLIENT_TRACE_ID};
use http::header::{HeaderMap, HeaderName, HeaderValue};

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub static B3: HeaderName = HeaderName::from_static("b3");
pub static B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub static B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub static B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub static B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub static B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// The longest `traceparent` read (version 00 is 55 bytes; later versions may append fields).
const MAX_TRACEPARENT: usize = 512;
/// The longest `b3` read: 32 + 16 + 16 hex digits, a flag and separators.
const MAX_B3: usize = 68;

/// How a context travelled (and so how it is passed on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Multi,
    B3Single,
}

/// A trace context read from a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    pub trace_id: u128,
    pub span_id: u64,
    /// B3's `x-b3-parentspanid`: the parent of the incoming span.
    pub parent_id: Option<u64>,
    /// The caller's sampling decision, if it made one.
    pub sampled: Option<bool>,
    /// B3 ids may be 64 bits; passed on as they came.
    pub trace_id_128: bool,
    pub format: Format,
}

/// What the B3 headers say when they carry a decision but no ids (`b3: 0`, a lone
/// `x-b3-sampled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum B3 {
    Context(u128, u64, Option<u64>, Option<bool>, bool, Format),
    DecisionOnly(bool),
}

/// Which trace headers a request carries, as the connection manager's one pass over its names
/// found them ([`Present`]). Most requests carry none, and each lookup of a name outside the
/// standard set hashes it byte by byte: the nine lookups this spares an untraced request had
/// cost it some 600 instructions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    pub traceparent: bool,
    pub tracestate: bool,
    /// `b3` or any `x-b3-*`.
    pub b3: bool,
    pub forcing: Forcing,
}

impl Carried {
    /// `present`'s flags, whose `true` only says "look": the connection manager may have
    /// removed a header since its scan. `force_trace`: whether `x-envoy-force-trace` is still
    /// there, which the connection manager has already looked up.
    pub fn of(present: &Present, headers: &HeaderMap, force_trace: bool) -> Carried {
        Carried {
            traceparent: present.traceparent,
            tracestate: present.tracestate,
            b3: present.b3,
            forcing: Forcing {
                client_trace_id: present.client_trace_id
                    && headers.contains_key(&X_CLIENT_TRACE_ID),
                force_trace,
            },
        }
    }
}

fn single<'a>(headers: &'a HeaderMap, name: &HeaderName, max: usize) -> Option<&'a [u8]> {
    let mut values = headers.get_all(name).iter();
    let value = values.next()?;
    // Two of a context header cannot be told apart: neither is used.
    if values.next().is_some() || value.len() > max {
        return None;
    }
    Some(value.as_bytes())
}

fn hex_u128(text: &[u8]) -> Option<u128> {
    if text.is_empty() || text.len() > 32 || !text.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u128::from_str_radix(std::str::from_utf8(text).ok()?, 16).ok()
}

fn hex_u64(text: &[u8]) -> Option<u64> {
    if text.len() != 16 {
        return None;
    }
    hex_u128(text).map(|v| v as u64)
}

fn lower_hex(text: &[u8]) -> bool {
    text.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Parses `traceparent` (W3C Trace Context level 1): `VERSION-TRACEID-SPANID-FLAGS`, lower-case
/// hex; all-zero ids and version `ff` are invalid; a later version may append `-...` fields.
pub fn parse_traceparent(value: &[u8]) -> Option<Context> {
    if value.len() < 55 || value.len() > MAX_TRACEPARENT {
        return None;
    }
    let (version, trace, span, flags) =
        (&value[0..2], &value[3..35], &value[36..52], &value[53..55]);
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    if !lower_hex(version) || version == b"ff" {
        return None;
    }
    if version == b"00" && value.len() != 55 {
        return None;
    }
    if value.len() > 55 && value[55] != b'-' {
        return None;
    }
    if !lower_hex(trace) || !lower_hex(span) || !lower_hex(flags) {
        return None;
    }
    let trace_id = hex_u128(trace)?;
    let span_id = hex_u64(span)?;
    let flags = u8::from_str_radix(std::str::from_utf8(flags).ok()?, 16).ok()?;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    Some(Context {
        trace_id,
        span_id,
        parent_id: None,
        sampled: Some(flags & 1 == 1),
        trace_id_128: true,
        format: Format::W3c,
    })
}

/// The W3C context of a request, if it carries a valid one.
pub fn read_w3c(headers: &HeaderMap) -> Option<Context> {
    parse_traceparent(single(headers, &TRACEPARENT, MAX_TRACEPARENT)?)
}

/// `tracestate` as received (several headers are joined, as the spec allows).
pub fn read_tracestate(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(&TRACESTATE).iter();
    let first = values.next()?;
    let rest: Vec<&HeaderValue> = values.collect();
    if rest.is_empty() {
        return Some(first.clone());
    }
    let mut joined = first.as_bytes().to_vec();
    for value in rest {
        joined.push(b',');
        joined.extend_from_slice(value.as_bytes());
    }
    HeaderValue::from_bytes(&joined).ok()
}

fn b3_sampled(value: &[u8]) -> Option<bool> {
    match value {
        b"1" | b"true" | b"d" => Some(true),
        b"0" | b"false" => Some(false),
        _ => None,
    }
}

/// Parses the single `b3` header: `TRACEID-SPANID[-SAMPLED[-PARENTSPANID]]`, or a lone
/// sampling decision (`0`, `1`, `d`).
pub fn parse_b3_single(value: &[u8]) -> Option<B3> {
    if value.len() > MAX_B3 {
        return None;
    }
    let parts: Vec<&[u8]> = value.split(|b| *b == b'-').collect();
    match parts.as_slice() {
        [flag] => b3_sampled(flag).map(B3::DecisionOnly),
        [trace, span, rest @ ..] if rest.len() <= 2 => {
            if !matches!(trace.len(), 16 | 32) {
                return None;
            }
            let trace_id = hex_u128(trace)?;
            let span_id = hex_u64(span)?;
            if trace_id == 0 || span_id == 0 {
                return None;
            }
            let sampled = match rest.first() {
                Some(flag) => Some(b3_sampled(flag)?),
                None => None,
            };
            let parent = match rest.get(1) {
                Some(parent) => Some(hex_u64(parent)?),
                None => None,
            };
            Some(B3::Context(
                trace_id,
                span_id,
                parent,
                sampled,
                trace.len() == 32,
                Format::B3Single,
            ))
        }
        _ => None,
    }
}

/// The B3 context of a request: the single header first, then the `x-b3-*` headers.
pub fn read_b3(headers: &HeaderMap) -> Option<B3> {
    if headers.contains_key(&B3) {
        return single(headers, &B3, MAX_B3).and_then(parse_b3_single);
    }
    let debug = single(headers, &B3_FLAGS, 1) == Some(b"1");
    let sampled = match single(headers, &B3_SAMPLED, 5) {
        Some(value) => b3_sampled(value),
        None => None,
    };
    let sampled = if debug { Some(true) } else { sampled };
    let (Some(trace), Some(span)) = (
        single(headers, &B3_TRACE_ID, 32),
        single(headers, &B3_SPAN_ID, 16),
    ) else {
        return sampled.map(B3::DecisionOnly);
    };
    if !matches!(trace.len(), 16 | 32) {
        return None;
    }
    let trace_id = hex_u128(trace)?;
    let span_id = hex_u64(span)?;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    let parent = match single(headers, &B3_PARENT_SPAN_ID, 16) {
        Some(parent) => Some(hex_u64(parent)?),
        None => None,
    };
    Some(B3::Context(
        trace_id,
        span_id,
        parent,
        sampled,
        trace.len() == 32,
        Format::B3Multi,
    ))
}

impl B3 {
    pub fn context(self) -> Option<Context> {
        match self {
            B3::Context(trace_id, span_id, parent_id, sampled, trace_id_128, format) => {
                Some(Context {
                    trace_id,
                    span_id,
                    parent_id,
                    sampled,
                    trace_id_128,
                    format,
                })
            }
            B3::DecisionOnly(_) => None,
        }
    }

    pub fn sampled(self) -> Option<bool> {
        match self {
            B3::Context(_, _, _, sampled, ..) => sampled,
            B3::DecisionOnly(sampled) => Some(sampled),
        }
    }
}

fn value(bytes: &[u8]) -> HeaderValue {
    // Hex digits and dashes are always a valid header value.
    HeaderValue::from_bytes(bytes).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// `traceparent: 00-TRACEID-SPANID-FLAGS`.
pub fn traceparent(trace_id: u128, span_id: u64, sampled: bool) -> HeaderValue {
    let mut out = [0u8; 55];
    out[0..3].copy_from_slice(b"00-");
    out[3..35].copy_from_slice(&hex::lower::<32>(trace_id));
    out[35] = b'-';
    out[36..52].copy_from_slice(&hex::lower::<16>(u128::from(span_id)));
    out[52..55].copy_from_slice(if sampled { b"-01" } else { b"-00" });
    value(&out)
}

/// A B3 trace id, 16 or 32 hex digits.
pub fn b3_trace_id(trace_id: u128, wide: bool) -> HeaderValue {
    if wide {
        value(&hex::lower::<32>(trace_id))
    } else {
        value(&hex::lower::<16>(trace_id))
    }
}

pub fn span_id_value(span_id: u64) -> HeaderValue {
    value(&hex::lower::<16>(u128::from(span_id)))
}

/// Writes the `x-b3-*` headers (and removes a single `b3`).
pub fn write_b3_multi(
    headers: &mut HeaderMap,
    trace_id: u128,
    wide: bool,
    span_id: u64,
    parent: Option<u64>,
    sampled: bool,
) {
    headers.remove(&B3);
    headers.insert(&B3_TRACE_ID, b3_trace_id(trace_id, wide));
    headers.insert(&B3_SPAN_ID, span_id_value(span_id));
    match parent {
        Some(parent) => {
            headers.insert(&B3_PARENT_SPAN_ID, span_id_value(parent));
        }
        None => {
            headers.remove(&B3_PARENT_SPAN_ID);
        }
    }
    headers.insert(
        &B3_SAMPLED,
        HeaderValue::from_static(if sampled { "1" } else { "0" }),
    );
    headers.remove(&B3_FLAGS);
}

/// Writes the single `b3` header (and removes the `x-b3-*` ones).
pub fn write_b3_single(
    headers: &mut HeaderMap,
    trace_id: u128,
    wide: bool,
    span_id: u64,
    parent: Option<u64>,
    sampled: bool,
) {
    for name in [
        &B3_TRACE_ID,
        &B3_SPAN_ID,
        &B3_PARENT_SPAN_ID,
        &B3_SAMPLED,
        &B3_FLAGS,
    ] {
        headers.remove(name);
    }
    let mut out = Vec::with_capacity(MAX_B3);
    if wide {
        out.extend_from_slice(&hex::lower::<32>(trace_id));
    } else {
        out.extend_from_slice(&hex::lower::<16>(trace_id));
    }
    out.push(b'-');
    out.extend_from_slice(&hex::lower::<16>(u128::from(span_id)));
    out.extend_from_slice(if sampled { b"-1" } else { b"-0" });
    if let Some(parent) = parent {
        out.push(b'-');
        out.extend_from_slice(&hex::lower::<16>(u128::from(parent)));
    }
    headers.insert(&B3, value(&out));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    #[test]
    fn the_scan_finds_what_lookups_find() {
        let names = [
            "traceparent",
            "tracestate",
            "b3",
            "x-b3-traceid",
            "x-b3-spanid",
            "x-b3-parentspanid",
            "x-b3-sampled",
            "x-b3-flags",
            "x-client-trace-id",
            "x-envoy-force-trace",
        ];
        let scan = |headers: &HeaderMap| {
            let force_trace = headers.contains_key("x-envoy-force-trace");
            Carried::of(&Present::scan(headers), headers, force_trace)
        };
        let by_lookup = |headers: &HeaderMap| Carried {
            traceparent: headers.contains_key(&TRACEPARENT),
            tracestate: headers.contains_key(&TRACESTATE),
            b3: names[2..8].iter().any(|name| headers.contains_key(*name)),
            forcing: Forcing::of(headers),
        };
        let plain = map(&[("host", "a"), ("user-agent", "b"), ("x-request-id", "c")]);
        assert_eq!(scan(&plain), Carried::default());
        for name in names {
            let mut headers = plain.clone();
            headers.append(name, HeaderValue::from_static("1"));
            assert_eq!(scan(&headers), by_lookup(&headers), "{name}");
            assert_ne!(scan(&headers), Carried::default(), "{name}");
        }
        let mut all = plain.clone();
        for name in names {
            all.append(name, HeaderValue::from_static("1"));
        }
        assert_eq!(scan(&all), by_lookup(&all));
    }

    #[test]
    fn valid_traceparents_are_read() {
        let context = read_w3c(&map(&[(
            "traceparent",
            &format!("00-{TRACE}-00f067aa0ba902b7-01"),
        )]))
        .unwrap();
        assert_eq!(context.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(context.span_id, 0x00f067aa0ba902b7);
        assert_eq!(context.sampled, Some(true));
        let unsampled = read_w3c(&map(&[(
            "traceparent",
            &format!("00-{TRACE}-00f067aa0ba902b7-00"),
        )]))
        .unwrap();
        assert_eq!(unsampled.sampled, Some(false));
        // A later version may carry more fields after the four it shares with 00.
        assert!(
            parse_traceparent(format!("01-{TRACE}-00f067aa0ba902b7-01-extra").as_bytes()).is_some()
        );
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        let cases = [
            String::new(),
            "garbage".into(),
            format!("00-{TRACE}-00f067aa0ba902b7-1"),
            format!("00-{}-00f067aa0ba902b7-01", TRACE.to_uppercase()),
            format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
            format!("00-{TRACE}-0000000000000000-01"),
            format!("ff-{TRACE}-00f067aa0ba902b7-01"),
            format!("00-{TRACE}-00f067aa0ba902b7-01-extra"),
            format!("01-{TRACE}-00f067aa0ba902b7-01x"),
            format!("00_{TRACE}-00f067aa0ba902b7-01"),
            format!("00-{TRACE}-00f067aa0ba902bz-01"),
        ];
        for case in cases {
            assert_eq!(parse_traceparent(case.as_bytes()), None, "{case:?}");
        }
        // Two traceparent headers: neither can be trusted.
        let twice = map(&[
            ("traceparent", &format!("00-{TRACE}-00f067aa0ba902b7-01")),
            ("traceparent", &format!("00-{TRACE}-00f067aa0ba902b8-01")),
        ]);
        assert_eq!(read_w3c(&twice), None);
    }

    #[test]
    fn oversized_headers_are_not_read() {
        let long = format!("01-{TRACE}-00f067aa0ba902b7-01-{}", "a".repeat(600));
        assert_eq!(read_w3c(&map(&[("traceparent", &long)])), None);
        let long_b3 = format!("{TRACE}-00f067aa0ba902b7-1-{}", "0".repeat(60));
        assert_eq!(read_b3(&map(&[("b3", &long_b3)])), None);
        let long_id = map(&[
            ("x-b3-traceid", &"a".repeat(40)),
            ("x-b3-spanid", "00f067aa0ba902b7"),
        ]);
        assert_eq!(read_b3(&long_id), None);
    }

    #[test]
    fn b3_multi_and_single_are_read() {
        let multi = read_b3(&map(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-parentspanid", "0020000000000001"),
            ("x-b3-sampled", "1"),
        ]))
        .unwrap()
        .context()
        .unwrap();
        assert_eq!(multi.trace_id, 0x463ac35c9f6413ad);
        assert!(!multi.trace_id_128);
        assert_eq!(multi.parent_id, Some(0x0020000000000001));
        assert_eq!((multi.sampled, multi.format), (Some(true), Format::B3Multi));

        let single = read_b3(&map(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0-05e3ac9a4f6e3b90",
        )]))
        .unwrap()
        .context()
        .unwrap();
        assert!(single.trace_id_128);
        assert_eq!(single.sampled, Some(false));
        assert_eq!(single.parent_id, Some(0x05e3ac9a4f6e3b90));
        assert_eq!(single.format, Format::B3Single);

        assert_eq!(read_b3(&map(&[("b3", "0")])), Some(B3::DecisionOnly(false)));
        assert_eq!(
            read_b3(&map(&[("x-b3-sampled", "0")])),
            Some(B3::DecisionOnly(false))
        );
        let debug = read_b3(&map(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-flags", "1"),
        ]));
        assert_eq!(debug.and_then(B3::sampled), Some(true));
    }

    #[test]
    fn malformed_b3_is_ignored() {
        for case in [
            "463ac35c9f6413ad",
            "463ac35c9f6413ad-",
            "463ac35c9f6413ad-a2fb4a1d1a96d312-x",
            "463ac35c9f6413ad-a2fb4a1d1a96d31-1",
            "463ac35c9f6413a-a2fb4a1d1a96d312-1",
            "0000000000000000-a2fb4a1d1a96d312-1",
            "463ac35c9f6413ad-a2fb4a1d1a96d312-1-zz",
            "463ac35c9f6413ad-a2fb4a1d1a96d312-1-a2fb4a1d1a96d312-9",
        ] {
            assert_eq!(parse_b3_single(case.as_bytes()), None, "{case}");
        }
        let bad_span = map(&[("x-b3-traceid", "463ac35c9f6413ad"), ("x-b3-spanid", "xyz")]);
        assert_eq!(read_b3(&bad_span), None);
    }

    #[test]
    fn mixed_w3c_and_b3_are_read_independently() {
        let headers = map(&[
            ("traceparent", &format!("00-{TRACE}-00f067aa0ba902b7-01")),
            ("b3", "463ac35c9f6413ad-a2fb4a1d1a96d312-0"),
        ]);
        assert_eq!(
            read_w3c(&headers).unwrap().trace_id,
            0x4bf92f3577b34da6a3ce929d0e0e4736
        );
        let b3 = read_b3(&headers).unwrap().context().unwrap();
        assert_eq!(b3.trace_id, 0x463ac35c9f6413ad);
        // A malformed traceparent next to good B3 leaves the B3 usable.
        let headers = map(&[
            ("traceparent", "00-zz"),
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ]);
        assert_eq!(read_w3c(&headers), None);
        assert!(read_b3(&headers).and_then(B3::context).is_some());
    }

    #[test]
    fn contexts_are_written_as_read() {
        let value = traceparent(0x4bf92f3577b34da6a3ce929d0e0e4736, 0xf067aa0ba902b7, true);
        assert_eq!(value, format!("00-{TRACE}-00f067aa0ba902b7-01").as_str());
        let parsed = parse_traceparent(value.as_bytes()).unwrap();
        assert_eq!(parsed.span_id, 0xf067aa0ba902b7);

        let mut headers = map(&[("b3", "1")]);
        write_b3_multi(&mut headers, 0x463ac35c9f6413ad, false, 7, Some(9), false);
        assert_eq!(headers.get("x-b3-traceid").unwrap(), "463ac35c9f6413ad");
        assert_eq!(headers.get("x-b3-spanid").unwrap(), "0000000000000007");
        assert_eq!(
            headers.get("x-b3-parentspanid").unwrap(),
            "0000000000000009"
        );
        assert_eq!(headers.get("x-b3-sampled").unwrap(), "0");
        assert!(!headers.contains_key("b3"));

        write_b3_single(&mut headers, 1 << 100, true, 7, None, true);
        assert_eq!(
            headers.get("b3").unwrap(),
            "00000010000000000000000000000000-0000000000000007-1"
        );
        assert!(!headers.contains_key("x-b3-traceid"));
    }
}
