//! TLS: termination on a filter chain (`DownstreamTlsContext`) and origination to a cluster
//! (`UpstreamTlsContext`). The model keeps where certificates come from; files are read by the
//! proxy when it builds the listener or cluster.

use remora_config::bootstrap::Bootstrap;
use remora_config::common::DataSource;
use remora_config::tls::{
    CertificateSource, CommonTls, SanType, SecretKind, SecretSource, TlsVersion, Validation,
    ValidationSource,
};

use crate::support::*;

const DOWNSTREAM: &str = r#"
transport_socket:
  name: envoy.transport_sockets.tls
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
    common_tls_context:
      tls_certificates:
      - certificate_chain: {filename: /etc/remora/cert.pem}
        private_key: {filename: /etc/remora/key.pem}
"#;

const UPSTREAM: &str = r#"
transport_socket:
  name: envoy.transport_sockets.tls
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
    sni: backend.example
"#;

/// The context under a `transport_socket` patched into [`DOWNSTREAM`] or [`UPSTREAM`].
fn context(inner: &str) -> String {
    format!("transport_socket: {{typed_config: {inner}}}")
}

/// The TLS context of the bootstrap's first downstream filter chain.
fn downstream_common(bootstrap: &Bootstrap) -> &CommonTls {
    &bootstrap.listeners[0].filter_chains[0]
        .tls
        .as_ref()
        .expect("downstream TLS")
        .common
}

/// `common`'s validation context, which the test wrote inline.
fn inline_validation(common: &CommonTls) -> &Validation {
    match &common.validation {
        Some(ValidationSource::Inline(validation)) => validation,
        other => panic!("an inline validation: {other:?}"),
    }
}

const CTX: &str = "transport_socket.typed_config";
/// A certificate's SHA-256 in hex, as `openssl dgst -sha256` prints it.
const HASH: &str = "489777d29717a552acfab70b4e27a52782832ac61240741174b273cdf7d0960b";
const COMMON: &str = "transport_socket.typed_config.common_tls_context";

