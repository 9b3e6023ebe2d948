//! Proxy errors tagged by where they came from, and their mapping to Envoy's response flags.
//!
//! Every failure on the request path is a [`ProxyError`]: an [`Origin`] (downstream, upstream,
//! internal, config) plus a [`ResponseFlag`] that access logs, stats and retry decisions use.

use std::fmt;

/// Where an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Downstream,
    Upstream,
    Internal,
    Config,
}

/// Envoy's response flags (the subset Remora produces).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFlag {
    /// No healthy upstream host.
    NoHealthyUpstream,
    /// Upstream request timeout (the route's, or one attempt's).
    UpstreamRequestTimeout,
    /// The upstream reset the stream.
    UpstreamRemoteReset,
    /// Upstream connection failure.
    UpstreamConnectionFailure,
    /// The upstream connection closed under the request.
    UpstreamConnectionTermination,
    /// The upstream's response broke the protocol (a head its codec could not read).
    UpstreamProtocolError,
    /// Upstream overflow (circuit breaker).
    UpstreamOverflow,
    /// No route configured.
    NoRouteFound,
    /// Downstream connection termination.
    DownstreamConnectionTermination,
    /// The request was retried as often as allowed and still failed.
    UpstreamRetryLimitExceeded,
    /// Stream idle timeout.
    StreamIdleTimeout,
    /// The downstream broke the protocol (a malformed request or body).
    DownstreamProtocolError,
    /// The stream's `max_stream_duration` ran out.
    DurationTimeout,
    /// Cluster not found.
    NoClusterFound,
    /// The fault filter delayed the request (it then went on, or was aborted).
    DelayInjected,
    /// The fault filter answered in place of the upstream.
    FaultInjected,
    /// The local rate limit filter refused the request.
    RateLimited,
}

impl ResponseFlag {
    /// Envoy's short code, as in access logs.
    pub fn code(self) -> &'static str {
        match self {
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamRequestTimeout => "UT",
            ResponseFlag::UpstreamRemoteReset => "UR",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::UpstreamConnectionTermination => "UC",
            ResponseFlag::UpstreamProtocolError => "UPE",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::NoRouteFound => "NR",
            ResponseFlag::DownstreamConnectionTermination => "DC",
            ResponseFlag::UpstreamRetryLimitExceeded => "URX",
            ResponseFlag::StreamIdleTimeout => "SI",
            ResponseFlag::DownstreamProtocolError => "DPE",
            ResponseFlag::DurationTimeout => "DT",
            ResponseFlag::NoClusterFound => "NC",
            ResponseFlag::DelayInjected => "DI",
            ResponseFlag::FaultInjected => "FI",
            ResponseFlag::RateLimited => "RL",
        }
    }

    /// The status and body Envoy sends as a local reply for this flag.
    pub fn local_reply(self) -> (u16, &'static str) {
        match self {
            ResponseFlag::NoHealthyUpstream => (503, "no healthy upstream"),
            ResponseFlag::UpstreamConnectionFailure => (
                503,
                "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure",
            ),
            ResponseFlag::UpstreamOverflow => (
                503,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            ),
            ResponseFlag::NoRouteFound => (404, ""),
            ResponseFlag::UpstreamConnectionTermination => (
                503,
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
            ),
            ResponseFlag::UpstreamProtocolError => (
                502,
                "upstream connect error or disconnect/reset before headers. reset reason: protocol error",
            ),
            ResponseFlag::UpstreamRemoteReset | ResponseFlag::UpstreamRetryLimitExceeded => (
                503,
                "upstream connect error or disconnect/reset before headers. reset reason: remote reset",
            ),
            ResponseFlag::UpstreamRequestTimeout => (504, "upstream request timeout"),
            ResponseFlag::DownstreamConnectionTermination => (499, ""),
            ResponseFlag::NoClusterFound => (503, ""),
            ResponseFlag::StreamIdleTimeout => (504, "stream timeout"),
            ResponseFlag::DownstreamProtocolError => (400, "Bad Request"),
            ResponseFlag::DurationTimeout => (504, "downstream duration timeout"),
            // A delay is no answer of its own; the filters make their replies themselves.
            ResponseFlag::DelayInjected => (200, ""),
            ResponseFlag::FaultInjected => (503, "fault filter abort"),
            ResponseFlag::RateLimited => (429, "local_rate_limited"),
        }
    }
}

/// The response flags one request collected (the retries it ran out of, then how its last
/// attempt failed, say), shown as Envoy 1.40 shows them: in the order they were set (`URX,UF`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseFlags {
    set: [Option<ResponseFlag>; 4],
}

impl ResponseFlags {
    /// Adds a flag (once; beyond four, further ones are dropped).
    pub fn insert(&mut self, flag: ResponseFlag) {
        if self.contains(flag) {
            return;
        }
        if let Some(slot) = self.set.iter_mut().find(|slot| slot.is_none()) {
            *slot = Some(flag);
        }
    }

    pub fn contains(self, flag: ResponseFlag) -> bool {
        self.set.contains(&Some(flag))
    }

    pub fn is_empty(self) -> bool {
        self.set[0].is_none()
    }

    /// The flags in the order set.
    pub fn iter(self) -> impl Iterator<Item = ResponseFlag> {
        self.set.into_iter().flatten()
    }

    /// Comma-separated codes in the order set; `None` when there are none.
    pub fn render(self) -> Option<String> {
        if self.is_empty() {
            return None;
        }
        let codes: Vec<&str> = self.set.iter().flatten().map(|flag| flag.code()).collect();
        Some(codes.join(","))
    }
}

impl From<ResponseFlag> for ResponseFlags {
    fn from(flag: ResponseFlag) -> Self {
        let mut flags = ResponseFlags::default();
        flags.insert(flag);
        flags
    }
}

/// A request-path failure.
#[derive(Debug)]
pub struct ProxyError {
    pub origin: Origin,
    pub flag: ResponseFlag,
    pub detail: String,
}

impl ProxyError {
    pub fn upstream(flag: ResponseFlag, detail: impl Into<String>) -> Self {
        ProxyError {
            origin: Origin::Upstream,
            flag,
            detail: detail.into(),
        }
    }

    pub fn config(flag: ResponseFlag, detail: impl Into<String>) -> Self {
        ProxyError {
            origin: Origin::Config,
            flag,
            detail: detail.into(),
        }
    }

    pub fn downstream(flag: ResponseFlag, detail: impl Into<String>) -> Self {
        ProxyError {
            origin: Origin::Downstream,
            flag,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} error ({}): {}",
            self.origin,
            self.flag.code(),
            self.detail
        )
    }
}

impl std::error::Error for ProxyError {}

/// The first error of type `T` in `error`'s chain of sources (`error` itself included): the
/// `h2::Error` under a `hyper::Error`, say.
pub fn source_of<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<T>() {
            return Some(found);
        }
        current = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_flags_show_in_the_order_set() {
        let mut flags = ResponseFlags::default();
        assert_eq!(flags.render(), None);
        flags.insert(ResponseFlag::UpstreamRetryLimitExceeded);
        flags.insert(ResponseFlag::UpstreamConnectionFailure);
        flags.insert(ResponseFlag::UpstreamRetryLimitExceeded);
        assert_eq!(flags.render().as_deref(), Some("URX,UF"));
    }
}
