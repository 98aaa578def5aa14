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
    /// Follows the inbound frames to keep the raw payload of a Close.
    sniffer: CloseSniffer,
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
            sniffer: CloseSniffer::frames(),
        }
    }

    /// Wraps `io` for a client: the server's HTTP response passes through
    /// this layer before the frames do.
    pub(crate) fn for_client(io: S, chunk: usize) -> Self {
        Self {
            sniffer: CloseSniffer::after_http_head(),
            ..Self::with_chunk(io, chunk)
        }
    }

    /// The raw code and text of the last Close frame the peer sent, as it
    /// was on the wire (tungstenite replaces a code it does not allow).
    pub(crate) fn last_close(&self) -> Option<RawClose> {
        self.sniffer.last.clone()
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
        let before = out.filled().len();
        let result = self.as_mut().read_to(cx, out);
        if result.is_ready() {
            self.sniffer.feed(&out.filled()[before..]);
        }
        result
    }
}

impl<S: AsyncRead + Unpin> ReadLayer<S> {
    /// Hands `out` the next bytes: the spill first, then one read.
    fn read_to(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
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

// ===== impl CloseSniffer =====

/// A Close frame's payload as the peer sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawClose {
    /// The status code (`None`: an empty Close).
    pub(crate) code: Option<u16>,
    /// The reason bytes (at most 123).
    pub(crate) text: Vec<u8>,
}

/// Follows the frame boundaries of the inbound byte stream, to keep the raw
/// payload of the last Close frame: tungstenite replaces a close code it
/// does not allow with its own 1002 before anyone sees it, and the close
/// event must say what the peer actually sent. It looks only at headers and
/// at Close payloads (at most 125 bytes); data payloads are skipped by
/// length.
#[derive(Debug)]
struct CloseSniffer {
    state: Sniff,
    last: Option<RawClose>,
}

#[derive(Debug)]
enum Sniff {
    /// A client's layer: the server's HTTP response head still passes;
    /// `matched` bytes of the blank line that ends it were seen.
    HttpHead { matched: u8 },
    /// The first `have` bytes of a frame header.
    Header { buf: [u8; 14], have: u8 },
    /// The rest of a frame's payload; a Close's is captured.
    Payload {
        remaining: u64,
        close: Option<Capture>,
    },
}

/// A Close payload being captured.
#[derive(Debug)]
struct Capture {
    mask: Option<[u8; 4]>,
    bytes: Vec<u8>,
}

/// Largest control-frame payload (RFC 6455 §5.5).
const MAX_CONTROL: usize = 125;

impl CloseSniffer {
    fn frames() -> Self {
        Self {
            state: Sniff::Header {
                buf: [0; 14],
                have: 0,
            },
            last: None,
        }
    }

    fn after_http_head() -> Self {
        Self {
            state: Sniff::HttpHead { matched: 0 },
            last: None,
        }
    }

    /// Follows `bytes`, the next bytes of the stream.
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.state {
                Sniff::HttpHead { matched } => {
                    let byte = bytes[0];
                    bytes = &bytes[1..];
                    let expected = b"\r\n\r\n"[usize::from(*matched)];
                    *matched = if byte == expected {
                        *matched + 1
                    } else {
                        u8::from(byte == b'\r')
                    };
                    if *matched == 4 {
                        self.state = Sniff::Header {
                            buf: [0; 14],
                            have: 0,
                        };
                    }
                }
                Sniff::Header { buf, have } => {
                    buf[usize::from(*have)] = bytes[0];
                    bytes = &bytes[1..];
                    *have += 1;
                    if let Some(next) = header_done(buf, *have) {
                        self.state = next;
                        self.finish_if_empty();
                    }
                }
                Sniff::Payload { remaining, close } => {
                    let n = bytes
                        .len()
                        .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                    if let Some(capture) = close {
                        for &byte in &bytes[..n] {
                            if capture.bytes.len() < MAX_CONTROL {
                                let i = capture.bytes.len();
                                let key = capture.mask.map_or(0, |m| m[i % 4]);
                                capture.bytes.push(byte ^ key);
                            }
                        }
                    }
                    bytes = &bytes[n..];
                    *remaining -= n as u64;
                    self.finish_if_empty();
                }
            }
        }
    }

    /// Ends the current frame if its payload is complete.
    fn finish_if_empty(&mut self) {
        let Sniff::Payload {
            remaining: 0,
            close,
        } = &mut self.state
        else {
            return;
        };
        if let Some(capture) = close.take() {
            let bytes = capture.bytes;
            self.last = Some(match bytes.len() {
                0 | 1 => RawClose {
                    code: None,
                    text: Vec::new(),
                },
                _ => RawClose {
                    code: Some(u16::from_be_bytes([bytes[0], bytes[1]])),
                    text: bytes[2..].to_vec(),
                },
            });
        }
        self.state = Sniff::Header {
            buf: [0; 14],
            have: 0,
        };
    }
}

/// The payload state once `have` header bytes in `buf` make a whole header.
fn header_done(buf: &[u8; 14], have: u8) -> Option<Sniff> {
    if have < 2 {
        return None;
    }
    let masked = buf[1] & 0x80 != 0;
    let (ext, len7) = match buf[1] & 0x7f {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(u64::from(n))),
    };
    let need = 2 + ext + if masked { 4 } else { 0 };
    if usize::from(have) < need {
        return None;
    }
    let len = len7.unwrap_or_else(|| {
        buf[2..2 + ext]
            .iter()
            .fold(0u64, |n, &b| (n << 8) | u64::from(b))
    });
    let mask = masked.then(|| {
        let at = 2 + ext;
        [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]
    });
    let close = (buf[0] & 0x0f == 0x8).then(|| Capture {
        mask,
        bytes: Vec::new(),
    });
    Some(Sniff::Payload {
        remaining: len,
        close,
    })
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

    fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(m | n as u8),
            n if n < 65536 => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(k) => {
                out.extend_from_slice(&k);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => out.extend_from_slice(payload),
        }
        out
    }

    #[test]
    fn the_sniffer_keeps_the_raw_close_behind_data_of_every_length() {
        for mask in [None, Some([1, 2, 3, 4])] {
            let mut stream = Vec::new();
            for len in [0usize, 5, 125, 126, 300, 70_000] {
                stream.extend(frame(0x2, &vec![0xAA; len], mask));
            }
            let mut close = 1014u16.to_be_bytes().to_vec();
            close.extend_from_slice(b"bad gateway");
            stream.extend(frame(0x8, &close, mask));
            // Fed in every chunking from 1 byte up.
            for step in [1, 2, 3, 7, 64, 4096, stream.len()] {
                let mut s = CloseSniffer::frames();
                for chunk in stream.chunks(step) {
                    s.feed(chunk);
                }
                let last = s.last.clone().expect("the close");
                assert_eq!(last.code, Some(1014), "step {step} mask {mask:?}");
                assert_eq!(last.text, b"bad gateway");
            }
        }
    }

    #[test]
    fn a_client_sniffer_skips_the_http_response_first() {
        let mut stream = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n".to_vec();
        stream.extend(frame(0x8, &999u16.to_be_bytes(), None));
        let mut s = CloseSniffer::after_http_head();
        for chunk in stream.chunks(3) {
            s.feed(chunk);
        }
        assert_eq!(s.last.map(|c| c.code), Some(Some(999)));
        let mut s = CloseSniffer::frames();
        s.feed(&frame(0x8, &[], None));
        assert_eq!(
            s.last,
            Some(RawClose {
                code: None,
                text: Vec::new()
            })
        );
    }
}
