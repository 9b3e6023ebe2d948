//! A bootstrap as protobuf bytes: the wire gate, decoding and conversion must refuse bad
//! input with an error, never panic. Files it names are not read (`Files::Skip`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::{Message, Name};
use remora_config::route::Files;
use xds_api::envoy::config::bootstrap::v3::Bootstrap;

fuzz_target!(|bytes: &[u8]| {
    if remora_config::gate::check_bytes(&Bootstrap::full_name(), bytes, "").is_err() {
        return;
    }
    let Ok(proto) = Bootstrap::decode(bytes) else {
        return;
    };
    let _ = remora_config::bootstrap::bootstrap_files(&proto, Files::Skip);
});
