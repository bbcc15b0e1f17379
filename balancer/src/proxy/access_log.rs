//! The access log: one line per request or tunnel, in squid's native format or the combined
//! format, each ending with the uplink that carried it, so an office can answer "who fetched
//! what, over which line". Query strings are left out unless `access_log_query` is set.
//!
//! Lines go through a channel to one writer task, so a slow disk never holds a request; the
//! file is reopened on SIGHUP, after logrotate has moved it.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use super::ProxyError;
use crate::config::proxy::{AccessLog as Settings, LogFormat};

/// Lines waiting for the writer; beyond this, lines are dropped and counted rather than
/// letting a stuck disk grow memory.
const QUEUE: usize = 4096;

/// What is logged about one request or tunnel.
#[derive(Debug, Clone)]
pub struct Entry {
    pub started: SystemTime,
    pub elapsed: Duration,
    pub client: IpAddr,
    pub method: String,
    /// The absolute URL (or host:port of a tunnel).
    pub url: String,
    pub host: String,
    pub status: u16,
    /// Bytes sent to the client (body, or tunnel bytes from the server).
    pub bytes: u64,
    /// The uplink's name; `None` when the proxy refused or answered itself.
    pub uplink: Option<String>,
    pub referer: Option<String>,
    pub user_agent: Option<String>,
}

/// A handle on the log, cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    settings: Settings,
    lines: mpsc::Sender<String>,
    file: Arc<Mutex<File>>,
    receiver: Arc<Mutex<Option<mpsc::Receiver<String>>>>,
}

fn open(settings: &Settings) -> Result<File, ProxyError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&settings.path)
        .map_err(|source| ProxyError::AccessLog {
            path: settings.path.display().to_string(),
            source,
        })
}

impl AccessLog {
    /// Opens (creates) the file now, so a bad path fails the daemon's start.
    pub fn open(settings: Settings) -> Result<AccessLog, ProxyError> {
        let file = open(&settings)?;
        let (lines, receiver) = mpsc::channel(QUEUE);
        Ok(AccessLog {
            settings,
            lines,
            file: Arc::new(Mutex::new(file)),
            receiver: Arc::new(Mutex::new(Some(receiver))),
        })
    }

    pub fn record(&self, entry: &Entry) {
        let line = format_line(entry, self.settings.format, self.settings.query);
        // Full queue: the line is lost, the request is not delayed.
        let _ = self.lines.try_send(line);
    }

    /// Writes queued lines, and reopens the file on each SIGHUP, until the runtime ends.
    pub async fn reopen_on_sighup(self) {
        let Some(mut receiver) = self.receiver.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => Some(hangup),
            Err(error) => {
                tracing::warn!(%error, "access log: no SIGHUP handler, it will not be reopened");
                None
            }
        };
        loop {
            tokio::select! {
                line = receiver.recv() => {
                    let Some(line) = line else { return };
                    self.write(&line);
                }
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.reopen(),
            }
        }
    }

    fn write(&self, line: &str) {
        if let Ok(mut file) = self.file.lock()
            && let Err(error) = file.write_all(line.as_bytes())
        {
            tracing::warn!(%error, path = %self.settings.path.display(), "access log write failed");
        }
    }

    fn reopen(&self) {
        match open(&self.settings) {
            Ok(new) => {
                if let Ok(mut file) = self.file.lock() {
                    *file = new;
                }
                tracing::info!(path = %self.settings.path.display(), "access log reopened");
            }
            Err(error) => {
                tracing::warn!(error = %crate::daemon::error_chain(&error), "access log not reopened; still writing the old file");
            }
        }
    }
}

/// A response body that counts the bytes it passes and records its log entry when it ends
/// (or is dropped half-way: the client went away).
pub struct Logged<B> {
    inner: B,
    log: AccessLog,
    entry: Option<Entry>,
    clock: Instant,
}

impl<B> Logged<B> {
    pub fn new(inner: B, log: AccessLog, entry: Entry, clock: Instant) -> Self {
        Logged {
            inner,
            log,
            entry: Some(entry),
            clock,
        }
    }

