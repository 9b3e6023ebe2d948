//! Retry policies (route and virtual host `retry_policy`): when a failed attempt is tried
//! again, how many times, how long each attempt may take, how long to wait between attempts,
//! and which host a retry may pick. The `retry_on` words are parsed here for the config and
//! for the `x-envoy-retry-on` / `x-envoy-retry-grpc-on` request headers alike.

use std::time::Duration;

use xds_api::envoy::config::route::v3 as route_pb;

use crate::common::opt_duration;
use crate::error::{ConfigResult, err, field, item};
use crate::matcher::{HeaderMatch, header_matcher};
use crate::unsupported;

/// The conditions a retry policy retries on (Envoy's `retry_on` words), as bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn(u32);

impl RetryOn {
    /// Any 5xx response, and any reset, connect failure or per-try timeout.
    pub const FIVE_XX: RetryOn = RetryOn(1);
    /// 502, 503 and 504 responses, and any reset, connect failure or per-try timeout.
    pub const GATEWAY_ERROR: RetryOn = RetryOn(1 << 1);
    /// A reset, disconnect or per-try timeout before response headers.
    pub const RESET: RetryOn = RetryOn(1 << 2);
    /// A reset before the request reached the upstream.
    pub const RESET_BEFORE_REQUEST: RetryOn = RetryOn(1 << 3);
    /// A connection that could not be made (or timed out connecting).
    pub const CONNECT_FAILURE: RetryOn = RetryOn(1 << 4);
    /// 409 responses.
    pub const RETRIABLE_4XX: RetryOn = RetryOn(1 << 5);
    /// An HTTP/2 stream refused by the upstream (REFUSED_STREAM).
    pub const REFUSED_STREAM: RetryOn = RetryOn(1 << 6);
    /// Responses with a status in `retriable_status_codes`.
    pub const RETRIABLE_STATUS_CODES: RetryOn = RetryOn(1 << 7);
    /// Responses whose headers match `retriable_headers`.
    pub const RETRIABLE_HEADERS: RetryOn = RetryOn(1 << 8);
    /// Responses carrying `x-envoy-ratelimited` (from an upstream Envoy).
    pub const ENVOY_RATELIMITED: RetryOn = RetryOn(1 << 9);
    /// gRPC statuses (from `grpc-status` in response headers).
    pub const GRPC_CANCELLED: RetryOn = RetryOn(1 << 10);
    pub const GRPC_DEADLINE_EXCEEDED: RetryOn = RetryOn(1 << 11);
    pub const GRPC_RESOURCE_EXHAUSTED: RetryOn = RetryOn(1 << 12);
    pub const GRPC_UNAVAILABLE: RetryOn = RetryOn(1 << 13);
    pub const GRPC_INTERNAL: RetryOn = RetryOn(1 << 14);

