//! A request body more than one upstream request reads: a retry reads it again from the start,
//! a mirror reads it beside the main request. What arrives from the downstream is kept (as
//! shared `Bytes`, no copy) up to the route's buffer limit; past it the kept frames are let go,
//! the reader that is ahead goes on alone, and a new reader cannot start (the request can no
//! longer be retried, as in Envoy).
//!
//! Readers take turns pulling from the downstream: whichever needs a frame nobody has read yet
//! polls for it and wakes the others when it comes.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::BoxError;
use super::request::RequestBody;

/// A frame as kept for later readers.
#[derive(Debug, Clone)]
enum Kept {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Kept {
    fn frame(&self) -> Frame<Bytes> {
        match self {
            Kept::Data(data) => Frame::data(data.clone()),
            Kept::Trailers(trailers) => Frame::trailers(trailers.clone()),
        }
    }
}

#[derive(Debug)]
enum Source {
    Open(RequestBody),
    Ended,
    Failed(String),
}

#[derive(Debug)]
struct State {
    source: Source,
    /// Kept frames; `kept[0]` is frame number `first`.
    kept: Vec<Kept>,
    first: usize,
    /// Frames read from the downstream so far.
    read: usize,
    kept_bytes: usize,
    limit: usize,
    /// The downstream's declared length, for readers that start at the beginning.
    exact_len: Option<u64>,
    /// Readers waiting for the next frame.
    waiting: Vec<Waker>,
}

/// The shared body; make readers with [`SharedBody::reader`].
#[derive(Debug, Clone)]
pub struct SharedBody(Arc<Mutex<State>>);

impl SharedBody {
    /// Shares `source`, keeping up to `limit` bytes of it for readers that start later.
    pub fn new(source: RequestBody, limit: usize) -> Self {
        let exact_len = source.size_hint().exact();
        SharedBody(Arc::new(Mutex::new(State {
            source: Source::Open(source),
            kept: Vec::new(),
            first: 0,
            read: 0,
            kept_bytes: 0,
            limit,
            exact_len,
            waiting: Vec::new(),
        })))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.0)
    }

    /// Whether a new reader could read the body from its start.
    pub fn replayable(&self) -> bool {
        self.state().first == 0
    }

    /// A reader from the start of the body.
    pub fn reader(&self) -> SharedReader {
        SharedReader {
            shared: self.0.clone(),
            next: 0,
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One reader of a [`SharedBody`].
#[derive(Debug)]
pub struct SharedReader {
    shared: Arc<Mutex<State>>,
    /// The number of the next frame this reader returns.
    next: usize,
}

impl Body for SharedReader {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut state = lock(&this.shared);
        if this.next < state.read {
            if this.next < state.first {
                return Poll::Ready(Some(Err(
                    "the request body outgrew its buffer limit and cannot be read again".into(),
                )));
            }
            let frame = state.kept[this.next - state.first].frame();
            this.next += 1;
            return Poll::Ready(Some(Ok(frame)));
        }
        let polled = match &mut state.source {
            Source::Ended => return Poll::Ready(None),
            Source::Failed(error) => return Poll::Ready(Some(Err(error.clone().into()))),
            Source::Open(body) => Pin::new(body).poll_frame(cx),
        };
        match polled {
            Poll::Pending => {
                if !state.waiting.iter().any(|w| w.will_wake(cx.waker())) {
                    state.waiting.push(cx.waker().clone());
                }
                Poll::Pending
            }
            Poll::Ready(None) => {
                state.source = Source::Ended;
                wake_all(&mut state);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => {
                state.source = Source::Failed(error.to_string());
                wake_all(&mut state);
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let kept = if let Some(data) = frame.data_ref() {
                    Some((Kept::Data(data.clone()), data.len()))
                } else {
                    frame
                        .trailers_ref()
                        .map(|trailers| (Kept::Trailers(trailers.clone()), 0))
                };
                if let Some((kept, len)) = kept {
                    if state.first == 0 && state.kept_bytes + len <= state.limit {
                        state.kept.push(kept);
                        state.kept_bytes += len;
                    } else {
                        // Over the limit: nothing is kept any more, and no new reader starts.
                        state.kept = Vec::new();
                        state.kept_bytes = 0;
                        state.first = state.read + 1;
                    }
                }
                state.read += 1;
                this.next = state.read;
                wake_all(&mut state);
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let state = lock(&self.shared);
        self.next >= state.read
            && match &state.source {
                Source::Ended => true,
                Source::Open(body) => body.is_end_stream(),
                Source::Failed(_) => false,
            }
    }

    fn size_hint(&self) -> SizeHint {
        match lock(&self.shared).exact_len {
            Some(len) if self.next == 0 => SizeHint::with_exact(len),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for SharedReader {
    /// A reader that leaves may have been the one the downstream would wake: another takes
    /// its turn.
    fn drop(&mut self) {
        wake_all(&mut lock(&self.shared));
    }
}

fn wake_all(state: &mut State) {
    for waker in state.waiting.drain(..) {
        waker.wake();
    }
}
