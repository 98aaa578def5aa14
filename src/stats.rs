//! Plain data a connection reports: its id and a heartbeat snapshot. See [`Stats`].

use std::fmt;
use std::time::Duration;

/// Identifies a connection within its supervisor (unique, increasing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnectionId(pub(crate) u64);

impl ConnectionId {
    /// The number behind the id.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A snapshot of one connection's heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Pings sent by the supervisor: ping frames, or application-level probes
    /// ([`ConfigBuilder::app_heartbeat`](crate::ConfigBuilder::app_heartbeat)).
    pub pings_sent: u64,
    /// Pongs received, matching or not: pong frames, or answers to
    /// application-level probes.
    pub pongs_received: u64,
    /// Pongs that matched none of our recent pings (unsolicited or stale).
    pub pongs_unmatched: u64,
    /// Round-trip time of the last matched pong.
    pub last_rtt: Option<Duration>,
    /// Smoothed round-trip time (EWMA, alpha = 1/8, as RFC 6298).
    pub smoothed_rtt: Option<Duration>,
    /// Time since the last inbound frame (or since the connection opened).
    pub since_last_inbound: Duration,
}
