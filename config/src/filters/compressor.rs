//! The compressor filter's config (`envoy.filters.http.compressor`): which library compresses
//! response bodies (gzip, brotli or zstd), for which content types and sizes, and what it does
//! to the request's `Accept-Encoding` and the response's `ETag`.

use xds_api::envoy::config::core::v3 as core_pb;
use xds_api::envoy::extensions::compression::brotli::compressor::v3 as brotli_pb;
use xds_api::envoy::extensions::compression::gzip::compressor::v3 as gzip_pb;
use xds_api::envoy::extensions::compression::zstd::compressor::v3 as zstd_pb;
use xds_api::envoy::extensions::filters::http::compressor::v3 as compressor_pb;

use crate::common::unpack;
use crate::error::{ConfigResult, err, field};
use crate::unsupported;

pub const TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor";
const GZIP_URL: &str = "type.googleapis.com/envoy.extensions.compression.gzip.compressor.v3.Gzip";
const BROTLI_URL: &str =
    "type.googleapis.com/envoy.extensions.compression.brotli.compressor.v3.Brotli";
const ZSTD_URL: &str = "type.googleapis.com/envoy.extensions.compression.zstd.compressor.v3.Zstd";

/// Envoy's content types compressed when the config names none.
pub const DEFAULT_CONTENT_TYPES: [&str; 18] = [
    "text/html",
    "text/plain",
    "text/css",
    "application/javascript",
    "application/x-javascript",
    "text/javascript",
    "text/x-javascript",
    "text/ecmascript",
    "text/js",
    "text/jscript",
    "text/x-js",
    "application/ecmascript",
    "application/x-json",
    "application/xml",
    "application/json",
    "image/svg+xml",
    "text/xml",
    "application/xhtml+xml",
];

#[derive(Debug, Clone, PartialEq)]
pub struct Compressor {
    pub library: Library,
    /// `compressor_library.name`: the stats' prefix (`compressor.NAME.gzip.*`).
    pub library_name: String,
    /// Responses shorter than this (by `Content-Length`) stay as they are.
    pub min_content_length: u64,
    /// Media types compressed, lower case, without parameters.
    pub content_types: Vec<String>,
    pub disable_on_etag_header: bool,
    pub remove_accept_encoding_header: bool,
    /// Wins a tie of `Accept-Encoding` weights among the chain's compressors.
    pub choose_first: bool,
    pub uncompressible_response_codes: Vec<u16>,
    /// `enabled` (or the deprecated `runtime_enabled`) is off.
    pub disabled: bool,
    /// `response_direction_config` is given: Envoy then counts responses under `response.`,
    /// else under its older names, straight under the library's prefix.
    pub response_stats_prefix: bool,
}

/// A compression library and its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Library {
    /// zlib's level (1-9).
    Gzip { level: u32 },
    /// Quality (0-11) and window bits (10-24).
    Brotli { quality: u32, window_bits: u32 },
    /// Level, and whether frames carry a checksum.
    Zstd { level: i32, checksum: bool },
}

impl Library {
    /// The `Content-Encoding` (and `Accept-Encoding` token) it produces.
    pub fn encoding(self) -> &'static str {
        match self {
            Library::Gzip { .. } => "gzip",
            Library::Brotli { .. } => "br",
            Library::Zstd { .. } => "zstd",
        }
    }

    /// Its stats' prefix below the library's name, as Envoy's.
    pub fn stats_prefix(self) -> &'static str {
        match self {
            Library::Gzip { .. } => "gzip",
            Library::Brotli { .. } => "brotli",
            Library::Zstd { .. } => "zstd",
        }
    }
}

/// Whether a feature flag leaves the feature on. Remora's runtime holds no such keys, so the
/// default applies, as in Envoy with the key unset.
fn flag_on(flag: &Option<core_pb::RuntimeFeatureFlag>) -> bool {
    flag.as_ref()
        .is_none_or(|f| f.default_value.unwrap_or(true))
}

