//! The compressor filter: a response whose content type, size and headers allow it is
//! compressed with the filter's library when the client's `Accept-Encoding` picks that
//! library's encoding over the chain's other compressors and `identity`, as Envoy picks it:
//! the greatest weight, ties to a `choose_first` compressor, then to the header's order; `*`
//! picks the chain's first compressor. A compressible response gets `Vary: Accept-Encoding`
//! whichever encoding is picked, and a strong `ETag` is made weak.

use std::io::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response};
use remora_config::filters::compressor::{Compressor as Config, Library};

use crate::body::filter::BodyFilter;
use crate::http::filter::{HttpFilter, Stream};
use crate::stats::{Registry, Stat};

/// One compressor of the chain, as the negotiation sees it: its encoding and `choose_first`.
pub type ChainEntry = (&'static str, bool);

#[derive(Debug)]
pub struct Compressor {
    config: Arc<Config>,
    /// Every compressor of the chain, in order, and this one's place among them.
    chain: Arc<[ChainEntry]>,
    position: usize,
    stats: Arc<CompressorStats>,
}

/// `http.PREFIX.compressor.NAME.LIBRARY.*`, as Envoy names them.
#[derive(Debug)]
struct CompressorStats {
    no_accept_header: Arc<Stat>,
    header_identity: Arc<Stat>,
    header_wildcard: Arc<Stat>,
    header_not_valid: Arc<Stat>,
    header_compressor_used: Arc<Stat>,
    header_compressor_overshadowed: Arc<Stat>,
    not_compressed_etag: Arc<Stat>,
    request_not_compressed: Arc<Stat>,
    compressed: Arc<Stat>,
    not_compressed: Arc<Stat>,
    content_length_too_small: Arc<Stat>,
    total_uncompressed_bytes: Arc<Stat>,
    total_compressed_bytes: Arc<Stat>,
}

impl Compressor {
    pub fn new(
        config: Arc<Config>,
        chain: Arc<[ChainEntry]>,
        position: usize,
        registry: &Registry,
        stat_prefix: &str,
    ) -> Self {
        let prefix = format!(
            "http.{stat_prefix}.compressor.{}.{}",
            config.library_name,
            config.library.stats_prefix()
        );
        let c = |name: &str| registry.counter(format!("{prefix}.{name}"));
        let response = if config.response_stats_prefix {
            "response."
        } else {
            ""
        };
        let r = |name: &str| c(&format!("{response}{name}"));
        let stats = Arc::new(CompressorStats {
            no_accept_header: c("no_accept_header"),
            header_identity: c("header_identity"),
            header_wildcard: c("header_wildcard"),
            header_not_valid: c("header_not_valid"),
            header_compressor_used: c("header_compressor_used"),
            header_compressor_overshadowed: c("header_compressor_overshadowed"),
            not_compressed_etag: c("not_compressed_etag"),
            request_not_compressed: c("request.not_compressed"),
            compressed: r("compressed"),
            not_compressed: r("not_compressed"),
            content_length_too_small: r("content_length_too_small"),
            total_uncompressed_bytes: r("total_uncompressed_bytes"),
            total_compressed_bytes: r("total_compressed_bytes"),
        });
        // Envoy makes these at start; so do the request direction's, which stay at zero.
        for name in [
            "request.compressed",
            "request.content_length_too_small",
            "request.total_compressed_bytes",
            "request.total_uncompressed_bytes",
        ] {
            c(name);
        }
        Compressor {
            config,
            chain,
            position,
            stats,
        }
    }
}

/// What `Accept-Encoding` picks among the chain's compressors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pick {
    NoHeader,
    NotValid,
    Identity,
    /// `*`: the chain's first compressor.
    Wildcard,
    Compressor(usize),
}

/// Envoy's choice: the token with the greatest weight among the chain's encodings, `identity`
/// and `*` (tokens compared as written); ties go to a `choose_first` compressor, then to the
/// token written first.
fn pick(accept: Option<&str>, chain: &[ChainEntry]) -> Pick {
    let Some(accept) = accept else {
        return Pick::NoHeader;
    };
    let mut best: Option<(f32, bool, Pick)> = None;
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let token = parts.next().unwrap_or_default().trim();
        let weight = parts
            .find_map(|p| p.trim().strip_prefix("q=").map(str::trim))
            .map_or(Some(1.0), |q| q.parse::<f32>().ok());
        let Some(weight) = weight.filter(|w| *w > 0.0) else {
            continue;
        };
        let (candidate, first) = match token {
            "identity" => (Pick::Identity, false),
            "*" => (Pick::Wildcard, false),
            token => match chain.iter().position(|(encoding, _)| *encoding == token) {
                Some(index) => (Pick::Compressor(index), chain[index].1),
                None => continue,
            },
        };
        let better = match best {
            None => true,
            Some((w, f, _)) => weight > w || (weight == w && first && !f),
        };
        if better {
            best = Some((weight, first, candidate));
        }
    }
    best.map_or(Pick::NotValid, |(_, _, pick)| pick)
}

