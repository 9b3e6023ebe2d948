//! gRPC framing done by hand for the discovery services: a stream's task encodes each response
//! as a [`Frame`], and [`ResponseBody`] writes the frames, then the gRPC status.
//!
//! Responses are framed here rather than by tonic's generated servers: tonic's per-stream encode
//! buffer keeps the capacity of the largest message ever sent (a full CDS or EDS set, hundreds of
//! KiB), for the life of the stream. Each response is encoded into its own exactly-sized buffer
//! that is freed once written, which keeps thousands of idle proxies cheap; and a frame may end
//! in bytes shared with other streams (a state-of-the-world body encoded once per snapshot).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::mpsc;
use tonic::Status;

/// One gRPC message as written: `head` (the frame header and the stream's own fields), then
/// `shared` (the rest of the message, possibly shared with other streams; may be empty).
#[derive(Clone, Debug)]
pub struct Frame {
    pub head: Bytes,
    pub shared: Bytes,
}

impl Frame {
    /// The frame of a message made of `own` fields followed by `shared` encoded fields
    /// (protobuf lets fields come in any order).
    pub fn with_shared(own: impl FnOnce(&mut Vec<u8>), own_len: usize, shared: Bytes) -> Frame {
        let length = own_len + shared.len();
        let mut head = Vec::with_capacity(5 + own_len);
        head.push(0);
        head.extend_from_slice(&(length as u32).to_be_bytes());
        own(&mut head);
        debug_assert_eq!(head.len(), 5 + own_len);
        Frame {
            head: head.into(),
            shared,
        }
    }

    /// Everything the frame writes, in one buffer.
    pub fn to_bytes(&self) -> Bytes {
        [&self.head[..], &self.shared[..]].concat().into()
    }
}

/// Encodes one message as a gRPC frame (uncompressed flag, big-endian length, payload) in a
/// buffer of exactly its size.
pub fn grpc_frame<M: prost::Message>(message: &M) -> Frame {
    Frame::with_shared(
        |buf| message.encode_raw(buf),
        message.encoded_len(),
        Bytes::new(),
    )
}

/// The response body of one stream: framed messages from its task, then the gRPC status.
pub struct ResponseBody {
    receiver: mpsc::Receiver<Result<Frame, Status>>,
    /// The shared part of the frame whose head was just written.
    rest: Option<Bytes>,
    finished: bool,
}

impl ResponseBody {
    /// The body that writes what the stream's task sends on `receiver`.
    pub fn new(receiver: mpsc::Receiver<Result<Frame, Status>>) -> ResponseBody {
        ResponseBody {
            receiver,
            rest: None,
            finished: false,
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        if let Some(rest) = self.rest.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(rest))));
        }
        match self.receiver.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if !frame.shared.is_empty() {
                    self.rest = Some(frame.shared);
                }
                Poll::Ready(Some(Ok(http_body::Frame::data(frame.head))))
            }
            Poll::Ready(ending) => {
                self.finished = true;
                let status = match ending {
                    Some(Err(status)) => status,
                    _ => Status::ok(""),
                };
                let mut trailers = http::HeaderMap::new();
                if let Err(status) = status.add_header(&mut trailers) {
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }
}