#[test]
fn downstream_tls_fields_are_refused_by_path() {
    let cert = format!("{COMMON}.tls_certificates[0]");
    check_rejections_given(
        &[(CHAIN, DOWNSTREAM)],
        CHAIN,
        &[
            (
                &context("{require_sni: true}"),
                &format!("{CTX}.require_sni"),
                UNSUPPORTED,
            ),
            (
                &context("{session_timeout: 60s}"),
                &format!("{CTX}.session_timeout"),
                UNSUPPORTED,
            ),
            (
                &context("{prefer_client_ciphers: true}"),
                &format!("{CTX}.prefer_client_ciphers"),
                UNSUPPORTED,
            ),
            (&context("{common_tls_context: null}"), COMMON, "required"),
            (
                &context("{common_tls_context: {tls_certificates!: []}}"),
                &format!("{COMMON}.tls_certificates"),
                "exactly one certificate is supported",
            ),
            (
                &context(
                    "{common_tls_context: {tls_certificates: [{}, {certificate_chain: {filename: a}, private_key: {filename: b}}]}}",
                ),
                &format!("{COMMON}.tls_certificates"),
                "exactly one certificate is supported",
            ),
            (
                &context("{common_tls_context: {tls_certificates: [{private_key: null}]}}"),
                &format!("{cert}.private_key"),
                "required",
            ),
            (
                &context(
                    "{common_tls_context: {tls_certificates: [{password: {inline_string: x}}]}}",
                ),
                &format!("{cert}.password"),
                UNSUPPORTED,
            ),
            (
                &context(
                    "{common_tls_context: {tls_certificates: [{watched_directory: {path: /etc}}]}}",
                ),
                &format!("{cert}.watched_directory"),
                UNSUPPORTED,
            ),
            (
                &context(
                    "{common_tls_context: {tls_certificates: [{certificate_chain!: {environment_variable: CERT}}]}}",
                ),
                &format!("{cert}.certificate_chain.environment_variable"),
                "is not supported",
            ),
            (
                &context("{common_tls_context: {tls_certificate_sds_secret_configs: [{name: s}]}}"),
                &format!("{COMMON}.tls_certificate_sds_secret_configs"),
                "set tls_certificates or tls_certificate_sds_secret_configs, not both",
            ),
            (
                &context(
                    "{common_tls_context: {tls_certificates!: [], tls_certificate_sds_secret_configs: [{name: s}]}}",
                ),
                &format!("{COMMON}.tls_certificate_sds_secret_configs[0].name"),
                "unknown static secret \"s\"",
            ),
            (
                &context(
                    "{common_tls_context: {tls_certificates!: [], tls_certificate_sds_secret_configs: [{name: s, sds_config: {api_config_source: {api_type: GRPC}}}]}}",
                ),
                &format!(
                    "{COMMON}.tls_certificate_sds_secret_configs[0].sds_config.api_config_source.grpc_services"
                ),
                "exactly one grpc service is required",
            ),
            (
                &context(
                    "{common_tls_context: {tls_certificates!: [], tls_certificate_sds_secret_configs: [{name: s, sds_config: {api_config_source: {api_type: DELTA_GRPC, grpc_services: [{envoy_grpc: {cluster_name: echo}}]}}}]}}",
                ),
                &format!(
                    "{COMMON}.tls_certificate_sds_secret_configs[0].sds_config.api_config_source.api_type"
                ),
                "GRPC (StreamSecrets) only",
            ),
            (
                &context(
                    "{common_tls_context: {tls_certificates!: [], tls_certificate_sds_secret_configs: [{name: s, sds_config: {api_config_source: {api_type: GRPC, grpc_services: [{envoy_grpc: {cluster_name: nowhere}}]}}}]}}",
                ),
                &format!(
                    "{COMMON}.tls_certificate_sds_secret_configs[0].sds_config.api_config_source.grpc_services[0].envoy_grpc.cluster_name"
                ),
                "unknown static cluster \"nowhere\"",
            ),
            (
                &context(
                    "{common_tls_context: {tls_certificates!: [], tls_certificate_sds_secret_configs: [{name: s, sds_config: {api_config_source: {api_type: GRPC, grpc_services: [{google_grpc: {target_uri: agent, stat_prefix: sds}}]}}}]}}",
                ),
                &format!(
                    "{COMMON}.tls_certificate_sds_secret_configs[0].sds_config.api_config_source.grpc_services[0].google_grpc"
                ),
                "unknown field `google_grpc`",
            ),
            (
                &context(
                    "{common_tls_context: {tls_certificates!: [], tls_certificate_sds_secret_configs: [{name: s, sds_config: {path_config_source: {path: /a}, api_config_source: {}}}]}}",
                ),
                &format!("{COMMON}.tls_certificate_sds_secret_configs[0].sds_config"),
                "multiple fields provided for oneof",
            ),
            (
                &context(
                    "{common_tls_context: {tls_certificates!: [], tls_certificate_sds_secret_configs: [{sds_config: {ads: {}}}]}}",
                ),
                &format!("{COMMON}.tls_certificate_sds_secret_configs[0].name"),
                "required",
            ),
            (
                &context("{require_client_certificate: true}"),
                &format!("{CTX}.require_client_certificate"),
                "needs a validation_context",
            ),
            (
                &context("{common_tls_context: {validation_context: {}}}"),
                &format!("{COMMON}.validation_context.trusted_ca"),
                "required",
            ),
            (
                &context(
                    "{common_tls_context: {validation_context: {trusted_ca: {filename: ca.pem}, match_typed_subject_alt_names: [{san_type: OTHER_NAME, matcher: {exact: a}}]}}}",
                ),
                &format!("{COMMON}.validation_context.match_typed_subject_alt_names[0].oid"),
                "required for OTHER_NAME",
            ),
            (
                &context(
                    "{common_tls_context: {validation_context: {trusted_ca: {filename: ca.pem}, match_typed_subject_alt_names: [{san_type: OTHER_NAME, oid: msUPN, matcher: {exact: a}}]}}}",
                ),
                &format!("{COMMON}.validation_context.match_typed_subject_alt_names[0].oid"),
                "not an OID in dotted form",
            ),
            (
                &context(
                    "{common_tls_context: {validation_context: {trusted_ca: {filename: ca.pem}, match_typed_subject_alt_names: [{san_type: OTHER_NAME, oid: \"1..2\", matcher: {exact: a}}]}}}",
                ),
                &format!("{COMMON}.validation_context.match_typed_subject_alt_names[0].oid"),
                "not an OID in dotted form",
            ),
            (
                &context(
                    "{common_tls_context: {validation_context: {trusted_ca: {filename: ca.pem}, match_typed_subject_alt_names: [{matcher: {exact: a}}]}}}",
                ),
                &format!("{COMMON}.validation_context.match_typed_subject_alt_names[0].san_type"),
                "required",
            ),
            (
                &context(
                    "{common_tls_context: {validation_context: {trusted_ca: {filename: ca.pem}, match_typed_subject_alt_names: [{san_type: URI}]}}}",
                ),
                &format!("{COMMON}.validation_context.match_typed_subject_alt_names[0].matcher"),
                "required",
            ),
            (
                &context(&format!(
                    "{{common_tls_context: {{validation_context: {{trusted_ca: {{filename: ca.pem}}, verify_certificate_hash: [{HASH}, \"{HASH}:\"]}}}}}}"
                )),
                &format!("{COMMON}.validation_context.verify_certificate_hash[1]"),
                "must be a hex-encoded SHA-256",
            ),
            (
                &context(
                    "{common_tls_context: {validation_context: {trusted_ca: {filename: ca.pem}, verify_certificate_spki: [\"3YhT8Y2CYBfl3KnWTdcYZVgobAWofxoTIcP53NXfA8c\"]}}}",
                ),
                &format!("{COMMON}.validation_context.verify_certificate_spki[0]"),
                "must be a base64-encoded SHA-256",
            ),
            (
                &context(&format!(
                    "{{common_tls_context: {{validation_context: {{verify_certificate_hash: [{HASH}], match_typed_subject_alt_names: [{{san_type: DNS, matcher: {{exact: a}}}}]}}}}}}"
                )),
                &format!("{COMMON}.validation_context.match_typed_subject_alt_names"),
                "without trusted_ca is insecure and not allowed",
            ),
            (
                &context(&format!(
                    "{{common_tls_context: {{validation_context: {{verify_certificate_hash: [{HASH}], match_subject_alt_names: [{{exact: a}}]}}}}}}"
                )),
                &format!("{COMMON}.validation_context.match_subject_alt_names"),
                "without trusted_ca is insecure and not allowed",
            ),
            (
                &context(&format!(
                    "{{common_tls_context: {{validation_context: {{verify_certificate_hash: [{HASH}], crl: {{filename: crl.pem}}}}}}}}"
                )),
                &format!("{COMMON}.validation_context.crl"),
                "a CRL without trusted_ca is not allowed",
            ),
            (
                &context(&format!(
                    "{{common_tls_context: {{validation_context: {{verify_certificate_hash: [{HASH}], allow_expired_certificate: true}}}}}}"
                )),
                &format!("{COMMON}.validation_context.allow_expired_certificate"),
                "validity period is always ignored without trusted_ca",
            ),
            (
                &context(
                    "{common_tls_context: {validation_context: {trusted_ca: {filename: ca.pem}, max_verify_depth: 101}}}",
                ),
                &format!("{COMMON}.validation_context.max_verify_depth"),
                "must be at most 100",
            ),
            (
                &context(
                    "{common_tls_context: {validation_context: {trusted_ca: {filename: ca.pem}, trust_chain_verification: ACCEPT_UNTRUSTED}}}",
                ),
                &format!("{COMMON}.validation_context.trust_chain_verification"),
                UNSUPPORTED,
            ),
            (
                &context(
                    "{common_tls_context: {validation_context: {trusted_ca: {filename: ca.pem}, crl: {environment_variable: CRL}}}}",
                ),
                &format!("{COMMON}.validation_context.crl.environment_variable"),
                "is not supported",
            ),
            (
                &context(
                    "{common_tls_context: {validation_context_sds_secret_config: {name: ca}}}",
                ),
                &format!("{COMMON}.validation_context_sds_secret_config.name"),
                "unknown static secret \"ca\"",
            ),
            (
                &context(
                    "{common_tls_context: {combined_validation_context: {default_validation_context: {}}}}",
                ),
                &format!(
                    "{COMMON}.combined_validation_context.validation_context_sds_secret_config"
                ),
                "required",
            ),
            (
                &context(
                    "{common_tls_context: {tls_params: {tls_minimum_protocol_version: TLSv1_1}}}",
                ),
                &format!("{COMMON}.tls_params.tls_minimum_protocol_version"),
                "TLS 1.0 and 1.1 are not supported",
            ),
            (
                &context(
                    "{common_tls_context: {tls_params: {tls_maximum_protocol_version: TLSv1_0}}}",
                ),
                &format!("{COMMON}.tls_params.tls_maximum_protocol_version"),
                "TLS 1.0 and 1.1 are not supported",
            ),
            (
                &context(
                    "{common_tls_context: {tls_params: {tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_2}}}",
                ),
                &format!("{COMMON}.tls_params"),
                "tls_minimum_protocol_version is above tls_maximum_protocol_version",
            ),
            (
                &context("{common_tls_context: {tls_params: {cipher_suites: [AES128-SHA]}}}"),
                &format!("{COMMON}.tls_params.cipher_suites"),
                "none of these is a suite Remora speaks",
            ),
            (
                "transport_socket!: {name: tls}",
                "transport_socket",
                "typed_config is required",
            ),
            (
                "transport_socket!: {name: tls, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext}}",
                CTX,
                "transport socket type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext is not supported",
            ),
        ],
    );
}

