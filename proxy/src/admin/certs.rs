//! `/certs`: every TLS context's CA certificates and own certificate, as Envoy prints them
//! (path, serial, SANs, days until expiration, validity). A context is a TLS-terminating
//! filter chain or a TLS-originating cluster.

use serde_json::{Value, json};

use super::Context;
use crate::tls::{ContextCertificates, PeerCertificate};

pub fn render(context: &Context) -> Value {
    let contexts =
        crate::server_stats::tls_contexts(&context.listeners, &context.store, &context.secrets);
    let now = jiff::Timestamp::now().as_second();
    let certificates: Vec<Value> = contexts
        .iter()
        .map(|shown: &ContextCertificates| {
            json!({
                "ca_cert": shown.ca.iter().map(|(path, der)| details(path, der, now)).collect::<Vec<_>>(),
                "cert_chain": shown.chain.iter().map(|(path, der)| details(path, der, now)).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "certificates": certificates })
}

/// One certificate's entry; `now` in seconds since the epoch.
fn details(path: &str, der: &[u8], now: i64) -> Value {
    let Some(certificate) = PeerCertificate::parse(der) else {
        return json!({ "path": path });
    };
    let names = |kind: &str, values: &[String]| -> Vec<Value> {
        values.iter().map(|value| json!({ kind: value })).collect()
    };
    // Envoy lists the names by type, DNS first.
    let mut subject_alt_names = names("dns", certificate.dns_sans());
    subject_alt_names.extend(names("uri", certificate.uri_sans()));
    subject_alt_names.extend(names("ip_address", certificate.ip_sans()));
    subject_alt_names.extend(names("email", certificate.email_sans()));
    let (start, end) = certificate.validity();
    json!({
        "path": path,
        "serial_number": certificate.serial(),
        "subject_alt_names": subject_alt_names,
        "days_until_expiration": crate::server_stats::days_until(end, now).to_string(),
        "valid_from": timestamp(start),
        "expiration_time": timestamp(end),
    })
}

fn timestamp(seconds: i64) -> String {
    jiff::Timestamp::from_second(seconds)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}
