//! What every serving example shares, so outside tools drive them alike:
//! the flags `--listen ADDR --ping-interval-ms N --pong-timeout-ms N`, and
//! one `closed …` line per closed connection.

#![allow(dead_code)] // each example uses its own part of this module

use std::net::SocketAddr;
use std::time::Duration;

use std::process::ExitCode;

use ws_supervisor::{CloseCode, CloseEvent, Config, ConfigBuilder};

/// The flags every serving example takes.
#[derive(Debug, Clone)]
pub struct ServeFlags {
    pub listen: SocketAddr,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
}

impl ServeFlags {
    /// Defaults: ping and pong timeout of 1 s each.
    pub fn new(listen: &str) -> Self {
        Self {
            listen: listen.parse().expect("valid default address"),
            ping_interval: Duration::from_millis(1000),
            pong_timeout: Duration::from_millis(1000),
        }
    }

    /// Parses the common flags; any other flag goes to `other` with a way
    /// to take its value, and must return `Ok(true)` if it knew the flag.
    pub fn parse(
        mut self,
        mut args: impl Iterator<Item = String>,
        usage: &str,
        mut other: impl FnMut(&str, &mut dyn FnMut() -> Result<String, String>) -> Result<bool, String>,
    ) -> Result<Self, String> {
        while let Some(flag) = args.next() {
            let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--listen" => {
                    let v = value()?;
                    self.listen = v.parse().map_err(|e| format!("--listen {v}: {e}"))?;
                }
                "--ping-interval-ms" => self.ping_interval = millis(&value()?)?,
                "--pong-timeout-ms" => self.pong_timeout = millis(&value()?)?,
                "-h" | "--help" => return Err(usage.to_owned()),
                _ => {
                    if !other(&flag, &mut value)? {
                        return Err(format!("unknown argument {flag}\n{usage}"));
                    }
                }
            }
        }
        Ok(self)
    }
}

impl ServeFlags {
    /// The supervisor's config for these flags (the examples close with a
    /// 2 s close timeout), or why not, printed, as exit status 2.
    pub fn config(&self) -> Result<Config, ExitCode> {
        self.config_with(|builder| builder)
    }

    /// As [`config`](Self::config), with more settings from `more`.
    pub fn config_with(
        &self,
        more: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    ) -> Result<Config, ExitCode> {
        more(
            Config::builder()
                .ping_interval(self.ping_interval)
                .pong_timeout(self.pong_timeout)
                .close_timeout(Duration::from_secs(2)),
        )
        .build()
        .map_err(|e| {
            eprintln!("invalid settings: {e}");
            ExitCode::from(2)
        })
    }
}

impl ServeFlags {
    /// Binds `--listen`, or says why not (exit status 1).
    pub async fn bind(&self) -> Result<tokio::net::TcpListener, ExitCode> {
        tokio::net::TcpListener::bind(self.listen)
            .await
            .map_err(|e| {
                eprintln!("cannot listen on {}: {e}", self.listen);
                ExitCode::FAILURE
            })
    }
}

/// Parses the command line with `parse`, or prints why not (usage errors
/// exit with status 2).
pub fn args_or_exit<A>(
    parse: impl FnOnce(std::env::Args) -> Result<A, String>,
) -> Result<A, ExitCode> {
    let mut args = std::env::args();
    args.next();
    parse(args).map_err(|message| {
        eprintln!("{message}");
        ExitCode::from(2)
    })
}

/// Parses a number of milliseconds.
pub fn millis(v: &str) -> Result<Duration, String> {
    v.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|e| format!("{v}: {e}"))
}

/// The close hook of every example: one line per closed connection.
pub fn print_event(e: &CloseEvent) {
    println!("closed {}", event_fields(e));
}

/// What the `closed …` line says after its first word: `id=… peer=…
/// reason=… initiator=… sent=… received=… lived=… pings=… pongs=…
/// rtt_last=… rtt_smoothed=…`.
pub fn event_fields(e: &CloseEvent) -> String {
    let code =
        |c: Option<CloseCode>| c.map_or_else(|| "-".to_owned(), |c| u16::from(c).to_string());
    let ms = |d: Option<Duration>| {
        d.map_or_else(
            || "-".to_owned(),
            |d| format!("{:.1}ms", d.as_secs_f64() * 1e3),
        )
    };
    format!(
        "id={} peer={} reason={} initiator={} sent={} received={} lived={:.2}s pings={} pongs={} rtt_last={} rtt_smoothed={}",
        e.id.as_u64(),
        e.peer_addr
            .map_or_else(|| "-".to_owned(), |a| a.to_string()),
        e.reason.as_str(),
        e.initiator.as_str(),
        code(e.code_sent),
        code(e.code_received),
        e.duration.as_secs_f64(),
        e.stats.pings_sent,
        e.stats.pongs_received,
        ms(e.stats.last_rtt),
        ms(e.stats.smoothed_rtt),
    )
}
