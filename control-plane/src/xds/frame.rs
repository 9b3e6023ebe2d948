//! gRPC framing done by hand for the discovery services: a stream's task encodes each response
//! as a [`Frame`], and [`ResponseBody`] writes the frames, then the gRPC status;
//! [`RequestStream`] reads the requests.
//!
//! Responses are framed here rather than by tonic's generated servers: tonic's per-stream encode
//! buffer keeps the capacity of the largest message ever sent (a full CDS or EDS set, hundreds of
//! KiB), for the life of the stream. Each response is encoded into its own exactly-sized buffer
//! that is freed once written, which keeps thousands of idle proxies cheap; and a frame may end
//! in bytes shared with other streams (a state-of-the-world body encoded once per snapshot).
//! Requests likewise: tonic's reader keeps a buffer as large as the largest request (tens of
//! KiB for a SotW subscription of thousands of names) per stream; ours holds bytes only while a
//! message is incomplete.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::Body as _;
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

/// The decoded requests of one stream, read from its request body.
pub struct RequestStream<T> {
    body: tonic::body::Body,
    /// The stream's decoder: it may remember what earlier requests repeat.
    decode: Box<dyn FnMut(Bytes) -> Result<T, Status> + Send>,
    max_message: usize,
    /// Data received and not yet decoded: empty between messages.
    chunks: VecDeque<Bytes>,
    finished: bool,
}

impl<T> RequestStream<T> {
    /// Reads `body`, decoding each message with `decode`; a message longer than `max_message`
    /// ends the stream with an error.
    pub fn new(
        body: tonic::body::Body,
        decode: impl FnMut(Bytes) -> Result<T, Status> + Send + 'static,
        max_message: usize,
    ) -> RequestStream<T> {
        RequestStream {
            body,
            decode: Box::new(decode),
            max_message,
            chunks: VecDeque::new(),
            finished: false,
        }
    }

    fn buffered(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    /// The next whole message's bytes, if all of it has arrived.
    fn take_message(&mut self) -> Result<Option<Bytes>, Status> {
        let buffered = self.buffered();
        if buffered < 5 {
            return Ok(None);
        }
        let mut header = [0u8; 5];
        let mut filled = 0;
        for chunk in &self.chunks {
            let take = (5 - filled).min(chunk.len());
            header[filled..filled + take].copy_from_slice(&chunk[..take]);
            filled += take;
            if filled == 5 {
                break;
            }
        }
        if header[0] != 0 {
            return Err(Status::unimplemented(
                "compressed requests are not supported: send them uncompressed",
            ));
        }
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if length > self.max_message {
            return Err(Status::resource_exhausted(format!(
                "a request of {length} bytes is over the limit of {} bytes",
                self.max_message
            )));
        }
        if buffered < 5 + length {
            return Ok(None);
        }
        let first = self.chunks.front_mut().expect("at least 5 bytes buffered");
        if first.len() >= 5 + length {
            // Whole in one received chunk (the usual case): no copy.
            let message = first.slice(5..5 + length);
            first.advance(5 + length);
            if first.is_empty() {
                self.chunks.pop_front();
            }
            return Ok(Some(message));
        }
        let mut message = Vec::with_capacity(length);
        let mut skip = 5;
        while skip > 0 || message.len() < length {
            let chunk = self.chunks.front_mut().expect("enough bytes buffered");
            let from = skip.min(chunk.len());
            skip -= from;
            let take = (chunk.len() - from).min(length - message.len());
            message.extend_from_slice(&chunk[from..from + take]);
            chunk.advance(from + take);
            if chunk.is_empty() {
                self.chunks.pop_front();
            }
        }
        if self.chunks.is_empty() {
            // Let go of the queue's storage too between messages.
            self.chunks = VecDeque::new();
        }
        Ok(Some(message.into()))
    }
}

impl<T> futures::Stream for RequestStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            match this.take_message() {
                Ok(Some(message)) => return Poll::Ready(Some((this.decode)(message))),
                Ok(None) => {}
                Err(status) => {
                    this.finished = true;
                    return Poll::Ready(Some(Err(status)));
                }
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        this.chunks.push_back(data);
                    }
                }
                Some(Err(status)) => {
                    this.finished = true;
                    return Poll::Ready(Some(Err(status)));
                }
                None => {
                    this.finished = true;
                    if this.buffered() > 0 {
                        return Poll::Ready(Some(Err(Status::invalid_argument(
                            "the request stream ended inside a message",
                        ))));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// A body that yields `chunks` as DATA frames, then ends.
    fn body(chunks: Vec<Vec<u8>>) -> tonic::body::Body {
        let frames = chunks
            .into_iter()
            .map(|chunk| Ok::<_, Status>(http_body::Frame::data(Bytes::from(chunk))));
        tonic::body::Body::new(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )))
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut frame = vec![0];
        frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
        frame.extend_from_slice(message);
        frame
    }

    fn keep(bytes: Bytes) -> Result<Vec<u8>, Status> {
        Ok(bytes.to_vec())
    }

    async fn read(chunks: Vec<Vec<u8>>) -> Vec<Result<Vec<u8>, Status>> {
        RequestStream::new(body(chunks), keep, 1024).collect().await
    }

    #[tokio::test]
    async fn messages_are_read_however_the_frames_cut_them() {
        let messages: Vec<Vec<u8>> = vec![b"first".to_vec(), Vec::new(), vec![7; 300]];
        let stream: Vec<u8> = messages.iter().flat_map(|m| framed(m)).collect();
        for cut in [1, 2, 3, 5, 7, 64, stream.len()] {
            let chunks: Vec<Vec<u8>> = stream.chunks(cut).map(<[u8]>::to_vec).collect();
            let read: Vec<Vec<u8>> = read(chunks)
                .await
                .into_iter()
                .map(|message| message.expect("a message"))
                .collect();
            assert_eq!(read, messages, "cut every {cut} bytes");
        }
    }

    #[tokio::test]
    async fn bad_framing_ends_the_stream_with_what_is_wrong() {
        let mut compressed = framed(b"x");
        compressed[0] = 1;
        let errors = [
            (compressed, "compressed"),
            (framed(&[0; 2000]), "over the limit"),
            (framed(b"cut short")[..8].to_vec(), "ended inside a message"),
        ];
        for (bytes, expected) in errors {
            let read = read(vec![bytes]).await;
            let error = read
                .last()
                .expect("an item")
                .as_ref()
                .expect_err("an error");
            assert!(error.message().contains(expected), "{error:?}");
        }
    }
}