/// Per stream: this compressor was picked, and then whether it compresses the response.
#[derive(Debug)]
struct Picked;

#[derive(Debug)]
struct Compressing;

impl HttpFilter for Compressor {
    fn on_request(&self, stream: &mut Stream<'_>) -> crate::http::filter::Flow {
        if self.config.disabled {
            return crate::http::filter::Flow::Continue;
        }
        self.stats.request_not_compressed.inc();
        let headers = &stream.request.headers;
        let joined: Option<String> = {
            let values: Vec<&str> = headers
                .get_all(header::ACCEPT_ENCODING)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            (!values.is_empty()).then(|| values.join(","))
        };
        let picked = pick(joined.as_deref(), &self.chain);
        let stat = match picked {
            Pick::NoHeader => &self.stats.no_accept_header,
            Pick::NotValid => &self.stats.header_not_valid,
            Pick::Identity => &self.stats.header_identity,
            Pick::Wildcard => &self.stats.header_wildcard,
            Pick::Compressor(index) if index == self.position => &self.stats.header_compressor_used,
            Pick::Compressor(_) => &self.stats.header_compressor_overshadowed,
        };
        stat.inc();
        if picked == Pick::Compressor(self.position)
            || (picked == Pick::Wildcard && self.position == 0)
        {
            stream.set_state(Picked);
        }
        if self.config.remove_accept_encoding_header {
            stream.request.headers.remove(header::ACCEPT_ENCODING);
        }
        crate::http::filter::Flow::Continue
    }

    fn on_response(&self, stream: &mut Stream<'_>, response: &mut Response<()>) {
        if self.config.disabled {
            return;
        }
        let picked = stream.state::<Picked>().is_some();
        let headers = response.headers();
        let status = response.status().as_u16();
        // A tunnel's bytes (CONNECT) are not a body to compress.
        let has_body = stream.request.method != Method::HEAD
            && stream.request.method != Method::CONNECT
            && !matches!(status, 100..=199 | 204 | 304)
            && !self.config.uncompressible_response_codes.contains(&status);
        let length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
        let type_allowed = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|value| {
                let media = value.split(';').next().unwrap_or_default().trim();
                self.config
                    .content_types
                    .iter()
                    .any(|t| t.eq_ignore_ascii_case(media))
            });
        let no_transform = headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|d| d.trim().eq_ignore_ascii_case("no-transform"));
        let encoded = headers.contains_key(header::CONTENT_ENCODING)
            || headers
                .get_all(header::TRANSFER_ENCODING)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|t| !t.trim().eq_ignore_ascii_case("chunked"));
        let etag_refused = self.config.disable_on_etag_header && headers.contains_key(header::ETAG);
        let too_small = length.is_some_and(|n| n < self.config.min_content_length);
        if too_small {
            self.stats.content_length_too_small.inc();
        }
        if etag_refused {
            self.stats.not_compressed_etag.inc();
        }
        let compressible =
            has_body && !too_small && type_allowed && !no_transform && !encoded && !etag_refused;
        if !compressible {
            self.stats.not_compressed.inc();
            return;
        }
        let headers = response.headers_mut();
        add_vary(headers);
        if !picked {
            self.stats.not_compressed.inc();
            return;
        }
        // The body changes, so a strong validator no longer holds: made weak, as Envoy does.
        if let Some(tag) = headers.get(header::ETAG).and_then(|v| v.to_str().ok())
            && !tag.starts_with("W/")
            && let Ok(weak) = HeaderValue::from_str(&format!("W/{tag}"))
        {
            headers.insert(header::ETAG, weak);
        }
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(self.config.library.encoding()),
        );
        self.stats.compressed.inc();
        stream.set_state(Compressing);
    }

    fn response_body(&self, stream: &Stream<'_>) -> Option<Box<dyn BodyFilter>> {
        stream.state::<Compressing>()?;
        Some(Box::new(Encoder::new(
            self.config.library,
            self.stats.clone(),
        )))
    }
}

/// `Vary: Accept-Encoding`, added to what the response varies on unless already there.
fn add_vary(headers: &mut http::HeaderMap) {
    let present = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| {
            let v = v.trim();
            v == "*" || v.eq_ignore_ascii_case("accept-encoding")
        });
    if !present {
        headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
}

/// The streaming encoder: each data frame goes out compressed and flushed (so a streamed
/// response is not held back), the library's trailer at the end.
struct Encoder {
    codec: Codec,
    stats: Arc<CompressorStats>,
}

enum Codec {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
    Done,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Encoder")
    }
}

