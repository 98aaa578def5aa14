//! What an ended connection or a failed attempt means for the next one:
//! server hints, pure. See [`Decision`].

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::close::{CloseEvent, Initiator};
use crate::error::{Error, HandshakeFailure};

/// Whether a [`Reconnecting`](crate::Reconnecting) client tries again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Decision {
    /// Reconnect after the next backoff delay.
    Retry,
    /// Give up: the client's stream ends.
    GiveUp,
}

/// The application's answer for a close code with no built-in meaning
/// (1008 and 4000–4999): the code and the server's close text.
pub(crate) type CodePolicy = Arc<dyn Fn(CloseCode, &str) -> Decision + Send + Sync>;

/// The rules the client applies when a connection ends.
#[derive(Clone)]
pub(crate) struct Rules {
    /// Whether a server's 1000 or 1001 means "come back".
    pub(crate) retry_on_server_close: bool,
    /// For 1008 and 4000–4999; retry when `None`.
    pub(crate) code_policy: Option<CodePolicy>,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            retry_on_server_close: true,
            code_policy: None,
        }
    }
}

impl fmt::Debug for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rules")
            .field("retry_on_server_close", &self.retry_on_server_close)
            .field("code_policy", &self.code_policy.is_some())
            .finish()
    }
}

impl Rules {
    /// What a connection's end means (the table in `docs/client.md`):
    ///
    /// * the server closed with 1000 or 1001: `retry_on_server_close`;
    /// * the server closed with 1008 or 4000–4999: the code policy (retry
    ///   without one);
    /// * the server closed with any other code (1011, 1012 service restart,
    ///   1013 try again later, …): retry;
    /// * anything else (a timeout, a reset, our own close): retry.
    pub(crate) fn after_close(&self, event: &CloseEvent) -> Decision {
        let code = match (event.initiator, event.code_received) {
            (Initiator::Remote, Some(code)) => code,
            _ => return Decision::Retry,
        };
        match u16::from(code) {
            1000 | 1001 if !self.retry_on_server_close => Decision::GiveUp,
            1008 | 4000..=4999 => match &self.code_policy {
                Some(policy) => policy(code, &event.text),
                None => Decision::Retry,
            },
            _ => Decision::Retry,
        }
    }
}

/// What a failed attempt means: every cause is retried except our own
/// supervisor shutting down.
pub(crate) fn after_failure(err: &Error) -> Decision {
    match err.handshake_failure() {
        Some(HandshakeFailure::ShuttingDown) => Decision::GiveUp,
        _ => Decision::Retry,
    }
}

/// The server's own wait, honoured on a 429 or 503 refusal with a valid
/// `Retry-After`.
pub(crate) fn server_hint(err: &Error) -> Option<Duration> {
    match err.http_status() {
        Some(429 | 503) => err.retry_after(),
        _ => None,
    }
}

// ===== Retry-After =====

/// Parses a `Retry-After` value (RFC 9110 §10.2.3): delay-seconds, or an
/// HTTP date (IMF-fixdate) turned into a wait from `now` (zero if past).
/// `None` if it is neither.
pub(crate) fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Huge values saturate; the client adds with saturation and caps
        // the wait at its max.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = http_date(value)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses an IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT` (the form RFC