#[test]
fn upstream_tls_fields_are_refused_by_path() {
    check_rejections_given(
        &[(CLUSTER, UPSTREAM)],
        CLUSTER,
        &[
            (
                &context("{sni: \"bad sni!\"}"),
                &format!("{CTX}.sni"),
                "not a valid server name",
            ),
            (
                &context("{auto_host_sni: true}"),
                &format!("{CTX}.auto_host_sni"),
                UNSUPPORTED,
            ),
            (
                &context("{allow_renegotiation: true}"),
                &format!("{CTX}.allow_renegotiation"),
                UNSUPPORTED,
            ),
            (
                &context(
                    "{common_tls_context: {tls_certificates: [{certificate_chain: {filename: a}, private_key: {filename: b}}, {certificate_chain: {filename: c}, private_key: {filename: d}}]}}",
                ),
                &format!("{COMMON}.tls_certificates"),
                "at most one certificate is supported",
            ),
            (
                "transport_socket!: {name: tls, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext}}",
                CTX,
                "is not supported",
            ),
        ],
    );
}

#[test]
fn tls_settings_reach_the_model() {
    let bootstrap = accepted_all(&[
        (CHAIN, DOWNSTREAM),
        (
            CHAIN,
            &context(
                "{require_client_certificate: true, common_tls_context: {alpn_protocols: [h2, http/1.1], validation_context: {trusted_ca: {inline_string: CA}}, tls_params: {tls_minimum_protocol_version: TLSv1_3}}}",
            ),
        ),
    ]);
    let tls = bootstrap.listeners[0].filter_chains[0]
        .tls
        .clone()
        .expect("downstream TLS");
    assert!(tls.require_client_certificate);
    let common = &tls.common;
    assert_eq!(common.path, format!("{CHAIN}.{COMMON}"));
    let CertificateSource::Inline(certificate) = &common.certificates[0] else {
        panic!("an inline certificate: {:?}", common.certificates);
    };
    assert_eq!(
        certificate.chain,
        DataSource::File("/etc/remora/cert.pem".into())
    );
    assert_eq!(
        certificate.key,
        DataSource::File("/etc/remora/key.pem".into())
    );
    assert_eq!(
        certificate.path,
        format!("{CHAIN}.{COMMON}.tls_certificates[0]")
    );
    let validation = inline_validation(common);
    assert_eq!(
        validation.trusted_ca,
        Some(DataSource::Inline(b"CA".to_vec()))
    );
    assert!(validation.san_matchers.is_empty());
    assert_eq!(common.alpn, ["h2", "http/1.1"]);
    assert_eq!(
        (common.min_version, common.max_version),
        (TlsVersion::V1_3, TlsVersion::V1_3)
    );

    let tls = accepted(CLUSTER, UPSTREAM).clusters[0]
        .connect
        .tls
        .clone()
        .expect("upstream TLS");
    assert_eq!(tls.sni.as_deref(), Some("backend.example"));
    assert!(tls.common.certificates.is_empty() && tls.common.validation.is_none());
    assert_eq!(
        (tls.common.min_version, tls.common.max_version),
        (TlsVersion::V1_2, TlsVersion::V1_2),
        "a client speaks TLS 1.2 at most unless told otherwise, as Envoy's"
    );
    let tls = accepted_all(&[(CLUSTER, UPSTREAM), (CLUSTER, &context("{sni: \"\", common_tls_context: {tls_params: {tls_maximum_protocol_version: TLSv1_2}}}"))])
        .clusters[0]
        .connect
        .tls
        .clone()
        .expect("upstream TLS");
    assert_eq!(tls.sni, None, "no SNI unless configured, as Envoy");
    assert!(
        tls.session_resumption,
        "sessions resume by default, as in Envoy"
    );
    assert_eq!(tls.common.max_version, TlsVersion::V1_2);
    let tls = accepted_all(&[
        (CLUSTER, UPSTREAM),
        (CLUSTER, &context("{max_session_keys: 0}")),
    ])
    .clusters[0]
        .connect
        .tls
        .clone()
        .expect("upstream TLS");
    assert!(
        !tls.session_resumption,
        "max_session_keys: 0 turns resumption off"
    );
    assert!(accepted(CLUSTER, "").clusters[0].connect.tls.is_none());
}

