//! Clusters: one EDS cluster per service port (load balancing, circuit breakers, outlier
//! detection, mTLS and upstream HTTP/2 from the effective policy), the passthrough cluster for
//! unknown destinations, and the inbound clusters that reach the app on localhost.
//!
//! Mesh mTLS checks who answers, as Istio does: a service port's cluster accepts only the
//! SPIFFE ids of the service accounts behind the service (URI SAN, exact), or, while some
//! endpoint's workload is unknown, any identity of the trust domain (prefix).

use std::collections::{BTreeSet, HashMap};

use xds_api::envoy::config::cluster::v3::circuit_breakers::Thresholds;
use xds_api::envoy::config::cluster::v3::circuit_breakers::thresholds::RetryBudget;
use xds_api::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy,
};
use xds_api::envoy::config::cluster::v3::{CircuitBreakers, Cluster, OutlierDetection};
use xds_api::envoy::config::core::v3::Http2ProtocolOptions;
use xds_api::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use xds_api::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use xds_api::envoy::extensions::transport_sockets::tls::v3::common_tls_context::{
    CombinedCertificateValidationContext, ValidationContextType,
};
use xds_api::envoy::extensions::transport_sockets::tls::v3::subject_alt_name_matcher::SanType;
use xds_api::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, UpstreamTlsContext,
};
use xds_api::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use xds_api::envoy::extensions::upstreams::http::v3::http_protocol_options::explicit_http_config::ProtocolConfig;
use xds_api::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    ExplicitHttpConfig, UpstreamProtocolOptions,
};
use xds_api::envoy::r#type::matcher::v3::StringMatcher;
use xds_api::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use xds_api::envoy::r#type::v3::Percent;
use xds_api::type_urls;

use crate::mesh::model::Protocol;
use crate::mesh::names;
use crate::mesh::policy::{Effective, LbAlgorithm, MtlsMode};
use crate::mesh::translate::{ads, sds, socket_address, tls_socket, typed};

fn discovery(kind: DiscoveryType) -> Option<ClusterDiscoveryType> {
    Some(ClusterDiscoveryType::Type(kind as i32))
}

/// Upstream HTTP/2 (h2c, gRPC) for a cluster.
fn http2_upstream() -> HashMap<String, prost_types::Any> {
    let options = HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                    Http2ProtocolOptions::default(),
                )),
            },
        )),
        ..Default::default()
    };
    HashMap::from([(
        type_urls::UPSTREAM_HTTP_PROTOCOL_OPTIONS_KEY.to_string(),
        typed(&options),
    )])
}

/// Who may answer for a service, as their certificates' URI SANs say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerIdentities {
    /// Exactly these SPIFFE ids: the service accounts of every endpoint's workload.
    Known(BTreeSet<String>),
    /// Any identity under this prefix (`spiffe://TRUST_DOMAIN/`): some endpoint's workload,
    /// and so its service account, is not known.
    TrustDomain(String),
}

impl PeerIdentities {
    fn matchers(&self) -> Vec<SubjectAltNameMatcher> {
        let uri = |pattern: MatchPattern| SubjectAltNameMatcher {
            san_type: SanType::Uri as i32,
            matcher: Some(StringMatcher {
                match_pattern: Some(pattern),
                ..Default::default()
            }),
            ..Default::default()
        };
        match self {
            PeerIdentities::Known(ids) => ids
                .iter()
                .map(|id| uri(MatchPattern::Exact(id.clone())))
                .collect(),
            PeerIdentities::TrustDomain(prefix) => vec![uri(MatchPattern::Prefix(prefix.clone()))],
        }
    }
}

