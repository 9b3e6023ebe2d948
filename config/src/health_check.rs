//! Active health checking (`Cluster.health_checks`, an `envoy.config.core.v3.HealthCheck`):
//! how often a host is probed, how many results flip it, and what a probe is (an HTTP request,
//! a TCP exchange or a `grpc.health.v1.Health/Check` call). Envoy's defaults and limits apply.

use std::time::Duration;

use http::Method;
use xds_api::envoy::config::core::v3 as core_pb;
use xds_api::envoy::r#type::v3 as type_pb;

use crate::common::{HeaderMutations, duration, header_mutations};
use crate::error::{ConfigResult, err, field, item};
use crate::matcher::{StringMatch, string_matcher};
use crate::unsupported;

/// Envoy's default `no_traffic_interval`: a cluster that never carried traffic is probed
/// this often.
pub const DEFAULT_NO_TRAFFIC_INTERVAL: Duration = Duration::from_secs(60);
/// Envoy's default HTTP `response_buffer_size` (bytes of body kept to match `receive`).
pub const DEFAULT_RESPONSE_BUFFER: u64 = 1024;

/// One health checker.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub timeout: Duration,
    pub interval: Duration,
    /// Before a host's first probe: a random wait below this (none when zero).
    pub initial_jitter: Duration,
    pub interval_jitter: Duration,
    pub interval_jitter_percent: u32,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    pub reuse_connection: bool,
    pub no_traffic_interval: Duration,
    pub no_traffic_healthy_interval: Duration,
    pub unhealthy_interval: Duration,
    pub unhealthy_edge_interval: Duration,
    pub healthy_edge_interval: Duration,
    /// Accepted: without an event log (which Remora does not offer) Envoy does nothing more
    /// with them either.
    pub always_log_failures: bool,
    pub always_log_success: bool,
    pub probe: Probe,
    /// The message as configured: two checkers are the same when their protos are.
    pub proto: core_pb::HealthCheck,
}

impl PartialEq for HealthCheck {
    fn eq(&self, other: &Self) -> bool {
        self.proto == other.proto
    }
}

/// What one probe does.
#[derive(Debug, Clone)]
pub enum Probe {
    Http(HttpProbe),
    Tcp(TcpProbe),
    Grpc(GrpcProbe),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeProtocol {
    Http1,
    Http2,
}

#[derive(Debug, Clone)]
pub struct HttpProbe {
    /// The `Host`/`:authority` (empty: the endpoint's `health_check_config.hostname`, else the
    /// cluster name).
    pub host: String,
    pub path: String,
    pub method: Method,
    /// A request body (`send`), sent with `content-length`.
    pub send: Vec<u8>,
    /// Byte strings that must appear in order in the response body.
    pub receive: Vec<Vec<u8>>,
    /// How much of the body is kept to match `receive` (0: all of it).
    pub response_buffer_size: u64,
    pub headers: HeaderMutations,
    /// Healthy statuses, as half-open ranges `[start, end)`.
    pub expected_statuses: Vec<(u16, u16)>,
    /// Statuses that count toward `unhealthy_threshold` instead of failing at once.
    pub retriable_statuses: Vec<(u16, u16)>,
    pub protocol: ProbeProtocol,
    /// Matched against the response's `x-envoy-upstream-healthchecked-cluster`.
    pub service_name: Option<StringMatch>,
}

impl HttpProbe {
    pub fn expected(&self, status: u16) -> bool {
        in_ranges(&self.expected_statuses, status)
    }