#[test]
fn the_plaintext_socket_written_out_is_no_tls() {
    const NAMED: &str = "transport_socket: {name: envoy.transport_sockets.raw_buffer}";
    const TYPED: &str = "transport_socket: {name: raw, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer}}";
    for socket in [NAMED, TYPED] {
        let bootstrap = accepted_all(&[(CLUSTER, socket), (CHAIN, socket)]);
        assert!(bootstrap.clusters[0].connect.tls.is_none(), "{socket}");
        assert!(
            bootstrap.listeners[0].filter_chains[0].tls.is_none(),
            "{socket}"
        );
    }
}

#[test]
fn sds_secrets_and_san_matchers_reach_the_model() {
    const SECRETS: &str = "static_resources";
    let bootstrap = accepted_all(&[
        (
            SECRETS,
            "{secrets: [{name: bundle, validation_context: {trusted_ca: {inline_string: CA}, match_typed_subject_alt_names: [{san_type: DNS, matcher: {suffix: .svc}}]}}]}",
        ),
        (CHAIN, DOWNSTREAM),
        (
            CHAIN,
            &context(
                "{common_tls_context: {tls_certificates!: [], tls_certificate_sds_secret_configs: [{name: cert, sds_config: {ads: {}}}], combined_validation_context: {default_validation_context: {match_typed_subject_alt_names: [{san_type: URI, matcher: {prefix: \"spiffe://td/\"}}], match_subject_alt_names: [{exact: legacy}]}, validation_context_sds_secret_config: {name: bundle}}}}",
            ),
        ),
        (CLUSTER, UPSTREAM),
        (
            CLUSTER,
            &context(
                "{common_tls_context: {validation_context_sds_secret_config: {name: ca, sds_config: {path_config_source: {path: /etc/remora/ca.yaml}}}}}",
            ),
        ),
    ]);
    let [secret] = bootstrap.secrets.as_slice() else {
        panic!("one static secret: {:?}", bootstrap.secrets);
    };
    assert_eq!(secret.name, "bundle");
    let SecretKind::Validation(validation) = &secret.kind else {
        panic!("a validation context");
    };
    assert_eq!(validation.san_matchers.len(), 1);
    assert!(validation.san_matchers[0].matches("b.a.svc"));

    let common = downstream_common(&bootstrap);
    let CertificateSource::Sds(sds) = &common.certificates[0] else {
        panic!("an SDS certificate");
    };
    assert_eq!(
        (sds.name.as_str(), &sds.source),
        ("cert", &SecretSource::Ads)
    );
    let Some(ValidationSource::Combined { default, secret }) = &common.validation else {
        panic!("a combined validation: {:?}", common.validation);
    };
    assert_eq!(
        (secret.name.as_str(), &secret.source),
        ("bundle", &SecretSource::Static)
    );
    assert_eq!(default.trusted_ca, None);
    // One typed matcher, and the legacy one for each of the four SAN types, which the typed
    // one puts out of force (as Envoy ignores the deprecated field then).
    let types = |matchers: &[remora_config::tls::SanMatcher]| -> Vec<SanType> {
        matchers.iter().map(|m| m.san_type).collect()
    };
    assert_eq!(types(&default.san_matchers), [SanType::Uri]);
    assert_eq!(
        types(&default.legacy_san_matchers),
        [SanType::Dns, SanType::Uri, SanType::Email, SanType::Ip]
    );
    assert_eq!(default.san_matchers_in_force(), &default.san_matchers[..]);
    assert!(default.san_matchers[0].matches("spiffe://td/ns/a/sa/b"));
    assert!(!default.san_matchers[0].matches("spiffe://other/ns/a/sa/b"));
    let legacy_only = remora_config::tls::Validation {
        san_matchers: Vec::new(),
        ..default.clone()
    };
    assert_eq!(
        types(legacy_only.san_matchers_in_force()),
        [SanType::Dns, SanType::Uri, SanType::Email, SanType::Ip]
    );

    let tls = bootstrap.clusters[0]
        .connect
        .tls
        .as_ref()
        .expect("upstream TLS");
    let Some(ValidationSource::Sds(sds)) = &tls.common.validation else {
        panic!("an SDS validation");
    };
    assert_eq!(sds.source, SecretSource::File("/etc/remora/ca.yaml".into()));
}

