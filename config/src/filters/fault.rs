//! The fault injection filter's config (`envoy.filters.http.fault`, `HTTPFault`): a delay and
//! an abort, each for a share of requests, fixed or taken from request headers, and the
//! conditions a request must meet (cluster, headers, downstream node). The same message is the
//! per-route config, which replaces the filter's own for that route.

use std::time::Duration;

use xds_api::envoy::extensions::filters::common::fault::v3 as common_pb;
use xds_api::envoy::extensions::filters::http::fault::v3 as fault_pb;
use xds_api::envoy::r#type::v3 as type_pb;

use crate::common::{duration, unpack};
use crate::error::{ConfigResult, err, field, item};
use crate::matcher::{HeaderMatch, header_matcher};
use crate::unsupported;

pub const TYPE_URL: &str = xds_api::type_urls::FAULT;

/// A share of requests as Envoy draws it: a request is taken when a random number modulo the
/// denominator is below the numerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fraction {
    pub numerator: u32,
    /// 100, 10 000 or 1 000 000.
    pub denominator: u32,
}

impl Fraction {
    /// Whether the request that drew `random` is taken.
    pub fn takes(self, random: u64) -> bool {
        random % u64::from(self.denominator) < u64::from(self.numerator)
    }

    /// The share a request header asks for: never more than the configured one, as in Envoy
    /// (the header names a numerator over the configured denominator).
    pub fn at_most(self, numerator: u32) -> Fraction {
        Fraction {
            numerator: numerator.min(self.numerator),
            ..self
        }
    }
}

/// A `FractionalPercent`; unset is none of the requests, as in Envoy.
fn fraction(proto: &Option<type_pb::FractionalPercent>, path: &str) -> ConfigResult<Fraction> {
    use type_pb::fractional_percent::DenominatorType;
    let Some(type_pb::FractionalPercent {
        numerator,
        denominator,
    }) = proto
    else {
        return Ok(Fraction {
            numerator: 0,
            denominator: 100,
        });
    };
    let denominator = match DenominatorType::try_from(*denominator) {
        Ok(DenominatorType::Hundred) => 100,
        Ok(DenominatorType::TenThousand) => 10_000,
        Ok(DenominatorType::Million) => 1_000_000,
        Err(_) => return err(field(path, "denominator"), "unknown value"),
    };
    Ok(Fraction {
        numerator: *numerator,
        denominator,
    })
}

/// Where a delay's length comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelaySource {
    Fixed(Duration),
    /// `x-envoy-fault-delay-request`, in milliseconds; no delay without it.
    Header,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delay {
    pub source: DelaySource,
    /// The share delayed; `x-envoy-fault-delay-request-percentage` may lower it.
    pub percentage: Fraction,
}

/// Where an abort's status comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortSource {
    Http(u16),
    /// A gRPC status, sent with HTTP status 200.
    Grpc(u32),
    /// `x-envoy-fault-abort-request` (HTTP, 200 to 599) or `x-envoy-fault-abort-grpc-request`;
    /// no abort without either.
    Header,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abort {
    pub source: AbortSource,
    /// The share aborted; `x-envoy-fault-abort-request-percentage` may lower it.
    pub percentage: Fraction,
}

/// One `HTTPFault`: the filter's own config, or a route's.
#[derive(Debug, Clone)]
pub struct Fault {
    pub delay: Option<Delay>,
    pub abort: Option<Abort>,
    /// Only requests routed to this cluster (empty: any).
    pub upstream_cluster: String,
    /// Only requests whose headers all match.
    pub headers: Vec<HeaderMatch>,
    /// Only requests whose `x-envoy-downstream-service-node` is one of these (empty: any).
    pub downstream_nodes: Vec<String>,
    /// No new fault while this many are active (`None`: no limit).
    pub max_active_faults: Option<u32>,
    /// No `http.PREFIX.fault.CLUSTER.*` counters per `x-envoy-downstream-service-cluster`.
    pub disable_downstream_cluster_stats: bool,
}

/// The filter's config, or (the same message) a route's.
pub fn fault(any: &prost_types::Any, path: &str) -> ConfigResult<Fault> {
    let fault_pb::HttpFault {
        delay,
        abort,
        upstream_cluster,
        headers,
        downstream_nodes,
        max_active_faults,
        response_rate_limit,
        // Where Envoy's runtime may override a value. Remora's runtime holds no fault keys (no
        // RTDS, no admin changes, and a bootstrap layer that sets one is refused), so the
        // configured values apply whatever key is named, as in Envoy when none is set.
        delay_percent_runtime: _,
        abort_percent_runtime: _,
        delay_duration_runtime: _,
        abort_http_status_runtime: _,
        max_active_faults_runtime: _,
        response_rate_limit_percent_runtime: _,
        abort_grpc_status_runtime: _,
        disable_downstream_cluster_stats,
        filter_metadata,
    } = unpack(any, path)?;
    // Throttling a response body needs a body filter that can wait; Remora's cannot yet.
    unsupported!(path, response_rate_limit, filter_metadata);
    let headers = headers
        .iter()
        .enumerate()
        .map(|(i, h)| header_matcher(h, &item(path, "headers", i)))
        .collect::<ConfigResult<Vec<_>>>()?;
    Ok(Fault {
        delay: delay
            .as_ref()
            .map(|d| fault_delay(d, &field(path, "delay")))
            .transpose()?,
        abort: abort
            .as_ref()
            .map(|a| fault_abort(a, &field(path, "abort")))
            .transpose()?,
        upstream_cluster,
        headers,
        downstream_nodes,
        max_active_faults,
        disable_downstream_cluster_stats,
    })
}

