//! A read buffer that exists only while there is unparsed data. See [`ReadLayer`].

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::bytes::BufMut;

use crate::config::Config;
use crate::taken::{Head, Taking};

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
/// handing tungstenite what it asks for; only bytes not yet handed out are
/// kept on the heap. Within a frame longer than tungstenite's
/// next request (a large message), the layer reads into that heap buffer
/// directly, so the payload is not copied twice; the next read outside
/// such a frame gives the memory back. The driver reads once more after
/// every message unless the socket gave that message whole with nothing
/// behind it, so an idle connection holds no read buffer here.
///
/// On the streams the supervisor builds, its driver also reads the peer's
/// plain data messages (a final text or binary frame within the size
/// limits, whose header came whole in one read) through this layer
/// without tungstenite, into the message's own memory (a large payload
/// straight from the socket, up to 64 KiB per system call). Every other
/// frame, and
/// every frame on a stream given to
/// [`Supervisor::supervise`](crate::Supervisor::supervise), goes through
/// tungstenite. On the streams the supervisor builds for a server, its
/// driver's ping frames skip tungstenite the other way: the driver queues
/// each in this layer, which writes it ahead of anything tungstenite
/// writes next.
///
/// Use it together with [`Config::websocket_config`]: the example there
/// builds a stream exactly as the supervisor does.
#[derive(Debug)]
pub struct ReadLayer<S> {
    io: S,
    /// Bytes read but not yet handed out: `spill[pos..end]`. Within a
    /// large frame, its memory (all of it initialized) is kept between
    /// reads, so `end` may be below its length.
    spill: Vec<u8>,
    pos: u32,
    end: u32,
    /// The spill's unread bytes are the rest of a read that was short (the
    /// socket gave fewer bytes than asked): handing out the last of them
    /// ends what the socket had, as a short read of its own would.
    spill_short: bool,
    /// Bytes per read system call (at most [`CHUNK`]), outside a payload
    /// taken past tungstenite.
    chunk: usize,
    /// Bytes the socket has accepted from us, since the start: the
    /// driver's measure of write progress.
    written: u64,
    /// Follows the inbound frames to keep the raw payload of a Close.
    sniffer: CloseSniffer,
    /// A pong with an 8-byte payload (the size of the supervisor's pings)
    /// taken out of the stream before tungstenite saw it, for the driver
    /// (see [`take_pong`](Self::take_pong)).
    pong: Option<[u8; 8]>,
    /// The end of the stream or an error the driver's read met, for
    /// tungstenite's next read.
    stashed: Option<Stashed>,
    /// A ping frame the driver queued past tungstenite (see
    /// [`queue_ping`](Self::queue_ping)), and how much of it the socket
    /// took: the rest goes out before any byte tungstenite writes.
    ping: [u8; PING_FRAME],
    ping_sent: u8,
    /// A data frame being taken, while its payload arrives.
    taking: Option<Box<Taking>>,
    /// Longest payload this layer takes (tungstenite's frame and message
    /// limits); longer frames go to tungstenite, which refuses them.
    max_len: usize,
    /// The next frame goes to tungstenite: it was taken and given back.
    give_back: bool,
    /// Whether the peer's frames are masked (we are the server).
    peer_masks: bool,
    /// A driver that asks for them takes the pongs, the data messages and
    /// the `parked` answers (see [`drive`](Self::drive)); on a stream given
    /// to `supervise`, nobody does, and every frame goes to tungstenite.
    driven: bool,
    /// The last read handed tungstenite exactly one whole frame, or
    /// completed a frame taken for the driver, from a short socket read,
    /// keeping nothing back: once the driver has its message, every byte
    /// the socket gave is consumed (see [`parked`](Self::parked)).
    whole: bool,
}

