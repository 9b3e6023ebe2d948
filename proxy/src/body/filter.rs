//! Body filters: what an HTTP filter installs to see a request's or response's data and
//! trailers as they stream through (phases 2 and 4 of the chain in [`crate::http::filter`]).

use bytes::Bytes;
use http::HeaderMap;
use http_body::Frame;

/// Sees a body's data and trailers as they pass.
pub trait BodyFilter: Send + std::fmt::Debug {
    /// A data frame; it may be changed in place.
    fn on_data(&mut self, data: &mut Bytes) {
        let _ = data;
    }
    /// The trailers, if the body has them.
    fn on_trailers(&mut self, trailers: &mut HeaderMap) {
        let _ = trailers;
    }
    /// The body ended.
    fn on_end(&mut self) {}
    /// Whether the filter changes the body's length (a compressor): the body then has no
    /// known size and is not over until [`BodyFilter::finish`] has been asked. Response
    /// bodies only.
    fn reshapes(&self) -> bool {
        false
    }
    /// What the filter still holds once the data is over, sent before the trailers or the
    /// end (a compressor's last block).
    fn finish(&mut self) -> Option<Bytes> {
        None
    }
}

/// Asks each filter for what it still holds, in order: what one gives passes through the
/// filters after it, as data would.
pub fn finish_all(filters: &mut [Box<dyn BodyFilter>]) -> Option<Bytes> {
    let mut tail: Option<Bytes> = None;
    for filter in filters.iter_mut() {
        if let Some(data) = tail.as_mut() {
            filter.on_data(data);
        }
        if let Some(more) = filter.finish() {
            tail = Some(match tail.take() {
                Some(before) if !before.is_empty() => [before, more].concat().into(),
                _ => more,
            });
        }
    }
    tail.filter(|data| !data.is_empty())
}

/// Shows a data or trailers frame to the body filters, in order.
pub fn filter_frame(filters: &mut [Box<dyn BodyFilter>], frame: &mut Frame<Bytes>) {
    if filters.is_empty() {
        return;
    }
    if let Some(data) = frame.data_mut() {
        for filter in filters.iter_mut() {
            filter.on_data(data);
        }
    } else if let Some(trailers) = frame.trailers_mut() {
        for filter in filters.iter_mut() {
            filter.on_trailers(trailers);
        }
    }
}
