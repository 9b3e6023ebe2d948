//! Remora's config model: Envoy's v3 bootstrap and xDS resources read into typed, validated
//! values the proxy runs on, and nothing else (no sockets, no runtime state).
//!
//! Each area's converter reads its proto messages by exhaustive destructuring, so a field
//! added to `protos/` does not compile until someone decides what it means; a set field Remora
//! does not honour is a [`ConfigError`] naming its path (`static_resources.clusters[0].
//! outlier_detection: field is not supported`). Before decoding, [`gate`] walks a resource's
//! wire bytes for fields our protos do not declare.
//!
//! Areas, in the order a request meets them: [`bootstrap`], [`listener`] (filter chains),
//! [`rbac`] (network and HTTP), [`tcp_proxy`], [`hcm`] (with [`filters`] and [`access_log`]), [`route`] (with [`retry`] and
//! [`hash_policy`]), [`cluster`] (with [`load_balancing`], [`health_check`] and [`outlier`]),
//! [`endpoint`], [`tls`], [`tracing`]; [`common`] and [`matcher`] hold what they share.
//! [`resource`] reads
//! xDS resources from the wire and answers a control plane's "would a proxy accept this?".

pub mod access_log;
pub mod app_log;
pub mod bootstrap;
pub mod cluster;
pub mod common;
pub mod endpoint;
pub mod error;
pub mod filters;
pub mod gate;
pub mod hash_policy;
pub mod hcm;
pub mod health_check;
pub mod listener;
pub mod load_balancing;
pub mod matcher;
pub mod outlier;
pub mod raw;
pub mod rbac;
pub mod resource;
pub mod retry;
pub mod route;
pub mod stats;
pub mod tcp_proxy;
pub mod tls;
pub mod tracing;

pub use error::{ConfigError, ConfigResult};
pub use raw::RawConfig;

/// A random (version 4) UUID as text, as Envoy names unnamed listeners.
pub(crate) fn uuid_v4() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}
