//! Decoding of a stream's requests, kept cheap at scale.
//!
//! Envoy repeats its whole subscription (often thousands of EDS names) on every SotW ACK, and
//! unless `set_node_on_first_message_only` is set it repeats its node too (about 60 KB in
//! Envoy 1.40, most of it the list of its extensions), on both protocols. Only a stream's first
//! node counts, so each stream's decoder ([`SotwDecoder`], [`DeltaDecoder`]) skips the later
//! ones undecoded, and decodes the first without the lists it never reads (`SlimNode`).
//!
//! SotW names stay encoded ([`EncodedNames`]) and lists are told apart by a hash of their
//! bytes; a list the stream sent before is recognised by comparing bytes, with neither a walk
//! over its entries nor a new hash. Equal lists, encoded or as sets ([`intern`]), are shared
//! among streams, which also lets their streams share encoded responses.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
use tonic::Status;
use xds_api::envoy::config::core::v3::Node;
use xds_api::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};

/// `DiscoveryRequest.node`.
const SOTW_NODE: u32 = 2;
/// `DiscoveryRequest.resource_names`.
const RESOURCE_NAMES: u32 = 3;
/// `DeltaDiscoveryRequest.node`.
const DELTA_NODE: u32 = 1;
/// The one-byte key of `resource_names`, length-delimited.
const NAME_KEY: u8 = (RESOURCE_NAMES as u8) << 3 | 2;

/// A SotW request whose `resource_names` are still encoded.
#[derive(Debug, Default, Clone)]
pub struct SotwRequest {
    /// Every field but `resource_names` (and, after a stream's first request, `node`).
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
            names: EncodedNames::new(names),
        }
    }
}

/// The `resource_names` entries of a request as they came on the wire (keys included), with
/// their hash.
#[derive(Debug, Default, Clone)]
pub struct EncodedNames {
    /// Shared by the streams that sent the same bytes; `None` when there are none.
    entries: Option<Arc<Vec<u8>>>,
    fingerprint: u64,
}

impl EncodedNames {
    /// Entries of this stream's own (not shared).
    fn new(entries: Vec<u8>) -> EncodedNames {
        EncodedNames {
            fingerprint: fingerprint(&entries),
            entries: (!entries.is_empty()).then(|| Arc::new(entries)),
        }
    }

    fn entries(&self) -> &[u8] {
        self.entries.as_deref().map_or(&[], Vec::as_slice)
    }

    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }

    /// A hash of the list in the order sent.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The names, in the order sent.
    pub fn decode(&self) -> Result<Vec<String>, Status> {
        let mut buf = self.entries();
        let mut names = Vec::new();
        while !buf.is_empty() {
            let length = field_length(&mut buf)?;
            let (name, tail) = buf.split_at(length);
            buf = tail;
            let name = String::from_utf8(name.to_vec()).map_err(|_| {
                Status::invalid_argument("resource_names holds a name that is not UTF-8")
            })?;
            names.push(name);
        }
        Ok(names)
    }
}

/// xxHash64 of encoded entries: fast over the tens of KiB a large subscription takes, and it
/// only has to tell a client's lists apart. No entries hash to 0.
fn fingerprint(entries: &[u8]) -> u64 {
    if entries.is_empty() {
        return 0;
    }
    xxhash_rust::xxh64::xxh64(entries, 0)
}

