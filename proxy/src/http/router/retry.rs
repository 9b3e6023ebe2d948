//! Retries, as Envoy's router decides them: whether an attempt's outcome is worth another try
//! (the policy's `retry_on` conditions, widened by `x-envoy-retry-on` and
//! `x-envoy-retry-grpc-on`), how many tries are left (`num_retries`, or `x-envoy-max-retries`),
//! the retry circuit breaker, and the jittered exponential back-off between tries.

use std::time::Duration;

use http::{HeaderMap, HeaderName, StatusCode};
use rand::Rng;
use remora_config::retry::{RetryOn, RetryPolicy};

use crate::stats::ClusterStats;
use crate::upstream::breakers::{Held, Limits};

static X_RETRY_ON: HeaderName = HeaderName::from_static("x-envoy-retry-on");
static X_RETRY_GRPC_ON: HeaderName = HeaderName::from_static("x-envoy-retry-grpc-on");
static X_MAX_RETRIES: HeaderName = HeaderName::from_static("x-envoy-max-retries");
static X_RETRIABLE_STATUS_CODES: HeaderName =
    HeaderName::from_static("x-envoy-retriable-status-codes");
static X_RETRIABLE_HEADER_NAMES: HeaderName =
    HeaderName::from_static("x-envoy-retriable-header-names");
static X_RATELIMITED: HeaderName = HeaderName::from_static("x-envoy-ratelimited");
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// What one attempt came to, as far as retrying is concerned.
#[derive(Debug)]
pub enum Tried<'a> {
    /// Response headers arrived.
    Response {
        status: StatusCode,
        headers: &'a HeaderMap,
    },
    /// No connection could be made.
    ConnectFailure,
    /// The stream failed before response headers; `sent`: the request had reached the
    /// upstream. A per-try timeout counts as this too.
    Reset { sent: bool, refused: bool },
    /// The pending-request breaker refused the attempt: never retried.
    Overflow,
}

/// Why no retry follows an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRetry {
    /// The outcome is not one the policy retries.
    NotRetriable,
    /// Retries used up (flag URX).
    LimitExceeded,
    /// The retry circuit breaker is full (flag UO).
    Overflow,
}

/// One request's retry state.
#[derive(Debug)]
pub struct Retries<'a> {
    policy: &'a RetryPolicy,
    retry_on: RetryOn,
    remaining: u32,
    /// More retriable statuses and header names from the request.
    extra_statuses: Vec<u16>,
    extra_header_names: Vec<HeaderName>,
    /// The upper bound of the next back-off (Envoy doubles it after each retry).
    next_back_off: Duration,
    /// The breaker place of the retry in flight, given back once its outcome is known.
    in_flight: Option<Held>,
    /// Retries made so far.
    pub made: u32,
}

