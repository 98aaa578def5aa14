//! A read buffer that exists only while there is unparsed data. See [`ReadLayer`].

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::Config;

/// Largest accepted `read_buffer_size`: the stack buffer of one read.
pub(crate) const CHUNK: usize = 64 * 1024;

/// The receive buffer tungstenite keeps per connection when ours sits below
/// it: small, because this layer does the large reads.
pub(crate) const TUNGSTENITE_READ_BUFFER: usize = 256;

/// The stream under tungstenite for every connection the supervisor builds
/// itself (`accept`, `connect`, the hyper and axum upgrades), public so that
/// a `WebSocketStream` built elsewhere for
/// [`Supervisor::supervise`](crate::Supervisor::supervise) can have it too.
///
/// tungstenite allocates its read buffer eagerly, per connection, and
/// zero-fills it on every read: 128 KiB by default, which is most of the
/// memory of an idle connection. Under this layer tungstenite gets a small
/// buffer (see [`Config::websocket_config`]), and the layer reads up to
/// [`Config::read_buffer_size`] bytes per system call into a stack buffer,
/// handing tungstenite what it asks for; only bytes tungstenite has not yet
/// asked for are kept on the heap, and that allocation is freed as soon as it
/// is drained. An idle connection therefore holds no read buffer here.
///
/// Use it together with [`Config::websocket_config`]: the example there
/// builds a stream exactly as the supervisor does.
#[derive(Debug)]
pub struct ReadLayer<S> {
    io: S,
    /// Bytes read but not yet handed out, from `pos`.
    spill: Vec<u8>,
    pos: usize,
    /// Bytes per read system call (at most [`CHUNK`]).
    chunk: usize,
    /// Bytes the socket has accepted from us, since the start: the
    /// driver's measure of write progress.
    written: u64,
}

impl<S> ReadLayer<S> {
    /// Wraps `io`, reading [`Config::read_buffer_size`] bytes per system call.
    pub fn new(io: S, config: &Config) -> Self {
        Self::with_chunk(io, config.read_buffer_size())
    }

    /// Wraps `io`, reading up to `chunk` bytes per system call.
    pub(crate) fn with_chunk(io: S, chunk: usize) -> Self {
        Self::with_prefix(io, chunk, Vec::new())
    }

    /// Wraps `io` whose first bytes, `prefix`, were already read from it
    /// (what followed an HTTP request in the same read).
    pub(crate) fn with_prefix(io: S, chunk: usize, prefix: Vec<u8>) -> Self {
        Self {
            io,
            spill: prefix,
            pos: 0,
            chunk: chunk.clamp(1, CHUNK),
            written: 0,
        }
    }

    /// Bytes the socket has accepted from us so far (always `Some`: the
    /// driver's write-progress probe for streams it built, see `Progress`).
    pub(crate) fn bytes_written(&self) -> Option<u64> {
        Some(self.written)
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The wrapped stream, mutably. Reading from it directly would skip
    /// bytes this layer already holds.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }
}

/// Stack buffer for chunks up to the default `read_buffer_size`.
const SMALL_CHUNK: usize = 4 * 1024;

impl<S: AsyncRead + Unpin> ReadLayer<S> {
    // Separate frames, so the common path does not reserve 64 KiB of stack.
    #[inline(never)]
    fn read_small(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut stack = [MaybeUninit::<u8>::uninit(); SMALL_CHUNK];
        self.read_via(cx, out, &mut stack)
    }

    #[inline(never)]
    fn read_large(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut stack = [MaybeUninit::<u8>::uninit(); CHUNK];
        self.read_via(cx, out, &mut stack)
    }

    /// One read system call into `stack`, handing `out` what fits and
    /// keeping the rest.
    fn read_via(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
        stack: &mut [MaybeUninit<u8>],
    ) -> Poll<io::Result<()>> {
        let mut buf = ReadBuf::uninit(&mut stack[..self.chunk]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        let filled = buf.filled();
        let n = out.remaining().min(filled.len());
        out.put_slice(&filled[..n]);
        if n < filled.len() {
            self.spill.extend_from_slice(&filled[n..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadLayer<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.spill.len() {
            let n = out.remaining().min(this.spill.len() - this.pos);
            out.put_slice(&this.spill[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.spill.len() {
                // Drained: give the memory back.
                this.spill = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if out.remaining() >= this.chunk {
            // Big enough: read straight into the caller's buffer.
            return Pin::new(&mut this.io).poll_read(cx, out);
        }
        // Small chunks (the default) get a small stack frame: a 64 KiB one
        // costs a stack probe per page on every read.
        if this.chunk <= SMALL_CHUNK {
            this.read_small(cx, out)
        } else {
            this.read_large(cx, out)
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadLayer<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
        self.written += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, bufs))?;
        self.written += n as u64;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_are_served_from_one_chunk_then_the_spill_is_freed() {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut t = ReadLayer::with_chunk(rx, 4096);
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        tx.write_all(&data).await.unwrap();
        let mut got = vec![0u8; 100];
        t.read_exact(&mut got).await.unwrap();
        assert_eq!(got, data[..100]);
        assert_eq!(t.spill.len(), 2900, "the rest of the chunk is kept");
        let mut rest = vec![0u8; 2900];
        t.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, data[100..]);
        assert_eq!(t.spill.capacity(), 0, "drained: the memory is released");
    }

    #[tokio::test]
    async fn large_reads_go_straight_through() {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut t = ReadLayer::with_chunk(rx, 1024);
        tx.write_all(&[7u8; 5000]).await.unwrap();
        drop(tx);
        let mut all = Vec::new();
        t.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, vec![7u8; 5000]);
        assert_eq!(t.spill.capacity(), 0);
    }
}