/// Reads the key and length of one of the (already checked) name entries.
fn field_length(buf: &mut &[u8]) -> Result<usize, Status> {
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

/// More types than ADS serves (five), in case a client names others too.
const REMEMBERED_TYPES: usize = 8;

/// Decodes one SotW stream's requests, remembering what they repeat.
#[derive(Debug, Default)]
pub struct SotwDecoder {
    /// Set after the first request: later nodes are skipped.
    started: bool,
    /// Per type URL, the list its latest request sent: one per type, so a stream holds no more
    /// than its subscriptions, and at most [`REMEMBERED_TYPES`].
    recent: Vec<(String, EncodedNames)>,
}

impl SotwDecoder {
    /// One encoded `DiscoveryRequest` as a [`SotwRequest`].
    pub fn decode(&mut self, message: Bytes) -> Result<SotwRequest, Status> {
        let malformed =
            |what: String| Status::invalid_argument(format!("malformed request: {what}"));
        let skip_node = std::mem::replace(&mut self.started, true);
        let mut rest = Vec::new();
        // Where the names lie in `message`: one run (as every client encodes them), either a
        // list sent before (`recalled`) or walked here; names spread among other fields are
        // copied together.
        let mut run: Option<std::ops::Range<usize>> = None;
        let mut recalled: Option<EncodedNames> = None;
        let mut scattered: Vec<u8> = Vec::new();
        let mut node = None;
        let mut remaining: &[u8] = &message;
        while !remaining.is_empty() {
            let start = message.len() - remaining.len();
            let (tag, wire_type) =
                decode_key(&mut remaining).map_err(|error| malformed(error.to_string()))?;
            let after_key = message.len() - remaining.len();
            if tag == RESOURCE_NAMES && wire_type == WireType::LengthDelimited {
                let recall = run.is_none().then(|| self.recall(&message[start..]));
                match recall.flatten() {
                    Some(list) => {
                        remaining = &message[start + list.entries().len()..];
                        recalled = Some(list);
                    }
                    // Thousands of names in a row: walked here, not field by field by prost.
                    None => {
                        remaining = skip_names(remaining).ok_or_else(|| {
                            malformed("field 3 (resource_names) runs past the message".into())
                        })?
                    }
                }
            } else {
                skip_field(wire_type, tag, &mut remaining, DecodeContext::default())
                    .map_err(|error| malformed(format!("field {tag}: {error}")))?;
            }
            let end = message.len() - remaining.len();
            if tag == SOTW_NODE {
                if !skip_node {
                    // A node given twice is merged, as protobuf merges a repeated message.
                    let slim = node.get_or_insert_with(SlimNode::default);
                    let mut body = &message[after_key..end];
                    prost::encoding::message::merge(
                        wire_type,
                        slim,
                        &mut body,
                        DecodeContext::default(),
                    )
                    .map_err(|error| malformed(format!("node: {error}")))?;
                }
                continue;
            }
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
        let mut request = DiscoveryRequest::decode(rest.as_slice())
            .map_err(|error| malformed(error.to_string()))?;
        request.node = node.map(|SlimNode(node)| node);
        let names = match run {
            _ if !scattered.is_empty() => shared_names(&scattered),
            Some(range) => match recalled {
                Some(list) if list.entries().len() == range.len() => list,
                _ => shared_names(&message[range]),
            },
            None => EncodedNames::default(),
        };
        self.note(&request.type_url, &names);
        Ok(SotwRequest { request, names })
    }

    /// The list sent before that `bytes` starts with, if the name entries end where it does.
    /// Its entries were checked when first sent, so the same bytes need no walk.
    fn recall(&self, bytes: &[u8]) -> Option<EncodedNames> {
        self.recent
            .iter()
            .map(|(_, list)| list)
            .find(|list| {
                let entries = list.entries();
                !entries.is_empty()
                    && bytes.starts_with(entries)
                    && bytes.get(entries.len()) != Some(&NAME_KEY)
            })
            .cloned()
    }

    /// Remembers `names` as the latest list of `type_url`.
    fn note(&mut self, type_url: &str, names: &EncodedNames) {
        let slot = self.recent.iter().position(|(url, _)| url == type_url);
        match (slot, names.is_empty()) {
            (Some(slot), true) => {
                self.recent.swap_remove(slot);
            }
            (Some(slot), false) => self.recent[slot].1 = names.clone(),
            (None, true) => {}
            (None, false) => {
                // A client naming ever more types must not grow the stream without bound.
                if self.recent.len() == REMEMBERED_TYPES {
                    self.recent.remove(0);
                }
                self.recent.push((type_url.to_string(), names.clone()));
            }
        }
    }
}

/// Skips the body of the name entry whose key was just read (`rest` starts at its length),
/// and every name entry right after it; what follows them, or `None` if one runs past the end.
fn skip_names(mut rest: &[u8]) -> Option<&[u8]> {
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

/// Decodes one delta stream's requests: only the first one's node is read.
#[derive(Debug, Default)]
pub struct DeltaDecoder {
    started: bool,
}

impl DeltaDecoder {
    /// One encoded `DeltaDiscoveryRequest`.
    pub fn decode(&mut self, message: Bytes) -> Result<DeltaDiscoveryRequest, Status> {
        let mut decoded = DeltaRequest {
            skip_node: std::mem::replace(&mut self.started, true),
            ..Default::default()
        };
        decoded
            .merge(message)
            .map_err(|error| Status::invalid_argument(format!("malformed request: {error}")))?;
        Ok(decoded.request)
    }
}

/// A delta request whose node is decoded slim ([`SlimNode`]), or skipped after the first.
#[derive(Debug, Default)]
struct DeltaRequest {
    request: DeltaDiscoveryRequest,
    skip_node: bool,
}

impl Message for DeltaRequest {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        self.request.encode_raw(buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        match tag {
            DELTA_NODE if self.skip_node => skip_field(wire_type, tag, buf, ctx),
            DELTA_NODE => {
                let mut slim = SlimNode(self.request.node.take().unwrap_or_default());
                prost::encoding::message::merge(wire_type, &mut slim, buf, ctx)?;
                self.request.node = Some(slim.0);
                Ok(())
            }
            _ => self.request.merge_field(tag, wire_type, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        self.request.encoded_len()
    }

    fn clear(&mut self) {
        self.request.clear();
    }
}

/// `Node.extensions` and `Node.client_features`.
const NODE_EXTENSIONS: u32 = 9;
const NODE_CLIENT_FEATURES: u32 = 10;

/// A node decoded without the lists the control plane never reads: Envoy's extensions (516
/// in Envoy 1.40, tens of KB once decoded, for every stream) and its client features.
#[derive(Debug, Default)]
struct SlimNode(Node);

impl Message for SlimNode {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        self.0.encode_raw(buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        match tag {
            NODE_EXTENSIONS | NODE_CLIENT_FEATURES => skip_field(wire_type, tag, buf, ctx),
            _ => self.0.merge_field(tag, wire_type, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        self.0.encoded_len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// Values shared while some holder keeps them, found by a hash of their content.
struct Interner<T> {
    buckets: Mutex<HashMap<u64, Vec<Weak<T>>>>,
}

impl<T> Interner<T> {
    fn new() -> Interner<T> {
        Interner {
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The live value equal to `value`, whose hash is `hash`, or a new one made of it.
    fn share<V>(&self, hash: u64, value: V) -> Arc<T>
    where
        T: From<V> + PartialEq<V>,
    {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let bucket = buckets.entry(hash).or_default();
        bucket.retain(|value| value.strong_count() > 0);
        if let Some(shared) = bucket
            .iter()
            .filter_map(Weak::upgrade)
            .find(|shared| **shared == value)
        {
            return shared;
        }
        let shared = Arc::new(T::from(value));
        bucket.push(Arc::downgrade(&shared));
        // Drop the buckets of values nobody holds any more, now and then.
        if buckets.len() > 64 && buckets.len().is_power_of_two() {
            buckets.retain(|_, bucket| {
                bucket.retain(|value| value.strong_count() > 0);
                !bucket.is_empty()
            });
        }
        shared
    }
}

/// Live encoded name lists, by fingerprint.
static ENCODED_LISTS: LazyLock<Interner<Vec<u8>>> = LazyLock::new(Interner::new);

/// The one shared copy of encoded entries equal to `entries`.
fn shared_names(entries: &[u8]) -> EncodedNames {
    let fingerprint = fingerprint(entries);
    EncodedNames {
        entries: Some(ENCODED_LISTS.share(fingerprint, entries)),
        fingerprint,
    }
}

/// A set of subscribed names.
type NameSet = BTreeSet<String>;

/// Live name sets by content hash.
static NAME_SETS: LazyLock<Interner<NameSet>> = LazyLock::new(Interner::new);

/// The one shared set equal to `names`: streams subscribing to the same names hold one copy.
pub fn intern(names: NameSet) -> Arc<NameSet> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    names.hash(&mut hasher);
    NAME_SETS.share(hasher.finish(), names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::encoding::{encode_key, encode_varint};
    use xds_api::envoy::config::core::v3::Node;

    /// `message` as the first request of a stream.
    fn decode_request(message: Bytes) -> Result<SotwRequest, Status> {
        SotwDecoder::default().decode(message)
    }

    fn decode(request: &DiscoveryRequest) -> Result<SotwRequest, Status> {
        decode_request(request.encode_to_vec().into())
    }

    fn names_request(type_url: &str, names: &[&str]) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: "1".into(),
            node: Some(Node {
                id: "n".into(),
                ..Default::default()
            }),
            resource_names: names.iter().map(|name| name.to_string()).collect(),
            type_url: type_url.into(),
            response_nonce: "1".into(),
            ..Default::default()
        }
    }

    fn entries(names: &EncodedNames) -> *const Vec<u8> {
        names.entries.as_ref().map_or(std::ptr::null(), Arc::as_ptr)
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
        let names = EncodedNames::new(raw);
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

    #[test]
    fn only_the_first_node_of_a_stream_is_decoded_and_without_its_lists() {
        let slim = Node {
            id: "n".into(),
            cluster: "g".into(),
            metadata: Some(prost_types::Struct {
                fields: [(
                    "POD_NAME".to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue("p".into())),
                    },
                )]
                .into(),
            }),
            user_agent_name: "envoy".into(),
            ..Default::default()
        };
        let full = Node {
            extensions: vec![xds_api::envoy::config::core::v3::Extension {
                name: "envoy.filters.http.router".into(),
                category: "envoy.filters.http".into(),
                ..Default::default()
            }],
            client_features: vec!["envoy.lb.does_not_support_overprovisioning".into()],
            ..slim.clone()
        };
        let request = DiscoveryRequest {
            node: Some(full.clone()),
            ..names_request("t", &["a"])
        };
        let mut sotw = SotwDecoder::default();
        let first = sotw.decode(request.encode_to_vec().into()).expect("first");
        assert_eq!(first.request.node.as_ref(), Some(&slim));
        let later = sotw.decode(request.encode_to_vec().into()).expect("later");
        assert_eq!(later.request.node, None);
        assert_eq!(
            later.request,
            DiscoveryRequest {
                node: None,
                resource_names: Vec::new(),
                ..request.clone()
            }
        );
        assert_eq!(later.names.decode().expect("names"), ["a"]);

        let request = DeltaDiscoveryRequest {
            node: Some(full),
            type_url: "t".into(),
            resource_names_subscribe: vec!["a".into()],
            response_nonce: "1".into(),
            ..Default::default()
        };
        let mut delta = DeltaDecoder::default();
        let first = delta.decode(request.encode_to_vec().into()).expect("first");
        assert_eq!(
            first,
            DeltaDiscoveryRequest {
                node: Some(slim),
                ..request.clone()
            }
        );
        let later = delta.decode(request.encode_to_vec().into()).expect("later");
        assert_eq!(
            later,
            DeltaDiscoveryRequest {
                node: None,
                ..request.clone()
            }
        );
        let error = delta
            .decode(Bytes::from_static(&[0x0a, 5, 1]))
            .expect_err("a node running past the message");
        assert!(error.message().contains("malformed request"), "{error:?}");
    }

    #[test]
    fn a_list_sent_before_is_recognised_and_shared() {
        let eds = ["cluster-a", "cluster-b", "cluster-c"];
        let mut stream = SotwDecoder::default();
        let mut decode = |request: DiscoveryRequest| {
            stream
                .decode(request.encode_to_vec().into())
                .expect("decoded")
        };
        let first = decode(names_request("eds", &eds));
        let routes = decode(names_request("rds", &["route"]));
        let again = decode(names_request("eds", &eds));
        assert_eq!(again.names.decode().expect("names"), eds);
        assert_eq!(again.names.fingerprint(), first.names.fingerprint());
        assert_eq!(entries(&again.names), entries(&first.names));
        assert_eq!(routes.names.decode().expect("names"), ["route"]);
        // The list sent before followed by one name more, or cut short, is a new list.
        let longer = decode(names_request(
            "eds",
            &["cluster-a", "cluster-b", "cluster-c", "d"],
        ));
        assert_eq!(
            longer.names.decode().expect("names"),
            ["cluster-a", "cluster-b", "cluster-c", "d"]
        );
        assert_ne!(longer.names.fingerprint(), first.names.fingerprint());
        let shorter = decode(names_request("eds", &["cluster-a", "cluster-b"]));
        assert_eq!(
            shorter.names.decode().expect("names"),
            ["cluster-a", "cluster-b"]
        );
        // Another stream sending the same list holds the same bytes.
        let other = SotwDecoder::default()
            .decode(
                names_request("eds", &["cluster-a", "cluster-b"])
                    .encode_to_vec()
                    .into(),
            )
            .expect("decoded");
        assert_eq!(entries(&other.names), entries(&shorter.names));
        assert_eq!(other.names.fingerprint(), shorter.names.fingerprint());
        // Names dropped from the request: nothing to recall for that type any more.
        let none = decode(names_request("eds", &[]));
        assert!(none.names.is_empty());
        assert!(stream.recent.iter().all(|(url, _)| url != "eds"));
    }

    #[test]
    fn a_recalled_list_with_more_names_elsewhere_is_gathered() {
        let mut stream = SotwDecoder::default();
        stream
            .decode(names_request("t", &["a", "b"]).encode_to_vec().into())
            .expect("decoded");
        let mut raw = names_request("t", &["a", "b"]).encode_to_vec();
        prost::encoding::string::encode(RESOURCE_NAMES, &"c".to_string(), &mut raw);
        let decoded = stream.decode(raw.into()).expect("decoded");
        assert_eq!(decoded.names.decode().expect("names"), ["a", "b", "c"]);
    }

    #[test]
    fn a_stream_remembers_a_bounded_number_of_lists() {
        let mut stream = SotwDecoder::default();
        for index in 0..3 * REMEMBERED_TYPES {
            let request = names_request(&format!("type-{index}"), &["a"]);
            stream
                .decode(request.encode_to_vec().into())
                .expect("decoded");
        }
        assert_eq!(stream.recent.len(), REMEMBERED_TYPES);
        let latest = format!("type-{}", 3 * REMEMBERED_TYPES - 1);
        assert!(stream.recent.iter().any(|(url, _)| *url == latest));
    }

    #[test]
    fn a_node_given_twice_in_the_first_request_is_merged() {
        let part = |id: &str, cluster: &str| Node {
            id: id.into(),
            cluster: cluster.into(),
            ..Default::default()
        };
        let merged = part("n", "g");
        for node_tag in [SOTW_NODE, DELTA_NODE] {
            let mut raw = Vec::new();
            prost::encoding::message::encode(node_tag, &part("n", ""), &mut raw);
            prost::encoding::message::encode(node_tag, &part("", "g"), &mut raw);
            let node = if node_tag == SOTW_NODE {
                SotwDecoder::default()
                    .decode(raw.into())
                    .expect("decoded")
                    .request
                    .node
            } else {
                DeltaDecoder::default()
                    .decode(raw.into())
                    .expect("decoded")
                    .node
            };
            assert_eq!(node.as_ref(), Some(&merged), "field {node_tag}");
        }
    }
}
