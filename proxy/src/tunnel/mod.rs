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

/// Moves bytes both ways between two plain sockets with `splice(2)`; `a_to_b` and `b_to_a` hear
/// of every chunk delivered. `None` when the pipes cannot be made (out of descriptors): the
/// caller copies instead.
pub fn splice_both_ways<'a>(
    a: &'a TcpStream,
    b: &'a TcpStream,
    a_to_b: impl FnMut(usize) + 'a,
    b_to_a: impl FnMut(usize) + 'a,
) -> Option<impl Future<Output = io::Result<()>> + 'a> {
    let (Ok(pipe_ab), Ok(pipe_ba)) = (splice::Pipe::new(), splice::Pipe::new()) else {
        return None;
    };
    Some(async move {
        let forward = splice::forward(a, b, &pipe_ab, a_to_b);
        let back = splice::forward(b, a, &pipe_ba, b_to_a);
        tokio::try_join!(forward, back).map(drop)
    })
}

/// Copies one direction until `reader` ends, then ends `writer`'s sending side (a half-close:
/// the other direction stays open); `moved` hears of every chunk written.
pub async fn copy<R, W>(
    reader: &mut R,
    writer: &mut W,
    mut moved: impl FnMut(usize),
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            let _ = writer.shutdown().await;
            return Ok(());
        }
        writer.write_all(&buf[..n]).await?;
        moved(n);
    }
}

/// Copies both ways between `a` and `b` (see [`copy`]).
pub async fn copy_both_ways<A, B>(
    a: A,
    b: B,
    a_to_b: impl FnMut(usize),
    b_to_a: impl FnMut(usize),
) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let forward = copy(&mut a_read, &mut b_write, a_to_b);
    let back = copy(&mut b_read, &mut a_write, b_to_a);
    tokio::try_join!(forward, back).map(drop)
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