    pub fn retriable(&self, status: u16) -> bool {
        in_ranges(&self.retriable_statuses, status)
    }
}

fn in_ranges(ranges: &[(u16, u16)], status: u16) -> bool {
    ranges
        .iter()
        .any(|(start, end)| (*start..*end).contains(&status))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpProbe {
    /// Written after connecting (only when `receive` is set: Envoy's connect-only probe sends
    /// nothing).
    pub send: Vec<u8>,
    /// Byte strings that must arrive in order; empty: connecting is the whole probe.
    pub receive: Vec<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct GrpcProbe {
    pub service_name: String,
    /// The `:authority` (empty: the endpoint's health check hostname, else the cluster name).
    pub authority: String,
    /// `initial_metadata`: headers added to the call.
    pub metadata: HeaderMutations,
}

/// The cluster's `health_checks` (Envoy runs at most one); `http2`: the cluster speaks HTTP/2,
/// which a gRPC check needs.
pub fn health_checks(
    protos: &[core_pb::HealthCheck],
    path: &str,
    http2: bool,
) -> ConfigResult<Option<HealthCheck>> {
    match protos {
        [] => Ok(None),
        [one] => health_check(one, &item(path, "health_checks", 0), http2).map(Some),
        _ => err(
            field(path, "health_checks"),
            "multiple health checks are not supported (as in Envoy)",
        ),
    }
}

fn required_duration(
    value: &Option<prost_types::Duration>,
    path: &str,
    name: &str,
) -> ConfigResult<Duration> {
    let p = field(path, name);
    match value {
        Some(value) => {
            let d = duration(value, &p)?;
            if d.is_zero() {
                return err(p, "must be greater than 0");
            }
            Ok(d)
        }
        None => err(p, "is required"),
    }
}

/// An optional duration that must be positive when set.
fn positive_or(
    value: &Option<prost_types::Duration>,
    path: &str,
    name: &str,
    default: Duration,
) -> ConfigResult<Duration> {
    match value {
        Some(_) => required_duration(value, path, name),
        None => Ok(default),
    }
}

pub fn health_check(
    proto: &core_pb::HealthCheck,
    path: &str,
    http2: bool,
) -> ConfigResult<HealthCheck> {
    let core_pb::HealthCheck {
        timeout,
        interval,
        initial_jitter,
        interval_jitter,
        interval_jitter_percent,
        unhealthy_threshold,
        healthy_threshold,
        alt_port,
        reuse_connection,
        health_checker,
        no_traffic_interval,
        no_traffic_healthy_interval,
        unhealthy_interval,
        unhealthy_edge_interval,
        healthy_edge_interval,
        always_log_health_check_failures,
        always_log_health_check_success,
    } = proto;
    unsupported!(path, alt_port);
    let timeout = required_duration(timeout, path, "timeout")?;
    let interval = required_duration(interval, path, "interval")?;
    let initial_jitter = match initial_jitter {
        Some(d) => duration(d, &field(path, "initial_jitter"))?,
        None => Duration::ZERO,
    };
    let interval_jitter = match interval_jitter {
        Some(d) => duration(d, &field(path, "interval_jitter"))?,
        None => Duration::ZERO,
    };
    let Some(unhealthy_threshold) = unhealthy_threshold else {
        return err(field(path, "unhealthy_threshold"), "is required");
    };
    let Some(healthy_threshold) = healthy_threshold else {
        return err(field(path, "healthy_threshold"), "is required");
    };
    let no_traffic_interval = positive_or(
        no_traffic_interval,
        path,
        "no_traffic_interval",
        DEFAULT_NO_TRAFFIC_INTERVAL,
    )?;
    let no_traffic_healthy_interval = positive_or(
        no_traffic_healthy_interval,
        path,
        "no_traffic_healthy_interval",
        no_traffic_interval,
    )?;
    let unhealthy_interval = positive_or(unhealthy_interval, path, "unhealthy_interval", interval)?;
    let unhealthy_edge_interval = positive_or(
        unhealthy_edge_interval,
        path,
        "unhealthy_edge_interval",
        unhealthy_interval,
    )?;
    let healthy_edge_interval = positive_or(
        healthy_edge_interval,
        path,
        "healthy_edge_interval",
        interval,
    )?;
    use core_pb::health_check::HealthChecker;
    let probe = match health_checker {
        Some(HealthChecker::HttpHealthCheck(http)) => {
            Probe::Http(http_probe(http, &field(path, "http_health_check"))?)
        }
        Some(HealthChecker::TcpHealthCheck(tcp)) => {
            Probe::Tcp(tcp_probe(tcp, &field(path, "tcp_health_check"))?)
        }
        Some(HealthChecker::GrpcHealthCheck(grpc)) => {
            let gpath = field(path, "grpc_health_check");
            if !http2 {
                return err(
                    gpath,
                    "the cluster must support HTTP/2 for gRPC health checking (as in Envoy)",
                );
            }
            Probe::Grpc(grpc_probe(grpc, &gpath)?)
        }
        Some(HealthChecker::CustomHealthCheck(_)) => {
            return err(
                field(path, "custom_health_check"),
                "custom health checkers are not supported",
            );
        }
        None => {
            return err(
                path,
                "one of http_health_check, tcp_health_check or grpc_health_check is required",
            );
        }
    };
    Ok(HealthCheck {
        timeout,
        interval,
        initial_jitter,
        interval_jitter,
        interval_jitter_percent: *interval_jitter_percent,
        unhealthy_threshold: *unhealthy_threshold,
        healthy_threshold: *healthy_threshold,
        reuse_connection: reuse_connection.unwrap_or(true),
        no_traffic_interval,
        no_traffic_healthy_interval,
        unhealthy_interval,
        unhealthy_edge_interval,
        healthy_edge_interval,
        always_log_failures: *always_log_health_check_failures,
        always_log_success: *always_log_health_check_success,
        probe,
        proto: proto.clone(),
    })
}

/// A `Payload`: hex text or raw bytes.
fn payload(proto: &core_pb::health_check::Payload, path: &str) -> ConfigResult<Vec<u8>> {
    use core_pb::health_check::payload::Payload as P;
    let core_pb::health_check::Payload { payload } = proto;
    match payload {
        Some(P::Text(text)) => hex(text).ok_or_else(|| {
            crate::ConfigError::new(field(path, "text"), format!("invalid hex string {text:?}"))
        }),
        Some(P::Binary(bytes)) => Ok(bytes.clone()),
        None => err(path, "text or binary is required"),
    }
}

/// Hex text as bytes (Envoy's decoder: an even number of hex digits, not empty).
fn hex(text: &str) -> Option<Vec<u8>> {
    if text.is_empty() || !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn payloads(
    protos: &[core_pb::health_check::Payload],
    path: &str,
    name: &str,
) -> ConfigResult<Vec<Vec<u8>>> {
    protos
        .iter()
        .enumerate()
        .map(|(i, p)| payload(p, &item(path, name, i)))
        .collect()
}

fn status_ranges(
    ranges: &[type_pb::Int64Range],
    path: &str,
    name: &str,
) -> ConfigResult<Vec<(u16, u16)>> {
    let mut out = Vec::with_capacity(ranges.len());
    for (i, range) in ranges.iter().enumerate() {
        let p = item(path, name, i);
        let type_pb::Int64Range { start, end } = range;
        if start >= end {
            return err(
                p,
                format!("expecting start < end, but found start={start} and end={end}"),
            );
        }
        if *start < 100 {
            return err(
                p,
                format!("expecting start >= 100, but found start={start}"),
            );
        }
        if *end > 600 {
            return err(p, format!("expecting end <= 600, but found end={end}"));
        }
        out.push((*start as u16, *end as u16));
    }
    Ok(out)
}

fn http_probe(
    proto: &core_pb::health_check::HttpHealthCheck,
    path: &str,
) -> ConfigResult<HttpProbe> {
    let core_pb::health_check::HttpHealthCheck {
        host,
        path: request_path,
        send,
        receive,
        response_buffer_size,
        request_headers_to_add,
        request_headers_to_remove,
        expected_statuses,
        retriable_statuses,
        codec_client_type,
        service_name_matcher,
        method,
    } = proto;
    if request_path.is_empty() {
        return err(field(path, "path"), "must not be empty");
    }
    if http::uri::PathAndQuery::try_from(request_path.as_str()).is_err() {
        return err(field(path, "path"), "not a valid request path");
    }
    if !host.is_empty() && http::HeaderValue::from_str(host).is_err() {
        return err(field(path, "host"), "not a valid header value");
    }
    use core_pb::RequestMethod as M;
    let method = match M::try_from(*method) {
        Ok(M::MethodUnspecified | M::Get) => Method::GET,
        Ok(M::Head) => Method::HEAD,
        Ok(M::Post) => Method::POST,
        Ok(M::Put) => Method::PUT,
        Ok(M::Delete) => Method::DELETE,
        Ok(M::Options) => Method::OPTIONS,
        Ok(M::Trace) => Method::TRACE,
        Ok(M::Patch) => Method::PATCH,
        Ok(M::Connect) => return err(field(path, "method"), "CONNECT is not allowed"),
        Err(_) => return err(field(path, "method"), "unknown value"),
    };
    let send = match send {
        Some(send) => {
            if matches!(
                method,
                Method::GET | Method::HEAD | Method::DELETE | Method::TRACE
            ) {
                return err(
                    field(path, "send"),
                    format!(
                        "a request payload needs a method that carries a body (POST, PUT, \
                         PATCH, OPTIONS), not {method}"
                    ),
                );
            }
            payload(send, &field(path, "send"))?
        }
        None => Vec::new(),
    };
    let receive = payloads(receive, path, "receive")?;
    let response_buffer_size = response_buffer_size.unwrap_or(DEFAULT_RESPONSE_BUFFER);
    let wanted: u64 = receive.iter().map(|r| r.len() as u64).sum();
    if response_buffer_size != 0 && wanted > response_buffer_size {
        return err(
            field(path, "receive"),
            format!(
                "the expected response length {wanted} is over the response buffer size \
                 {response_buffer_size}"
            ),
        );
    }
    let headers = header_mutations(
        request_headers_to_add,
        request_headers_to_remove,
        path,
        "request_headers_to_add",
        "request_headers_to_remove",
    )?;
    let mut expected = status_ranges(expected_statuses, path, "expected_statuses")?;
    if expected.is_empty() {
        expected.push((200, 201));
    }
    let retriable = status_ranges(retriable_statuses, path, "retriable_statuses")?;
    let protocol = match type_pb::CodecClientType::try_from(*codec_client_type) {
        Ok(type_pb::CodecClientType::Http1) => ProbeProtocol::Http1,
        Ok(type_pb::CodecClientType::Http2) => ProbeProtocol::Http2,
        Ok(type_pb::CodecClientType::Http3) => {
            return err(field(path, "codec_client_type"), "HTTP3 is not supported");
        }
        Err(_) => return err(field(path, "codec_client_type"), "unknown value"),
    };
    let service_name = service_name_matcher
        .as_ref()
        .map(|m| string_matcher(m, &field(path, "service_name_matcher")))
        .transpose()?;
    Ok(HttpProbe {
        host: host.clone(),
        path: request_path.clone(),
        method,
        send,
        receive,
        response_buffer_size,
        headers,
        expected_statuses: expected,
        retriable_statuses: retriable,
        protocol,
        service_name,
    })
}

fn tcp_probe(proto: &core_pb::health_check::TcpHealthCheck, path: &str) -> ConfigResult<TcpProbe> {
    let core_pb::health_check::TcpHealthCheck { send, receive } = proto;
    Ok(TcpProbe {
        send: send
            .as_ref()
            .map(|send| payload(send, &field(path, "send")))
            .transpose()?
            .unwrap_or_default(),
        receive: payloads(receive, path, "receive")?,
    })
}

fn grpc_probe(
    proto: &core_pb::health_check::GrpcHealthCheck,
    path: &str,
) -> ConfigResult<GrpcProbe> {
    let core_pb::health_check::GrpcHealthCheck {
        service_name,
        authority,
        initial_metadata,
    } = proto;
    if !authority.is_empty() && http::uri::Authority::try_from(authority.as_str()).is_err() {
        return err(field(path, "authority"), "not a valid authority");
    }
    Ok(GrpcProbe {
        service_name: service_name.clone(),
        authority: authority.clone(),
        metadata: header_mutations(initial_metadata, &[], path, "initial_metadata", "")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(yaml: &str, http2: bool) -> ConfigResult<HealthCheck> {
        let proto: core_pb::HealthCheck = xds_api::json::from_yaml_str(yaml).expect("yaml");
        health_check(&proto, "hc", http2)
    }

    const BASE: &str = "{timeout: 1s, interval: 2s, unhealthy_threshold: 3, healthy_threshold: 2, ";

    #[test]
    fn http_check_with_envoy_defaults() {
        let hc = check(
            &format!("{BASE}http_health_check: {{path: /healthz}}}}"),
            false,
        )
        .expect("valid");
        assert_eq!(hc.timeout, Duration::from_secs(1));
        assert_eq!(hc.unhealthy_interval, Duration::from_secs(2));
        assert_eq!(hc.unhealthy_edge_interval, Duration::from_secs(2));
        assert_eq!(hc.healthy_edge_interval, Duration::from_secs(2));
        assert_eq!(hc.no_traffic_interval, Duration::from_secs(60));
        assert_eq!(hc.no_traffic_healthy_interval, Duration::from_secs(60));
        assert!(hc.reuse_connection);
        let Probe::Http(http) = hc.probe else {
            panic!("http probe")
        };
        assert_eq!(http.method, Method::GET);
        assert!(http.expected(200) && !http.expected(201) && !http.expected(503));
        assert_eq!(http.protocol, ProbeProtocol::Http1);
        assert_eq!(http.response_buffer_size, 1024);
    }

    #[test]
    fn http_check_options() {
        let hc = check(
            &format!(
                "{BASE}unhealthy_interval: 5s, no_traffic_interval: 3s, \
                 http_health_check: {{path: /h, host: svc, method: POST, send: {{text: '6869'}}, \
                 receive: [{{text: '6f6b'}}], expected_statuses: [{{start: 200, end: 300}}], \
                 retriable_statuses: [{{start: 500, end: 501}}], codec_client_type: HTTP2, \
                 request_headers_to_add: [{{header: {{key: x-hc, value: '1'}}}}], \
                 request_headers_to_remove: [user-agent], \
                 service_name_matcher: {{prefix: svc}}}}}}"
            ),
            false,
        )
        .expect("valid");
        assert_eq!(hc.unhealthy_interval, Duration::from_secs(5));
        assert_eq!(hc.unhealthy_edge_interval, Duration::from_secs(5));
        assert_eq!(hc.no_traffic_healthy_interval, Duration::from_secs(3));
        let Probe::Http(http) = hc.probe else {
            panic!("http probe")
        };
        assert_eq!(http.send, b"hi");
        assert_eq!(http.receive, vec![b"ok".to_vec()]);
        assert!(http.expected(299) && !http.expected(300));
        assert!(http.retriable(500) && !http.retriable(501));
        assert_eq!(http.protocol, ProbeProtocol::Http2);
        assert_eq!(http.headers.add.len(), 1);
        assert_eq!(http.headers.remove.len(), 1);
        assert!(http.service_name.is_some());
    }

    #[test]
    fn errors_name_their_field() {
        let cases = [
            (
                "{interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {}}",
                "hc.timeout: is required",
            ),
            (&format!("{BASE}}}"), "hc: one of http_health_check"),
            (
                &format!("{BASE}http_health_check: {{path: ''}}}}"),
                "hc.http_health_check.path: must not be empty",
            ),
            (
                &format!(
                    "{BASE}http_health_check: {{path: /, expected_statuses: [{{start: 200, end: 200}}]}}}}"
                ),
                "hc.http_health_check.expected_statuses[0]: expecting start < end",
            ),
            (
                &format!(
                    "{BASE}http_health_check: {{path: /, expected_statuses: [{{start: 99, end: 200}}]}}}}"
                ),
                "expecting start >= 100",
            ),
            (
                &format!("{BASE}http_health_check: {{path: /, codec_client_type: HTTP3}}}}"),
                "hc.http_health_check.codec_client_type: HTTP3 is not supported",
            ),
            (
                &format!("{BASE}http_health_check: {{path: /, send: {{text: '00'}}}}}}"),
                "hc.http_health_check.send: a request payload needs",
            ),
            (
                &format!("{BASE}tcp_health_check: {{send: {{text: 'zz'}}}}}}"),
                "hc.tcp_health_check.send.text: invalid hex string",
            ),
            (
                &format!("{BASE}alt_port: 8080, tcp_health_check: {{}}}}"),
                "hc.alt_port: field is not supported",
            ),
            (
                &format!("{BASE}grpc_health_check: {{}}}}"),
                "hc.grpc_health_check: the cluster must support HTTP/2",
            ),
            (
                &format!("{BASE}custom_health_check: {{name: x}}}}"),
                "hc.custom_health_check: custom health checkers are not supported",
            ),
            (
                &format!("{BASE}unhealthy_interval: 0s, tcp_health_check: {{}}}}"),
                "hc.unhealthy_interval: must be greater than 0",
            ),
        ];
        for (yaml, want) in cases {
            let error = check(yaml, false).expect_err(yaml).to_string();
            assert!(error.contains(want), "{yaml}: {error}");
        }
    }

    #[test]
    fn tcp_and_grpc_probes() {
        let hc = check(
            &format!(
                "{BASE}tcp_health_check: {{send: {{text: '01'}}, receive: [{{binary: 'AQ=='}}]}}}}"
            ),
            false,
        )
        .expect("valid");
        let Probe::Tcp(tcp) = hc.probe else {
            panic!("tcp")
        };
        assert_eq!(
            tcp,
            TcpProbe {
                send: vec![1],
                receive: vec![vec![1]]
            }
        );
        let hc = check(
            &format!("{BASE}grpc_health_check: {{service_name: s, authority: a.b}}}}"),
            true,
        )
        .expect("valid");
        let Probe::Grpc(grpc) = hc.probe else {
            panic!("grpc")
        };
        assert_eq!(
            (grpc.service_name.as_str(), grpc.authority.as_str()),
            ("s", "a.b")
        );
    }

    #[test]
    fn only_one_checker() {
        let proto: core_pb::HealthCheck =
            xds_api::json::from_yaml_str(&format!("{BASE}tcp_health_check: {{}}}}")).expect("yaml");
        let error = health_checks(&[proto.clone(), proto], "c", false).expect_err("two");
        assert!(
            error.to_string().contains("c.health_checks: multiple"),
            "{error}"
        );
    }
}
