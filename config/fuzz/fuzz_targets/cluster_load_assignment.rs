//! An xDS resource of type `CLUSTER_LOAD_ASSIGNMENT` as it arrives in a DiscoveryResponse: the wire gate,
//! decoding and conversion (`remora_config::resource`) must answer with a value or an error,
//! never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xds_api::type_urls::CLUSTER_LOAD_ASSIGNMENT;

fuzz_target!(|bytes: &[u8]| {
    let _ = remora_config::resource::name(CLUSTER_LOAD_ASSIGNMENT, bytes);
    let _ = remora_config::resource::check(CLUSTER_LOAD_ASSIGNMENT, bytes);
});