    fn finish(&mut self) {
        if let Some(mut entry) = self.entry.take() {
            entry.elapsed = self.clock.elapsed();
            self.log.record(&entry);
        }
    }
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Logged<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(entry)) = (frame.data_ref(), self.entry.as_mut()) {
                    entry.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => self.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The URL as logged: without its query unless asked for.
fn logged_url(url: &str, query: bool) -> &str {
    if query {
        url
    } else {
        url.split_once('?').map_or(url, |(path, _)| path)
    }
}

/// A field that must stay one whitespace-free token.
fn token(text: &str) -> String {
    if text.is_empty() {
        "-".to_string()
    } else {
        text.replace(|c: char| c.is_whitespace() || c.is_control(), "%20")
    }
}

fn quoted(text: Option<&str>) -> String {
    match text {
        Some(text) => text.replace(['"', '\\'], "_").replace(char::is_control, ""),
        None => "-".to_string(),
    }
}

pub fn format_line(entry: &Entry, format: LogFormat, query: bool) -> String {
    let url = token(logged_url(&entry.url, query));
    let uplink = entry.uplink.as_deref().map_or("-".to_string(), token);
    match format {
        LogFormat::Squid => {
            let since = entry.started.duration_since(UNIX_EPOCH).unwrap_or_default();
            let (code, hierarchy) = match &entry.uplink {
                Some(_) if entry.status == super::http::CLIENT_GONE => (
                    "TCP_MISS_ABORTED",
                    format!("HIER_DIRECT/{}", token(&entry.host)),
                ),
                None if entry.status == super::http::CLIENT_GONE => {
                    ("TCP_MISS_ABORTED", "HIER_NONE/-".to_string())
                }
                Some(_) => ("TCP_MISS", format!("HIER_DIRECT/{}", token(&entry.host))),
                None if entry.status == 200 => ("TCP_MEM_HIT", "HIER_NONE/-".to_string()),
                None => ("TCP_DENIED", "HIER_NONE/-".to_string()),
            };
            format!(
                "{}.{:03} {:>6} {} {code}/{} {} {} {url} - {hierarchy} - {uplink}\n",
                since.as_secs(),
                since.subsec_millis(),
                entry.elapsed.as_millis(),
                entry.client,
                entry.status,
                entry.bytes,
                token(&entry.method),
            )
        }
        LogFormat::Combined => {
            format!(
                "{} - - [{}] \"{} {url} HTTP/1.1\" {} {} \"{}\" \"{}\" {uplink}\n",
                entry.client,
                clf_time(entry.started),
                token(&entry.method),
                entry.status,
                entry.bytes,
                quoted(entry.referer.as_deref()),
                quoted(entry.user_agent.as_deref()),
            )
        }
    }
}

/// `05/Dec/2026:07:03:36 +0000`: the common log format's time, in UTC.
fn clf_time(time: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let seconds = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000",
        MONTHS
            .get(month.saturating_sub(1) as usize)
            .unwrap_or(&"Jan"),
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            started: UNIX_EPOCH + Duration::from_millis(1_764_918_216_123),
            elapsed: Duration::from_millis(45),
            client: "198.18.0.11".parse().unwrap(),
            method: "GET".into(),
            url: "http://198.18.9.1:8080/a?token=secret".into(),
            host: "198.18.9.1".into(),
            status: 200,
            bytes: 1234,
            uplink: Some("isp2".into()),
            referer: None,
            user_agent: Some("curl/8".into()),
        }
    }

    #[test]
    fn squid_native_line() {
        let line = format_line(&entry(), LogFormat::Squid, false);
        assert_eq!(
            line,
            "1764918216.123     45 198.18.0.11 TCP_MISS/200 1234 GET http://198.18.9.1:8080/a - HIER_DIRECT/198.18.9.1 - isp2\n"
        );
        let with_query = format_line(&entry(), LogFormat::Squid, true);
        assert!(with_query.contains("/a?token=secret "));
    }

    #[test]
    fn combined_line() {
        let line = format_line(&entry(), LogFormat::Combined, false);
        assert_eq!(
            line,
            "198.18.0.11 - - [05/Dec/2025:07:03:36 +0000] \"GET http://198.18.9.1:8080/a HTTP/1.1\" 200 1234 \"-\" \"curl/8\" isp2\n"
        );
    }

    #[test]
    fn refusals_are_denied() {
        let mut refused = entry();
        refused.uplink = None;
        refused.status = 403;
        assert!(format_line(&refused, LogFormat::Squid, false).contains(" TCP_DENIED/403 "));
    }
}