fn fault_delay(proto: &common_pb::FaultDelay, path: &str) -> ConfigResult<Delay> {
    use common_pb::fault_delay::FaultDelaySecifier as S;
    let common_pb::FaultDelay {
        percentage,
        fault_delay_secifier,
    } = proto;
    let source = match fault_delay_secifier {
        Some(S::FixedDelay(d)) => {
            let delay = duration(d, &field(path, "fixed_delay"))?;
            if delay.is_zero() {
                return err(field(path, "fixed_delay"), "must be greater than 0s");
            }
            DelaySource::Fixed(delay)
        }
        Some(S::HeaderDelay(common_pb::fault_delay::HeaderDelay {})) => DelaySource::Header,
        None => return err(path, "one of fixed_delay or header_delay is required"),
    };
    Ok(Delay {
        source,
        percentage: fraction(percentage, &field(path, "percentage"))?,
    })
}

fn fault_abort(proto: &fault_pb::FaultAbort, path: &str) -> ConfigResult<Abort> {
    use fault_pb::fault_abort::ErrorType as E;
    let fault_pb::FaultAbort {
        percentage,
        error_type,
    } = proto;
    let source = match error_type {
        Some(E::HttpStatus(status)) => match u16::try_from(*status) {
            Ok(status @ 200..=599) => AbortSource::Http(status),
            _ => {
                return err(
                    field(path, "http_status"),
                    format!("{status} is not a status from 200 to 599"),
                );
            }
        },
        Some(E::GrpcStatus(status)) => AbortSource::Grpc(*status),
        Some(E::HeaderAbort(fault_pb::fault_abort::HeaderAbort {})) => AbortSource::Header,
        None => {
            return err(
                path,
                "one of http_status, grpc_status or header_abort is required",
            );
        }
    };
    Ok(Abort {
        source,
        percentage: fraction(percentage, &field(path, "percentage"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(yaml: &str) -> ConfigResult<Fault> {
        let proto: fault_pb::HttpFault = xds_api::json::from_yaml_str(yaml).expect("yaml");
        fault(&xds_api::any::pack(&proto), "f")
    }

    #[test]
    fn delays_aborts_and_conditions_are_read() {
        let fault = read(
            r#"
delay: {fixed_delay: 0.25s, percentage: {numerator: 5, denominator: TEN_THOUSAND}}
abort: {http_status: 503, percentage: {numerator: 100}}
upstream_cluster: a
headers: [{name: x-fault, exact_match: "yes"}]
downstream_nodes: [n1]
max_active_faults: 3
delay_percent_runtime: fault.http.delay.fixed_delay_percent
abort_percent_runtime: my.own.key
"#,
        )
        .unwrap();
        assert_eq!(
            fault.delay,
            Some(Delay {
                source: DelaySource::Fixed(Duration::from_millis(250)),
                percentage: Fraction {
                    numerator: 5,
                    denominator: 10_000
                },
            })
        );
        assert_eq!(fault.abort.unwrap().source, AbortSource::Http(503));
        assert_eq!(fault.max_active_faults, Some(3));
        assert_eq!(fault.headers.len(), 1);
        let header_abort = read("abort: {header_abort: {}}").unwrap().abort.unwrap();
        assert_eq!(header_abort.source, AbortSource::Header);
        assert_eq!(header_abort.percentage.numerator, 0, "unset is none");
    }

    #[test]
    fn fractions_are_drawn_as_envoy_draws_them() {
        let half = Fraction {
            numerator: 50,
            denominator: 100,
        };
        assert!(half.takes(149) && !half.takes(150));
        assert_eq!(half.at_most(80), half);
        assert_eq!(half.at_most(10).numerator, 10);
        let all = Fraction {
            numerator: 200,
            denominator: 100,
        };
        assert!(all.takes(99));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "response_rate_limit: {fixed_limit: {limit_kbps: 1}}",
                "f.response_rate_limit",
            ),
            ("filter_metadata: {a: 1}", "f.filter_metadata"),
            ("delay: {fixed_delay: 0s}", "f.delay.fixed_delay"),
            ("delay: {percentage: {numerator: 1}}", "f.delay"),
            ("abort: {http_status: 600}", "f.abort.http_status"),
            ("abort: {http_status: 100}", "f.abort.http_status"),
            ("abort: {percentage: {numerator: 1}}", "f.abort"),
            (
                "headers: [{name: 'bad name', exact_match: x}]",
                "f.headers[0].name",
            ),
        ];
        for (yaml, path) in cases {
            let error = read(yaml).expect_err(yaml);
            assert_eq!(error.path, path, "{yaml}: {error}");
        }
    }
}
