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
