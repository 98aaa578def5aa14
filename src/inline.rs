//! Messages handled on the connection's own task. See
//! [`Connection::on_message`](crate::Connection::on_message) and [`Reply`].

use std::fmt;

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
/// driver's task, which writes the replies later in the same turn. The
/// handler is called only while fewer than
/// [`outbound_queue`](crate::ConfigBuilder::outbound_queue) of its replies
/// wait to be written (see [`on_message`](crate::Connection::on_message));
/// what one call replies is queued whatever the queue holds.
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
