//! Resource-name lists of state-of-the-world requests, kept cheap at scale.
//!
//! Envoy repeats its whole subscription (often thousands of EDS names) on every ACK, and ten
//! thousand Envoys of a group usually name the same resources. So a request's names stay
//! encoded ([`SotwRequest`], read by [`decode_request`]) until the list differs from the last
//! one, which a hash of the encoded bytes tells; and equal subscriptions share one set
//! ([`intern`]), which also lets their streams share encoded responses.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use prost::encoding::{WireType, decode_key, decode_varint};
use tonic::Status;
use xds_api::envoy::service::discovery::v3::DiscoveryRequest;

/// `DiscoveryRequest.resource_names`.
const RESOURCE_NAMES: u32 = 3;

/// A SotW request whose `resource_names` are still encoded.
#[derive(Debug, Default, Clone)]
pub struct SotwRequest {
    /// Every field but `resource_names`.
    pub request: DiscoveryRequest,
    pub names: EncodedNames,
}

impl From<DiscoveryRequest> for SotwRequest {
    fn from(mut request: DiscoveryRequest) -> SotwRequest {
        let mut names = Vec::new();
        prost::encoding::string::encode_repeated(
            RESOURCE_NAMES,
            &request.resource_names,
            &mut names,
        );
        request.resource_names.clear();
        SotwRequest {
            request,
            names: EncodedNames(names.into()),
        }
    }
}

/// The `resource_names` entries of a request as they came on the wire.
#[derive(Debug, Default, Clone)]
pub struct EncodedNames(Bytes);

impl EncodedNames {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A hash of the list in the order sent (xxHash64: fast over the tens of KiB a large
    /// subscription takes, and it only has to tell a client's lists apart).
    pub fn fingerprint(&self) -> u64 {
        xxhash_rust::xxh64::xxh64(&self.0, 0)
    }

    /// The names, in the order sent.
    pub fn decode(&self) -> Result<Vec<String>, Status> {
        let mut buf = self.0.clone();
        let mut names = Vec::new();
        while buf.has_remaining() {
            let length = field_length(&mut buf)?;
            let bytes = buf.copy_to_bytes(length);
            let name = String::from_utf8(bytes.to_vec()).map_err(|_| {
                Status::invalid_argument("resource_names holds a name that is not UTF-8")
            })?;
            names.push(name);
        }
        Ok(names)
    }
}

/// Reads the key and length of one of the (already checked) name entries.
fn field_length(buf: &mut Bytes) -> Result<usize, Status> {
    let malformed = |error: prost::DecodeError| {
        Status::invalid_argument(format!("malformed request: resource_names: {error}"))
    };
    decode_key(buf).map_err(malformed)?;
    let length = decode_varint(buf).map_err(malformed)? as usize;
    if length > buf.remaining() {
        return Err(Status::invalid_argument(
            "malformed request: resource_names runs past the message",
        ));
    }
    Ok(length)
}

/// One encoded `DiscoveryRequest` as a [`SotwRequest`].
pub fn decode_request(message: Bytes) -> Result<SotwRequest, Status> {
    let malformed = |what: String| Status::invalid_argument(format!("malformed request: {what}"));
    let mut rest = Vec::with_capacity(message.len());
    // Where the names lie in `message`: one run (as every client encodes them) is kept as a
    // slice of it; names spread among other fields are copied together.
    let mut run: Option<std::ops::Range<usize>> = None;
    let mut scattered: Vec<u8> = Vec::new();
    let mut remaining: &[u8] = &message;
    while !remaining.is_empty() {
        let start = message.len() - remaining.len();
        let (tag, wire_type) =
            decode_key(&mut remaining).map_err(|error| malformed(error.to_string()))?;
        if tag == RESOURCE_NAMES && wire_type == WireType::LengthDelimited {
            // Thousands of names in a row: walked here, not field by field through prost.
            remaining = skip_names(remaining).ok_or_else(|| {
                malformed("field 3 (resource_names) runs past the message".into())
            })?;
        } else {
            prost::encoding::skip_field(
                wire_type,
                tag,
                &mut remaining,
                prost::encoding::DecodeContext::default(),
            )
            .map_err(|error| malformed(format!("field {tag}: {error}")))?;
        }
        let end = message.len() - remaining.len();
        if tag != RESOURCE_NAMES {
            rest.put_slice(&message[start..end]);
            continue;
        }
        if wire_type != WireType::LengthDelimited {
            return Err(malformed("resource_names is not a string".into()));
        }
        match &mut run {
            Some(range) if scattered.is_empty() && range.end == start => range.end = end,
            None => run = Some(start..end),
            Some(range) => {
                if scattered.is_empty() {
                    scattered.put_slice(&message[range.clone()]);
                }
                scattered.put_slice(&message[start..end]);
            }
        }
    }
    let request =
        DiscoveryRequest::decode(rest.as_slice()).map_err(|error| malformed(error.to_string()))?;
    let names = match run {
        _ if !scattered.is_empty() => Bytes::from(scattered),
        Some(range) => message.slice(range),
        None => Bytes::new(),
    };
    Ok(SotwRequest {
        request,
        names: EncodedNames(names),
    })
}

/// A set of subscribed names.
type NameSet = BTreeSet<String>;

/// Skips the body of the name entry whose key was just read (`rest` starts at its length),
/// and every name entry right after it; what follows them, or `None` if one runs past the end.
fn skip_names(mut rest: &[u8]) -> Option<&[u8]> {
    /// The one-byte key of field 3, length-delimited.
    const NAME_KEY: u8 = (RESOURCE_NAMES as u8) << 3 | 2;
    loop {
        let mut length: usize = 0;
        let mut shift = 0;
        loop {
            let (&byte, tail) = rest.split_first()?;
            rest = tail;
            length |= usize::from(byte & 0x7f).checked_shl(shift)?;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 35 {
                return None;
            }
        }
        rest = rest.get(length..)?;
        match rest.first() {
            Some(&NAME_KEY) => rest = &rest[1..],
            _ => return Some(rest),
        }
    }
}

/// Live name sets by content hash.
static NAME_SETS: LazyLock<Mutex<HashMap<u64, Vec<Weak<NameSet>>>>> =
    LazyLock::new(Default::default);

/// The one shared set equal to `names`: streams subscribing to the same names hold one copy.
pub fn intern(names: NameSet) -> Arc<NameSet> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    names.hash(&mut hasher);
    let hash = hasher.finish();
    let mut sets = NAME_SETS
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let bucket = sets.entry(hash).or_default();
    bucket.retain(|set| set.strong_count() > 0);
    if let Some(shared) = bucket
        .iter()
        .filter_map(Weak::upgrade)
        .find(|set| **set == names)
    {
        return shared;
    }
    let shared = Arc::new(names);
    bucket.push(Arc::downgrade(&shared));
    // Drop the buckets of sets no stream holds any more, now and then.
    if sets.len() > 64 && sets.len().is_power_of_two() {
        sets.retain(|_, bucket| {
            bucket.retain(|set| set.strong_count() > 0);
            !bucket.is_empty()
        });
    }
    shared
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::encoding::{encode_key, encode_varint};
    use xds_api::envoy::config::core::v3::Node;