pub fn filter(any: &prost_types::Any, path: &str) -> ConfigResult<Compressor> {
    let compressor_pb::Compressor {
        content_length,
        content_type,
        disable_on_etag_header,
        remove_accept_encoding_header,
        runtime_enabled,
        compressor_library,
        request_direction_config,
        response_direction_config,
        choose_first,
    } = unpack(any, path)?;
    crate::unsupported_because!(
        path,
        request_direction_config,
        "request compression is not supported (responses only)"
    );
    let Some(core_pb::TypedExtensionConfig {
        name: library_name,
        typed_config: Some(library),
    }) = compressor_library
    else {
        return err(field(path, "compressor_library"), "required");
    };
    let lpath = field(path, "compressor_library.typed_config");
    let library = match library.type_url.as_str() {
        GZIP_URL => {
            // The gzip library here has no window, memory level or strategy to set: refused
            // rather than taken and not applied.
            let gzip_pb::Gzip {
                compression_level,
                memory_level,
                compression_strategy,
                window_bits,
                chunk_size,
            } = unpack(&library, &lpath)?;
            unsupported!(
                &lpath,
                memory_level,
                compression_strategy,
                window_bits,
                chunk_size
            );
            Library::Gzip {
                level: match compression_level {
                    0 => 6,
                    level => level.clamp(1, 9) as u32,
                },
            }
        }
        BROTLI_URL => {
            let brotli_pb::Brotli {
                quality,
                window_bits,
                encoder_mode,
                input_block_bits,
                chunk_size,
                disable_literal_context_modeling,
            } = unpack(&library, &lpath)?;
            unsupported!(
                &lpath,
                encoder_mode,
                input_block_bits,
                chunk_size,
                disable_literal_context_modeling
            );
            Library::Brotli {
                quality: quality.unwrap_or(3).min(11),
                window_bits: window_bits.unwrap_or(18).clamp(10, 24),
            }
        }
        ZSTD_URL => {
            let zstd_pb::Zstd {
                compression_level,
                enable_checksum,
                dictionary,
                strategy,
                chunk_size,
            } = unpack(&library, &lpath)?;
            unsupported!(&lpath, dictionary, strategy, chunk_size);
            Library::Zstd {
                level: compression_level.unwrap_or(3).min(22) as i32,
                checksum: enable_checksum,
            }
        }
        other => {
            return err(
                lpath,
                format!("compression library {other:?} is not supported (gzip, brotli, zstd)"),
            );
        }
    };
    let response_stats_prefix = response_direction_config.is_some();
    let response = response_direction_config.unwrap_or_default();
    let common = response.common_config.unwrap_or_default();
    let types = if common.content_type.is_empty() {
        content_type
    } else {
        common.content_type
    };
    let content_types = if types.is_empty() {
        DEFAULT_CONTENT_TYPES
            .iter()
            .map(|t| t.to_string())
            .collect()
    } else {
        types
            .iter()
            .map(|t| {
                t.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            })
            .collect()
    };
    let mut codes = Vec::new();
    for code in &response.uncompressible_response_codes {
        match u16::try_from(*code) {
            Ok(code) if (100..600).contains(&code) => codes.push(code),
            _ => {
                return err(
                    field(
                        path,
                        "response_direction_config.uncompressible_response_codes",
                    ),
                    format!("{code} is not an HTTP status"),
                );
            }
        }
    }
    Ok(Compressor {
        library,
        library_name,
        min_content_length: u64::from(common.min_content_length.or(content_length).unwrap_or(30)),
        content_types,
        disable_on_etag_header: response.disable_on_etag_header || disable_on_etag_header,
        remove_accept_encoding_header: response.remove_accept_encoding_header
            || remove_accept_encoding_header,
        choose_first,
        uncompressible_response_codes: codes,
        disabled: !flag_on(&common.enabled) || !flag_on(&runtime_enabled),
        response_stats_prefix,
    })
}
