//! Copying bytes both ways between two streams without holding a buffer while idle.
//!
//! tokio's `copy_bidirectional` keeps two 8 KiB buffers for the life of a connection;
//! across thousands of idle WebSockets that was most of their memory. Here a direction
//! borrows a buffer from a small per-thread free list only while it has bytes in hand:
//! it takes one to read, gives it back at once when the read is pending, and after a
//! read keeps it only until everything read is written. Otherwise this is tokio's copy:
//! each chunk is written as soon as it is read (and the buffer topped up while the
//! writer is pending), the writer is flushed when the reader has nothing more (rustls
//! holds records until then), and at EOF the writer is flushed and its write half shut
//! down while the other direction goes on (half-close).

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The size of a copy buffer, as tokio's.
const BUF_SIZE: usize = 8 * 1024;

/// Free buffers kept per thread. Only connections with bytes in flight hold buffers, so
/// a handful is enough to spare the allocator, and the list stays bounded (512 KiB).
const KEPT_PER_THREAD: usize = 64;

thread_local! {
    static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
thread_local! {
    static LENT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A buffer borrowed from this thread's free list, given back when dropped (to the list
/// of the thread that drops it, or to the allocator if that list is full).
struct Lent(Box<[u8]>);

impl Lent {
    fn take() -> Lent {
        let kept = FREE.try_with(|free| free.borrow_mut().pop()).ok().flatten();
        #[cfg(test)]
        LENT.with(|n| n.set(n.get() + 1));
        Lent(kept.unwrap_or_else(|| vec![0; BUF_SIZE].into_boxed_slice()))
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        #[cfg(test)]
        let _ = LENT.try_with(|n| n.set(n.get().saturating_sub(1)));
        let buf = std::mem::take(&mut self.0);
        // During thread teardown the list may be gone: the buffer is simply freed.
        let _ = FREE.try_with(|free| {
            let mut free = free.borrow_mut();
            if free.len() < KEPT_PER_THREAD {
                free.push(buf);
            }
        });
    }
}

/// Buffers lent out on this thread and not yet given back.
#[cfg(test)]
fn lent_on_this_thread() -> usize {
    LENT.with(std::cell::Cell::get)
}

/// Where one direction of the copy stands.
enum State {
    /// Waiting for bytes; no buffer held.
    Reading,
    /// Bytes `pos..cap` of `buf` are still to be written.
    Writing {
        buf: Lent,
        pos: usize,
        cap: usize,
    },
    /// EOF read and everything written: flush the writer, then shut its write half.
    Flushing,
    ShuttingDown,
    Done,
}

/// One direction: reader → writer.
struct Direction {
    state: State,
    /// EOF was read while topping up a buffer that still had bytes to write.
    read_done: bool,
    /// Bytes were written since the last flush.
    need_flush: bool,
    copied: u64,
}

impl Direction {
    fn new() -> Self {
        Direction {
            state: State::Reading,
            read_done: false,
            need_flush: false,
            copied: 0,
        }
    }

    /// Copies until the reader is at EOF and the writer shut down (the bytes copied),
    /// an error, or nothing can move (pending).
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        // Take part in tokio's task budget, as its copy does: a stream whose bytes are
        // always ready (rustls's plaintext) would otherwise never let other tasks run.
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        loop {
            match &mut self.state {
                State::Reading => {
                    let mut buf = Lent::take();
                    let mut read = ReadBuf::new(&mut buf.0);
                    match poll_read(cx, reader.as_mut(), &mut read) {
                        Poll::Pending => {
                            drop(buf);
                            // The writer may be holding what it was given (rustls keeps
                            // records until flushed), and the peer may wait for it
                            // before it sends more.
                            if self.need_flush {
                                ready!(writer.as_mut().poll_flush(cx))?;
                                coop.made_progress();
                                self.need_flush = false;
                            }
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => {
                            coop.made_progress();
                            return Poll::Ready(Err(e));
                        }
                        Poll::Ready(Ok(())) => {
                            coop.made_progress();
                            let cap = read.filled().len();
                            self.state = if cap == 0 {
                                State::Flushing
                            } else {
                                State::Writing { buf, pos: 0, cap }
                            };
                        }
                    }
                }
                State::Writing { buf, pos, cap } => {
                    match writer.as_mut().poll_write(cx, &buf.0[*pos..*cap]) {
                        Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {
                            // Read more behind what is waiting, so that the next write
                            // is a larger one.
                            if !self.read_done && *cap < buf.0.len() {
                                let mut read = ReadBuf::new(&mut buf.0);
                                read.set_filled(*cap);
                                ready!(poll_read(cx, reader.as_mut(), &mut read))?;
                                let filled = read.filled().len();
                                self.read_done = filled == *cap;
                                *cap = filled;
                            }
                            return Poll::Pending;
                        }
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::WriteZero,
                                "write zero byte into writer",
                            )));
                        }
                        Poll::Ready(Ok(n)) => {
                            coop.made_progress();
                            // A writer that claims more than it was given ends the copy
                            // rather than looping on a bad range.
                            *pos = pos.saturating_add(n).min(*cap);
                            self.copied += n as u64;
                            self.need_flush = true;
                            if *pos == *cap {
                                // Dropping the buffer gives it back.
                                self.state = if self.read_done {
                                    State::Flushing
                                } else {
                                    State::Reading
                                };
                            }
                        }
                    }
                }
                State::Flushing => {
                    ready!(writer.as_mut().poll_flush(cx))?;
                    coop.made_progress();
                    self.need_flush = false;
                    self.state = State::ShuttingDown;
                }
                State::ShuttingDown => {
                    ready!(writer.as_mut().poll_shutdown(cx))?;
                    coop.made_progress();
                    self.state = State::Done;
                }
                State::Done => return Poll::Ready(Ok(self.copied)),
            }
        }
    }
}

