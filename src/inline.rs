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
/// A reply never waits: the handler is called only while the connection's
/// send queue has room (see
/// [`on_message`](crate::Connection::on_message)), and what one call
/// replies is queued even past
/// [`outbound_queue`](crate::ConfigBuilder::outbound_queue).
pub struct Reply<'a> {
    shared: &'a Shared,
    id: ConnectionId,
    write_buffer_limit: usize,
    /// Called from the driver's own task: it takes the queue in this turn,
    /// so waking it would only poll it once more for nothing.
    from_driver: bool,
}

impl<'a> Reply<'a> {
    pub(crate) fn new(
        shared: &'a Shared,
        id: ConnectionId,
        write_buffer_limit: usize,
        from_driver: bool,
    ) -> Self {
        Self {
            shared,
            id,
            write_buffer_limit,
            from_driver,
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
        self.push(Command::Send(message))
    }

    /// Starts the closing handshake with `code` and `reason`, after the
    /// messages already queued; see [`Sender::close`](crate::Sender::close).
    ///
    /// # Errors
    /// As [`Sender::close`](crate::Sender::close).
    pub fn close(&mut self, code: CloseCode, reason: &str) -> Result<(), Error> {
        self.push(close_command(code, reason)?)
    }

    fn push(&mut self, command: Command) -> Result<(), Error> {
        self.shared.push_command(command, !self.from_driver)
    }
}

impl fmt::Debug for Reply<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply").field("id", &self.id).finish()
    }
}
