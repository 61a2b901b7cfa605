//! [`WatchedIo`]: a client connection whose writes may wait at most a set time for the client
//! to take bytes (nginx's `send_timeout`).
//!
//! A client that stops reading fills its socket's buffers; hyper's write then waits, and while it
//! waits nothing polls the response body, so the body's own idle timer does not run. The
//! connection, the handler's state and the upstream connection the body holds would stay for as
//! long as the client liked: a few clients that ask for large answers and read none would hold
//! an upstream connection each. Here a write (or flush) that has made no progress for the limit
//! fails with [`std::io::ErrorKind::TimedOut`]; hyper ends the connection, which drops the
//! response body (its upstream connection closed, its request counted).
//!
//! Only silence counts, not a slow reader: the timer is [`Silence`]'s, armed when a write begins
//! to wait and disarmed when one makes progress.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::silence::Silence;

/// `io`, whose writes fail once one has waited `limit` without progress.
pub(super) struct WatchedIo<I> {
    io: I,
    silence: Silence,
}

/// The client took no bytes for the limit.
#[derive(Debug, thiserror::Error)]
#[error("the client read nothing for {0:?}")]
struct Stalled(Duration);

impl<I> WatchedIo<I> {
    pub(super) fn new(io: I, limit: Duration) -> Self {
        WatchedIo {
            io,
            silence: Silence::new(limit),
        }
    }

    /// Passes a write's result on; a wait past the limit is an error.
    fn watch<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match self.silence.watch(&polled, cx) {
            Some(expired) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                Stalled(expired.0),
            ))),
            None => polled,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WatchedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WatchedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(polled, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(polled, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(polled, cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::time::Instant;

    use super::*;

    const LIMIT: Duration = Duration::from_secs(1);

    /// A pipe that holds 16 KiB: (the writer's end, watched; the reader's end).
    fn pipe() -> (WatchedIo<DuplexStream>, DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(16 * 1024);
        (WatchedIo::new(ours, LIMIT), theirs)
    }

    #[tokio::test(start_paused = true)]
    async fn writes_to_a_client_that_reads_nothing_fail_after_the_limit() {
        let (mut writer, _reader) = pipe();
        let chunk = vec![0u8; 4 * 1024];
        let started = Instant::now();
        let failed = tokio::time::timeout(LIMIT * 10, async {
            loop {
                if let Err(e) = writer.write_all(&chunk).await {
                    return e;
                }
            }
        })
        .await
        .expect("the write waited on past its limit");
        assert_eq!(failed.kind(), io::ErrorKind::TimedOut, "{failed}");
        assert_eq!(started.elapsed(), LIMIT);
    }

    /// Only silence counts: a client that reads a little every 20 ms gets every byte over five
    /// limits' time (the writer waits on it all along, never a limit at a time).
    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_gets_everything() {
        let (mut writer, mut reader) = pipe();
        let total = 4 * 1024 * 1024 / 16;
        let reading = tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            let mut got = 0;
            while got < total {
                tokio::time::sleep(Duration::from_millis(20)).await;
                got += reader.read(&mut buf).await.expect("read");
            }
            got
        });
        let started = Instant::now();
        let chunk = vec![7u8; 4 * 1024];
        for _ in 0..total / chunk.len() {
            writer
                .write_all(&chunk)
                .await
                .expect("a slow reader is not cut");
        }
        assert_eq!(reading.await.expect("reader"), total);
        assert!(started.elapsed() > LIMIT * 5, "{:?}", started.elapsed());
    }
}
