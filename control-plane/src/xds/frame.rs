//! gRPC framing done by hand for the discovery services: a stream's task encodes each response
//! with [`grpc_frame`], and [`ResponseBody`] writes the frames, then the gRPC status.
//!
//! Responses are framed here rather than by tonic's generated servers: tonic's per-stream encode
//! buffer keeps the capacity of the largest message ever sent (a full CDS or EDS set, hundreds of
//! KiB), for the life of the stream. Each response is encoded into its own exactly-sized buffer
//! that is freed once written, which keeps thousands of idle proxies cheap.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use tokio::sync::mpsc;
use tonic::Status;

/// Encodes one message as a gRPC frame (uncompressed flag, big-endian length, payload) in a
/// buffer of exactly its size.
pub fn grpc_frame<M: prost::Message>(message: &M) -> Bytes {
    let length = message.encoded_len();
    let mut frame = Vec::with_capacity(5 + length);
    frame.push(0);
    frame.extend_from_slice(&(length as u32).to_be_bytes());
    message.encode_raw(&mut frame);
    Bytes::from(frame)
}

/// The response body of one stream: framed messages from its task, then the gRPC status.
pub struct ResponseBody {
    receiver: mpsc::Receiver<Result<Bytes, Status>>,
    finished: bool,
}

impl ResponseBody {
    /// The body that writes what the stream's task sends on `receiver`.
    pub fn new(receiver: mpsc::Receiver<Result<Bytes, Status>>) -> ResponseBody {
        ResponseBody {
            receiver,
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
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.receiver.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(Frame::data(frame)))),
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
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }
}
