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
    /// Upstream connection failure.
    UpstreamConnectionFailure,
    /// Upstream overflow (circuit breaker).
    UpstreamOverflow,
    /// No route configured.
    NoRouteFound,
    /// Upstream retry limit exceeded / remote reset.
    UpstreamRemoteReset,
    /// Upstream request timeout.
    UpstreamRequestTimeout,
    /// Downstream connection termination.
    DownstreamConnectionTermination,
    /// Cluster not found.
    NoClusterFound,
    /// Stream idle timeout.
    StreamIdleTimeout,
    /// The downstream broke the protocol (a malformed request or body).
    DownstreamProtocolError,
}

impl ResponseFlag {
    /// Envoy's short code, as in access logs.
    pub fn code(self) -> &'static str {
        match self {
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::NoRouteFound => "NR",
            ResponseFlag::UpstreamRemoteReset => "UR",
            ResponseFlag::UpstreamRequestTimeout => "UT",
            ResponseFlag::DownstreamConnectionTermination => "DC",
            ResponseFlag::NoClusterFound => "NC",
            ResponseFlag::StreamIdleTimeout => "SI",
            ResponseFlag::DownstreamProtocolError => "DPE",
        }
    }

    /// The status and body Envoy sends as a local reply for this flag.
    pub fn local_reply(self) -> (u16, &'static str) {
        match self {
            ResponseFlag::NoHealthyUpstream => (503, "no healthy upstream"),
            ResponseFlag::UpstreamConnectionFailure => (
                503,
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
            ),
            ResponseFlag::UpstreamOverflow => (
                503,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            ),
            ResponseFlag::NoRouteFound => (404, ""),
            ResponseFlag::UpstreamRemoteReset => (
                503,
                "upstream connect error or disconnect/reset before headers. reset reason: remote reset",
            ),
            ResponseFlag::UpstreamRequestTimeout => (504, "upstream request timeout"),
            ResponseFlag::DownstreamConnectionTermination => (499, ""),
            ResponseFlag::NoClusterFound => (503, ""),
            ResponseFlag::StreamIdleTimeout => (504, "stream timeout"),
            ResponseFlag::DownstreamProtocolError => (400, "Bad Request"),
        }
    }

    /// Whether a retry on this failure is safe (the request never reached an upstream).
    pub fn retriable_connect(self) -> bool {
        matches!(self, ResponseFlag::UpstreamConnectionFailure)
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