impl<S> ReadLayer<S> {
    /// Wraps `io`, reading [`Config::read_buffer_size`] bytes per system
    /// call (outside large messages, see above).
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
        // What followed a request in one read of at most `CHUNK` bytes.
        let end = u32::try_from(prefix.len()).expect("a prefix of at most one read");
        Self {
            io,
            spill: prefix,
            pos: 0,
            end,
            spill_short: false,
            chunk: chunk.clamp(1, CHUNK),
            written: 0,
            sniffer: CloseSniffer::frames(),
            pong: None,
            stashed: None,
            ping: [0; PING_FRAME],
            ping_sent: PING_FRAME as u8,
            taking: None,
            max_len: 0,
            give_back: false,
            peer_masks: true,
            driven: false,
            whole: false,
        }
    }

    /// Wraps `io` for a client: the server's HTTP response passes through
    /// this layer before the frames do.
    pub(crate) fn for_client(io: S, chunk: usize) -> Self {
        Self {
            sniffer: CloseSniffer::after_http_head(),
            peer_masks: false,
            ..Self::with_chunk(io, chunk)
        }
    }

    /// The raw code and text of the last Close frame the peer sent, as it
    /// was on the wire (tungstenite replaces a code it does not allow).
    pub(crate) fn last_close(&self) -> Option<RawClose> {
        self.sniffer.last.clone()
    }

    /// The driver will take pongs ([`take_pong`](Self::take_pong)) and
    /// data messages of at most `max_len` bytes (and at most
    /// [`MAX_TAKEN`]) ([`poll_take`](Self::poll_take)) and ask
    /// [`parked`](Self::parked): from here on this layer takes them out of
    /// the stream.
    pub(crate) fn drive(&mut self, max_len: usize) {
        // A client's sniffer that has not seen the end of the HTTP head by
        // now has lost the frame boundaries: take nothing, trust nothing.
        self.driven = self.sniffer.in_frames();
        self.max_len = max_len.min(MAX_TAKEN);
    }

    /// Whether the socket is now registered for its next bytes and every
    /// byte it gave so far is consumed once the driver has the message of
    /// the last read (from tungstenite or taken past it): the driver then
    /// need not read again to find nothing. Only a plain `TcpStream` is asked (its readiness can be
    /// polled without a read); takes the mark, so it answers once per read.
    pub(crate) fn parked(&mut self, cx: &mut Context<'_>) -> bool
    where
        S: 'static,
    {
        if !std::mem::take(&mut self.whole) || !self.driven {
            return false;
        }
        let io: &mut dyn std::any::Any = &mut self.io;
        let Some(tcp) = io.downcast_mut::<tokio::net::TcpStream>() else {
            return false;
        };
        // Readiness was cleared by the short read: this registers `cx`
        // without a system call. (A `Pending` for tokio's cooperative budget
        // registers nothing, and is not parked.)
        tcp.poll_read_ready(cx).is_pending() && tokio::task::coop::has_budget_remaining()
    }

    /// The pong this layer took out of the stream, if any (see
    /// [`poll_take`](Self::poll_take)).
    pub(crate) fn take_pong(&mut self) -> Option<[u8; 8]> {
        self.pong.take()
    }

    /// For the driver: queues a ping frame carrying `payload`, written
    /// ahead of any byte tungstenite writes next (on its next write or
    /// flush through this layer), with no pass through tungstenite and no
    /// allocation. `false` when this layer cannot: a client's frames need
    /// a mask (tungstenite draws those), a stream given to `supervise` is
    /// not driven, and an earlier ping may still be on its way; the
    /// caller then sends the ping through tungstenite.
    ///
    /// The caller must know that tungstenite holds no byte it has not
    /// written, or the ping would land inside one of its frames: the driver
    /// pings only once everything was flushed (a peer's ping, whose pong
    /// tungstenite then owes, counts as unflushed until that pong is out).
    pub(crate) fn queue_ping(&mut self, payload: [u8; 8]) -> bool {
        if !self.driven || !self.peer_masks || usize::from(self.ping_sent) < PING_FRAME {
            return false;
        }
        // FIN and opcode 9, unmasked, an 8-byte payload (RFC 6455 §5.2).
        self.ping[..2].copy_from_slice(&[0x89, 8]);
        self.ping[2..].copy_from_slice(&payload);
        self.ping_sent = 0;
        true
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

/// A ping frame from a server: a 2-byte header and the 8-byte nonce.
const PING_FRAME: usize = 10;

/// Longest payload the driver's own reads take (a larger frame, where the
/// limits allow one, goes to tungstenite): the spill's `u32` offsets must
/// hold a frame given back.
const MAX_TAKEN: usize = 1 << 30;

/// The longest data message a driver may take past tungstenite under
/// `config`: none that tungstenite would refuse as too long (its frame and
/// message limits).
pub(crate) fn taken_limit(config: &WebSocketConfig) -> usize {
    [config.max_frame_size, config.max_message_size]
        .into_iter()
        .flatten()
        .fold(usize::MAX, usize::min)
}

/// Stack buffer for chunks up to the default `read_buffer_size`.
const SMALL_CHUNK: usize = 4 * 1024;

impl<S: AsyncRead + Unpin> ReadLayer<S> {
    // Separate frames, so the common path does not reserve 64 KiB of stack.
    #[inline(never)]
    fn read_small(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<bool>> {
        let mut stack = [MaybeUninit::<u8>::uninit(); SMALL_CHUNK];
        self.read_via(cx, out, &mut stack)
    }

    #[inline(never)]
    fn read_large(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<bool>> {
        let mut stack = [MaybeUninit::<u8>::uninit(); CHUNK];
        self.read_via(cx, out, &mut stack)
    }

    /// One read system call into `stack`, handing `out` what fits and
    /// keeping the rest; `true` if the socket gave fewer bytes than asked.
    fn read_via(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
        stack: &mut [MaybeUninit<u8>],
    ) -> Poll<io::Result<bool>> {
        let mut buf = ReadBuf::uninit(&mut stack[..self.chunk]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        let filled = buf.filled();
        let n = out.remaining().min(filled.len());
        out.put_slice(&filled[..n]);
        if n < filled.len() {
            // A full chunk is likely part of a large frame, which reuses
            // the memory (`read_to`): room for a whole chunk then.
            let full = filled.len() == self.chunk;
            let mut spill = Vec::with_capacity(if full { self.chunk } else { filled.len() - n });
            spill.extend_from_slice(&filled[n..]);
            self.keep(spill, filled.len() < self.chunk);
        }
        Poll::Ready(Ok(filled.len() < self.chunk))
    }

    /// Keeps `spill` (all of it unread) for the next reads: the rest of a
    /// read that was `short` or not.
    fn keep(&mut self, spill: Vec<u8>, short: bool) {
        self.pos = 0;
        self.end = spill.len() as u32;
        self.spill = spill;
        self.spill_short = short;
    }

    /// Within a frame that needs more than `asked` bytes: one read into the
    /// spill's own memory (a chunk, zeroed once per frame), handing `out`
    /// what fits; `true` if the socket gave fewer bytes than asked.
    fn read_into_spill(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<bool>> {
        let mut spill = std::mem::take(&mut self.spill);
        spill.resize(self.chunk, 0);
        let mut buf = ReadBuf::new(&mut spill);
        let read = Pin::new(&mut self.io).poll_read(cx, &mut buf);
        let filled = buf.filled().len();
        let n = out.remaining().min(filled);
        out.put_slice(&spill[..n]);
        // The memory stays for the rest of the frame, even on `Pending`.
        self.spill = spill;
        self.pos = n as u32;
        self.end = filled as u32;
        self.spill_short = filled < self.chunk;
        ready!(read)?;
        Poll::Ready(Ok(filled < self.chunk))
    }
}

/// What tungstenite reads: every byte the driver's own reads did not take
/// (pongs and plain data messages, on the streams the supervisor builds),
/// untouched, so tungstenite judges it as before.
///
/// Under a supervisor's driver, each read hands tungstenite at most one
/// frame, and a client's read that ends the server's HTTP response head
/// stops there: tungstenite then never holds a whole frame it has not
/// returned, so the driver's own reads between tungstenite's cannot take a
/// frame ahead of one tungstenite still holds.
impl<S: AsyncRead + Unpin> AsyncRead for ReadLayer<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.whole = false;
        self.read_and_pass(cx, out)
    }
}

impl<S: AsyncRead + Unpin> ReadLayer<S> {
    /// One read, cut after the first frame (see [`pass`](Self::pass));
    /// sets `whole`.
    fn read_and_pass(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = out.filled().len();
        // Where the spill was, if this read is served from it.
        let kept_at = (self.pos < self.end).then_some((self.pos, self.end));
        let short = ready!(self.as_mut().read_to(cx, out))?;
        let read = out.filled().len() - before;
        let from_boundary = self.sniffer.at_boundary();
        let (frames, stop) = self.pass(&out.filled()[before..]);
        if stop < read {
            match kept_at {
                // Still in the spill's memory: step back, copying nothing
                // (a burst of small frames would otherwise copy the rest
                // of the spill once per frame).
                Some((pos, end)) => (self.pos, self.end) = (pos + stop as u32, end),
                None => {
                    let rest = out.filled()[before + stop..].to_vec();
                    self.unread(rest, short);
                }
            }
        }
        out.set_filled(before + stop);
        // Never after the peer's Close: tungstenite then ends the stream on
        // its next read without a byte from the socket.
        self.whole = from_boundary
            && frames == 1
            && self.sniffer.at_boundary()
            && short
            && self.pos == self.end
            && self.sniffer.last.is_none();
        Poll::Ready(Ok(()))
    }

    /// For the driver, before it asks tungstenite: takes the next data
    /// message straight from the stream, if the next frame is one that
    /// qualifies ([`Head::parse`]: final, text or binary, no reserved bits,
    /// masked as required, within the size limits) and no fragmented
    /// message is open; takes whole 8-byte pongs on the way (see
    /// [`take_pong`](Self::take_pong)).
    ///
    /// The payload is read straight into the message's own memory (a large
    /// one with no copy through tungstenite's 256-byte reads), unmasked,
    /// and checked as UTF-8 if it is text. `Pending` once the socket has
    /// nothing more (registered for its next bytes, unless tokio's
    /// cooperative budget ran out, which wakes the task); [`Taken::Pass`] when
    /// the next frame is tungstenite's, or the stream's end or an error is:
    /// those are kept for tungstenite's next read, so it judges them as
    /// before. Text that is not UTF-8, or a frame cut off by the end of the
    /// stream, is given back to tungstenite byte for byte.
    pub(crate) fn poll_take(&mut self, cx: &mut Context<'_>) -> Poll<Taken> {
        self.whole = false;
        if !self.takes_frames() {
            return Poll::Ready(Taken::Pass);
        }
        // Each turn that goes on took everything it read (pongs: once, as
        // the slot is then full), and the next read of a socket that gave
        // fewer bytes than asked is `Pending` without a system call.
        for _ in 0..3 {
            if self.taking.is_none() {
                let (short, message) = if self.pos < self.end {
                    // What an earlier read kept, first.
                    let spill = std::mem::take(&mut self.spill);
                    let (pos, end) = (self.pos as usize, self.end as usize);
                    let (used, message) = self.take_from(&spill[pos..end]);
                    self.spill = spill;
                    self.pos += used as u32;
                    if self.pos == self.end {
                        self.forget_spill();
                    }
                    (self.spill_short, message)
                } else if self.stashed.is_some() {
                    return Poll::Ready(Taken::Pass);
                } else {
                    // Nothing kept: an idle connection holds no memory here.
                    self.forget_spill();
                    if self.chunk <= SMALL_CHUNK {
                        ready!(self.take_small(cx))
                    } else {
                        ready!(self.take_large(cx))
                    }
                };
                if let Some(message) = message {
                    self.whole = short && self.pos == self.end;
                    return Poll::Ready(Taken::Message(message));
                }
            }
            if self.taking.is_some() {
                return match ready!(self.poll_taking(cx)) {
                    Some(message) => Poll::Ready(Taken::Message(message)),
                    None => Poll::Ready(Taken::Pass),
                };
            }
            if self.pos < self.end {
                // A frame that is not ours is next.
                return Poll::Ready(Taken::Pass);
            }
        }
        Poll::Ready(Taken::Pass)
    }

    // Separate frames, so the common path does not reserve 64 KiB of stack.
    #[inline(never)]
    fn take_small(&mut self, cx: &mut Context<'_>) -> Poll<(bool, Option<Message>)> {
        let mut stack = [MaybeUninit::<u8>::uninit(); SMALL_CHUNK];
        self.take_via(cx, &mut stack)
    }

    #[inline(never)]
    fn take_large(&mut self, cx: &mut Context<'_>) -> Poll<(bool, Option<Message>)> {
        let mut stack = [MaybeUninit::<u8>::uninit(); CHUNK];
        self.take_via(cx, &mut stack)
    }

    /// One read of the socket into `stack`, taking what may be taken and
    /// keeping the rest: whether the socket gave fewer bytes than asked,
    /// and the message taken whole, if any. The end of the stream or an
    /// error is kept for tungstenite.
    fn take_via(
        &mut self,
        cx: &mut Context<'_>,
        stack: &mut [MaybeUninit<u8>],
    ) -> Poll<(bool, Option<Message>)> {
        let mut buf = ReadBuf::uninit(&mut stack[..self.chunk]);
        match ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf)) {
            Ok(()) if buf.filled().is_empty() => self.stashed = Some(Stashed::End),
            Ok(()) => {
                let filled = buf.filled();
                let (used, message) = self.take_from(filled);
                if used < filled.len() {
                    self.keep(filled[used..].to_vec(), filled.len() < self.chunk);
                }
                return Poll::Ready((filled.len() < self.chunk, message));
            }
            Err(e) => self.stashed = Some(Stashed::Error(e)),
        }
        Poll::Ready((false, None))
    }

    /// Reads the rest of the frame being taken straight into its payload,
    /// from the socket. `Some` once the message is whole;
    /// `None` if the frame was given back to tungstenite.
    fn poll_taking(&mut self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let taking = self.taking.as_mut().expect("a frame being taken");
        // A frame is taken from what one read or the spill held up to its
        // end, and nothing reads the stream but this until it is whole.
        debug_assert!(self.pos == self.end, "bytes behind a frame being taken");
        let mut short = false;
        while taking.left() > 0 {
            // At most `CHUNK` per read: a stream that zero-fills the space
            // it is given (some TLS layers do) must not zero the rest of a
            // large payload on every read.
            let room = taking.payload.capacity() - taking.payload.len();
            let asked = room.min(CHUNK);
            let read = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.io),
                cx,
                &mut (&mut taking.payload).limit(asked)
            ));
            match read {
                Ok(n) if n > 0 => short = n < asked,
                // The stream ended or failed within the frame: tungstenite
                // reads the frame again, then the end or the error, and
                // says what that means.
                end => {
                    self.stashed = Some(match end {
                        Err(e) => Stashed::Error(e),
                        Ok(_) => Stashed::End,
                    });
                    let frame = self.taking.take().expect("a frame being taken");
                    // Its end follows it: no read ends with these bytes.
                    self.unread(frame.give_back(), false);
                    self.give_back = true;
                    return Poll::Ready(None);
                }
            }
        }
        let mut taking = self.taking.take().expect("a frame being taken");
        let behind = taking.payload.split_off(taking.head.len);
        self.unread(behind, short);
        match taking.finish() {
            Ok(message) => {
                self.whole = short && self.pos == self.end;
                Poll::Ready(Some(message))
            }
            Err(wire) => {
                self.unread(wire, short);
                self.give_back = true;
                Poll::Ready(None)
            }
        }
    }

    /// Puts `front` back before the unread bytes of the spill (in
    /// `front`'s memory): what the last read, `short` or not, gave past
    /// what was used, unless the spill already holds bytes behind it.
    fn unread(&mut self, mut front: Vec<u8>, short: bool) {
        if front.is_empty() {
            return;
        }
        let short = if self.pos < self.end {
            front.extend_from_slice(&self.spill[self.pos as usize..self.end as usize]);
            self.spill_short
        } else {
            short
        };
        self.keep(front, short);
    }

    /// The spill is empty: its memory goes back.
    fn forget_spill(&mut self) {
        (self.pos, self.end) = (0, 0);
        self.spill = Vec::new();
    }
}

