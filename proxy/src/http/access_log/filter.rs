//! Which requests a log writes: Envoy's access log filters (`status_code_filter`,
//! `duration_filter`, `response_flag_filter`, `header_filter`, `runtime_filter`, ...), judged
//! on what the entry recorded when its line would be written.
//!
//! A header filter reads the request's headers, which an entry does not keep (it keeps the
//! values its formats name). So header matchers are judged as the request is captured, on the
//! whole head, and the entry keeps one yes or no per matcher ([`HeaderChecks`]).

use http::HeaderMap;
use remora_config::access_log::LogFilter;
use remora_config::matcher::{HeaderMatch, PseudoHeaders};

use super::Entry;
use crate::http::headers::X_REQUEST_ID;

/// A log's filter, as built from its config: the config's tree, with each header matcher
/// replaced by its place in the logs' [`HeaderChecks`].
#[derive(Debug)]
pub(super) enum Filter {
    /// A filter judged on the entry alone (status, duration, flags, trace, runtime).
    Leaf(LogFilter),
    All(Vec<Filter>),
    Any(Vec<Filter>),
    /// The index of its matcher in [`HeaderChecks`].
    Header(usize),
}

impl Filter {
    /// The filter `config` describes; its header matchers are added to `checks`.
    pub(super) fn build(config: &LogFilter, checks: &mut HeaderChecks) -> Filter {
        let all = |filters: &[LogFilter], checks: &mut HeaderChecks| -> Vec<Filter> {
            filters
                .iter()
                .map(|filter| Filter::build(filter, checks))
                .collect()
        };
        match config {
            LogFilter::And(filters) => Filter::All(all(filters, checks)),
            LogFilter::Or(filters) => Filter::Any(all(filters, checks)),
            LogFilter::Header(matcher) => {
                checks.matchers.push(matcher.clone());
                checks
                    .unmatched
                    .push(matcher.matches_request(&PseudoHeaders::default(), &HeaderMap::new()));
                Filter::Header(checks.matchers.len() - 1)
            }
            leaf => Filter::Leaf(leaf.clone()),
        }
    }

    /// Whether the filter reads the request id (a runtime filter that samples by it).
    pub(super) fn reads_request_id(&self) -> bool {
        match self {
            Filter::Leaf(LogFilter::Runtime {
                independent_randomness,
                ..
            }) => !independent_randomness,
            Filter::All(filters) | Filter::Any(filters) => {
                filters.iter().any(Filter::reads_request_id)
            }
            _ => false,
        }
    }

    /// Whether `entry`'s line is written.
    pub(super) fn admits(&self, entry: &Entry) -> bool {
        let leaf = match self {
            Filter::All(filters) => return filters.iter().all(|filter| filter.admits(entry)),
            Filter::Any(filters) => return filters.iter().any(|filter| filter.admits(entry)),
            Filter::Header(index) => {
                return entry.header_checks.get(*index).copied().unwrap_or(false);
            }
            Filter::Leaf(leaf) => leaf,
        };
        match leaf {
            LogFilter::StatusCode(comparison) => comparison.holds_for(u64::from(entry.status)),
            LogFilter::Duration(comparison) => {
                comparison.holds_for(entry.took().as_millis().try_into().unwrap_or(u64::MAX))
            }
            // The health check filter marks its requests.
            LogFilter::NotHealthCheck => !entry.health_check,
            // Traced because forced (`x-envoy-force-trace`), as Envoy's filter reads it.
            LogFilter::Traceable => entry.trace_forced,
            LogFilter::Runtime {
                numerator,
                denominator,
                independent_randomness,
            } => {
                // Envoy draws from the request id's first eight hex digits, so that every log
                // (and every proxy on the path) keeps the same requests.
                let by_id = (!independent_randomness)
                    .then(|| {
                        entry
                            .headers
                            .request(&entry.logs.request_headers, &X_REQUEST_ID)
                    })
                    .flatten()
                    .and_then(|id| id.get(..8))
                    .and_then(|prefix| u64::from_str_radix(prefix, 16).ok());
                let draw = by_id.unwrap_or_else(rand::random::<u64>);
                draw % denominator < *numerator
            }
            LogFilter::ResponseFlags(codes) if codes.is_empty() => !entry.flags.is_empty(),
            LogFilter::ResponseFlags(codes) => entry
                .flags
                .iter()
                .any(|flag| codes.iter().any(|code| code == flag.code())),
            // Built into the other variants.
            LogFilter::And(_) | LogFilter::Or(_) | LogFilter::Header(_) => false,
        }
    }
}

/// The header matchers of a filter's logs, and how each judges a request with no headers (a
/// `tcp_proxy` connection, a head the codec refused).
#[derive(Debug, Default)]
pub(super) struct HeaderChecks {
    matchers: Vec<HeaderMatch>,
    unmatched: Vec<bool>,
}

impl HeaderChecks {
    pub(super) fn is_empty(&self) -> bool {
        self.matchers.is_empty()
    }

    /// Each matcher's verdict on a request with no headers.
    pub(super) fn on_nothing(&self) -> Vec<bool> {
        self.unmatched.clone()
    }

    /// Each matcher's verdict on `head`, into `verdicts`.
    pub(super) fn judge(&self, head: &http::request::Parts, verdicts: &mut Vec<bool>) {
        let authority = head
            .headers
            .get(http::header::HOST)
            .and_then(|host| host.to_str().ok())
            .or_else(|| head.uri.authority().map(|authority| authority.as_str()))
            .unwrap_or("");
        // An HTTP/1 request carries no scheme; the connection manager's `x-forwarded-proto`
        // says the one Envoy's `:scheme` would hold.
        let scheme = head
            .uri
            .scheme_str()
            .or_else(|| {
                head.headers
                    .get(&crate::http::headers::X_FORWARDED_PROTO)
                    .and_then(|proto| proto.to_str().ok())
            })
            .unwrap_or("http");
        let pseudo = PseudoHeaders {
            method: head.method.as_str(),
            path: head.uri.path_and_query().map_or("", |path| path.as_str()),
            authority,
            scheme,
        };
        verdicts.clear();
        verdicts.extend(
            self.matchers
                .iter()
                .map(|matcher| matcher.matches_request(&pseudo, &head.headers)),
        );
    }
}
