//! Bytes between two plain TCP sockets moved with `splice(2)` through a pipe: from one socket's
//! receive queue into the pipe and from the pipe into the other's send queue, kernel to kernel,
//! never copied into the proxy. TLS on either side needs the bytes in user space, so those
//! connections keep the copy loop.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// What one splice into the pipe asks for; the pipe is grown to hold it where the system allows
/// (`/proc/sys/fs/pipe-max-size`, 1 MiB by default), and a smaller pipe takes what fits.
const PIPE_BYTES: usize = 1 << 20;

/// A pipe holding bytes on their way from one socket to the other.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Larger chunks mean fewer system calls; the default 64 KiB pipe works too.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES as i32));
        Ok(Pipe { read, write })
    }
}

/// Moves bytes from `from` to `to` until `from` ends, then ends `to`'s sending side (a
/// half-close, as the copy loop does); `moved` hears of every chunk delivered to `to`.
pub async fn forward(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    mut moved: impl FnMut(usize),
) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        // The pipe is empty here, so "would block" can only mean `from` has nothing to read.
        let mut in_pipe = from
            .async_io(Interest::READABLE, || {
                splice(
                    from.as_fd(),
                    None,
                    pipe.write.as_fd(),
                    None,
                    PIPE_BYTES,
                    flags,
                )
                .map_err(io::Error::from)
            })
            .await?;
        if in_pipe == 0 {
            let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            return Ok(());
        }
        // The pipe holds bytes here, so "would block" can only mean `to` is full.
        while in_pipe > 0 {
            let sent = to
                .async_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_fd(), None, to.as_fd(), None, in_pipe, flags)
                        .map_err(io::Error::from)
                })
                .await?;
            in_pipe -= sent;
            moved(sent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of sockets on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let connect = TcpStream::connect(listener.local_addr().expect("addr"));
        let (connected, accepted) = tokio::join!(connect, listener.accept());
        (connected.expect("connect"), accepted.expect("accept").0)
    }

    #[tokio::test]
    async fn bytes_arrive_whole_and_in_order_then_the_end_is_passed_on() {
        let (mut client, proxy_in) = pair().await;
        let (proxy_out, mut server) = pair().await;
        let data: Vec<u8> = (0..8_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("write");
            client.shutdown().await.expect("half-close");
            client
        });
        let reader = tokio::spawn(async move {
            let mut received = Vec::new();
            server
                .read_to_end(&mut received)
                .await
                .expect("read to the end");
            received
        });
        let pipe = Pipe::new().expect("pipe");
        let mut counted = 0;
        forward(&proxy_in, &proxy_out, &pipe, |n| counted += n)
            .await
            .expect("forwarded");
        let received = reader.await.expect("reader");
        assert_eq!(received.len(), data.len());
        assert!(received == data, "the same bytes in the same order");
        assert_eq!(counted, data.len());
        writer.await.expect("writer");
    }
}