/// The EDS cluster of one service port; `peers` are who may answer it over mTLS.
pub fn service_cluster(
    name: &str,
    host: &str,
    protocol: Protocol,
    policy: &Effective,
    peers: &PeerIdentities,
) -> Cluster {
    let mut cluster = Cluster {
        name: name.to_string(),
        cluster_discovery_type: discovery(DiscoveryType::Eds),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        connect_timeout: policy.connect_timeout.map(|t| t.to_proto()),
        ..Default::default()
    };
    if protocol == Protocol::Http2 {
        cluster.typed_extension_protocol_options = http2_upstream();
    }
    if let Some(lb) = &policy.load_balancer {
        cluster.lb_policy = match lb.algorithm {
            LbAlgorithm::RoundRobin => LbPolicy::RoundRobin,
            LbAlgorithm::LeastRequest => LbPolicy::LeastRequest,
            LbAlgorithm::Random => LbPolicy::Random,
            LbAlgorithm::RingHash => LbPolicy::RingHash,
            LbAlgorithm::Maglev => LbPolicy::Maglev,
        } as i32;
    }
    let budget = policy
        .retries
        .as_ref()
        .filter(|retries| retries.attempts > 0)
        .and_then(|retries| retries.budget.as_ref());
    if policy.circuit_breaker.is_some() || budget.is_some() {
        let limits = policy.circuit_breaker.clone().unwrap_or_default();
        cluster.circuit_breakers = Some(CircuitBreakers {
            thresholds: vec![Thresholds {
                max_connections: limits.max_connections,
                max_pending_requests: limits.max_pending_requests,
                max_requests: limits.max_requests,
                max_retries: limits.max_retries,
                retry_budget: budget.map(|budget| RetryBudget {
                    budget_percent: Some(Percent {
                        value: budget.percent,
                    }),
                    min_retry_concurrency: budget.min_concurrency,
                }),
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    if let Some(outlier) = &policy.outlier_detection
        && outlier.enabled != Some(false)
    {
        // Unset counters are not enforced (Envoy would enforce 5xx by default): what the
        // policy names is what ejects.
        cluster.outlier_detection = Some(OutlierDetection {
            consecutive_5xx: outlier.consecutive_5xx,
            enforcing_consecutive_5xx: Some(if outlier.consecutive_5xx.is_some() {
                100
            } else {
                0
            }),
            consecutive_gateway_failure: outlier.consecutive_gateway_errors,
            enforcing_consecutive_gateway_failure: Some(
                if outlier.consecutive_gateway_errors.is_some() {
                    100
                } else {
                    0
                },
            ),
            interval: outlier.interval.map(|t| t.to_proto()),
            base_ejection_time: outlier.base_ejection_time.map(|t| t.to_proto()),
            max_ejection_percent: outlier.max_ejection_percent,
            ..Default::default()
        });
    }
    if policy.mtls != MtlsMode::Disable {
        cluster.transport_socket = Some(tls_socket(&UpstreamTlsContext {
            common_tls_context: Some(upstream_mesh_tls_context(peers)),
            sni: host.to_string(),
            ..Default::default()
        }));
    }
    cluster
}

/// The server side of mesh mTLS: the workload's certificate and the trust bundle, both over
/// SDS. Any identity the bundle vouches for may connect; who may call what is policy's job.
pub fn mesh_tls_context() -> CommonTlsContext {
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds(names::WORKLOAD_CERT_SECRET)],
        validation_context_type: Some(ValidationContextType::ValidationContextSdsSecretConfig(
            sds(names::TRUST_BUNDLE_SECRET),
        )),
        ..Default::default()
    }
}

/// The client side of mesh mTLS: the workload's certificate, and the trust bundle (over SDS)
/// combined with SAN matchers for the identities that may answer.
pub fn upstream_mesh_tls_context(peers: &PeerIdentities) -> CommonTlsContext {
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds(names::WORKLOAD_CERT_SECRET)],
        validation_context_type: Some(ValidationContextType::CombinedValidationContext(
            CombinedCertificateValidationContext {
                default_validation_context: Some(CertificateValidationContext {
                    match_typed_subject_alt_names: peers.matchers(),
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(sds(names::TRUST_BUNDLE_SECRET)),
            },
        )),
        ..Default::default()
    }
}

/// Where connections to unknown destinations go: to their original destination.
pub fn passthrough_cluster() -> Cluster {
    Cluster {
        name: names::PASSTHROUGH_CLUSTER.to_string(),
        cluster_discovery_type: discovery(DiscoveryType::OriginalDst),
        lb_policy: LbPolicy::ClusterProvided as i32,
        ..Default::default()
    }
}

/// The app inside the sidecar's own pod, on `127.0.0.1:port`.
pub fn inbound_cluster(port: u16, protocol: Protocol) -> Cluster {
    let name = names::inbound(port, protocol);
    let mut cluster = Cluster {
        name: name.clone(),
        cluster_discovery_type: discovery(DiscoveryType::Static),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name,
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket_address("127.0.0.1", port)),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    if protocol == Protocol::Http2 {
        cluster.typed_extension_protocol_options = http2_upstream();
    }
    cluster
}
