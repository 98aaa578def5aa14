//! Messages handled on the connection's own task. See
//! [`Connection::on_message`](crate::Connection::on_message) and [`Reply`].

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};

use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::connection::{Command, Shared, checked_message, close_command};
use crate::error::Error;
use crate::stats::ConnectionId;

/// A message handler, as the driver holds it.
pub(crate) type Handler = Box<dyn FnMut(Message, &mut Reply<'_>) + Send>;

/// What a handler given to
/// [`Connection::on_message`](crate::Connection::on_message) answers with:
/// messages and a Close for the same connection, queued for its driver in
/// order, behind what its [`Sender`](crate::Sender)s queued before.
///
/// A reply never waits, and wakes no task: the handler runs on the
/// driver's task, which writes the send queue in order, from the same turn
/// on. While the connection is open, the handler is called only while
/// fewer than [`outbound_queue`](crate::ConfigBuilder::outbound_queue) of
/// its replies wait to be written (see
/// [`on_message`](crate::Connection::on_message)); what one call replies is
/// queued whatever the queue holds. Once the connection is closing, replies
/// fail with [`Error::is_closed`] (one made in the very turn the closing
/// began is queued but not written, as a [`Sender`](crate::Sender)'s is).
pub struct Reply<'a> {
    shared: &'a Shared,
    /// The handler's replies queued and not yet written (the driver's
    /// count).
    waiting: &'a mut usize,
    id: ConnectionId,
    write_buffer_limit: usize,
}

impl<'a> Reply<'a> {
    pub(crate) fn new(
        shared: &'a Shared,
        waiting: &'a mut usize,
        id: ConnectionId,
        write_buffer_limit: usize,
    ) -> Self {
        Self {
            shared,
            waiting,
            id,
            write_buffer_limit,
        }
    }

    /// The connection this reply goes to.
    pub fn id(&self) -> ConnectionId {
        self.id
    }

    /// Queues a text or binary message.
    ///
    /// # Errors
    /// As [`Sender::send`](crate::Sender::send): [`Error::is_closed`] once
    /// the connection is closing or closed; [`Error::is_invalid_input`] for
    /// a ping, pong, close or raw frame, or a message larger than the
    /// write-buffer limit. In every error case nothing was queued.
    pub fn send(&mut self, message: impl Into<Message>) -> Result<(), Error> {
        let message = checked_message(message.into(), self.write_buffer_limit)?;
        self.shared.push_command(Command::Reply(message))?;
        *self.waiting += 1;
        Ok(())
    }

    /// Starts the closing handshake with `code` and `reason`, after the
    /// messages already queued; see [`Sender::close`](crate::Sender::close).
    ///
    /// # Errors
    /// As [`Sender::close`](crate::Sender::close).
    pub fn close(&mut self, code: CloseCode, reason: &str) -> Result<(), Error> {
        self.shared.push_command(close_command(code, reason)?)
    }
}

impl fmt::Debug for Reply<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply").field("id", &self.id).finish()
    }
}

/// Runs the messages still queued through `handler` after the driver has
/// ended (their replies fail: the send queue is closed), then drops it.
/// Panics are contained: the connection is over, and so is the handler.
pub(crate) fn run_leftovers(
    shared: &Shared,
    mut handler: Handler,
    id: ConnectionId,
    write_buffer_limit: usize,
) {
    if std::thread::panicking() {
        // Our own code panicked: no user code runs during the unwind.
        return;
    }
    let mut waiting = 0;
    while let Some(message) = shared.take_queued() {
        let mut reply = Reply::new(shared, &mut waiting, id, write_buffer_limit);
        if catch_unwind(AssertUnwindSafe(|| handler(message, &mut reply))).is_err() {
            break;
        }
    }
    let _ = catch_unwind(AssertUnwindSafe(move || drop(handler)));
}