impl<'a> Retries<'a> {
    /// The retry state for a request under `policy` (if any) and its headers; `None` when
    /// nothing would be retried.
    /// `control`: the request has `x-envoy-*` headers (else the retry headers are not looked
    /// up).
    pub fn new(
        policy: Option<&'a RetryPolicy>,
        request: &HeaderMap,
        control: bool,
    ) -> Option<Self> {
        static NONE: std::sync::OnceLock<RetryPolicy> = std::sync::OnceLock::new();
        let header_on = if !control {
            RetryOn::empty()
        } else {
            request
                .get(&X_RETRY_ON)
                .and_then(|v| v.to_str().ok())
                .map(RetryOn::from_http_header)
                .unwrap_or_default()
                .union(
                    request
                        .get(&X_RETRY_GRPC_ON)
                        .and_then(|v| v.to_str().ok())
                        .map(RetryOn::from_grpc_header)
                        .unwrap_or_default(),
                )
        };
        if policy.is_none() && header_on.is_empty() {
            return None;
        }
        let policy = policy.unwrap_or_else(|| {
            NONE.get_or_init(|| RetryPolicy {
                num_retries: 1,
                ..RetryPolicy::default()
            })
        });
        let retry_on = policy.retry_on.union(header_on);
        if retry_on.is_empty() {
            return None;
        }
        if !policy.retriable_request_headers.is_empty()
            && !policy
                .retriable_request_headers
                .iter()
                .any(|m| m.matches(request))
        {
            return None;
        }
        // The `x-envoy-*` overrides, looked up only in a request that has such headers.
        let control_header = |name| control.then(|| request.get(name)).flatten();
        let remaining = control_header(&X_MAX_RETRIES)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(policy.num_retries);
        let extra_statuses = control_header(&X_RETRIABLE_STATUS_CODES)
            .and_then(|v| v.to_str().ok())
            .map(|list| {
                list.split(',')
                    .filter_map(|code| code.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let extra_header_names = control_header(&X_RETRIABLE_HEADER_NAMES)
            .and_then(|v| v.to_str().ok())
            .map(|list| {
                list.split(',')
                    .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
                    .collect()
            })
            .unwrap_or_default();
        Some(Retries {
            policy,
            retry_on,
            remaining,
            extra_statuses,
            extra_header_names,
            next_back_off: policy.back_off.base,
            in_flight: None,
            made: 0,
        })
    }

    pub fn policy(&self) -> &RetryPolicy {
        self.policy
    }

    /// Whether the policy retries this outcome (before counting tries or breakers).
    fn retries(&self, tried: &Tried<'_>) -> bool {
        let on = self.retry_on;
        match tried {
            Tried::Overflow => false,
            Tried::ConnectFailure => on.intersects(
                RetryOn::CONNECT_FAILURE
                    .union(RetryOn::FIVE_XX)
                    .union(RetryOn::GATEWAY_ERROR)
                    .union(RetryOn::RESET)
                    .union(RetryOn::RESET_BEFORE_REQUEST),
            ),
            Tried::Reset { sent, refused } => {
                on.intersects(
                    RetryOn::FIVE_XX
                        .union(RetryOn::GATEWAY_ERROR)
                        .union(RetryOn::RESET),
                ) || (*refused && on.contains(RetryOn::REFUSED_STREAM))
                    || (!*sent && on.contains(RetryOn::RESET_BEFORE_REQUEST))
            }
            Tried::Response { status, headers } => self.retries_response(*status, headers),
        }
    }

    fn retries_response(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        // An upstream Envoy's rate limiting is retried only when asked for by name. The header
        // is looked up only when it could change the answer: not on a response that nothing
        // else would retry either, the usual one (a lookup hashes its long name).
        let limited = || headers.contains_key(&X_RATELIMITED);
        if self.retry_on.contains(RetryOn::ENVOY_RATELIMITED) && limited() {
            return true;
        }
        self.retries_status(status, headers) && !limited()
    }

    /// Whether the policy retries a response for its status or headers, rate limiting aside.
    fn retries_status(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        let on = self.retry_on;
        let code = status.as_u16();
        if on.contains(RetryOn::FIVE_XX) && status.is_server_error() {
            return true;
        }
        if on.contains(RetryOn::GATEWAY_ERROR) && matches!(code, 502..=504) {
            return true;
        }
        if on.contains(RetryOn::RETRIABLE_4XX) && code == 409 {
            return true;
        }
        if on.contains(RetryOn::RETRIABLE_STATUS_CODES)
            && (self.policy.retriable_status_codes.contains(&code)
                || self.extra_statuses.contains(&code))
        {
            return true;
        }
        if on.contains(RetryOn::RETRIABLE_HEADERS)
            && (self
                .policy
                .retriable_headers
                .iter()
                .any(|m| m.matches(headers))
                || self
                    .extra_header_names
                    .iter()
                    .any(|name| headers.contains_key(name)))
        {
            return true;
        }
        let grpc = RetryOn::GRPC_CANCELLED
            .union(RetryOn::GRPC_DEADLINE_EXCEEDED)
            .union(RetryOn::GRPC_RESOURCE_EXHAUSTED)
            .union(RetryOn::GRPC_UNAVAILABLE)
            .union(RetryOn::GRPC_INTERNAL);
        if on.intersects(grpc)
            && let Some(grpc_status) = headers
                .get(&GRPC_STATUS)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok())
        {
            let wanted = match grpc_status {
                1 => RetryOn::GRPC_CANCELLED,
                4 => RetryOn::GRPC_DEADLINE_EXCEEDED,
                8 => RetryOn::GRPC_RESOURCE_EXHAUSTED,
                13 => RetryOn::GRPC_INTERNAL,
                14 => RetryOn::GRPC_UNAVAILABLE,
                _ => RetryOn::empty(),
            };
            return on.contains(wanted);
        }
        false
    }

    /// Decides on a retry after an attempt, in Envoy's order: an outcome not retried ends the
    /// request (a success if it follows a retry); otherwise a try must be left, then a place
    /// under the retry breaker of `limits` (`pending`: requests waiting for a connection, for
    /// a retry budget). `Ok` holds the back-off to wait before the retry.
    pub fn decide(
        &mut self,
        tried: &Tried<'_>,
        limits: &Limits,
        pending: u64,
        stats: &ClusterStats,
    ) -> Result<Duration, NoRetry> {
        // The place of the retry that led here goes back, whatever comes next.
        let retried = self.in_flight.take().is_some();
        if !self.retries(tried) {
            if retried {
                stats.upstream_rq_retry_success.inc();
            }
            return Err(NoRetry::NotRetriable);
        }
        if self.remaining == 0 {
            stats.upstream_rq_retry_limit_exceeded.inc();
            return Err(NoRetry::LimitExceeded);
        }
        self.remaining -= 1;
        let Some(place) = limits.try_retry(pending) else {
            stats.upstream_rq_retry_overflow.inc();
            return Err(NoRetry::Overflow);
        };
        self.in_flight = Some(place);
        self.made += 1;
        stats.upstream_rq_retry.inc();
        stats.upstream_rq_retry_backoff_exponential.inc();
        Ok(self.back_off())
    }

    /// Envoy's jittered exponential back-off: random below a bound that starts at the base
    /// interval and doubles after each retry, up to the maximum.
    fn back_off(&mut self) -> Duration {
        let bound = self.next_back_off;
        let max = self.policy.back_off.max;
        self.next_back_off = if bound < max / 2 { bound * 2 } else { max };
        let bound_ms = bound.as_millis().max(1) as u64;
        Duration::from_millis(rand::rng().random_range(0..bound_ms)).min(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Thresholds;
    use crate::stats::Registry;
    use crate::upstream::breakers::Breakers;
    use remora_config::retry::BackOff;

    fn policy(retry_on: &str, num_retries: u32) -> RetryPolicy {
        RetryPolicy {
            retry_on: RetryOn::parse(retry_on).expect("valid"),
            num_retries,
            retriable_status_codes: vec![418],
            back_off: BackOff {
                base: Duration::from_millis(10),
                max: Duration::from_millis(40),
            },
            ..RetryPolicy::default()
        }
    }

    fn status(code: u16, headers: &HeaderMap) -> Tried<'_> {
        Tried::Response {
            status: StatusCode::from_u16(code).expect("status"),
            headers,
        }
    }

    #[test]
    fn conditions_match_envoys() {
        let none = HeaderMap::new();
        let five = policy("5xx", 1);
        let retries = Retries::new(Some(&five), &none, false).expect("enabled");
        assert!(retries.retries(&status(500, &none)));
        assert!(retries.retries(&Tried::ConnectFailure));
        assert!(retries.retries(&Tried::Reset {
            sent: true,
            refused: false
        }));
        assert!(!retries.retries(&status(409, &none)));
        assert!(!retries.retries(&Tried::Overflow));

        let gateway = policy("gateway-error", 1);
        let retries = Retries::new(Some(&gateway), &none, false).expect("enabled");
        assert!(retries.retries(&status(503, &none)));
        assert!(!retries.retries(&status(500, &none)));

        let codes = policy("retriable-status-codes,retriable-4xx", 1);
        let retries = Retries::new(Some(&codes), &none, false).expect("enabled");
        assert!(retries.retries(&status(418, &none)));
        assert!(retries.retries(&status(409, &none)));
        assert!(!retries.retries(&status(503, &none)));
        assert!(!retries.retries(&Tried::ConnectFailure));

        let before = policy("reset-before-request", 1);
        let retries = Retries::new(Some(&before), &none, false).expect("enabled");
        assert!(retries.retries(&Tried::Reset {
            sent: false,
            refused: false
        }));
        assert!(!retries.retries(&Tried::Reset {
            sent: true,
            refused: false
        }));

        let mut ratelimited = HeaderMap::new();
        ratelimited.insert(&X_RATELIMITED, "true".parse().expect("value"));
        let retries = Retries::new(Some(&five), &none, false).expect("enabled");
        assert!(
            !retries.retries(&status(503, &ratelimited)),
            "asked for by name only"
        );
        assert!(retries.retries(&status(503, &none)));
        let named = policy("envoy-ratelimited", 1);
        let retries = Retries::new(Some(&named), &none, false).expect("enabled");
        assert!(retries.retries(&status(429, &ratelimited)));
        assert!(
            retries.retries(&status(200, &ratelimited)),
            "whatever the status, as Envoy"
        );
        assert!(!retries.retries(&status(429, &none)));

        let grpc = policy("unavailable", 1);
        let retries = Retries::new(Some(&grpc), &none, false).expect("enabled");
        let mut trailers_only = HeaderMap::new();
        trailers_only.insert(&GRPC_STATUS, "14".parse().expect("value"));
        assert!(retries.retries(&status(200, &trailers_only)));
        trailers_only.insert(&GRPC_STATUS, "13".parse().expect("value"));
        assert!(!retries.retries(&status(200, &trailers_only)));
    }

    #[test]
    fn request_headers_widen_the_policy_and_set_the_count() {
        let mut request = HeaderMap::new();
        assert!(
            Retries::new(None, &request, true).is_none(),
            "nothing to retry on"
        );
        request.insert(&X_RETRY_ON, "connect-failure".parse().expect("value"));
        request.insert(&X_MAX_RETRIES, "4".parse().expect("value"));
        let retries = Retries::new(None, &request, true).expect("the header enables retries");
        assert_eq!(retries.remaining, 4);
        assert!(retries.retries(&Tried::ConnectFailure));
        assert!(!retries.retries(&status(503, &HeaderMap::new())));
    }

    #[test]
    fn tries_run_out_then_the_breaker_then_success_is_counted() {
        let registry = Registry::default();
        let stats = ClusterStats::new(&registry, "c");
        let breakers = Breakers::new(
            Thresholds {
                max_retries: 1,
                ..Thresholds::default()
            },
            Thresholds::default(),
        );
        let limits = breakers.for_priority(false);
        let five = policy("5xx", 2);
        let none = HeaderMap::new();
        let mut retries = Retries::new(Some(&five), &none, false).expect("enabled");
        let back_off = retries
            .decide(&status(503, &none), limits, 0, &stats)
            .expect("first retry");
        assert!(
            back_off < Duration::from_millis(10),
            "below the base at first"
        );
        // Another request holds the only retry place meanwhile.
        let mut other = Retries::new(Some(&five), &none, false).expect("enabled");
        assert_eq!(
            other.decide(&status(503, &none), limits, 0, &stats),
            Err(NoRetry::Overflow)
        );
        assert!(
            retries
                .decide(&status(503, &none), limits, 0, &stats)
                .is_ok()
        );
        assert_eq!(
            retries.decide(&status(503, &none), limits, 0, &stats),
            Err(NoRetry::LimitExceeded)
        );
        assert_eq!(stats.upstream_rq_retry.get(), 2);
        assert_eq!(stats.upstream_rq_retry_overflow.get(), 1);
        assert_eq!(stats.upstream_rq_retry_limit_exceeded.get(), 1);

        let mut third = Retries::new(Some(&five), &none, false).expect("enabled");
        assert!(third.decide(&status(503, &none), limits, 0, &stats).is_ok());
        assert_eq!(
            third.decide(&status(200, &none), limits, 0, &stats),
            Err(NoRetry::NotRetriable)
        );
        assert_eq!(stats.upstream_rq_retry_success.get(), 1);
    }

    #[test]
    fn back_off_bounds_double_up_to_the_maximum() {
        let five = policy("5xx", 10);
        let none = HeaderMap::new();
        let mut retries = Retries::new(Some(&five), &none, false).expect("enabled");
        let bounds: Vec<Duration> = (0..4)
            .map(|_| {
                let bound = retries.next_back_off;
                assert!(retries.back_off() < bound.max(Duration::from_millis(1)));
                bound
            })
            .collect();
        assert_eq!(bounds, [10, 20, 40, 40].map(Duration::from_millis).to_vec());
    }
}