#[test]
fn an_sds_source_of_its_own_is_read_as_istio_writes_it() {
    let bootstrap = accepted_all(&[
        (CHAIN, DOWNSTREAM),
        (
            CHAIN,
            &context(
                "{common_tls_context: {tls_certificates!: [], tls_certificate_sds_secret_configs: [{name: default, sds_config: {api_config_source: {api_type: GRPC, transport_api_version: V3, grpc_services: [{envoy_grpc: {cluster_name: echo}}], set_node_on_first_message_only: true}, initial_fetch_timeout: 0s, resource_api_version: V3}}]}}",
            ),
        ),
    ]);
    let common = downstream_common(&bootstrap);
    let CertificateSource::Sds(sds) = &common.certificates[0] else {
        panic!("an SDS certificate");
    };
    assert_eq!(
        sds.source,
        SecretSource::Grpc(remora_config::tls::GrpcSecretSource {
            cluster: "echo".into(),
            node_on_first_message_only: true,
        })
    );
    assert_eq!(sds.initial_fetch_timeout, std::time::Duration::ZERO);
}

#[test]
fn an_exact_dns_matcher_is_covered_by_a_wildcard_san() {
    let bootstrap = accepted_all(&[
        (CHAIN, DOWNSTREAM),
        (
            CHAIN,
            &context(
                "{common_tls_context: {validation_context: {trusted_ca: {inline_string: CA}, match_typed_subject_alt_names: [{san_type: DNS, matcher: {exact: api.example.com}}]}}}",
            ),
        ),
    ]);
    let common = downstream_common(&bootstrap);
    let validation = inline_validation(common);
    let matcher = &validation.san_matchers[0];
    assert!(matcher.matches("api.example.com"));
    assert!(matcher.matches("*.example.com"));
    assert!(!matcher.matches("*.api.example.com"));
    assert!(!matcher.matches("*.other.com"));
}