impl Encoder {
    fn new(library: Library, stats: Arc<CompressorStats>) -> Self {
        let codec = match library {
            Library::Gzip { level } => Codec::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(level),
            )),
            Library::Brotli {
                quality,
                window_bits,
            } => Codec::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                quality,
                window_bits,
            ))),
            Library::Zstd { level, checksum } => {
                match zstd::stream::write::Encoder::new(Vec::new(), level) {
                    Ok(mut encoder) => {
                        let _ = encoder.include_checksum(checksum);
                        Codec::Zstd(encoder)
                    }
                    Err(_) => Codec::Done,
                }
            }
        };
        Encoder { codec, stats }
    }

    /// Compresses `data` (and, with `last`, ends the stream): what is ready to send.
    fn run(&mut self, data: &[u8], last: bool) -> Bytes {
        fn take(buffer: &mut Vec<u8>) -> Bytes {
            Bytes::from(std::mem::take(buffer))
        }
        let out = match (&mut self.codec, last) {
            (Codec::Gzip(e), false) => {
                let _ = e.write_all(data).and_then(|()| e.flush());
                take(e.get_mut())
            }
            (Codec::Brotli(e), false) => {
                let _ = e.write_all(data).and_then(|()| e.flush());
                take(e.get_mut())
            }
            (Codec::Zstd(e), false) => {
                let _ = e.write_all(data).and_then(|()| e.flush());
                take(e.get_mut())
            }
            (Codec::Done, _) => Bytes::new(),
            (_, true) => match std::mem::replace(&mut self.codec, Codec::Done) {
                Codec::Gzip(e) => e.finish().map(Bytes::from).unwrap_or_default(),
                Codec::Brotli(e) => Bytes::from(e.into_inner()),
                Codec::Zstd(e) => e.finish().map(Bytes::from).unwrap_or_default(),
                Codec::Done => Bytes::new(),
            },
        };
        self.stats.total_uncompressed_bytes.add(data.len() as u64);
        self.stats.total_compressed_bytes.add(out.len() as u64);
        out
    }
}

impl BodyFilter for Encoder {
    fn on_data(&mut self, data: &mut Bytes) {
        *data = self.run(data, false);
    }

    fn reshapes(&self) -> bool {
        true
    }

    fn finish(&mut self) -> Option<Bytes> {
        Some(self.run(&[], true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAIN: [ChainEntry; 3] = [("br", false), ("zstd", false), ("gzip", false)];

    #[test]
    fn the_pick_is_envoys() {
        // Each as Envoy 1.40 picked for Istio's chain of brotli, zstd and gzip.
        let cases = [
            (Some("gzip"), Pick::Compressor(2)),
            (Some("gzip, br"), Pick::Compressor(2)),
            (Some("br, gzip"), Pick::Compressor(0)),
            (Some("gzip;q=0.5, br;q=0.8"), Pick::Compressor(0)),
            (Some("*"), Pick::Wildcard),
            (Some("identity"), Pick::Identity),
            (Some("gzip;q=0"), Pick::NotValid),
            (Some("deflate"), Pick::NotValid),
            (Some("GZIP"), Pick::NotValid),
            (Some("gzip, zstd, br"), Pick::Compressor(2)),
            (None, Pick::NoHeader),
        ];
        for (accept, want) in cases {
            assert_eq!(pick(accept, &CHAIN), want, "{accept:?}");
        }
        let first = [("br", false), ("gzip", true)];
        assert_eq!(pick(Some("br, gzip"), &first), Pick::Compressor(1));
    }

    #[test]
    fn each_library_round_trips() {
        use std::io::Read as _;
        let text = b"metric_line 1\n".repeat(200);
        for library in [
            Library::Gzip { level: 6 },
            Library::Brotli {
                quality: 3,
                window_bits: 18,
            },
            Library::Zstd {
                level: 3,
                checksum: false,
            },
        ] {
            let registry = Registry::default();
            let config = Config {
                library,
                library_name: "x".into(),
                min_content_length: 30,
                content_types: vec![],
                disable_on_etag_header: false,
                remove_accept_encoding_header: false,
                choose_first: false,
                uncompressible_response_codes: vec![],
                disabled: false,
                response_stats_prefix: true,
            };
            let filter = Compressor::new(Arc::new(config), Arc::from([]), 0, &registry, "p");
            let mut encoder = Encoder::new(library, filter.stats.clone());
            let mut wire = Vec::new();
            for chunk in text.chunks(700) {
                let mut data = Bytes::copy_from_slice(chunk);
                encoder.on_data(&mut data);
                wire.extend_from_slice(&data);
            }
            wire.extend_from_slice(&encoder.finish().unwrap());
            assert!(wire.len() < text.len() / 4, "{library:?}: {}", wire.len());
            let mut back = Vec::new();
            match library {
                Library::Gzip { .. } => {
                    flate2::read::GzDecoder::new(&wire[..])
                        .read_to_end(&mut back)
                        .unwrap();
                }
                Library::Brotli { .. } => {
                    brotli::Decompressor::new(&wire[..], 4096)
                        .read_to_end(&mut back)
                        .unwrap();
                }
                Library::Zstd { .. } => {
                    back = zstd::decode_all(&wire[..]).unwrap();
                }
            }
            assert_eq!(back, text, "{library:?}");
        }
    }
}
