//! Packing and unpacking `google.protobuf.Any` against the registry of types in
//! [`crate::descriptor_pool`].

use prost::{Message, Name};
use prost_reflect::DynamicMessage;
use prost_types::Any;

/// Why an `Any` could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum AnyError {
    #[error("expected a {expected} but the Any holds {found}")]
    WrongType { expected: String, found: String },
    #[error("unknown type URL {0:?}: not a type Remora knows")]
    UnknownType(String),
    #[error("cannot decode {type_url}: {source}")]
    Decode {
        type_url: String,
        #[source]
        source: prost::DecodeError,
    },
}

/// Wraps a message in an `Any` with its `type.googleapis.com/...` URL.
pub fn pack<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

/// Unwraps an `Any` that must hold an `M`.
pub fn unpack<M: Message + Name + Default>(any: &Any) -> Result<M, AnyError> {
    let expected = M::type_url();
    if any.type_url != expected {
        return Err(AnyError::WrongType {
            expected,
            found: any.type_url.clone(),
        });
    }
    M::decode(any.value.as_slice()).map_err(|source| AnyError::Decode {
        type_url: any.type_url.clone(),
        source,
    })
}

/// Decodes an `Any` of any registered type into a reflective message.
pub fn unpack_dynamic(any: &Any) -> Result<DynamicMessage, AnyError> {
    let name = crate::type_urls::message_name(&any.type_url);
    let descriptor = crate::descriptor_pool()
        .get_message_by_name(name)
        .ok_or_else(|| AnyError::UnknownType(any.type_url.clone()))?;
    DynamicMessage::decode(descriptor, any.value.as_slice()).map_err(|source| AnyError::Decode {
        type_url: any.type_url.clone(),
        source,
    })
}

/// Whether a type URL names a message in the registry.
pub fn is_known(type_url: &str) -> bool {
    crate::descriptor_pool()
        .get_message_by_name(crate::type_urls::message_name(type_url))
        .is_some()
}