#[test]
fn crls_reach_the_model_and_merge_in_a_combined_context() {
    const SECRETS: &str = "static_resources";
    let bootstrap = accepted_all(&[
        (
            SECRETS,
            "{secrets: [{name: bundle, validation_context: {trusted_ca: {inline_string: CA}, crl: {filename: /etc/remora/secret-crl.pem}}}]}",
        ),
        (CHAIN, DOWNSTREAM),
        (
            CHAIN,
            &context(
                "{common_tls_context: {validation_context: {trusted_ca: {inline_string: CA}, crl: {filename: /etc/remora/crl.pem}, only_verify_leaf_cert_crl: true}}}",
            ),
        ),
        (CLUSTER, UPSTREAM),
        (
            CLUSTER,
            &context(
                "{common_tls_context: {combined_validation_context: {default_validation_context: {crl: {inline_string: DEFAULT}, only_verify_leaf_cert_crl: true}, validation_context_sds_secret_config: {name: bundle}}}}",
            ),
        ),
    ]);
    let common = downstream_common(&bootstrap);
    let validation = inline_validation(common);
    assert_eq!(
        validation.crl,
        Some(DataSource::File("/etc/remora/crl.pem".into()))
    );
    assert!(validation.only_verify_leaf_cert_crl);

    let SecretKind::Validation(secret) = &bootstrap.secrets[0].kind else {
        panic!("a validation context");
    };
    assert!(
        !secret.only_verify_leaf_cert_crl,
        "the whole chain by default"
    );
    let tls = bootstrap.clusters[0].connect.tls.as_ref().expect("TLS");
    let Some(ValidationSource::Combined { default, .. }) = &tls.common.validation else {
        panic!("a combined validation");
    };
    // Protobuf's merge: the secret's CRL replaces the default's, a `true` flag stays.
    let merged = default.merged(secret);
    assert_eq!(
        merged.crl,
        Some(DataSource::File("/etc/remora/secret-crl.pem".into()))
    );
    assert!(merged.only_verify_leaf_cert_crl);
    let without_crl = remora_config::tls::Validation {
        crl: None,
        ..secret.clone()
    };
    assert_eq!(
        default.merged(&without_crl).crl,
        Some(DataSource::Inline(b"DEFAULT".to_vec()))
    );
}

