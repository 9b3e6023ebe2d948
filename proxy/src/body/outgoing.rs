//! What an upstream request carries; the connection pools send this type.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::BoxError;
use super::replay::SharedReader;
use super::request::RequestBody;

/// What an upstream request carries: the downstream body itself, one reader of a body that
/// retries and mirrors share, or nothing.
#[derive(Debug)]
pub enum OutgoingBody {
    Direct(RequestBody),
    Shared(SharedReader),
    Empty,
}

impl Body for OutgoingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            OutgoingBody::Direct(body) => Pin::new(body).poll_frame(cx),
            OutgoingBody::Shared(reader) => Pin::new(reader).poll_frame(cx),
            OutgoingBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutgoingBody::Direct(body) => body.is_end_stream(),
            OutgoingBody::Shared(reader) => reader.is_end_stream(),
            OutgoingBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutgoingBody::Direct(body) => body.size_hint(),
            OutgoingBody::Shared(reader) => reader.size_hint(),
            OutgoingBody::Empty => SizeHint::with_exact(0),
        }
    }
}
