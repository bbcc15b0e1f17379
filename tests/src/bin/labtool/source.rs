//! Clients of the source server (TCP 9001): `download` (one stream) and `streams` (N parallel
//! streams), each stream reporting the translated source the server saw and its longest stall.

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read},
    net::{Shutdown, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::{CHUNK, ClientOpts, Transfer, bounded_seconds, net::connect};

/// Longest line the source server's peer header may be.
const MAX_HEADER: u64 = 64;

pub(crate) fn download(opts: &ClientOpts, seconds: f64) -> anyhow::Result<()> {
    let duration = bounded_seconds(seconds)?;
    let started = Instant::now();
    let result = receive_from_source(opts, started, started + duration, started)?;
    let mut summary = Transfer::new(result.bytes, started.elapsed());
    summary.max_gap_ms = Some(result.max_gap_ms);
    summary.peer = Some(result.peer);
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

/// One download from the source server.
#[derive(Serialize)]
struct StreamResult {
    /// The source `<ip>:<port>` the server saw (after any NAT), from its header line.
    peer: String,
    bytes: u64,
    /// Bytes that arrived after the warm-up.
    steady_bytes: u64,
    seconds: f64,
    mbit_per_s: f64,
    /// Longest time without data: between the start and the first data, between two reads, and
    /// between the last data and the end.
    max_gap_ms: f64,
}

/// Connects to the source server, reads its header line (the peer it sees), then counts data
/// until `end` or until the server closes. A reset or a read error is an error.
fn receive_from_source(
    opts: &ClientOpts,
    start: Instant,
    end: Instant,
    warmup_end: Instant,
) -> anyhow::Result<StreamResult> {
    let mut stream = connect(opts)?;
    stream.set_read_timeout(Some(opts.timeout()))?;
    // The header byte by byte: nothing of the data after it may be swallowed by a buffer.
    let mut header = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = stream
            .read(&mut byte)
            .context("reading the source's header line")?;
        if n == 0 {
            bail!("the source closed before its header line");
        }
        if byte[0] == b'\n' {
            break;
        }
        header.push(byte[0]);
        if header.len() as u64 > MAX_HEADER {
            bail!("the source's header line is too long (an old source server without one?)");
        }
    }
    let peer = String::from_utf8_lossy(&header).into_owned();
    peer.parse::<SocketAddr>()
        .with_context(|| format!("the source's header {peer:?} is not <ip>:<port>"))?;

    let mut buf = vec![0u8; CHUNK];
    let mut bytes: u64 = 0;
    let mut steady_bytes: u64 = 0;
    let mut last = start;
    let mut max_gap = Duration::ZERO;
    loop {
        let now = Instant::now();
        let left = end.saturating_duration_since(now);
        if left.is_zero() {
            break;
        }
        stream.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let now = Instant::now();
                max_gap = max_gap.max(now.saturating_duration_since(last));
                last = now;
                bytes += n as u64;
                if now >= warmup_end {
                    steady_bytes += n as u64;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "reading from the source as {peer} after {bytes} bytes, {:.2} s",
                        start.elapsed().as_secs_f64()
                    )
                });
            }
        }
    }
    let finished = Instant::now().min(end);
    max_gap = max_gap.max(finished.saturating_duration_since(last));
    let _ = stream.shutdown(Shutdown::Both);
    let seconds = finished
        .saturating_duration_since(start)
        .as_secs_f64()
        .max(1e-9);
    Ok(StreamResult {
        peer,
        bytes,
        steady_bytes,
        seconds,
        mbit_per_s: bytes as f64 * 8.0 / seconds / 1e6,
        max_gap_ms: max_gap.as_secs_f64() * 1e3,
    })
}

/// Per source address the server saw, in a `streams` summary.
#[derive(Default, Serialize)]
struct SourceShare {
    streams: u32,
    bytes: u64,
    steady_bytes: u64,
}

#[derive(Serialize)]
struct StreamsSummary {
    count: u32,
    succeeded: u32,
    failed: u32,
    seconds: f64,
    bytes: u64,
    mbit_per_s: f64,
    /// From the end of the warm-up to the end.
    steady_seconds: f64,
    steady_bytes: u64,
    steady_mbit_per_s: f64,
    sources: BTreeMap<String, SourceShare>,
    streams: Vec<StreamResult>,
    errors: Vec<String>,
}

pub(crate) fn streams(
    opts: &ClientOpts,
    count: u32,
    duration: Duration,
    warmup: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let end = start + duration;
    let results: Vec<anyhow::Result<StreamResult>> = thread::scope(|s| {
        let handles: Vec<_> = (0..count)
            .map(|_| s.spawn(|| receive_from_source(opts, start, end, start + warmup)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("stream thread panicked")))
            })
            .collect()
    });
    let seconds = duration.as_secs_f64();
    let steady_seconds = (duration - warmup).as_secs_f64().max(1e-9);
    let mut summary = StreamsSummary {
        count,
        succeeded: 0,
        failed: 0,
        seconds,
        bytes: 0,
        mbit_per_s: 0.0,
        steady_seconds,
        steady_bytes: 0,
        steady_mbit_per_s: 0.0,
        sources: BTreeMap::new(),
        streams: Vec::new(),
        errors: Vec::new(),
    };
    for result in results {
        match result {
            Ok(stream) => {
                summary.succeeded += 1;
                summary.bytes += stream.bytes;
                summary.steady_bytes += stream.steady_bytes;
                let ip = stream
                    .peer
                    .parse::<SocketAddr>()
                    .map_or_else(|_| stream.peer.clone(), |a| a.ip().to_string());
                let share = summary.sources.entry(ip).or_default();
                share.streams += 1;
                share.bytes += stream.bytes;
                share.steady_bytes += stream.steady_bytes;
                summary.streams.push(stream);
            }
            Err(e) => {
                summary.failed += 1;
                summary.errors.push(format!("{e:#}"));
            }
        }
    }
    summary.mbit_per_s = summary.bytes as f64 * 8.0 / seconds / 1e6;
    summary.steady_mbit_per_s = summary.steady_bytes as f64 * 8.0 / steady_seconds / 1e6;
    println!("{}", serde_json::to_string(&summary)?);
    if summary.failed > 0 {
        bail!(
            "{} of {count} streams failed: {}",
            summary.failed,
            summary.errors.join("; ")
        );
    }
    Ok(())
}