/// What [`ReadLayer::poll_take`] found.
#[derive(Debug)]
pub(crate) enum Taken {
    /// A data message, read past tungstenite.
    Message(Message),
    /// The next frame (or the end, or an error) is tungstenite's.
    Pass,
}

/// The end of the stream or a read error met by the driver's own read,
/// kept for tungstenite's next read.
#[derive(Debug)]
enum Stashed {
    End,
    Error(io::Error),
}

impl<S> ReadLayer<S> {
    /// Whether the driver may read past tungstenite now: at a frame
    /// boundary (tungstenite then holds no byte), before the peer's Close,
    /// outside a fragmented message (its next data frame must be refused by
    /// tungstenite), and not right after giving a frame back.
    fn takes_frames(&self) -> bool {
        self.driven
            && self.sniffer.at_boundary()
            && self.sniffer.last.is_none()
            && !self.sniffer.fragmented
            && !self.give_back
    }

    /// Takes from the start of `bytes` (just read, or kept) a pong (if the
    /// slot is free) and the data frame the driver may take, up to the first frame that is
    /// tungstenite's; a data frame ends it (taken whole, or what of it is
    /// here starts `taking`). Returns how many bytes it took, and the
    /// message if it took one whole.
    fn take_from(&mut self, bytes: &[u8]) -> (usize, Option<Message>) {
        let mut at = 0;
        while at < bytes.len() {
            if self.pong.is_none() {
                if let Some((len, payload)) = whole_pong(&bytes[at..], self.peer_masks) {
                    self.pong = Some(payload);
                    at += len;
                    continue;
                }
            }
            let Some(head) = Head::parse(&bytes[at..], self.peer_masks, self.max_len) else {
                break;
            };
            let start = at + head.header;
            let end = start + head.len.min(bytes.len() - start);
            let taking = Taking::new(head, &bytes[start..end]);
            if taking.left() > 0 {
                self.taking = Some(Box::new(taking));
                return (end, None);
            }
            return match taking.finish() {
                Ok(message) => (end, Some(message)),
                // Not UTF-8: tungstenite refuses it, from here.
                Err(_) => {
                    self.give_back = true;
                    (at, None)
                }
            };
        }
        (at, None)
    }

    /// Follows `bytes`, just read, frame by frame, for tungstenite.
    /// Returns in how many frames (or parts of frames), and where it
    /// stopped: for a driver, after the first frame, and for a client, at
    /// the end of the HTTP head (the bytes from there go back to the
    /// spill).
    fn pass(&mut self, bytes: &[u8]) -> (usize, usize) {
        let (mut at, mut frames) = (0, 0);
        while at < bytes.len() {
            if self.driven && frames == 1 && self.sniffer.at_boundary() {
                break;
            }
            if self.sniffer.at_boundary() {
                // A frame given back is tungstenite's from here.
                self.give_back = false;
            }
            let in_head = !self.sniffer.in_frames();
            at += self.sniffer.feed_frame(&bytes[at..]);
            frames += 1;
            if in_head && self.sniffer.in_frames() {
                // A client's HTTP head: tungstenite's handshake keeps what
                // it reads behind the head for its first frames, where a
                // driver's own reads could not see them. So the frames
                // stay here.
                break;
            }
        }
        (frames, at)
    }
}

/// The length and unmasked payload of the pong at the start of `bytes`, if
/// it is whole, final, without reserved bits, masked exactly when
/// `masked`, and 8 bytes long.
fn whole_pong(bytes: &[u8], masked: bool) -> Option<(usize, [u8; 8])> {
    const FIN_PONG: u8 = 0x8A;
    let (&first, &second) = (bytes.first()?, bytes.get(1)?);
    if first != FIN_PONG || second != (u8::from(masked) << 7 | 8) {
        return None;
    }
    let start = if masked { 6 } else { 2 };
    let mut payload: [u8; 8] = bytes.get(start..start + 8)?.try_into().ok()?;
    if masked {
        crate::taken::unmask(&mut payload, [bytes[2], bytes[3], bytes[4], bytes[5]]);
    }
    Some((start + 8, payload))
}

impl<S: AsyncRead + Unpin> ReadLayer<S> {
    /// Hands `out` the next bytes: the spill first, then one read; `true`
    /// if that was a socket read that gave fewer bytes than asked (so tokio
    /// cleared the socket's readiness).
    fn read_to(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<bool>> {
        let this = self.get_mut();
        if this.pos < this.end {
            let (pos, end) = (this.pos as usize, this.end as usize);
            let n = out.remaining().min(end - pos);
            out.put_slice(&this.spill[pos..pos + n]);
            this.pos += n as u32;
            if this.pos < this.end {
                return Poll::Ready(Ok(false));
            }
            (this.pos, this.end) = (0, 0);
            return Poll::Ready(Ok(this.spill_short));
        }
        match this.stashed.take() {
            Some(Stashed::End) => return Poll::Ready(Ok(true)),
            Some(Stashed::Error(e)) => return Poll::Ready(Err(e)),
            None => {}
        }
        // A frame that needs more than tungstenite asks for: read it into
        // the spill's memory, kept while the frame lasts.
        let asked = out.remaining();
        if asked < this.chunk && this.sniffer.payload_left() > asked as u64 {
            return this.read_into_spill(cx, out);
        }
        // Otherwise the spill's memory goes back: an idle connection (or
        // one of small messages) holds none.
        if this.spill.capacity() > 0 {
            this.forget_spill();
        }
        if out.remaining() >= this.chunk {
            // Big enough: read straight into the caller's buffer.
            ready!(Pin::new(&mut this.io).poll_read(cx, out))?;
            return Poll::Ready(Ok(out.remaining() > 0));
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

impl<S: AsyncWrite + Unpin> ReadLayer<S> {
    /// Writes what is left of the ping frame the driver queued, if any.
    fn poll_ping(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while usize::from(self.ping_sent) < PING_FRAME {
            let rest = &self.ping[usize::from(self.ping_sent)..];
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.ping_sent += n as u8;
            self.written += n as u64;
        }
        Poll::Ready(Ok(()))
    }
}

/// Writes pass straight to the stream, after the rest of a ping frame a
/// supervisor's driver queued in this layer (a server's pings skip
/// tungstenite); they are counted for the driver's write-progress probe.
impl<S: AsyncWrite + Unpin> AsyncWrite for ReadLayer<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_ping(cx))?;
        let n = ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
        self.written += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_ping(cx))?;
        let n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, bufs))?;
        self.written += n as u64;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_ping(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_ping(cx))?;
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
    /// A fragmented data message is open: a text or binary frame that is
    /// not final was the last of its kind, and no final continuation came
    /// since.
    fragmented: bool,
}

