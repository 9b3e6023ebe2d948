//! A bootstrap as YAML or JSON text, as `remora-proxy -c FILE` reads it: the JSON mapping,
//! the gate and conversion must refuse bad input with an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remora_config::route::Files;
use xds_api::envoy::config::bootstrap::v3::Bootstrap;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(proto) = xds_api::json::from_config_str::<Bootstrap>(text) else {
        return;
    };
    let _ = remora_config::bootstrap::bootstrap_files(&proto, Files::Skip);
});
