//! The request/answer clients: `udp-whoami`, `http-get`, `upload` (to the sink) and `tcp-many`
//! (N sequential whoami connections and the sources the server saw).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::{
    CHUNK, ClientOpts, Transfer, bounded_seconds,
    net::{any_addr, connect, udp_ask},
};

pub(crate) fn udp_whoami(opts: &ClientOpts, attempts: u32) -> anyhow::Result<()> {
    let local = opts
        .bind
        .unwrap_or_else(|| SocketAddr::new(any_addr(&opts.addr), 0));
    let socket = UdpSocket::bind(local).with_context(|| format!("binding {local}"))?;
    socket
        .connect(opts.addr)
        .with_context(|| format!("connecting to {}", opts.addr))?;
    if let Some(reply) = udp_ask(&socket, b"whoami\n", opts.timeout(), attempts, |_| true)? {
        print!("{}", String::from_utf8_lossy(&reply));
        return Ok(());
    }
    bail!("no answer from {} within {:?}", opts.addr, opts.timeout())
}

pub(crate) fn http_get(opts: &ClientOpts, path: &str, count: bool) -> anyhow::Result<()> {
    let mut stream = connect(opts)?;
    stream.set_read_timeout(Some(opts.timeout()))?;
    let started = Instant::now();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        opts.addr
    )?;
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader
        .read_line(&mut status)
        .context("reading the status line")?;
    let code = status.split_whitespace().nth(1).unwrap_or("");
    let mut length: Option<u64> = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            bail!("connection closed inside the headers");
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.trim().parse().context("Content-Length")?);
            }
        }
    }
    let deadline = started + opts.timeout();
    let mut got: u64 = 0;
    let mut body = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    let mut last = Instant::now();
    let mut max_gap = Duration::ZERO;
    while length.is_none_or(|l| got < l) {
        if Instant::now() >= deadline {
            bail!("timed out after {got} body bytes");
        }
        let n = reader.read(&mut buf).with_context(|| {
            format!(
                "reading the body after {got} bytes, {:.2} s",
                started.elapsed().as_secs_f64()
            )
        })?;
        if n == 0 {
            break;
        }
        let now = Instant::now();
        max_gap = max_gap.max(now - last);
        last = now;
        got += n as u64;
        if !count && body.len() < 1 << 20 {
            body.extend_from_slice(&buf[..n]);
        }
    }
    if code != "200" {
        bail!("HTTP status {}", status.trim_end());
    }
    if let Some(l) = length {
        if got != l {
            bail!("short body: {got} of {l} bytes");
        }
    }
    if count {
        let mut summary = Transfer::new(got, started.elapsed());
        summary.max_gap_ms = Some(max_gap.as_secs_f64() * 1e3);
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        std::io::stdout().write_all(&body)?;
    }
    Ok(())
}

pub(crate) fn upload(opts: &ClientOpts, seconds: f64) -> anyhow::Result<()> {
    let duration = bounded_seconds(seconds)?;
    let mut stream = connect(opts)?;
    let started = Instant::now();
    let buf = vec![0x5au8; CHUNK];
    let mut sent: u64 = 0;
    stream.set_write_timeout(Some(Duration::from_millis(200)))?;
    while started.elapsed() < duration {
        match stream.write(&buf) {
            Ok(n) => sent += n as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e).context("writing to the sink"),
        }
    }
    stream.shutdown(Shutdown::Write)?;
    // The queued bytes still have to drain through the shaper before the sink sees EOF.
    stream.set_read_timeout(Some(opts.timeout().max(Duration::from_secs(10))))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .context("reading the sink's byte count")?;
    let elapsed = started.elapsed();
    let bytes: u64 = answer
        .trim()
        .parse()
        .with_context(|| format!("sink answered {answer:?}"))?;
    if bytes != sent {
        bail!("sink counted {bytes} bytes, {sent} were sent");
    }
    println!("{}", serde_json::to_string(&Transfer::new(bytes, elapsed))?);
    Ok(())
}

#[derive(Serialize)]
struct ManySummary {
    count: u32,
    succeeded: u32,
    failed: u32,
    /// How many answers named each source address (the server's view: after any NAT).
    sources: BTreeMap<String, u32>,
    /// How many distinct (address, port) pairs the server saw.
    distinct_peers: usize,
    /// Connections not tried because --max-failures was reached.
    skipped: u32,
    /// The first few errors.
    errors: Vec<String>,
}

/// N sequential short connections to a TCP whoami server.
pub(crate) fn tcp_many(opts: &ClientOpts, count: u32, max_failures: u32) -> anyhow::Result<()> {
    let mut summary = ManySummary {
        count,
        succeeded: 0,
        failed: 0,
        sources: BTreeMap::new(),
        distinct_peers: 0,
        skipped: 0,
        errors: Vec::new(),
    };
    let mut peers = std::collections::BTreeSet::new();
    for k in 0..count {
        if summary.failed >= max_failures {
            summary.skipped = count - k;
            break;
        }
        match whoami_once(opts) {
            Ok(peer) => {
                summary.succeeded += 1;
                *summary.sources.entry(peer.ip().to_string()).or_default() += 1;
                peers.insert(peer);
            }
            Err(e) => {
                summary.failed += 1;
                if summary.errors.len() < 5 {
                    summary.errors.push(format!("connection {k}: {e:#}"));
                }
            }
        }
    }
    summary.distinct_peers = peers.len();
    println!("{}", serde_json::to_string(&summary)?);
    if summary.failed > 0 {
        bail!(
            "{} of {count} connections failed ({} not tried): {}",
            summary.failed,
            summary.skipped,
            summary.errors.join("; ")
        );
    }
    Ok(())
}

/// One whoami exchange: connect, read the `<ip>:<port>` line, close.
fn whoami_once(opts: &ClientOpts) -> anyhow::Result<SocketAddr> {
    let stream = connect(opts)?;
    stream.set_read_timeout(Some(opts.timeout()))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .context("reading the whoami answer")?;
    let _ = stream.shutdown(Shutdown::Write);
    line.trim()
        .parse()
        .with_context(|| format!("whoami answered {line:?}"))
}