/// A read, retried when interrupted.
fn poll_read<R: AsyncRead + ?Sized>(
    cx: &mut Context<'_>,
    mut reader: Pin<&mut R>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    loop {
        match reader.as_mut().poll_read(cx, buf) {
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            polled => return polled,
        }
    }
}

/// Copies `a` → `b` and `b` → `a` until both directions have read EOF and shut their
/// writer down, or either fails. Returns the bytes copied each way, (a → b, b → a).
pub(crate) async fn bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Direction::new();
    let mut b_to_a = Direction::new();
    poll_fn(|cx| {
        let there = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let back = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        Poll::Ready(Ok((ready!(there), ready!(back))))
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::hash::{DefaultHasher, Hasher};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter, DuplexStream, duplex};

    use super::*;

    /// A copy between `client` and `upstream` (the test's ends), running as a task.
    fn spliced(
        capacity: usize,
    ) -> (
        DuplexStream,
        DuplexStream,
        tokio::task::JoinHandle<io::Result<(u64, u64)>>,
    ) {
        let (mut a, client) = duplex(capacity);
        let (mut b, upstream) = duplex(capacity);
        let copy = tokio::spawn(async move { bidirectional(&mut a, &mut b).await });
        (client, upstream, copy)
    }

    async fn read_exactly(stream: &mut DuplexStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut got)).await;
        assert!(matches!(read, Ok(Ok(_))), "{read:?}");
        got
    }

    /// Lets the copy task run until it waits on both readers.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect()
    }

    fn checksum(bytes: &[u8]) -> u64 {
        let mut h = DefaultHasher::new();
        h.write(bytes);
        h.finish()
    }

    #[tokio::test]
    async fn copies_both_ways_and_counts_the_bytes() {
        let (mut client, mut upstream, copy) = spliced(1024);
        client.write_all(b"hello").await.unwrap();
        assert_eq!(read_exactly(&mut upstream, 5).await, b"hello");
        upstream.write_all(b"world!").await.unwrap();
        assert_eq!(read_exactly(&mut client, 6).await, b"world!");
        client.shutdown().await.unwrap();
        upstream.shutdown().await.unwrap();
        let moved = copy.await.unwrap().unwrap();
        assert_eq!(moved, (5, 6));
    }

    #[tokio::test]
    async fn half_close_shuts_the_other_write_half_and_keeps_the_other_direction() {
        let (mut client, mut upstream, copy) = spliced(1024);
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), upstream.read_to_end(&mut got));
        assert!(matches!(read.await, Ok(Ok(7))), "the upstream sees EOF");
        assert_eq!(got, b"request");
        for part in [&b"one "[..], b"two ", b"three"] {
            upstream.write_all(part).await.unwrap();
            assert_eq!(read_exactly(&mut client, part.len()).await, part);
        }
        assert!(!copy.is_finished(), "the copy goes on after one side's EOF");
        upstream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert_eq!(copy.await.unwrap().unwrap(), (7, 13));
    }

    #[tokio::test]
    async fn a_large_transfer_arrives_whole_both_ways() {
        const LEN: usize = 6 * 1024 * 1024;
        // A pipe smaller than a buffer: writes are partial and pending all along.
        let (client, upstream, copy) = spliced(3000);
        let up = pattern(LEN, 1);
        let down = pattern(LEN + 12345, 2);
        let (up_sum, down_sum) = (checksum(&up), checksum(&down));
        let pump = |mut stream: DuplexStream, send: Vec<u8>| async move {
            let (mut r, mut w) = tokio::io::split(&mut stream);
            let write = async {
                w.write_all(&send).await?;
                w.shutdown().await
            };
            let mut got = Vec::new();
            let read = r.read_to_end(&mut got);
            let (written, read) = tokio::join!(write, read);
            written.and(read).map(|_| got)
        };
        // Each end returns what it received.
        let (at_client, at_upstream) = tokio::join!(pump(client, up), pump(upstream, down));
        let (at_client, at_upstream) = (at_client.unwrap(), at_upstream.unwrap());
        assert_eq!((at_upstream.len(), checksum(&at_upstream)), (LEN, up_sum));
        assert_eq!(
            (at_client.len(), checksum(&at_client)),
            (LEN + 12345, down_sum)
        );
        let moved = copy.await.unwrap().unwrap();
        assert_eq!(moved, (LEN as u64, LEN as u64 + 12345));
    }

    #[tokio::test]
    async fn a_slow_reader_holds_one_buffer_and_loses_nothing() {
        const LEN: usize = 200 * 1024;
        let (mut client, mut upstream, copy) = spliced(512);
        let sent = pattern(LEN, 3);
        let writer = tokio::spawn({
            let sent = sent.clone();
            async move {
                client.write_all(&sent).await.unwrap();
                client
            }
        });
        let mut got = Vec::new();
        let mut chunk = [0; 100];
        let mut held_while_blocked = 0;
        while got.len() < LEN {
            tokio::time::sleep(Duration::from_micros(200)).await;
            held_while_blocked = held_while_blocked.max(lent_on_this_thread());
            let n = upstream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "EOF after {} bytes", got.len());
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(checksum(&got), checksum(&sent));
        assert_eq!(
            held_while_blocked, 1,
            "a blocked direction holds its buffer"
        );
        let _client = writer.await.unwrap();
        settle().await;
        assert_eq!(lent_on_this_thread(), 0, "all written: the buffer is back");
        copy.abort();
    }

    #[tokio::test]
    async fn an_idle_copy_holds_no_buffer() {
        let (mut client, mut upstream, copy) = spliced(64 * 1024);
        settle().await;
        assert_eq!(lent_on_this_thread(), 0, "before any byte");
        client.write_all(&pattern(20_000, 4)).await.unwrap();
        read_exactly(&mut upstream, 20_000).await;
        upstream.write_all(b"pong").await.unwrap();
        read_exactly(&mut client, 4).await;
        settle().await;
        assert!(!copy.is_finished());
        assert_eq!(lent_on_this_thread(), 0, "idle after traffic both ways");
        let kept = FREE.with(|free| free.borrow().len());
        assert!((1..=KEPT_PER_THREAD).contains(&kept), "{kept}");
        drop(client);
        drop(upstream);
        let _ = copy.await;
    }

    #[tokio::test]
    async fn a_writer_that_buffers_is_flushed_when_the_reader_waits() {
        // Like rustls, a BufWriter keeps what it is given until flushed: an echo must not
        // wait for more bytes to come.
        let (mut a, mut client) = duplex(1024);
        let (b, mut upstream) = duplex(1024);
        let mut b = BufWriter::new(b);
        let copy = tokio::spawn(async move { bidirectional(&mut a, &mut b).await });
        client.write_all(b"ping").await.unwrap();
        assert_eq!(read_exactly(&mut upstream, 4).await, b"ping");
        upstream.write_all(b"pong").await.unwrap();
        assert_eq!(read_exactly(&mut client, 4).await, b"pong");
        copy.abort();
    }

    #[tokio::test]
    async fn a_write_error_ends_the_copy_with_it() {
        let (mut client, upstream, copy) = spliced(1024);
        drop(upstream);
        let _ = client.write_all(b"lost").await;
        let ended = tokio::time::timeout(Duration::from_secs(10), copy).await;
        let error = ended.unwrap().unwrap().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe, "{error}");
        assert_eq!(
            lent_on_this_thread(),
            0,
            "the buffer is given back on error"
        );
    }

    #[tokio::test]
    async fn the_idle_timeout_ends_a_quiet_connection_and_not_a_busy_one() {
        let (a, mut client) = duplex(1024);
        let (b, mut upstream) = duplex(1024);
        let idle = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let forward = tokio::spawn(super::super::tcp::forward(a, b, idle));
        // Busy for three timeouts: bytes every 100 ms keep it open.
        while started.elapsed() < idle * 3 {
            client.write_all(b".").await.unwrap();
            read_exactly(&mut upstream, 1).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!forward.is_finished(), "closed while bytes were moving");
        let quiet = std::time::Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(10), forward).await;
        let error = ended.unwrap().unwrap().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
        let waited = quiet.elapsed();
        assert!(waited >= idle / 2, "{waited:?}");
        assert_eq!(lent_on_this_thread(), 0);
    }
}