#[derive(Debug)]
enum Sniff {
    /// A client's layer: the server's HTTP response head still passes;
    /// `matched` line feeds in a row were seen (CRs skipped): 2 end it.
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
            fragmented: false,
        }
    }

    fn after_http_head() -> Self {
        Self {
            state: Sniff::HttpHead { matched: 0 },
            last: None,
            fragmented: false,
        }
    }

    /// Whether the HTTP head (of a client's stream) is behind us.
    fn in_frames(&self) -> bool {
        !matches!(self.state, Sniff::HttpHead { .. })
    }

    /// Payload bytes of the current frame not yet seen (0 at a boundary,
    /// in a header, or before the frames).
    fn payload_left(&self) -> u64 {
        match self.state {
            Sniff::Payload { remaining, .. } => remaining,
            _ => 0,
        }
    }

    /// Whether the next byte starts a frame.
    fn at_boundary(&self) -> bool {
        matches!(self.state, Sniff::Header { have: 0, .. })
    }

    /// Follows `bytes`, the next bytes of the stream.
    #[cfg(test)]
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = self.feed_frame(bytes);
            bytes = &bytes[n..];
        }
    }

    /// Follows the start of `bytes` up to the end of the current frame (or
    /// of the HTTP head); returns how many bytes that took (all of them if
    /// the frame goes on).
    fn feed_frame(&mut self, all: &[u8]) -> usize {
        let mut bytes = all;
        if matches!(self.state, Sniff::Header { have: 0, .. }) {
            // The common case: the whole header at once.
            if let Some(header) = Header::parse(bytes) {
                bytes = &bytes[header.size..];
                self.state = header.payload_state();
                self.follow_fragments(header.first);
                if self.finish_if_empty() {
                    return header.size;
                }
            }
        }
        while !bytes.is_empty() {
            match &mut self.state {
                Sniff::HttpHead { matched } => {
                    // The head ends at an empty line; as for httparse, a
                    // line may end with LF alone, so CRs are skipped.
                    let byte = bytes[0];
                    bytes = &bytes[1..];
                    *matched = match byte {
                        b'\n' => *matched + 1,
                        b'\r' => *matched,
                        _ => 0,
                    };
                    if *matched == 2 {
                        self.state = Sniff::Header {
                            buf: [0; 14],
                            have: 0,
                        };
                        break;
                    }
                }
                Sniff::Header { buf, have } => {
                    buf[usize::from(*have)] = bytes[0];
                    bytes = &bytes[1..];
                    *have += 1;
                    if let Some(header) = Header::parse(&buf[..usize::from(*have)]) {
                        self.state = header.payload_state();
                        self.follow_fragments(header.first);
                        if self.finish_if_empty() {
                            break;
                        }
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
                    if self.finish_if_empty() {
                        break;
                    }
                }
            }
        }
        all.len() - bytes.len()
    }

    /// Follows fragmented messages by the first header byte of each frame:
    /// a text or binary frame that is not final opens one, a final one or
    /// a final continuation ends it (control frames may come between; a
    /// final data frame within a fragmented message is tungstenite's to
    /// refuse).
    fn follow_fragments(&mut self, first: u8) {
        let fin = first & 0x80 != 0;
        match first & 0x0f {
            0x1 | 0x2 => self.fragmented = !fin,
            0x0 if fin => self.fragmented = false,
            _ => {}
        }
    }

    /// Ends the current frame if its payload is complete; returns whether
    /// it did.
    fn finish_if_empty(&mut self) -> bool {
        let Sniff::Payload {
            remaining: 0,
            close,
        } = &mut self.state
        else {
            return false;
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
        true
    }
}

/// A frame header, as the peer sent it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    /// The first byte: FIN, the reserved bits and the opcode.
    pub(crate) first: u8,
    /// Header bytes (2 to 14).
    pub(crate) size: usize,
    /// Payload bytes.
    pub(crate) len: u64,
    pub(crate) mask: Option<[u8; 4]>,
}

impl Header {
    /// The header at the start of `bytes`, once it is whole there.
    pub(crate) fn parse(bytes: &[u8]) -> Option<Self> {
        let (&first, &second) = (bytes.first()?, bytes.get(1)?);
        let ext = match second & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let masked = second & 0x80 != 0;
        let size = 2 + ext + if masked { 4 } else { 0 };
        let header = bytes.get(..size)?;
        let len = match ext {
            0 => u64::from(second & 0x7f),
            _ => header[2..2 + ext]
                .iter()
                .fold(0, |n, &b| (n << 8) | u64::from(b)),
        };
        let mask = masked.then(|| header[2 + ext..].try_into().expect("4 bytes"));
        Some(Self {
            first,
            size,
            len,
            mask,
        })
    }

    /// The sniffer's state for this frame's payload (a Close's captured).
    fn payload_state(&self) -> Sniff {
        let close = (self.first & 0x0f == 0x8).then(|| Capture {
            mask: self.mask,
            bytes: Vec::new(),
        });
        Sniff::Payload {
            remaining: self.len,
            close,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_are_served_from_one_chunk_then_the_spill_is_freed() {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut t = ReadLayer::with_chunk(rx, 4096);
        // 30 frames of 100 bytes.
        let data: Vec<u8> = (0..30u8).flat_map(|i| frame(0x2, &[i; 98], None)).collect();
        assert_eq!(data.len(), 3000);
        tx.write_all(&data).await.unwrap();
        let mut got = vec![0u8; 100];
        t.read_exact(&mut got).await.unwrap();
        assert_eq!(got, data[..100]);
        assert_eq!(t.end - t.pos, 2900, "the rest of the chunk is kept");
        let mut rest = vec![0u8; 2900];
        t.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, data[100..]);
        // The next read (here finding EOF) gives the memory back.
        drop(tx);
        assert_eq!(t.read(&mut got).await.unwrap(), 0);
        assert_eq!(t.spill.capacity(), 0, "drained: the memory is released");
    }

    #[tokio::test]
    async fn a_large_frame_is_read_into_one_kept_chunk_then_the_memory_goes_back() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut t = ReadLayer::with_chunk(rx, 4096);
        let payload: Vec<u8> = (0..16 * 1024u32).map(|i| (i * 7) as u8).collect();
        let mut data = frame(0x2, &payload, Some([9, 8, 7, 6]));
        data.extend(frame(0x1, b"after", Some([1, 2, 3, 4])));
        tx.write_all(&data).await.unwrap();
        // Read as tungstenite does under this layer: 256 bytes at a time.
        let mut got = Vec::new();
        let (mut capacities, mut lens) = (Vec::new(), Vec::new());
        while got.len() < data.len() {
            let mut buf = [0u8; 256];
            let n = t.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
            capacities.push(t.spill.capacity());
            lens.push(t.spill.len());
        }
        assert_eq!(got, data, "every byte, in order");
        // Within the frame the memory is one chunk: the first read's rest
        // (4096 - 256 bytes), then whole chunks read into it directly.
        assert!(capacities.iter().all(|&c| c <= 4096), "{capacities:?}");
        assert_eq!(lens[0], 4096 - 256);
        assert!(lens[16..60].iter().all(|&l| l == 4096), "{lens:?}");
        // After the frame, the next read gives it back.
        drop(tx);
        assert_eq!(t.read(&mut [0u8; 256]).await.unwrap(), 0);
        assert_eq!(t.spill.capacity(), 0);
    }

