//! A stream wrapper that records activity (for idle timeouts) and, on the client side, keeps a
//! short window of the raw bytes read, so a request head can be checked for what hyper
//! normalises away before the proxy sees it (both Content-Length and Transfer-Encoding).

use std::{
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::counters::UplinkCounters;

/// Raw bytes kept for the head check: a head is at most `max_header_bytes` (1 MiB at most) and
/// hyper reads at most its buffer past it, so a window of twice the limit plus slack holds it.
fn window_capacity(max_header_bytes: usize) -> usize {
    max_header_bytes * 2 + 16 * 1024
}

/// When a stream last moved a byte, as milliseconds since `start`.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// Bytes read from the watched stream (for a tunnel's server side: what the client got).
    read: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            read: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// A tunnel moved `n` bytes from the client to the server.
    pub fn moved_up(&self, n: u64, counters: &UplinkCounters) {
        self.touch();
        UplinkCounters::add(&counters.bytes_up, n);
    }

    /// A tunnel moved `n` bytes from the server to the client: what the access log counts.
    pub fn moved_down(&self, n: u64, counters: &UplinkCounters) {
        self.touch();
        self.read.fetch_add(n, Ordering::Relaxed);
        UplinkCounters::add(&counters.bytes_down, n);
    }

    /// Bytes read so far from the stream this activity watches.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Returns once nothing moved for `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// The raw bytes most recently read from a client.
#[derive(Debug, Default)]
pub struct Window {
    bytes: Vec<u8>,
    capacity: usize,
    /// Off once the connection became a tunnel: no request head follows, so its bytes are
    /// never copied here.
    stopped: bool,
}

impl Window {
    pub fn new(max_header_bytes: usize) -> Arc<Mutex<Window>> {
        Arc::new(Mutex::new(Window {
            bytes: Vec::new(),
            capacity: window_capacity(max_header_bytes),
            stopped: false,
        }))
    }

    /// The connection is a tunnel from now on (CONNECT or a protocol upgrade).
    pub fn stop(&mut self) {
        self.stopped = true;
        self.bytes = Vec::new();
    }

    fn push(&mut self, data: &[u8]) {
        if self.stopped {
            return;
        }
        self.bytes.extend_from_slice(data);
        // Compacted only at twice the capacity, so a long body costs an amortised move per
        // byte instead of a move of the whole window per read.
        if self.bytes.len() > self.capacity * 2 {
            let excess = self.bytes.len() - self.capacity;
            self.bytes.drain(..excess);
        }
    }

    /// Finds the head of a `method` request in the window, drops everything up to its end, and
    /// says whether it carried both Content-Length and Transfer-Encoding. `None` when the head
    /// is not in the window.
    pub fn take_conflict(&mut self, method: &str) -> Option<bool> {
        let (start, end) = find_head(&self.bytes, method)?;
        let head = self.bytes.get(start..end)?;
        let conflict = has_both_framings(head);
        self.bytes.drain(..end);
        Some(conflict)
    }
}

/// The first `METHOD target HTTP/1.x` line and the end of its blank line. Searched anywhere,
/// not only at line starts: a body without a final newline runs straight into the next head.
fn find_head(bytes: &[u8], method: &str) -> Option<(usize, usize)> {
    let needle = format!("{method} ");
    let mut from = 0;
    while let Some(offset) = bytes
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
    {
        let start = from + offset;
        let rest = bytes.get(start..)?;
        let line_len = rest.windows(2).position(|w| w == b"\r\n")?;
        let line = rest.get(..line_len)?;
        if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
            let end = rest.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
            return Some((start, start + end));
        }
        from = start + 1;
    }
    None
}

fn has_both_framings(head: &[u8]) -> bool {
    let mut content_length = false;
    let mut transfer_encoding = false;
    for line in head.split(|&b| b == b'\n').skip(1) {
        let name = line
            .split(|&b| b == b':')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        content_length |= name.eq_ignore_ascii_case(b"content-length");
        transfer_encoding |= name.eq_ignore_ascii_case(b"transfer-encoding");
    }
    content_length && transfer_encoding
}

/// A stream that records its activity and, optionally, the bytes read (client side) or the
/// bytes moved (upstream side: written = up, read = down, counted as they move).
pub struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
    window: Option<Arc<Mutex<Window>>>,
    counters: Option<Arc<UplinkCounters>>,
}

impl<T> Watched<T> {
    /// The stream underneath, once nothing more needs watching through this wrapper.
    pub fn into_inner(self) -> T {
        self.inner
    }

    pub fn client(inner: T, activity: Arc<Activity>, window: Arc<Mutex<Window>>) -> Self {
        activity.touch();
        Watched {
            inner,
            activity,
            window: Some(window),
            counters: None,
        }
    }

    /// Activity only: the client side of an upgraded (WebSocket) connection.
    pub fn plain(inner: T, activity: Arc<Activity>) -> Self {
        activity.touch();
        Watched {
            inner,
            activity,
            window: None,
            counters: None,
        }
    }

    pub fn upstream(inner: T, activity: Arc<Activity>, counters: Arc<UplinkCounters>) -> Self {
        activity.touch();
        Watched {
            inner,
            activity,
            window: None,
            counters: Some(counters),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let new = buf.filled().get(before..).unwrap_or_default();
            if !new.is_empty() {
                self.activity.touch();
                self.activity
                    .read
                    .fetch_add(new.len() as u64, Ordering::Relaxed);
                if let Some(counters) = &self.counters {
                    UplinkCounters::add(&counters.bytes_down, new.len() as u64);
                }
                if let Some(window) = &self.window
                    && let Ok(mut window) = window.lock()
                {
                    window.push(new);
                }
            }
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result
            && n > 0
        {
            self.activity.touch();
            if let Some(counters) = &self.counters {
                UplinkCounters::add(&counters.bytes_up, n as u64);
            }
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, buffers);
        if let Poll::Ready(Ok(n)) = result
            && n > 0
        {
            self.activity.touch();
            if let Some(counters) = &self.counters {
                UplinkCounters::add(&counters.bytes_up, n as u64);
            }
        }
        result
    }

    /// hyper then hands a response's head and body over in one writev instead of copying them
    /// into one buffer.
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_conflicting_framing_in_the_right_head() {
        let mut window = Window {
            bytes: Vec::new(),
            capacity: 1 << 16,
            stopped: false,
        };
        window.push(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(window.take_conflict("POST"), Some(false));
        window.push(b"POST http://a/ HTTP/1.1\r\nHost: a\r\ncontent-length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        assert_eq!(window.take_conflict("POST"), Some(true));
        assert_eq!(window.take_conflict("GET"), None);
    }

    #[test]
    fn the_window_is_bounded() {
        let mut window = Window {
            bytes: Vec::new(),
            capacity: 10,
            stopped: false,
        };
        window.push(&[b'x'; 25]);
        assert_eq!(window.bytes.len(), 10);
        window.push(&[b'x'; 5]);
        assert_eq!(
            window.bytes.len(),
            15,
            "compacted only past twice the capacity"
        );
        window.stop();
        window.push(&[b'x'; 5]);
        assert!(window.bytes.is_empty(), "a tunnel's bytes are not recorded");
    }
}
