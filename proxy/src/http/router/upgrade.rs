//! An upgraded HTTP/1.1 stream (WebSocket and the other `upgrade_configs`): once the upstream
//! answers `101 Switching Protocols`, hyper hands both connections back and they become a
//! tunnel ([`crate::tunnel`]): spliced when both are plain TCP, copied otherwise. The stream's
//! idle timeout (the route's `idle_timeout`, else the HCM's `stream_idle_timeout`) ends a tunnel
//! no byte has crossed for that long, as Envoy ends an idle upgraded stream.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::http::codec_guard::ServedIo;
use crate::stats::{GaugeGuard, HttpStats};
use crate::tunnel::{self, Activity};
use crate::upstream::pool::UpgradedUpstream;

/// Runs the tunnel in its own task once both sides have switched protocols. It counts in the
/// connection manager's `stats`: as an upgrade, and as a stream idle timeout if it idles out.
pub fn spawn(
    downstream: OnUpgrade,
    upstream: OnUpgrade,
    idle_timeout: Option<Duration>,
    stats: Arc<HttpStats>,
) {
    tokio::spawn(async move {
        let (Ok(downstream), Ok(upstream)) = tokio::join!(downstream, upstream) else {
            return;
        };
        stats.downstream_cx_upgrades_total.inc();
        let _open = GaugeGuard::new(&stats.downstream_cx_upgrades_active);
        let activity = Activity::default();
        let idle = async {
            tunnel::idle(&activity, idle_timeout).await;
            stats.downstream_rq_idle_timeout.inc();
        };
        tokio::select! {
            _ = run(downstream, upstream, &activity) => {}
            _ = idle => {}
        }
    });
}

/// Moves bytes until both directions have ended (or one fails).
async fn run(downstream: Upgraded, upstream: Upgraded, activity: &Activity) -> std::io::Result<()> {
    // Every HTTP/1.1 connection of the pool is one; anything else is a bug, and ends the tunnel.
    let Ok(mut upstream) = UpgradedUpstream::take(upstream) else {
        tracing::warn!("an upgraded upstream connection that is not the pool's; tunnel closed");
        return Err(std::io::Error::other(
            "upstream connection of an unknown type",
        ));
    };
    let (mut downstream, early) = match take_plain_downstream(downstream) {
        Ok((socket, early)) => (Side::Plain(socket), early),
        Err(other) => (Side::Other(TokioIo::new(other)), Bytes::new()),
    };
    // Bytes each side sent right behind its head reach the other side first (both at once: a
    // side may read only after it has been answered).
    let up_early = std::mem::take(&mut upstream.early);
    tokio::try_join!(
        upstream.io.write_all(&early),
        downstream.write_all(&up_early)
    )?;
    if !(early.is_empty() && up_early.is_empty()) {
        activity.touch();
    }
    let touch = |_, _| activity.touch();
    match downstream {
        Side::Plain(socket) => tunnel::both_ways(socket, upstream.io, touch).await,
        Side::Other(other) => tunnel::both_ways(other, upstream.io, touch).await,
    }
}

/// The downstream end of a tunnel: a plain socket, or what hyper wraps (TLS).
enum Side {
    Plain(TcpStream),
    Other(TokioIo<Upgraded>),
}

impl Side {
    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Side::Plain(socket) => socket.write_all(bytes).await,
            Side::Other(other) => other.write_all(bytes).await,
        }
    }
}

/// A plain TCP downstream connection taken back from hyper, with the bytes hyper and the codec
/// guard read past the request head, in the order they arrived.
fn take_plain_downstream(upgraded: Upgraded) -> Result<(TcpStream, Bytes), Upgraded> {
    let parts = hyper_util::server::conn::auto::upgrade::downcast::<ServedIo<TcpStream>>(upgraded)?;
    let (socket, unread) = parts.io.into_inner().into_parts();
    let early = if unread.is_empty() {
        parts.read_buf
    } else {
        let mut early = bytes::BytesMut::from(parts.read_buf);
        early.extend_from_slice(&unread);
        early.freeze()
    };
    Ok((socket, early))
}