    /// The HTTP words (`retry_on`, `x-envoy-retry-on`).
    const HTTP_WORDS: [(&'static str, RetryOn); 10] = [
        ("5xx", RetryOn::FIVE_XX),
        ("gateway-error", RetryOn::GATEWAY_ERROR),
        ("reset", RetryOn::RESET),
        ("reset-before-request", RetryOn::RESET_BEFORE_REQUEST),
        ("connect-failure", RetryOn::CONNECT_FAILURE),
        ("retriable-4xx", RetryOn::RETRIABLE_4XX),
        ("refused-stream", RetryOn::REFUSED_STREAM),
        ("retriable-status-codes", RetryOn::RETRIABLE_STATUS_CODES),
        ("retriable-headers", RetryOn::RETRIABLE_HEADERS),
        ("envoy-ratelimited", RetryOn::ENVOY_RATELIMITED),
    ];
    /// The gRPC words (`retry_on`, `x-envoy-retry-grpc-on`).
    const GRPC_WORDS: [(&'static str, RetryOn); 5] = [
        ("cancelled", RetryOn::GRPC_CANCELLED),
        ("deadline-exceeded", RetryOn::GRPC_DEADLINE_EXCEEDED),
        ("resource-exhausted", RetryOn::GRPC_RESOURCE_EXHAUSTED),
        ("unavailable", RetryOn::GRPC_UNAVAILABLE),
        ("internal", RetryOn::GRPC_INTERNAL),
    ];
    /// Words Envoy knows but Remora cannot act on (HTTP/3).
    const UNSUPPORTED_WORDS: [&'static str; 1] = ["http3-post-connect-failure"];

    pub const fn empty() -> RetryOn {
        RetryOn(0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, other: RetryOn) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    pub fn intersects(self, other: RetryOn) -> bool {
        self.0 & other.0 != 0
    }

    pub fn union(self, other: RetryOn) -> RetryOn {
        RetryOn(self.0 | other.0)
    }

    /// Reads a comma-separated list of words: HTTP and gRPC words in `retry_on`.
    pub fn parse(text: &str) -> Result<RetryOn, String> {
        Self::parse_words(text, true, true)
    }

    /// `x-envoy-retry-on` (HTTP words): unknown words are skipped, as Envoy does with headers.
    pub fn from_http_header(text: &str) -> RetryOn {
        Self::parse_lenient(text, &Self::HTTP_WORDS)
    }

    /// `x-envoy-retry-grpc-on` (gRPC words), unknown words skipped.
    pub fn from_grpc_header(text: &str) -> RetryOn {
        Self::parse_lenient(text, &Self::GRPC_WORDS)
    }

    fn parse_lenient(text: &str, words: &[(&str, RetryOn)]) -> RetryOn {
        text.split(',')
            .map(str::trim)
            .filter_map(|word| words.iter().find(|(w, _)| *w == word).map(|(_, on)| *on))
            .fold(RetryOn::empty(), RetryOn::union)
    }

    fn parse_words(text: &str, http: bool, grpc: bool) -> Result<RetryOn, String> {
        let mut on = RetryOn::empty();
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let known = http
                .then_some(&Self::HTTP_WORDS[..])
                .into_iter()
                .chain(grpc.then_some(&Self::GRPC_WORDS[..]))
                .flatten()
                .find(|(w, _)| *w == word);
            match known {
                Some((_, bit)) => on = on.union(*bit),
                None if Self::UNSUPPORTED_WORDS.contains(&word) => {
                    return Err(format!("{word:?} is not supported (Remora has no HTTP/3)"));
                }
                None => {
                    return Err(format!(
                        "{word:?} is not a retry condition; known: {}",
                        Self::HTTP_WORDS
                            .iter()
                            .chain(&Self::GRPC_WORDS)
                            .map(|(w, _)| *w)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
        }
        Ok(on)
    }
}

/// Envoy's jittered exponential back-off between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackOff {
    /// The first retry waits a random time below this; each later one below twice the last
    /// bound, up to `max`.
    pub base: Duration,
    pub max: Duration,
}

impl Default for BackOff {
    fn default() -> Self {
        BackOff {
            base: Duration::from_millis(25),
            max: Duration::from_millis(250),
        }
    }
}

/// Which host (and priority) a retry may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostSelection {
    /// `envoy.retry_host_predicates.previous_hosts`: avoid hosts already tried.
    pub avoid_previous_hosts: bool,
    /// How many times the load balancer may pick again to satisfy the predicate.
    pub max_attempts: u32,
    /// `envoy.retry_priorities.previous_priorities`: after this many attempts on a priority,
    /// later attempts go to the others.
    pub previous_priorities_every: Option<u32>,
}

/// A route's (or virtual host's) `retry_policy`.
#[derive(Debug, Default)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    /// Retries after the first attempt (Envoy's default 1).
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub per_try_idle_timeout: Option<Duration>,
    pub retriable_status_codes: Vec<u16>,
    pub retriable_headers: Vec<HeaderMatch>,
    /// Only requests matching these are retried (empty: every request).
    pub retriable_request_headers: Vec<HeaderMatch>,
    pub back_off: BackOff,
    pub host_selection: HostSelection,
}

/// Type URLs of the retry extensions Remora implements.
const PREVIOUS_HOSTS: &str = "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";
const PREVIOUS_PRIORITIES: &str =
    "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig";

pub fn retry_policy(proto: &route_pb::RetryPolicy, path: &str) -> ConfigResult<RetryPolicy> {
    let route_pb::RetryPolicy {
        retry_on,
        num_retries,
        per_try_timeout,
        per_try_idle_timeout,
        retry_priority,
        retry_host_predicate,
        host_selection_retry_max_attempts,
        retriable_status_codes,
        retry_back_off,
        retriable_headers,
        retriable_request_headers,
        rate_limited_retry_back_off,
        retry_options_predicates,
    } = proto;
    unsupported!(path, rate_limited_retry_back_off, retry_options_predicates);
    let retry_on = RetryOn::parse(retry_on)
        .map_err(|reason| crate::ConfigError::new(field(path, "retry_on"), reason))?;
    let mut statuses = Vec::with_capacity(retriable_status_codes.len());
    for (index, code) in retriable_status_codes.iter().enumerate() {
        match u16::try_from(*code) {
            Ok(code) if (100..=599).contains(&code) => statuses.push(code),
            _ => {
                return err(
                    item(path, "retriable_status_codes", index),
                    format!("{code} is not an HTTP status"),
                );
            }
        }
    }
    let matchers = |list: &[route_pb::HeaderMatcher], name: &str| {
        list.iter()
            .enumerate()
            .map(|(index, m)| header_matcher(m, &item(path, name, index)))
            .collect::<ConfigResult<Vec<_>>>()
    };
    let back_off = match retry_back_off {
        None => BackOff::default(),
        Some(route_pb::retry_policy::RetryBackOff {
            base_interval,
            max_interval,
        }) => {
            let bpath = field(path, "retry_back_off");
            let base = opt_duration(base_interval, &field(&bpath, "base_interval"))?
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    crate::ConfigError::new(
                        field(&bpath, "base_interval"),
                        "is required and must be above zero",
                    )
                })?;
            let max =
                opt_duration(max_interval, &field(&bpath, "max_interval"))?.unwrap_or(base * 10);
            if max < base {
                return err(
                    field(&bpath, "max_interval"),
                    "must not be below base_interval",
                );
            }
            BackOff { base, max }
        }
    };
    let mut host_selection = HostSelection {
        max_attempts: u32::try_from((*host_selection_retry_max_attempts).max(0))
            .unwrap_or(u32::MAX),
        ..HostSelection::default()
    };
    if *host_selection_retry_max_attempts == 0 {
        host_selection.max_attempts = 1;
    }
    for (index, predicate) in retry_host_predicate.iter().enumerate() {
        let ppath = item(path, "retry_host_predicate", index);
        let route_pb::retry_policy::RetryHostPredicate { name, config_type } = predicate;
        let type_url = config_type.as_ref().map(
            |route_pb::retry_policy::retry_host_predicate::ConfigType::TypedConfig(any)| {
                any.type_url.as_str()
            },
        );
        let is_previous_hosts = name == "envoy.retry_host_predicates.previous_hosts"
            || type_url.is_some_and(|url| url.ends_with(PREVIOUS_HOSTS));
        if !is_previous_hosts {
            return err(
                ppath,
                format!(
                    "{name:?} is not supported; Remora offers envoy.retry_host_predicates.previous_hosts"
                ),
            );
        }
        host_selection.avoid_previous_hosts = true;
    }
    if let Some(route_pb::retry_policy::RetryPriority { name, config_type }) = retry_priority {
        let ppath = field(path, "retry_priority");
        use route_pb::retry_policy::retry_priority::ConfigType;
        let any = config_type.as_ref().map(|ConfigType::TypedConfig(any)| any);
        let is_previous = name == "envoy.retry_priorities.previous_priorities"
            || any.is_some_and(|any| any.type_url.ends_with(PREVIOUS_PRIORITIES));
        if !is_previous {
            return err(
                ppath,
                format!(
                    "{name:?} is not supported; Remora offers envoy.retry_priorities.previous_priorities"
                ),
            );
        }
        let every = match any {
            Some(any) => {
                let config: xds_api::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig =
                    prost::Message::decode(any.value.as_slice()).map_err(|e| {
                        crate::ConfigError::new(field(&ppath, "typed_config"), e.to_string())
                    })?;
                config.update_frequency
            }
            None => 0,
        };
        if every <= 0 {
            return err(
                field(&ppath, "typed_config.update_frequency"),
                "must be above zero",
            );
        }
        host_selection.previous_priorities_every = Some(every as u32);
    }
    Ok(RetryPolicy {
        retry_on,
        num_retries: num_retries.unwrap_or(1),
        per_try_timeout: opt_duration(per_try_timeout, &field(path, "per_try_timeout"))?
            .filter(|d| !d.is_zero()),
        per_try_idle_timeout: opt_duration(
            per_try_idle_timeout,
            &field(path, "per_try_idle_timeout"),
        )?
        .filter(|d| !d.is_zero()),
        retriable_status_codes: statuses,
        retriable_headers: matchers(retriable_headers, "retriable_headers")?,
        retriable_request_headers: matchers(
            retriable_request_headers,
            "retriable_request_headers",
        )?,
        back_off,
        host_selection,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_on_words_are_read_and_unknown_ones_named() {
        let on = RetryOn::parse("5xx, connect-failure,unavailable").expect("valid");
        assert!(on.contains(RetryOn::FIVE_XX));
        assert!(on.contains(RetryOn::CONNECT_FAILURE));
        assert!(on.contains(RetryOn::GRPC_UNAVAILABLE));
        assert!(!on.intersects(RetryOn::RESET));
        let error = RetryOn::parse("5xx,bogus").expect_err("bogus");
        assert!(
            error.contains("\"bogus\" is not a retry condition"),
            "{error}"
        );
        assert!(RetryOn::parse("http3-post-connect-failure").is_err());
        // Headers: HTTP and gRPC words each in their own header, unknown words skipped.
        assert_eq!(RetryOn::from_http_header("reset, nope"), RetryOn::RESET);
        assert_eq!(
            RetryOn::from_grpc_header("5xx,cancelled"),
            RetryOn::GRPC_CANCELLED
        );
    }
}
