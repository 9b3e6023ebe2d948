//! Local replies: every response Remora makes itself (no route, no healthy upstream, timeouts,
//! a filter's answer, a direct response or redirect) is a [`LocalReply`], turned into a
//! response in one place, with Envoy's status, body, response flag and headers. A gRPC request
//! gets it as gRPC does errors: a trailers-only answer with `grpc-status` and `grpc-message`.

use std::borrow::Cow;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use crate::error::{ProxyError, ResponseFlag};
use crate::http::response_body::ResponseBody;

static X_OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// A response made here rather than by an upstream.
#[derive(Debug)]
pub struct LocalReply {
    pub status: StatusCode,
    pub body: Bytes,
    /// Why, for access logs (`%RESPONSE_FLAGS%`); `None` for an answer that is no failure.
    pub flag: Option<ResponseFlag>,
    /// Why: Envoy's response code details (`route_not_found`, `response_timeout`, ...), for
    /// `%RESPONSE_CODE_DETAILS%` and debug logs.
    pub details: Cow<'static, str>,
    /// What the upstream transport said when a connection failed
    /// (`%UPSTREAM_TRANSPORT_FAILURE_REASON%`).
    pub transport_failure: Option<std::sync::Arc<str>>,
    /// Extra headers (a redirect's `location`, CORS preflight headers).
    pub headers: HeaderMap,
    /// Made by the router after a route was chosen: the route's response headers apply.
    pub from_router: bool,
    /// The gRPC status a gRPC request gets, when not the one the HTTP status maps to.
    pub grpc_status: Option<u32>,
}

impl LocalReply {
    pub fn new(status: StatusCode) -> Self {
        LocalReply {
            status,
            body: Bytes::new(),
            flag: None,
            details: Cow::Borrowed(""),
            transport_failure: None,
            headers: HeaderMap::new(),
            from_router: false,
            grpc_status: None,
        }
    }

    pub fn with_body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// The reply Envoy gives for a request-path failure.
    pub fn from_error(error: &ProxyError) -> Self {
        let (status, body) = error.flag.local_reply();
        let mut reply = LocalReply::new(
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        )
        .with_body(Bytes::from_static(body.as_bytes()));
        reply.flag = Some(error.flag);
        reply.details = Cow::Owned(error.to_string());
        // Envoy marks requests dropped by a circuit breaker, and closes a connection whose
        // request broke the protocol (what follows on it cannot be trusted).
        match error.flag {
            ResponseFlag::UpstreamOverflow => {
                reply
                    .headers
                    .insert(&X_OVERLOADED, HeaderValue::from_static("true"));
            }
            ResponseFlag::DownstreamProtocolError => {
                reply
                    .headers
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        reply
    }

    /// The response for a gRPC request: 200, trailers-only, with the gRPC status (the HTTP
    /// status mapped as gRPC maps it, unless the reply names one) and the body as message.
    pub fn into_grpc_response(self, server: &HeaderValue) -> Response<ResponseBody> {
        let mut response = Response::new(ResponseBody::empty());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        let status = self
            .grpc_status
            .unwrap_or_else(|| grpc_status_for(self.status));
        headers.insert(&GRPC_STATUS, HeaderValue::from(status));
        if !self.body.is_empty() {
            let text = String::from_utf8_lossy(&self.body);
            if let Ok(message) = HeaderValue::from_str(&percent_encode(text.trim_end_matches('\n')))
            {
                headers.insert(&GRPC_MESSAGE, message);
            }
        }
        headers.insert(header::SERVER, server.clone());
        headers.extend(self.headers);
        headers.remove(header::CONTENT_LENGTH);
        response
    }

    /// The response: the body as text, its length, the server header and the extra headers.
    pub fn into_response(self, server: &HeaderValue) -> Response<ResponseBody> {
        let mut response = Response::new(ResponseBody::full(self.body.clone()));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        if !self.body.is_empty() {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        headers.insert(
            header::CONTENT_LENGTH,
            crate::http::headers::number(self.body.len() as u64),
        );
        headers.insert(header::SERVER, server.clone());
        headers.extend(self.headers);
        response
    }
}

/// The gRPC status for an HTTP status, as the gRPC spec maps them.
fn grpc_status_for(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}

/// gRPC's percent-encoding of `grpc-message`: printable ASCII stays, except `%`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (b' '..=b'~').contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

impl From<ProxyError> for LocalReply {
    fn from(error: ProxyError) -> Self {
        LocalReply::from_error(&error)
    }
}

impl ProxyError {
    /// The local reply for a failure the router met after choosing a route: the route's
    /// response headers apply to it, as Envoy's router applies them.
    pub fn into_router_reply(self) -> LocalReply {
        let mut reply = LocalReply::from_error(&self);
        reply.from_router = true;
        reply
    }
}