#[test]
fn pins_reach_the_model_and_need_no_ca() {
    let bootstrap = accepted_all(&[
        (CHAIN, DOWNSTREAM),
        (
            CHAIN,
            &context(
                "{common_tls_context: {validation_context: {verify_certificate_spki: [\"3YhT8Y2CYBfl3KnWTdcYZVgobAWofxoTIcP53NXfA8c=\"], verify_certificate_hash: [\"48:97:77:D2:97:17:A5:52:AC:FA:B7:0B:4E:27:A5:27:82:83:2A:C6:12:40:74:11:74:B2:73:CD:F7:D0:96:0B\"]}}}",
            ),
        ),
    ]);
    let common = downstream_common(&bootstrap);
    let validation = inline_validation(common);
    assert_eq!(
        validation.trusted_ca, None,
        "pins alone need no CA, as in Envoy"
    );
    assert_eq!(validation.certificate_hashes.len(), 1);
    assert_eq!(validation.certificate_hashes[0][..2], [0x48, 0x97]);
    assert_eq!(validation.spki_hashes.len(), 1);
    assert!(validation.has_pins());
}

#[test]
fn validity_and_depth_settings_reach_the_model_and_merge() {
    let bootstrap = accepted_all(&[
        (
            "static_resources",
            "{secrets: [{name: bundle, validation_context: {trusted_ca: {inline_string: CA}, max_verify_depth: 2}}]}",
        ),
        (CHAIN, DOWNSTREAM),
        (
            CHAIN,
            &context(
                "{common_tls_context: {combined_validation_context: {default_validation_context: {allow_expired_certificate: true, max_verify_depth: 5}, validation_context_sds_secret_config: {name: bundle}}}}",
            ),
        ),
    ]);
    let common = downstream_common(&bootstrap);
    let Some(ValidationSource::Combined { default, .. }) = &common.validation else {
        panic!("a combined validation: {:?}", common.validation);
    };
    assert!(default.allow_expired_certificate);
    assert_eq!(default.max_verify_depth, Some(5));
    let SecretKind::Validation(secret) = &bootstrap.secrets[0].kind else {
        panic!("a validation context");
    };
    assert!(!secret.allow_expired_certificate);
    let merged = default.merged(secret);
    assert!(merged.allow_expired_certificate, "a true flag stays");
    assert_eq!(merged.max_verify_depth, Some(2), "the secret's depth wins");
    let unset = remora_config::tls::Validation {
        max_verify_depth: None,
        ..secret.clone()
    };
    assert_eq!(default.merged(&unset).max_verify_depth, Some(5));
}

#[test]
fn other_name_matchers_reach_the_model() {
    let bootstrap = accepted_all(&[
        (CHAIN, DOWNSTREAM),
        (
            CHAIN,
            &context(
                "{common_tls_context: {validation_context: {trusted_ca: {inline_string: CA}, match_typed_subject_alt_names: [{san_type: OTHER_NAME, oid: \"1.3.6.1.4.1.311.20.2.3\", matcher: {exact: user@example.com}}, {san_type: DNS, oid: \"1.2.3\", matcher: {exact: a.test}}]}}}",
            ),
        ),
    ]);
    let common = downstream_common(&bootstrap);
    let validation = inline_validation(common);
    let [upn, dns] = validation.san_matchers.as_slice() else {
        panic!("two matchers: {:?}", validation.san_matchers);
    };
    assert_eq!(upn.san_type, SanType::OtherName);
    assert_eq!(upn.oid.as_deref(), Some("1.3.6.1.4.1.311.20.2.3"));
    assert!(upn.matches("user@example.com"));
    // Envoy ignores `oid` on other SAN types.
    assert_eq!((dns.san_type, dns.oid.as_deref()), (SanType::Dns, None));
}
