//! The sampling decision Envoy keeps in `x-request-id`: the version nibble of the UUID (index 14)
//! says whether the request is traced and why (`9` sampled, `a` forced, `b` client-traced, `4`
//! not traced), so every proxy on the path agrees without another header. The random draw is the
//! UUID's first eight hex digits modulo 10000, so the same request samples the same everywhere.

use http::header::{HeaderMap, HeaderValue};

use crate::http::headers::X_REQUEST_ID;

pub static X_CLIENT_TRACE_ID: http::HeaderName = http::HeaderName::from_static("x-client-trace-id");
pub static X_ENVOY_FORCE_TRACE: http::HeaderName =
    http::HeaderName::from_static("x-envoy-force-trace");

const SAMPLED: u8 = b'9';
const FORCED: u8 = b'a';
const CLIENT: u8 = b'b';
const NOT_TRACED: u8 = b'4';

/// Why a request is traced, or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Sampling,
    ServiceForced,
    ClientForced,
    /// Not traced: no usable request id, or the draws said no.
    NotTraceable,
}

impl Reason {
    pub fn traced(self) -> bool {
        self != Reason::NotTraceable
    }
}

/// The sampling shares, in ten-thousandths.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    pub client: u32,
    pub random: u32,
    pub overall: u32,
}

fn reason(mark: u8) -> Reason {
    match mark {
        SAMPLED => Reason::Sampling,
        FORCED => Reason::ServiceForced,
        CLIENT => Reason::ClientForced,
        _ => Reason::NotTraceable,
    }
}

/// Which of the headers that trace a request without the random draw it carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forcing {
    pub client_trace_id: bool,
    pub force_trace: bool,
}

impl Forcing {
    /// Looked up one by one (the tracer finds them in its one pass over the names instead).
    pub fn of(headers: &HeaderMap) -> Forcing {
        Forcing {
            client_trace_id: headers.contains_key(&X_CLIENT_TRACE_ID),
            force_trace: headers.contains_key(&X_ENVOY_FORCE_TRACE),
        }
    }
}

/// Decides whether the request is traced and writes the decision into its `x-request-id`,
/// as Envoy does: a request already marked keeps its mark (another proxy decided); otherwise
/// `x-client-trace-id`, then `x-envoy-force-trace`, then the random draw; finally the overall
/// draw can still turn it off. A missing or malformed request id is never traced. `forcing`
/// says which of the first two headers the request carries.
pub fn decide(headers: &mut HeaderMap, sampling: Sampling, forcing: Forcing) -> Reason {
    let Some(value) = headers.get(&X_REQUEST_ID) else {
        return Reason::NotTraceable;
    };
    let id = value.as_bytes();
    if id.len() != 36 || id[14] == b'-' {
        return Reason::NotTraceable;
    }
    let Some(draw) = std::str::from_utf8(&id[..8])
        .ok()
        .and_then(|prefix| u64::from_str_radix(prefix, 16).ok())
        .map(|prefix| (prefix % 10_000) as u32)
    else {
        return Reason::NotTraceable;
    };
    let mut mark = id[14];
    if reason(mark) == Reason::NotTraceable {
        if forcing.client_trace_id && draw < sampling.client {
            mark = CLIENT;
        } else if forcing.force_trace {
            mark = FORCED;
        } else if draw < sampling.random {
            mark = SAMPLED;
        }
    }
    if draw >= sampling.overall {
        mark = NOT_TRACED;
    }
    if mark != id[14] {
        let mut rewritten = [0u8; 36];
        rewritten.copy_from_slice(id);
        rewritten[14] = mark;
        if let Ok(value) = HeaderValue::from_bytes(&rewritten) {
            headers.insert(&X_REQUEST_ID, value);
        }
    }
    reason(mark)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Sampling = Sampling {
        client: 10_000,
        random: 10_000,
        overall: 10_000,
    };
    const NONE: Sampling = Sampling {
        client: 10_000,
        random: 0,
        overall: 10_000,
    };

    fn with_id(id: &str, extra: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(&X_REQUEST_ID, HeaderValue::from_str(id).unwrap());
        for (name, value) in extra {
            headers.insert(*name, HeaderValue::from_static(value));
        }
        headers
    }

    fn decided(headers: &mut HeaderMap, sampling: Sampling) -> Reason {
        let forcing = Forcing::of(headers);
        decide(headers, sampling, forcing)
    }

    fn id(headers: &HeaderMap) -> &str {
        headers.get(&X_REQUEST_ID).unwrap().to_str().unwrap()
    }

    #[test]
    fn the_decision_is_written_into_the_version_nibble() {
        let mut sampled = with_id("11111111-2222-4333-8444-555555555555", &[]);
        assert_eq!(decided(&mut sampled, ALL), Reason::Sampling);
        assert_eq!(id(&sampled), "11111111-2222-9333-8444-555555555555");

        let mut unsampled = with_id("11111111-2222-4333-8444-555555555555", &[]);
        assert_eq!(decided(&mut unsampled, NONE), Reason::NotTraceable);
        assert_eq!(id(&unsampled), "11111111-2222-4333-8444-555555555555");

        let mut client = with_id(
            "11111111-2222-4333-8444-555555555555",
            &[("x-client-trace-id", "c")],
        );
        assert_eq!(decided(&mut client, NONE), Reason::ClientForced);
        assert_eq!(&id(&client)[14..15], "b");

        let mut forced = with_id(
            "11111111-2222-4333-8444-555555555555",
            &[("x-envoy-force-trace", "1")],
        );
        assert_eq!(decided(&mut forced, NONE), Reason::ServiceForced);
        assert_eq!(&id(&forced)[14..15], "a");
    }

    #[test]
    fn an_upstream_proxys_mark_is_kept_unless_overall_sampling_says_no() {
        let mut marked = with_id("11111111-2222-9333-8444-555555555555", &[]);
        assert_eq!(decided(&mut marked, NONE), Reason::Sampling);
        let mut overall_off = with_id("11111111-2222-9333-8444-555555555555", &[]);
        let off = Sampling { overall: 0, ..ALL };
        assert_eq!(decided(&mut overall_off, off), Reason::NotTraceable);
        assert_eq!(&id(&overall_off)[14..15], "4");
    }

    #[test]
    fn the_draw_is_the_ids_first_eight_hex_digits() {
        // 0x00000063 = 99 < 100 (1%): sampled; 0x00000064 = 100: not.
        let one_percent = Sampling { random: 100, ..ALL };
        let mut low = with_id("00000063-2222-4333-8444-555555555555", &[]);
        assert_eq!(decided(&mut low, one_percent), Reason::Sampling);
        let mut high = with_id("00000064-2222-4333-8444-555555555555", &[]);
        assert_eq!(decided(&mut high, one_percent), Reason::NotTraceable);
    }

    #[test]
    fn malformed_request_ids_are_never_traced_nor_changed() {
        for bad in ["not-a-uuid", "zzzzzzzz-2222-4333-8444-555555555555", ""] {
            let mut headers = with_id(bad, &[]);
            assert_eq!(decided(&mut headers, ALL), Reason::NotTraceable);
            assert_eq!(id(&headers), bad);
        }
        assert_eq!(decided(&mut HeaderMap::new(), ALL), Reason::NotTraceable);
    }
}
