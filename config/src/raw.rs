//! A resource as it was configured, kept encoded for `/config_dump` and to tell a resend from an
//! update. Rendering it as JSON needs the reflection pool; keeping the bytes instead of a JSON
//! tree lets the pool exist only while a dump is being rendered, and is several times smaller.

/// The encoded message and its full proto name.
#[derive(Clone, PartialEq, Eq)]
pub struct RawConfig {
    full_name: String,
    bytes: bytes::Bytes,
}

impl RawConfig {
    pub fn of<M: prost::Message + prost::Name>(message: &M) -> Self {
        RawConfig {
            full_name: M::full_name(),
            bytes: message.encode_to_vec().into(),
        }
    }

    /// Proto3 JSON with Envoy's conventions; `null` if it cannot be rendered.
    pub fn to_json(&self) -> serde_json::Value {
        xds_api::json::encoded_to_value(&self.full_name, &self.bytes)
            .unwrap_or(serde_json::Value::Null)
    }

    /// A hash of the encoded bytes: equal configs hash equal (a resend is not an update).
    pub fn digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.bytes.hash(&mut hasher);
        hasher.finish()
    }
}

impl std::fmt::Debug for RawConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} bytes)", self.full_name, self.bytes.len())
    }
}
