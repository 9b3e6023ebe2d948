//! Bytes between two established connections, both ways, as long as either side sends: the
//! transfer of [`crate::tcp_proxy`] and of upgraded HTTP/1.1 streams (WebSocket and the other
//! `upgrade_configs`). Half-closes pass through; [`idle`] ends a transfer no byte has moved in
//! for its timeout. When both sides are plain TCP the kernel moves the bytes ([`splice`]);
//! otherwise (TLS on a side) they are copied.

pub mod splice;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// What one read of the copy loop takes at most.
const BUFFER: usize = 64 * 1024;
/// What its first read takes at most.
const FIRST_BUFFER: usize = 8 * 1024;

/// The upstream end of a tunnel: it counts its own bytes as they pass through it, and those a
/// splice moves past it when told.
pub trait UpstreamEnd {
    /// The socket, when the connection is plain TCP (not TLS).
    fn plain_socket(&self) -> Option<&TcpStream>;
    /// Counts bytes sent to the upstream other than through `AsyncWrite`.
    fn count_sent(&self, bytes: u64);
    /// Counts bytes received from the upstream other than through `AsyncRead`.
    fn count_received(&self, bytes: u64);
}

/// Which way a chunk went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToUpstream,
    ToDownstream,
}

/// Moves bytes both ways between `downstream` and `upstream` until both directions have ended
/// (or one fails): spliced when both are plain TCP, else copied. `moved` hears of every chunk
/// delivered.
pub async fn both_ways<D, U>(
    downstream: D,
    upstream: U,
    moved: impl Fn(Direction, usize),
) -> io::Result<()>
where
    D: AsyncRead + AsyncWrite + Unpin + 'static,
    U: AsyncRead + AsyncWrite + Unpin + UpstreamEnd,
{
    if let (Some(down), Some(up)) = (
        (&downstream as &dyn std::any::Any).downcast_ref::<TcpStream>(),
        upstream.plain_socket(),
    ) && let (Ok(pipe_up), Ok(pipe_down)) = (splice::Pipe::new(), splice::Pipe::new())
    {
        let sent = splice::forward(down, up, &pipe_up, |n| {
            upstream.count_sent(n as u64);
            moved(Direction::ToUpstream, n);
        });
        let received = splice::forward(up, down, &pipe_down, |n| {
            upstream.count_received(n as u64);
            moved(Direction::ToDownstream, n);
        });
        return tokio::try_join!(sent, received).map(drop);
    }
    // TLS on a side, or no descriptors left for the pipes: copied. The upstream end counts
    // what passes through it.
    let (mut down_read, mut down_write) = tokio::io::split(downstream);
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let sent = copy(&mut down_read, &mut up_write, |n| {
        moved(Direction::ToUpstream, n)
    });
    let received = copy(&mut up_read, &mut down_write, |n| {
        moved(Direction::ToDownstream, n)
    });
    tokio::try_join!(sent, received).map(drop)
}

/// Copies one direction until `reader` ends, then ends `writer`'s sending side (a half-close:
/// the other direction stays open); `moved` hears of every chunk written.
async fn copy<R, W>(reader: &mut R, writer: &mut W, mut moved: impl FnMut(usize)) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Reads go into spare capacity (zeroing 64 KiB per direction showed in profiles), which
    // starts small, as most tunnels carry a request and a response, and grows to the full
    // size the first time a read fills it.
    let mut buf = Vec::with_capacity(FIRST_BUFFER);
    loop {
        buf.clear();
        let n = reader.read_buf(&mut buf).await?;
        if n == 0 {
            let _ = writer.shutdown().await;
            return Ok(());
        }
        writer.write_all(&buf).await?;
        moved(n);
        if n == buf.capacity() && n < BUFFER {
            buf = Vec::with_capacity(BUFFER);
        }
    }
}

/// When bytes last moved, shared by both directions.
pub struct Activity {
    base: Instant,
    nanos: AtomicU64,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity {
            base: Instant::now(),
            nanos: AtomicU64::new(0),
        }
    }
}

impl Activity {
    pub fn touch(&self) {
        self.nanos
            .store(self.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

/// Completes once no byte has moved for `timeout`; never without one.
pub async fn idle(activity: &Activity, timeout: Option<Duration>) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep_until(activity.last() + timeout).await;
        if activity.last() + timeout <= Instant::now() {
            return;
        }
    }
}
