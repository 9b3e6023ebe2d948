//! Short gathered writes sent with one `send(2)`.
//!
//! hyper hands a message's head and its body to the socket as separate slices (its vectored
//! write strategy, which spares it copying large bodies), and tokio sends those with
//! `writev(2)`. On loopback TCP the kernel's `writev` path costs the sender 0.17–0.27 µs more
//! per call than a `send` of the same bytes (`bench/send-cost.c`; bench/README.md, "The
//! kernel's part of a request"). A proxy makes two such writes per request, so slices that fit
//! [`GATHER_LIMIT`] are copied into one buffer and written with `poll_write`, which tokio sends
//! with `send`; larger ones keep `writev`, where the copy would cost more than the call saves.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

/// The most bytes gathered into one buffer: a head and a short body. Copying this much costs
/// far less than what `writev` adds; a larger body goes out by `writev` uncopied.
pub const GATHER_LIMIT: usize = 4096;

/// Writes `bufs` to `io` as [`AsyncWrite::poll_write_vectored`] would, but with one
/// `poll_write` when only one slice holds bytes or all of them fit [`GATHER_LIMIT`]. Returns
/// the bytes written, counted across the slices in order, as a vectored write does.
pub fn poll_write_gathered<W: AsyncWrite + ?Sized>(
    io: Pin<&mut W>,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let mut holding = bufs.iter().filter(|buf| !buf.is_empty());
    let Some(first) = holding.next() else {
        return io.poll_write_vectored(cx, bufs);
    };
    if holding.next().is_none() {
        return io.poll_write(cx, first);
    }
    let total: usize = bufs.iter().map(|buf| buf.len()).sum();
    if total > GATHER_LIMIT {
        return io.poll_write_vectored(cx, bufs);
    }
    GATHERED.with(|gathered| {
        // Only a write made from inside another's would find it taken; it goes vectored.
        let Ok(mut gathered) = gathered.try_borrow_mut() else {
            return io.poll_write_vectored(cx, bufs);
        };
        gathered.clear();
        for buf in bufs {
            gathered.extend_from_slice(buf);
        }
        io.poll_write(cx, &gathered)
    })
}

thread_local! {
    /// The bytes of one gathered write, kept per thread: a fresh array on the stack was
    /// zeroed on every write (4 KiB, some 3,000 instructions per request under callgrind).
    static GATHERED: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(Vec::with_capacity(GATHER_LIMIT));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each call and accepts at most `accept` bytes of it.
    struct Recorder {
        calls: Vec<(&'static str, Vec<u8>)>,
        accept: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.accept);
            self.calls.push(("write", buf.to_vec()));
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let bytes: Vec<u8> = bufs.iter().flat_map(|buf| buf.iter().copied()).collect();
            let n = bytes.len().min(self.accept);
            self.calls.push(("writev", bytes));
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn write(bufs: &[&[u8]], accept: usize) -> (usize, Vec<(&'static str, Vec<u8>)>) {
        let mut io = Recorder {
            calls: Vec::new(),
            accept,
        };
        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|buf| IoSlice::new(buf)).collect();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let Poll::Ready(Ok(n)) = poll_write_gathered(Pin::new(&mut io), &mut cx, &slices) else {
            panic!("the recorder is always ready");
        };
        (n, io.calls)
    }

    #[test]
    fn a_head_and_a_short_body_go_out_in_one_write() {
        let (n, calls) = write(
            &[b"HTTP/1.1 200 OK\r\n\r\n", b"", b"{\"ok\":1}"],
            usize::MAX,
        );
        assert_eq!(n, 27);
        assert_eq!(
            calls,
            vec![("write", b"HTTP/1.1 200 OK\r\n\r\n{\"ok\":1}".to_vec())]
        );
    }

    #[test]
    fn one_slice_with_bytes_is_written_as_it_is() {
        let (n, calls) = write(&[b"", b"GET / HTTP/1.1\r\n\r\n"], usize::MAX);
        assert_eq!(n, 18);
        assert_eq!(calls, vec![("write", b"GET / HTTP/1.1\r\n\r\n".to_vec())]);
    }

    #[test]
    fn slices_above_the_limit_keep_the_vectored_write() {
        let body = vec![b'x'; GATHER_LIMIT];
        let (n, calls) = write(&[b"head", &body], usize::MAX);
        assert_eq!(n, GATHER_LIMIT + 4);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0, "writev");
        // Exactly at the limit still gathers.
        let body = vec![b'x'; GATHER_LIMIT - 4];
        let (_, calls) = write(&[b"head", &body], usize::MAX);
        assert_eq!(calls[0].0, "write");
    }

    #[test]
    fn a_short_write_reports_the_bytes_taken_across_the_slices() {
        let (n, calls) = write(&[b"abc", b"defg"], 5);
        assert_eq!(n, 5);
        assert_eq!(calls, vec![("write", b"abcdefg".to_vec())]);
    }

    #[test]
    fn no_bytes_at_all_go_to_the_vectored_write() {
        let (n, calls) = write(&[b"", b""], usize::MAX);
        assert_eq!(n, 0);
        assert_eq!(calls, vec![("writev", Vec::new())]);
    }
}
