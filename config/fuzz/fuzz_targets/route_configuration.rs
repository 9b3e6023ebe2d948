//! An xDS resource of type `ROUTE_CONFIGURATION` as it arrives in a DiscoveryResponse: the wire gate,
//! decoding and conversion (`remora_config::resource`) must answer with a value or an error,
//! never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xds_api::type_urls::ROUTE_CONFIGURATION;

fuzz_target!(|bytes: &[u8]| {
    let _ = remora_config::resource::name(ROUTE_CONFIGURATION, bytes);
    let _ = remora_config::resource::check(ROUTE_CONFIGURATION, bytes);
});