    fn decode(request: &DiscoveryRequest) -> Result<SotwRequest, Status> {
        decode_request(request.encode_to_vec().into())
    }

    #[test]
    fn names_are_set_aside_and_everything_else_decoded() {
        let request = DiscoveryRequest {
            version_info: "7".into(),
            node: Some(Node {
                id: "n".into(),
                ..Default::default()
            }),
            resource_names: vec![
                "b".into(),
                "a".into(),
                String::new(),
                "é".into(),
                "long".repeat(100),
            ],
            type_url: "t".into(),
            response_nonce: "3".into(),
            ..Default::default()
        };
        let decoded = decode(&request).expect("decoded");
        assert_eq!(
            decoded.names.decode().expect("names"),
            request.resource_names
        );
        assert_eq!(
            decoded.request,
            DiscoveryRequest {
                resource_names: Vec::new(),
                ..request.clone()
            }
        );
        let converted = SotwRequest::from(request);
        assert_eq!(converted.names.fingerprint(), decoded.names.fingerprint());
    }

    #[test]
    fn names_among_other_fields_are_gathered_in_order() {
        let mut raw = Vec::new();
        prost::encoding::string::encode(RESOURCE_NAMES, &"a".to_string(), &mut raw);
        prost::encoding::string::encode(4, &"t".to_string(), &mut raw);
        prost::encoding::string::encode(RESOURCE_NAMES, &"b".to_string(), &mut raw);
        prost::encoding::string::encode(RESOURCE_NAMES, &"c".to_string(), &mut raw);
        let decoded = decode_request(raw.into()).expect("decoded");
        assert_eq!(decoded.names.decode().expect("names"), ["a", "b", "c"]);
        assert_eq!(decoded.request.type_url, "t");
    }

    #[test]
    fn the_fingerprint_follows_the_list_as_sent() {
        let names = |list: &[&str]| {
            SotwRequest::from(DiscoveryRequest {
                resource_names: list.iter().map(|name| name.to_string()).collect(),
                ..Default::default()
            })
            .names
        };
        assert_eq!(
            names(&["a", "b"]).fingerprint(),
            names(&["a", "b"]).fingerprint()
        );
        assert_ne!(
            names(&["a", "b"]).fingerprint(),
            names(&["b", "a"]).fingerprint()
        );
        assert_ne!(
            names(&["ab"]).fingerprint(),
            names(&["a", "b"]).fingerprint()
        );
        assert!(names(&[]).is_empty());
    }

    #[test]
    fn malformed_requests_are_refused_with_what_is_wrong() {
        // resource_names claiming 10 bytes with 1 left.
        let error = decode_request(Bytes::from_static(&[0x1a, 10, b'a'])).expect_err("refused");
        assert!(error.message().contains("resource_names"), "{error:?}");
        let error =
            decode_request(Bytes::from_static(&[0x1a, 1, b'a', 0x1a, 0x80])).expect_err("refused");
        assert!(error.message().contains("resource_names"), "{error:?}");
        // resource_names as a number.
        let error = decode_request(Bytes::from_static(&[0x18, 1])).expect_err("refused");
        assert!(error.message().contains("resource_names"), "{error:?}");
        // A name that is not UTF-8 is refused when the names are read.
        let mut raw = Vec::new();
        encode_key(RESOURCE_NAMES, WireType::LengthDelimited, &mut raw);
        encode_varint(1, &mut raw);
        raw.push(0xff);
        let names = EncodedNames(raw.into());
        assert!(names.decode().is_err());
    }

    #[test]
    fn equal_name_sets_are_shared_while_held() {
        let set = |names: &[&str]| names.iter().map(|name| name.to_string()).collect();
        let first = intern(set(&["x-interned", "y-interned"]));
        let second = intern(set(&["y-interned", "x-interned"]));
        assert!(Arc::ptr_eq(&first, &second));
        let other = intern(set(&["x-interned"]));
        assert!(!Arc::ptr_eq(&first, &other));
    }
}