/// 9110 requires senders to use; the obsolete RFC 850 and asctime forms are
/// not accepted).
fn http_date(value: &str) -> Option<SystemTime> {
    let mut parts = value.split(' ');
    let weekday = parts.next()?;
    let day = parts.next()?;
    let month = parts.next()?;
    let year = parts.next()?;
    let time = parts.next()?;
    if parts.next()? != "GMT" || parts.next().is_some() {
        return None;
    }
    const WEEKDAYS: [&str; 7] = ["Mon,", "Tue,", "Wed,", "Thu,", "Fri,", "Sat,", "Sun,"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let weekday = WEEKDAYS.iter().position(|w| *w == weekday)?;
    let month = MONTHS.iter().position(|m| *m == month)? as u32 + 1;
    let number = |s: &str, len: usize| -> Option<u32> {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok())?
    };
    let day = number(day, 2)?;
    let year = number(year, 4)?;
    let mut hms = time.split(':');
    let (h, m, s) = (
        number(hms.next()?, 2)?,
        number(hms.next()?, 2)?,
        number(hms.next()?, 2)?,
    );
    if hms.next().is_some() || h > 23 || m > 59 || s > 60 || year < 1970 {
        return None;
    }
    let days = days_from_civil(year as i64, month, day)?;
    // 1970-01-01 was a Thursday (index 3 from Monday).
    if (days + 3).rem_euclid(7) as usize != weekday {
        return None;
    }
    let secs = days as u64 * 86_400 + u64::from(h * 3600 + m * 60 + s);
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`), if the date exists.
fn days_from_civil(year: i64, month: u32, day: u32) -> Option<i64> {
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month[month as usize - 1] {
        return None;
    }
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(month) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::close::CloseReason;
    use crate::stats::{ConnectionId, Stats};

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn retry_after_in_seconds() {
        let now = at(1_000);
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        for bad in ["", "-5", "1.5", "12s", "soon"] {
            assert_eq!(retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_as_an_http_date() {
        // RFC 9110's own example: 784111777 s after the epoch.
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        assert_eq!(http_date(date), Some(at(784_111_777)));
        assert_eq!(
            retry_after(date, at(784_111_777 - 90)),
            Some(Duration::from_secs(90))
        );
        // A date in the past is a zero wait, not an error.
        assert_eq!(retry_after(date, at(784_111_777 + 5)), Some(Duration::ZERO));
        // Leap days, the end of a year, and the epoch itself.
        assert_eq!(
            http_date("Thu, 29 Feb 2024 00:00:00 GMT"),
            Some(at(1_709_164_800))
        );
        assert_eq!(
            http_date("Thu, 31 Dec 2026 23:59:59 GMT"),
            Some(at(1_798_761_599))
        );
        assert_eq!(http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(at(0)));
    }

    #[test]
    fn malformed_dates_are_not_hints() {
        for bad in [
            "Sun, 06 Nov 1994 08:49:37 UTC",  // not GMT
            "Mon, 06 Nov 1994 08:49:37 GMT",  // wrong weekday
            "Sunday, 06-Nov-94 08:49:37 GMT", // RFC 850, obsolete
            "Sun Nov  6 08:49:37 1994",       // asctime, obsolete
            "Sun, 31 Nov 1994 08:49:37 GMT",  // no such day
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 6 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37 GMT extra",
        ] {
            assert_eq!(http_date(bad), None, "{bad:?}");
        }
    }

    fn ended(initiator: Initiator, code: Option<u16>, text: &str) -> CloseEvent {
        CloseEvent {
            id: ConnectionId(1),
            peer_addr: None,
            reason: CloseReason::from_close_code(code.map(CloseCode::from)),
            initiator,
            code_sent: None,
            code_received: code.map(CloseCode::from),
            text: text.into(),
            duration: Duration::from_secs(1),
            stats: Stats::default(),
            error: None,
        }
    }

    #[test]
    fn server_hints_1012_and_1013_retry_and_policy_codes_ask_the_application() {
        let give_up_on_4001 = Rules {
            retry_on_server_close: true,
            code_policy: Some(Arc::new(|code, text| {
                if u16::from(code) == 4001 && text == "bad token" {
                    Decision::GiveUp
                } else {
                    Decision::Retry
                }
            })),
        };
        let remote = |code| ended(Initiator::Remote, Some(code), "bad token");
        for code in [1012, 1013, 1011, 1002, 3000, 1000, 1001, 4002, 1008] {
            assert_eq!(
                give_up_on_4001.after_close(&remote(code)),
                Decision::Retry,
                "{code}"
            );
        }
        assert_eq!(give_up_on_4001.after_close(&remote(4001)), Decision::GiveUp);
        // Without a policy, policy codes retry.
        let default = Rules::default();
        assert_eq!(default.after_close(&remote(4001)), Decision::Retry);
        assert_eq!(default.after_close(&remote(1008)), Decision::Retry);
        // The same code sent by us, or no code at all, is not the server's hint.
        assert_eq!(
            give_up_on_4001.after_close(&ended(Initiator::Local, Some(4001), "bad token")),
            Decision::Retry
        );
        assert_eq!(
            default.after_close(&ended(Initiator::Remote, None, "")),
            Decision::Retry
        );
    }

    #[test]
    fn a_server_normal_close_retries_by_default_and_can_mean_give_up() {
        let remote = |code| ended(Initiator::Remote, Some(code), "");
        let default = Rules::default();
        assert_eq!(default.after_close(&remote(1000)), Decision::Retry);
        assert_eq!(default.after_close(&remote(1001)), Decision::Retry);
        let stay_down = Rules {
            retry_on_server_close: false,
            code_policy: None,
        };
        assert_eq!(stay_down.after_close(&remote(1000)), Decision::GiveUp);
        assert_eq!(stay_down.after_close(&remote(1001)), Decision::GiveUp);
        assert_eq!(stay_down.after_close(&remote(1012)), Decision::Retry);
    }

    #[test]
    fn failures_retry_except_our_own_shutdown_and_hints_need_429_or_503() {
        for cause in HandshakeFailure::ALL {
            let want = if cause == HandshakeFailure::ShuttingDown {
                Decision::GiveUp
            } else {
                Decision::Retry
            };
            assert_eq!(
                after_failure(&Error::handshake(cause, None)),
                want,
                "{cause:?}"
            );
        }
        let refused = |status, retry_after| {
            Error::refused_upgrade(
                crate::error::Refusal {
                    status,
                    retry_after,
                },
                None,
            )
        };
        let ten = Some(Duration::from_secs(10));
        assert_eq!(server_hint(&refused(503, ten)), ten);
        assert_eq!(server_hint(&refused(429, ten)), ten);
        assert_eq!(server_hint(&refused(404, ten)), None);
        assert_eq!(server_hint(&refused(503, None)), None);
        assert_eq!(after_failure(&refused(503, ten)), Decision::Retry);
    }
}