    #[tokio::test]
    async fn a_large_frame_that_arrives_in_parts_loses_no_byte() {
        use futures::FutureExt;
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut t = ReadLayer::with_chunk(rx, 4096);
        let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 13) as u8).collect();
        let data = frame(0x2, &payload, Some([5, 6, 7, 8]));
        let mut got = Vec::new();
        // Odd-sized parts, each read until the layer would wait: then a
        // read inside the frame finds nothing (`Pending`) and must keep
        // its place.
        for part in data.chunks(3001) {
            tx.write_all(part).await.unwrap();
            loop {
                let mut buf = [0u8; 256];
                match t.read(&mut buf).now_or_never() {
                    Some(n) => got.extend_from_slice(&buf[..n.unwrap()]),
                    None => break,
                }
            }
        }
        assert_eq!(got, data);
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

    #[tokio::test]
    async fn a_queued_ping_goes_out_whole_before_the_next_bytes_written() {
        // A pipe that takes at most 4 bytes at a time: the ping needs three
        // writes, with waits between them.
        let (layer_end, mut peer) = tokio::io::duplex(4);
        let mut t = ReadLayer::with_chunk(layer_end, 4096);
        t.drive(1 << 20);
        assert!(t.queue_ping(*b"12345678"));
        assert!(!t.queue_ping(*b"abcdefgh"), "one ping at a time");
        let after = frame(0x2, b"what tungstenite writes next", None);
        let mut want = frame(0x9, b"12345678", None);
        want.extend_from_slice(&after);
        let write = async {
            t.write_all(&after).await.unwrap();
            t.flush().await.unwrap();
            t
        };
        let read = async {
            let mut got = vec![0; want.len()];
            peer.read_exact(&mut got).await.unwrap();
            got
        };
        let (mut t, got) = tokio::join!(write, read);
        assert_eq!(got, want, "the ping, whole, then the rest");
        assert_eq!(t.bytes_written(), Some(want.len() as u64));
        assert!(t.queue_ping(*b"abcdefgh"), "out: the next one may go");
    }

    #[tokio::test]
    async fn a_flush_alone_writes_a_queued_ping() {
        let (layer_end, mut peer) = tokio::io::duplex(64);
        let mut t = ReadLayer::with_chunk(layer_end, 4096);
        t.drive(1 << 20);
        assert!(t.queue_ping(7u64.to_be_bytes()));
        t.flush().await.unwrap();
        // Gone: a ping not written would be an end of stream, not a wait.
        drop(t);
        let mut got = [0; 10];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got[..], frame(0x9, &7u64.to_be_bytes(), None)[..]);
    }

    #[tokio::test]
    async fn a_shutdown_or_a_vectored_write_sends_a_queued_ping_first() {
        let ping = frame(0x9, b"12345678", None);
        // A shutdown (tungstenite's close of the transport) after the ping.
        let (layer_end, mut peer) = tokio::io::duplex(64);
        let mut t = ReadLayer::with_chunk(layer_end, 4096);
        t.drive(1 << 20);
        assert!(t.queue_ping(*b"12345678"));
        t.shutdown().await.unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, ping);
        // A vectored write.
        let (layer_end, mut peer) = tokio::io::duplex(64);
        let mut t = ReadLayer::with_chunk(layer_end, 4096);
        t.drive(1 << 20);
        assert!(t.queue_ping(*b"12345678"));
        let after = frame(0x2, b"after", None);
        let n = t.write_vectored(&[io::IoSlice::new(&after)]).await.unwrap();
        assert_eq!(n, after.len());
        drop(t);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, [ping, after].concat());
    }

    #[test]
    fn a_driver_takes_at_most_one_gib_whatever_the_limits() {
        let (a, _b) = tokio::io::duplex(64);
        let mut t = ReadLayer::with_chunk(a, 4096);
        t.drive(usize::MAX);
        assert_eq!(t.max_len, MAX_TAKEN);
        t.drive(4096);
        assert_eq!(t.max_len, 4096);
    }

    #[test]
    fn only_a_driven_server_layer_queues_pings() {
        let (a, _b) = tokio::io::duplex(64);
        let mut undriven = ReadLayer::with_chunk(a, 4096);
        assert!(!undriven.queue_ping([0; 8]), "a stream given to supervise");
        let (a, _b) = tokio::io::duplex(64);
        let mut client = ReadLayer::for_client(a, 4096);
        client.sniffer = CloseSniffer::frames();
        client.drive(1 << 20);
        assert!(client.driven);
        assert!(!client.queue_ping([0; 8]), "a client's frames need a mask");
    }

    /// A final frame with `opcode` and `payload`, masked with `mask` if
    /// given.
    pub(crate) fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
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

    /// Everything `t` hands tungstenite until the writer is gone, and the
    /// pongs it took on the way, read as the driver reads: its own read
    /// first (no data frame here qualifies), then tungstenite's.
    async fn drain(t: &mut ReadLayer<tokio::io::DuplexStream>) -> (Vec<u8>, Vec<[u8; 8]>) {
        let (mut passed, mut pongs) = (Vec::new(), Vec::new());
        loop {
            let taken = std::future::poll_fn(|cx| t.poll_take(cx)).await;
            assert!(matches!(taken, Taken::Pass), "{taken:?}");
            pongs.extend(t.take_pong());
            let mut buf = [0u8; 256];
            let n = t.read(&mut buf).await.unwrap();
            if n == 0 {
                return (passed, pongs);
            }
            passed.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn a_whole_pong_is_taken_for_the_driver_and_the_rest_passes_intact() {
        let key = Some([9, 8, 7, 6]);
        let text = frame(0x1, b"hello", key);
        let mut stream = frame(0xA, b"12345678", key);
        stream.extend(&text);
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"bye");
        stream.extend(frame(0x8, &close, key));
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut t = ReadLayer::with_chunk(rx, 4096);
        t.drive(0);
        tx.write_all(&stream).await.unwrap();
        drop(tx);
        let (passed, pongs) = drain(&mut t).await;
        assert_eq!(pongs, vec![*b"12345678"]);
        let mut rest = text.clone();
        rest.extend(frame(0x8, &close, key));
        assert_eq!(passed, rest, "everything but the pong, byte for byte");
        assert_eq!(t.sniffer.last.as_ref().and_then(|c| c.code), Some(1000));
    }

    #[tokio::test]
    async fn an_undriven_layer_or_a_pong_after_the_close_passes_everything() {
        let key = Some([1, 2, 3, 4]);
        let pong = frame(0xA, b"12345678", key);
        // A layer given to `supervise`: no driver takes pongs from it.
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut t = ReadLayer::with_chunk(rx, 4096);
        tx.write_all(&pong).await.unwrap();
        drop(tx);
        assert_eq!(drain(&mut t).await, (pong.clone(), vec![]));
        // Behind the peer's Close, tungstenite must see every frame.
        let mut bytes = frame(0x8, &1000u16.to_be_bytes(), key);
        bytes.extend(&pong);
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut t = ReadLayer::with_chunk(rx, 4096);
        t.drive(0);
        tx.write_all(&bytes).await.unwrap();
        drop(tx);
        assert_eq!(drain(&mut t).await, (bytes, vec![]));
    }

    #[tokio::test]
    async fn pongs_that_break_a_rule_or_find_the_slot_taken_pass_to_tungstenite() {
        let key = Some([1, 2, 3, 4]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unmasked from a client", frame(0xA, b"12345678", None)),
            ("not 8 bytes", frame(0xA, b"1234567", key)),
            ("reserved bit", {
                let mut f = frame(0xA, b"12345678", key);
                f[0] |= 0x40;
                f
            }),
            ("not final", {
                let mut f = frame(0xA, b"12345678", key);
                f[0] &= 0x7f;
                f
            }),
            ("a second pong before the driver took the first", {
                let mut f = frame(0xA, b"abcdefgh", key);
                f.extend(frame(0xA, b"12345678", key));
                f
            }),
        ];
        for (what, bytes) in cases {
            let (mut tx, rx) = tokio::io::duplex(1 << 16);
            let mut t = ReadLayer::with_chunk(rx, 4096);
            t.drive(0);
            tx.write_all(&bytes).await.unwrap();
            drop(tx);
            let (passed, taken) = drain(&mut t).await;
            if what.starts_with("a second") {
                assert_eq!(taken, vec![*b"abcdefgh"], "{what}");
                assert_eq!(passed, bytes[14..], "{what}");
            } else {
                assert!(taken.is_empty(), "{what}");
                assert_eq!(passed, bytes, "{what}");
            }
        }
    }

    #[tokio::test]
    async fn a_pong_split_across_reads_passes_and_a_client_takes_unmasked_pongs() {
        // Split: the first read ends inside the pong, so it is not taken.
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut t = ReadLayer::with_chunk(rx, 4096);
        t.drive(0);
        let pong = frame(0xA, b"12345678", Some([5, 5, 5, 5]));
        tx.write_all(&pong[..5]).await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(t.read(&mut buf).await.unwrap(), 5);
        tx.write_all(&pong[5..]).await.unwrap();
        drop(tx);
        let (rest, pongs) = drain(&mut t).await;
        assert_eq!(rest, pong[5..]);
        assert!(pongs.is_empty());
        // A client's layer: the server's pongs are unmasked; the driver
        // comes after the head (driven before it, the layer takes nothing).
        // The frames behind the head, even in the same read, stay with the
        // layer: tungstenite's handshake would keep them for itself.
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut t = ReadLayer::for_client(rx, 4096);
        t.drive(0);
        assert!(!t.driven, "the head is still to come");
        let head = b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec();
        let hello = frame(0x1, b"hello", None);
        tx.write_all(&[&head[..], &hello].concat()).await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(t.read(&mut buf).await.unwrap(), head.len());
        t.drive(usize::MAX);
        assert!(
            matches!(take(&mut t), Poll::Ready(Taken::Message(m)) if m == Message::Text("hello".into()))
        );
        tx.write_all(&frame(0xA, b"87654321", None)).await.unwrap();
        drop(tx);
        let (passed, pongs) = drain(&mut t).await;
        assert_eq!(passed, b"");
        assert_eq!(pongs, vec![*b"87654321"]);
    }

    #[tokio::test]
    async fn a_read_of_nothing_but_a_pong_is_pending_not_the_end() {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut t = ReadLayer::with_chunk(rx, 4096);
        t.drive(0);
        tx.write_all(&frame(0xA, b"12345678", Some([1, 1, 1, 1])))
            .await
            .unwrap();
        // One poll reads the pong (it is there) and finds nothing behind it:
        // nothing for tungstenite, so no pass to it.
        assert!(take(&mut t).is_pending(), "Pending, not a pass to the end");
        assert_eq!(t.take_pong(), Some(*b"12345678"));
        tx.write_all(b"x").await.unwrap();
        assert!(matches!(take(&mut t), Poll::Ready(Taken::Pass)));
        let mut buf = [0u8; 64];
        assert_eq!(t.read(&mut buf).await.unwrap(), 1);
    }

    /// A connected pair on loopback: our layer's socket and the peer's.
    async fn tcp_pair() -> (ReadLayer<tokio::net::TcpStream>, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (peer, accepted) = tokio::join!(peer, listener.accept());
        let mut layer = ReadLayer::with_chunk(accepted.unwrap().0, 4096);
        layer.drive(0);
        (layer, peer.unwrap())
    }

    /// Reads what the peer wrote (one read), and asks `parked` with a waker
    /// that counts its wakes.
    async fn read_then_park(
        t: &mut ReadLayer<tokio::net::TcpStream>,
        wakes: &Arc<Counter>,
    ) -> (usize, bool) {
        let mut buf = [0u8; 256];
        let n = t.read(&mut buf).await.unwrap();
        let waker = std::task::Waker::from(wakes.clone());
        (n, t.parked(&mut Context::from_waker(&waker)))
    }

    /// Waits (bounded: the bytes cross loopback in well under a second)
    /// for the socket's wake, and checks it came once.
    async fn assert_woken_once(wakes: &Counter) {
        let count = || wakes.0.load(std::sync::atomic::Ordering::SeqCst);
        for _ in 0..1000 {
            if count() > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(count(), 1);
    }

    #[derive(Default)]
    struct Counter(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn one_whole_frame_parks_the_socket_and_its_next_bytes_wake_us() {
        let (mut t, mut peer) = tcp_pair().await;
        let wakes = Arc::new(Counter::default());
        let text = frame(0x1, b"hello", Some([1, 2, 3, 4]));
        peer.write_all(&text).await.unwrap();
        let (n, parked) = read_then_park(&mut t, &wakes).await;
        assert_eq!((n, parked), (text.len(), true));
        assert!(
            !t.parked(&mut Context::from_waker(std::task::Waker::noop())),
            "once per read"
        );
        peer.write_all(&text).await.unwrap();
        // The registration made by `parked` is what tells us.
        assert_woken_once(&wakes).await;
    }

    #[tokio::test]
    async fn the_last_frame_of_a_short_read_parks_the_socket_from_the_spill() {
        let key = Some([1, 2, 3, 4]);
        let ping = frame(0x9, b"hi", key);
        let wakes = Arc::new(Counter::default());
        // The driver's own read takes nothing (a ping is tungstenite's) and
        // keeps what it read: tungstenite's read of it ends what the socket
        // had.
        let (mut t, mut peer) = tcp_pair().await;
        peer.write_all(&ping).await.unwrap();
        let taken = std::future::poll_fn(|cx| t.poll_take(cx)).await;
        assert!(matches!(taken, Taken::Pass));
        assert_eq!(t.end - t.pos, ping.len() as u32, "kept for tungstenite");
        assert_eq!(read_then_park(&mut t, &wakes).await, (ping.len(), true));
        // Two frames in one read: the first is not the end, the second is.
        let (mut t, mut peer) = tcp_pair().await;
        peer.write_all(&[ping.clone(), ping.clone()].concat())
            .await
            .unwrap();
        assert_eq!(read_then_park(&mut t, &wakes).await, (ping.len(), false));
        assert_eq!(read_then_park(&mut t, &wakes).await, (ping.len(), true));
        // The registration `parked` made is what tells us of the next bytes.
        peer.write_all(&ping).await.unwrap();
        assert_woken_once(&wakes).await;
    }

    #[tokio::test]
    async fn more_or_less_than_one_whole_frame_is_not_parked() {
        let key = Some([1, 2, 3, 4]);
        let one = frame(0x1, b"hello", key);
        let two = [one.clone(), one.clone()].concat();
        let wakes = Arc::new(Counter::default());
        // Two frames in one read: tungstenite gets the first, this layer
        // keeps the second.
        let (mut t, mut peer) = tcp_pair().await;
        peer.write_all(&two).await.unwrap();
        let (n, parked) = read_then_park(&mut t, &wakes).await;
        assert_eq!((n, parked), (one.len(), false));
        assert_eq!(t.end - t.pos, one.len() as u32);
        // Half a frame: more is to come.
        let (mut t, mut peer) = tcp_pair().await;
        peer.write_all(&one[..4]).await.unwrap();
        assert_eq!(read_then_park(&mut t, &wakes).await, (4, false));
        peer.write_all(&one[4..]).await.unwrap();
        // The rest ends the frame but did not start at a boundary.
        assert_eq!(read_then_park(&mut t, &wakes).await, (one.len() - 4, false));
        // The peer's Close: tungstenite ends the stream after it by itself.
        let (mut t, mut peer) = tcp_pair().await;
        let close = frame(0x8, &1000u16.to_be_bytes(), key);
        peer.write_all(&close).await.unwrap();
        assert_eq!(read_then_park(&mut t, &wakes).await, (close.len(), false));
        // A stream that is not a TcpStream is never parked.
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut d = ReadLayer::with_chunk(rx, 4096);
        d.drive(0);
        tx.write_all(&one).await.unwrap();
        let mut buf = [0u8; 256];
        assert_eq!(d.read(&mut buf).await.unwrap(), one.len());
        assert!(!d.parked(&mut Context::from_waker(std::task::Waker::noop())));
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
        // Lines may end with LF alone (httparse, and so tungstenite, accept
        // it); a CR-LF-CR-LF inside a payload must not be taken for the end.
        let mut stream = b"HTTP/1.1 101 Switching Protocols\nUpgrade: websocket\n\n".to_vec();
        stream.extend(frame(0x2, b"\r\n\r\n..", None));
        stream.extend(frame(0x8, &1001u16.to_be_bytes(), None));
        let mut s = CloseSniffer::after_http_head();
        for chunk in stream.chunks(5) {
            s.feed(chunk);
        }
        assert_eq!(s.last.map(|c| c.code), Some(Some(1001)));
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

    // ===== data frames taken for the driver =====

    /// What a driver sees of `t`: the bytes passed to tungstenite, with the
    /// messages and pongs taken, in stream order.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Passed(Vec<u8>),
        Taken(Message),
        Pong([u8; 8]),
    }

    /// One poll of `poll_take`, with a waker that does nothing.
    fn take(t: &mut ReadLayer<impl AsyncRead + Unpin>) -> Poll<Taken> {
        t.poll_take(&mut Context::from_waker(std::task::Waker::noop()))
    }

    /// Reads `t` as the driver does (its own read first, tungstenite's
    /// 256-byte reads when told to pass, pongs taken after each) until the
    /// end, merging adjacent passed bytes.
    fn seen(t: &mut ReadLayer<tokio::io::DuplexStream>) -> Vec<Seen> {
        use futures::FutureExt;
        let mut seen = Vec::new();
        for _ in 0..10_000 {
            let taken = take(t);
            seen.extend(t.take_pong().map(Seen::Pong));
            match taken {
                Poll::Ready(Taken::Message(m)) => seen.push(Seen::Taken(m)),
                Poll::Pending => panic!("the writer is gone: no read may wait"),
                Poll::Ready(Taken::Pass) => {
                    let mut buf = [0u8; 256];
                    let n = t.read(&mut buf).now_or_never().expect("ready").unwrap();
                    seen.extend(t.take_pong().map(Seen::Pong));
                    if n == 0 {
                        return seen;
                    }
                    match seen.last_mut() {
                        Some(Seen::Passed(bytes)) => bytes.extend_from_slice(&buf[..n]),
                        _ => seen.push(Seen::Passed(buf[..n].to_vec())),
                    }
                }
            }
        }
        panic!("no end in 10 000 reads");
    }

    /// What a driver sees of `bytes` fed in parts of `step` bytes, each
    /// part read as far as it goes before the next is written.
    async fn seen_in_steps(bytes: &[u8], step: usize) -> Vec<Seen> {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut t = ReadLayer::with_chunk(rx, 4096);
        t.drive(usize::MAX);
        let mut all = Vec::new();
        for part in bytes.chunks(step) {
            tx.write_all(part).await.unwrap();
            // Until the layer waits for more (a wait is not an error here).
            for _ in 0..1000 {
                let taken = take(&mut t);
                all.extend(t.take_pong().map(Seen::Pong));
                match taken {
                    Poll::Pending => break,
                    Poll::Ready(Taken::Message(m)) => all.push(Seen::Taken(m)),
                    Poll::Ready(Taken::Pass) => {
                        let mut buf = [0u8; 256];
                        let Some(n) = futures::FutureExt::now_or_never(t.read(&mut buf)) else {
                            break;
                        };
                        all.extend(t.take_pong().map(Seen::Pong));
                        match all.last_mut() {
                            Some(Seen::Passed(b)) => b.extend_from_slice(&buf[..n.unwrap()]),
                            _ => all.push(Seen::Passed(buf[..n.unwrap()].to_vec())),
                        }
                    }
                }
            }
        }
        drop(tx);
        all.extend(seen(&mut t));
        all.retain(|s| !matches!(s, Seen::Passed(b) if b.is_empty()));
        all
    }

    /// A driven layer with `max_len`, fed `parts` and then the end.
    async fn layer_fed(parts: &[&[u8]], max_len: usize) -> ReadLayer<tokio::io::DuplexStream> {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut t = ReadLayer::with_chunk(rx, 4096);
        t.drive(max_len);
        for part in parts {
            tx.write_all(part).await.unwrap();
        }
        t
    }

    #[tokio::test]
    async fn data_frames_are_taken_and_everything_keeps_its_order() {
        let key = Some([3, 1, 4, 1]);
        let ping = frame(0x9, b"p", key);
        let all = [
            frame(0x1, b"hello", key),
            frame(0xA, b"12345678", key),
            frame(0x2, &[7; 300], key),
            ping.clone(),
            frame(0x1, b"after", key),
        ]
        .concat();
        // In one write: each data frame is taken, the pong too, the ping
        // passes.
        assert_eq!(
            seen_in_steps(&all, all.len()).await,
            vec![
                Seen::Taken(Message::Text("hello".into())),
                Seen::Pong(*b"12345678"),
                Seen::Taken(Message::Binary(vec![7; 300].into())),
                Seen::Passed(ping.clone()),
                Seen::Taken(Message::Text("after".into())),
            ]
        );
        // In parts, each read before the next part is written: frames
        // whose header is split pass instead, and what is taken and what
        // passes, in order, is the stream, byte for byte.
        for step in [1, 3, 7, 100] {
            let seen = seen_in_steps(&all, step).await;
            let rebuilt: Vec<u8> = seen
                .iter()
                .flat_map(|s| match s {
                    Seen::Passed(bytes) => bytes.clone(),
                    Seen::Pong(p) => frame(0xA, p, key),
                    Seen::Taken(Message::Text(t)) => frame(0x1, t.as_bytes(), key),
                    Seen::Taken(Message::Binary(b)) => frame(0x2, b, key),
                    Seen::Taken(other) => panic!("not a data message: {other:?}"),
                })
                .collect();
            assert_eq!(rebuilt, all, "step {step}: {seen:?}");
            if step == 100 {
                assert!(seen.iter().any(|s| matches!(s, Seen::Taken(_))));
            }
        }
    }

    #[tokio::test]
    async fn tungstenite_is_handed_one_frame_at_a_time_by_a_driven_layer() {
        let key = Some([5, 5, 5, 5]);
        let (ping, close) = (
            frame(0x9, b"a", key),
            frame(0x8, &1000u16.to_be_bytes(), key),
        );
        let mut t = layer_fed(&[&[&ping[..], &ping, &close].concat()], usize::MAX).await;
        let mut buf = [0u8; 256];
        for expected in [&ping, &ping, &close] {
            assert!(matches!(take(&mut t), Poll::Ready(Taken::Pass)));
            let n = t.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], &expected[..]);
        }
    }

    #[tokio::test]
    async fn frames_for_tungstenite_are_cut_from_the_spill_in_place_and_idle_holds_nothing() {
        use futures::FutureExt;
        let key = Some([4, 4, 2, 2]);
        // A fragmented message: a 5000-byte first fragment (read through
        // tungstenite, partly into the spill's own memory), 50 pings, then
        // the final continuation.
        let mut first = frame(0x2, &[1; 5000], key);
        first[0] &= 0x7f;
        let ping = frame(0x9, b"p", key);
        let mut last = frame(0x0, b"end", key);
        last[0] |= 0x80;
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut t = ReadLayer::with_chunk(rx, 4096);
        t.drive(usize::MAX);
        tx.write_all(&first).await.unwrap();
        tx.write_all(&ping.repeat(50)).await.unwrap();
        tx.write_all(&last).await.unwrap();
        let mut passed = Vec::new();
        let mut spills = Vec::new();
        for _ in 0..1000 {
            match take(&mut t) {
                Poll::Ready(Taken::Pass) => {}
                other => {
                    assert!(other.is_pending(), "nothing here is taken: {other:?}");
                    break;
                }
            }
            let mut buf = [0u8; 256];
            let Some(n) = t.read(&mut buf).now_or_never() else {
                break;
            };
            passed.extend_from_slice(&buf[..n.unwrap()]);
            if t.pos < t.end {
                spills.push((t.spill.as_ptr(), t.spill.capacity()));
            }
        }
        assert_eq!(passed, [first, ping.repeat(50), last].concat());
        // Each ping left the spill where it was: cut in place, not copied.
        let pings = &spills[spills.len() - 50..];
        assert!(pings.windows(2).all(|w| w[0] == w[1]), "{pings:?}");
        // Everything read, the connection idle: no memory held.
        assert!(take(&mut t).is_pending());
        assert_eq!((t.spill.capacity(), t.pos, t.end), (0, 0, 0));
    }

    #[tokio::test]
    async fn a_large_frame_in_parts_is_read_into_its_message_and_what_follows_is_kept() {
        let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 13) as u8).collect();
        let mut data = frame(0x2, &payload, Some([5, 6, 7, 8]));
        let next = frame(0x9, b"next", Some([1, 2, 3, 4]));
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut t = ReadLayer::with_chunk(rx, 4096);
        t.drive(usize::MAX);
        // Odd-sized parts: every read within the frame waits for more.
        for part in data.chunks(3001) {
            assert!(take(&mut t).is_pending(), "not before it is whole");
            tx.write_all(part).await.unwrap();
        }
        assert!(
            matches!(take(&mut t), Poll::Ready(Taken::Message(m)) if m == Message::Binary(payload.clone().into()))
        );
        // The frame's last bytes and the next frame in one write: the last
        // read asks past the frame, and its overshoot is kept.
        data.extend(&next);
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut t = ReadLayer::with_chunk(rx, 4096);
        t.drive(usize::MAX);
        tx.write_all(&data[..10_000]).await.unwrap();
        assert!(take(&mut t).is_pending());
        tx.write_all(&data[10_000..]).await.unwrap();
        drop(tx);
        assert_eq!(
            seen(&mut t),
            vec![
                Seen::Taken(Message::Binary(payload.into())),
                Seen::Passed(next)
            ]
        );
    }

    #[tokio::test]
    async fn frames_that_may_not_be_taken_pass_to_tungstenite_byte_for_byte() {
        let key = Some([9, 9, 1, 1]);
        let not_utf8 = frame(0x1, b"ok \xff\xfe", key);
        let long_not_utf8 = frame(0x1, &[b"x".repeat(5000), b"\xc3".to_vec()].concat(), key);
        let over = frame(0x2, &[0; 11], key);
        let unmasked = frame(0x2, b"abc", None);
        let mut fragment = frame(0x1, b"ab", key);
        fragment[0] &= 0x7f;
        let cases: Vec<(&str, Vec<u8>, usize)> = vec![
            ("text that is not UTF-8", not_utf8.clone(), 100),
            ("a large text that is not UTF-8", long_not_utf8, 10_000),
            ("longer than the limit", over, 10),
            ("unmasked from a client", unmasked, 100),
            ("not final", fragment, 100),
            ("longer than a limit of 0", frame(0x2, b"abc", key), 0),
        ];
        for (what, bytes, max_len) in cases {
            let mut t = layer_fed(&[&bytes], max_len).await;
            assert_eq!(seen(&mut t), vec![Seen::Passed(bytes)], "{what}");
        }
        // The next frame is taken again.
        let good = frame(0x1, b"fine", key);
        let mut t = layer_fed(&[&not_utf8, &good], 100).await;
        assert_eq!(
            seen(&mut t),
            vec![
                Seen::Passed(not_utf8),
                Seen::Taken(Message::Text("fine".into()))
            ]
        );
    }

    #[tokio::test]
    async fn within_a_fragmented_message_after_the_close_or_undriven_every_frame_passes() {
        let key = Some([2, 7, 1, 8]);
        let mut first = frame(0x1, b"ab", key);
        first[0] &= 0x7f;
        let middle = frame(0x2, b"x", key);
        let mut last = frame(0x0, b"cd", key);
        last[0] |= 0x80;
        let stream = [&first[..], &middle, &last, &middle].concat();
        let mut t = layer_fed(&[&stream], usize::MAX).await;
        assert_eq!(
            seen(&mut t),
            vec![
                Seen::Passed([&first[..], &middle, &last].concat()),
                Seen::Taken(Message::Binary(b"x"[..].into())),
            ],
            "a data frame inside a fragmented message is tungstenite's to refuse"
        );
        // Behind the peer's Close, tungstenite must see (and refuse) it all.
        let close = frame(0x8, &1000u16.to_be_bytes(), key);
        let mut t = layer_fed(&[&close, &middle], usize::MAX).await;
        assert_eq!(
            seen(&mut t),
            vec![Seen::Passed([close, middle.clone()].concat())]
        );
        // Undriven (a stream given to `supervise`): nothing is taken.
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut t = ReadLayer::with_chunk(rx, 4096);
        tx.write_all(&middle).await.unwrap();
        drop(tx);
        assert_eq!(seen(&mut t), vec![Seen::Passed(middle)]);
    }

    #[tokio::test]
    async fn the_end_or_an_error_met_by_the_drivers_read_is_kept_for_tungstenite() {
        // Cut off within a frame: tungstenite gets its bytes, then the end.
        let bytes = frame(0x2, &[1; 9000], Some([1, 2, 3, 4]));
        let cut = &bytes[..5000];
        let mut t = layer_fed(&[cut], usize::MAX).await;
        assert_eq!(seen(&mut t), vec![Seen::Passed(cut.to_vec())]);
        // An error at a boundary: tungstenite's next read returns it.
        let mut t = ReadLayer::with_chunk(ThenReset(Vec::new()), 4096);
        t.drive(usize::MAX);
        assert!(matches!(take(&mut t), Poll::Ready(Taken::Pass)));
        let mut buf = [0u8; 16];
        let err = t.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        // An error within a frame being taken: tungstenite gets the frame's
        // bytes, then the error.
        let mut t = ReadLayer::with_chunk(ThenReset(cut.to_vec()), 4096);
        t.drive(usize::MAX);
        assert!(matches!(take(&mut t), Poll::Ready(Taken::Pass)));
        assert!(
            t.give_back && matches!(t.stashed, Some(Stashed::Error(_))),
            "met while taking the frame, which went back"
        );
        let mut got = Vec::new();
        let err = loop {
            match t.read(&mut buf).await {
                Ok(n) => {
                    assert!(n > 0, "no end before the error");
                    got.extend_from_slice(&buf[..n]);
                }
                Err(e) => break e,
            }
        };
        assert_eq!(got, cut);
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    /// A stream that gives its bytes (if any), then fails every read with a
    /// reset.
    struct ThenReset(Vec<u8>);
    impl AsyncRead for ThenReset {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.0.is_empty() {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            let n = buf.remaining().min(self.0.len());
            buf.put_slice(&self.0[..n]);
            self.0.drain(..n);
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_taken_frame_whose_last_read_was_short_parks_the_socket() {
        // Small: whole in the first read; large: its payload read over
        // several reads, the last asking past the frame's end.
        for len in [128, 100_000] {
            let (mut t, mut peer) = tcp_pair().await;
            t.drive(usize::MAX);
            let wakes = Arc::new(Counter::default());
            let waker = std::task::Waker::from(wakes.clone());
            let mut cx = Context::from_waker(&waker);
            let payload = vec![b'z'; len];
            peer.write_all(&frame(0x2, &payload, Some([1, 2, 3, 4])))
                .await
                .unwrap();
            // Bounded: the bytes cross loopback in well under a second.
            let mut message = None;
            for _ in 0..1000 {
                if let Poll::Ready(taken) = t.poll_take(&mut cx) {
                    message = Some(taken);
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let wakes_before = wakes.0.load(std::sync::atomic::Ordering::SeqCst);
            assert!(
                matches!(&message, Some(Taken::Message(m)) if *m == Message::Binary(payload.into())),
                "{len}"
            );
            assert!(t.parked(&mut cx), "{len}: registered at once");
            peer.write_all(b"x").await.unwrap();
            for _ in 0..1000 {
                if wakes.0.load(std::sync::atomic::Ordering::SeqCst) > wakes_before {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            assert_eq!(
                wakes.0.load(std::sync::atomic::Ordering::SeqCst),
                wakes_before + 1,
                "{len}"
            );
        }
    }

    /// A stream that hands out what `data` holds, and records the most
    /// room a read offered it.
    struct Offered {
        data: std::io::Cursor<Vec<u8>>,
        most: usize,
    }
    impl AsyncRead for Offered {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.most = self.most.max(buf.remaining());
            let n = std::io::Read::read(&mut self.data, buf.initialize_unfilled())?;
            buf.advance(n);
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_large_payload_is_read_at_most_64_kib_at_a_time() {
        let payload: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let data = std::io::Cursor::new(frame(0x2, &payload, Some([8, 6, 4, 2])));
        let mut t = ReadLayer::with_chunk(Offered { data, most: 0 }, 4096);
        t.drive(usize::MAX);
        assert!(
            matches!(take(&mut t), Poll::Ready(Taken::Message(m)) if m == Message::Binary(payload.into()))
        );
        assert_eq!(t.io.most, CHUNK, "the payload's reads, capped");
    }

    // ===== against tungstenite alone =====

    mod same_as_tungstenite {
        use super::super::*;
        use super::frame;
        use futures::FutureExt;
        use proptest::prelude::*;
        use tokio::io::{AsyncWriteExt, DuplexStream};
        use tokio_tungstenite::WebSocketStream;
        use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

        /// A frame with any opcode and bits, text-like or not, masked with
        /// probability `masked`.
        fn any_frame(masked: f64) -> impl Strategy<Value = Vec<u8>> {
            let payload = prop_oneof![
                8 => "[a-zé€ ]{0,40}".prop_map(String::into_bytes),
                2 => prop::collection::vec(any::<u8>(), 0..40),
                1 => (2800usize..5200).prop_map(|n| vec![b'L'; n]),
            ];
            (
                prop::sample::select(vec![0u8, 1, 1, 2, 2, 8, 9, 10, 3]),
                prop::bool::weighted(0.8),
                prop::bool::weighted(masked),
                prop::bool::weighted(0.03),
                payload,
            )
                .prop_map(|(opcode, fin, masked, rsv, payload)| {
                    let mut f = frame(opcode, &payload, masked.then_some([7, 1, 3, 9]));
                    if !fin {
                        f[0] &= 0x7f;
                    }
                    if rsv {
                        f[0] |= 0x20;
                    }
                    f
                })
        }

        /// What a stream yields, as text: each message, then how it ended.
        fn next_items<S: AsyncRead + AsyncWrite + Unpin>(
            ws: &mut WebSocketStream<S>,
            take: fn(&mut S, &mut Context<'_>) -> Poll<Taken>,
            take_pong: fn(&mut S) -> Option<[u8; 8]>,
            out: &mut Vec<String>,
        ) -> bool {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            for _ in 0..100_000 {
                // The driver's own read step (tungstenite would have
                // yielded the pong it took aside, before the rest).
                let (pong, next) = crate::driver::read_next(ws, take, take_pong, &mut cx);
                if let Some(p) = pong {
                    out.push(format!("{:?}", Message::Pong(p.to_vec().into())));
                }
                match next {
                    Poll::Pending => return true,
                    Poll::Ready(Some(Ok(m))) => {
                        out.push(format!("{m:?}"));
                        // As the driver does: tungstenite's replies (a
                        // pong, a Close) go out at once.
                        let _ = futures::SinkExt::poll_flush_unpin(ws, &mut cx);
                    }
                    Poll::Ready(Some(Err(e))) => {
                        out.push(format!("error: {e}"));
                        return false;
                    }
                    Poll::Ready(None) => {
                        out.push("end".into());
                        return false;
                    }
                }
            }
            panic!("no pause in 100 000 items");
        }

        fn config() -> WebSocketConfig {
            WebSocketConfig::default()
                .max_frame_size(Some(4500))
                .max_message_size(Some(9000))
        }

        /// Feeds `bytes` in `cuts` to a stream, reading after each part as
        /// the driver does; returns what it yielded.
        fn run<S: AsyncRead + AsyncWrite + Unpin>(
            ws: WebSocketStream<S>,
            mut tx: DuplexStream,
            bytes: &[u8],
            cuts: &[usize],
            take: fn(&mut S, &mut Context<'_>) -> Poll<Taken>,
            take_pong: fn(&mut S) -> Option<[u8; 8]>,
        ) -> Vec<String> {
            let mut ws = ws;
            let mut out = Vec::new();
            let mut at = 0;
            let mut open = true;
            let drain = |ws: &mut WebSocketStream<S>, out: &mut Vec<String>| {
                next_items(ws, take, take_pong, out)
            };
            for &cut in cuts.iter().chain([bytes.len()].iter()) {
                let end = cut.clamp(at, bytes.len());
                tx.write_all(&bytes[at..end])
                    .now_or_never()
                    .unwrap()
                    .unwrap();
                at = end;
                if open {
                    open = drain(&mut ws, &mut out);
                }
            }
            drop(tx);
            while open {
                open = drain(&mut ws, &mut out);
            }
            out
        }

        proptest! {
            // `PROPTEST_CASES` as for tests/fuzz.rs (CI runs 20 000).
            #![proptest_config(ProptestConfig::with_cases(
                std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(512)
            ))]
            /// The driver's own reads yield exactly what tungstenite alone
            /// yields from the same bytes, cut anywhere: every message, in
            /// order, and the same error or end; as a server or a client,
            /// with small, default and largest read chunks.
            #[test]
            fn any_frames_cut_anywhere(
                server in any::<bool>(),
                frames in prop::collection::vec(any_frame(0.95), 1..12),
                client_frames in prop::collection::vec(any_frame(0.05), 1..12),
                cuts in prop::collection::vec(0.0f64..1.0, 0..8),
                chunk in prop::sample::select(vec![256usize, 4096, CHUNK]),
            ) {
                let bytes = if server { frames } else { client_frames }.concat();
                let mut cuts: Vec<usize> =
                    cuts.iter().map(|f| (f * bytes.len() as f64) as usize).collect();
                cuts.sort_unstable();
                let role = if server { Role::Server } else { Role::Client };
                let (tx, rx) = tokio::io::duplex(1 << 24);
                let plain = WebSocketStream::from_raw_socket(rx, role, Some(config()))
                    .now_or_never()
                    .unwrap();
                let expected = run(plain, tx, &bytes, &cuts, |_, _| Poll::Ready(Taken::Pass), |_| None);
                let (tx, rx) = tokio::io::duplex(1 << 24);
                let mut layer = ReadLayer::with_chunk(rx, chunk);
                layer.peer_masks = server;
                let cfg = config().read_buffer_size(TUNGSTENITE_READ_BUFFER);
                layer.drive(taken_limit(&cfg));
                let ours = WebSocketStream::from_raw_socket(layer, role, Some(cfg))
                    .now_or_never()
                    .unwrap();
                let got = run(ours, tx, &bytes, &cuts, ReadLayer::poll_take, ReadLayer::take_pong);
                prop_assert_eq!(got, expected);
            }
        }
    }
}
