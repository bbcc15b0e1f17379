//! `serve`: the internet host's servers (TCP/UDP whoami 9000, HTTP 8080, source 9001, sink
//! 9002), one thread per connection, until killed.

use std::{
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::CHUNK;

/// Largest body `GET /bytes/<n>` serves, so one request cannot run for ever.
const MAX_HTTP_BYTES: u64 = 1 << 30;
/// How long the source server streams at most.
const SOURCE_LIMIT: Duration = Duration::from_secs(60);
/// A connection idle this long is dropped, so forgotten clients do not pin threads.
/// The sink's reads: large, so its own system calls cost little next to what it measures.
const SINK_READ: usize = 256 * 1024;
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) fn serve(addr: Ipv4Addr) -> anyhow::Result<()> {
    let tcp = |port: u16| -> anyhow::Result<TcpListener> {
        TcpListener::bind(SocketAddrV4::new(addr, port))
            .with_context(|| format!("binding TCP {addr}:{port}"))
    };
    let whoami = tcp(9000)?;
    let http = tcp(8080)?;
    let source = tcp(9001)?;
    let sink = tcp(9002)?;
    let udp = UdpSocket::bind(SocketAddrV4::new(addr, 9000))
        .with_context(|| format!("binding UDP {addr}:9000"))?;

    let mut threads = vec![
        accept_loop(whoami, serve_whoami),
        accept_loop(http, serve_http),
        accept_loop(source, serve_source),
        accept_loop(sink, serve_sink),
    ];
    threads.push(thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            match udp.recv_from(&mut buf) {
                Ok((_, peer)) => {
                    let _ = udp.send_to(format!("{peer}\n").as_bytes(), peer);
                }
                Err(e) => eprintln!("udp whoami: {e}"),
            }
        }
    }));
    eprintln!("labtool serve: listening on {addr} (tcp 9000 8080 9001 9002, udp 9000)");
    for t in threads {
        let _ = t.join();
    }
    bail!("a server thread ended")
}

fn accept_loop(
    listener: TcpListener,
    handler: fn(TcpStream, SocketAddr) -> std::io::Result<()>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    thread::spawn(move || {
                        // As web servers do (nginx's tcp_nodelay): a response's head and body
                        // go out at once. With Nagle, the body waits for the head's ACK, which a
                        // client that reuses the connection (squid's server pconns) delays 40 ms.
                        let _ = stream.set_nodelay(true);
                        let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
                        let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
                        if let Err(e) = handler(stream, peer) {
                            if !matches!(
                                e.kind(),
                                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset
                            ) {
                                eprintln!("{peer}: {e}");
                            }
                        }
                    });
                }
                // EMFILE and friends: back off instead of spinning.
                Err(e) => {
                    eprintln!("accept: {e}");
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    })
}

fn serve_whoami(mut stream: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    stream.write_all(format!("{peer}\n").as_bytes())?;
    std::io::copy(&mut stream, &mut std::io::sink())?;
    Ok(())
}

fn serve_source(mut stream: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    stream.write_all(format!("{peer}\n").as_bytes())?;
    let buf = vec![0xa5u8; CHUNK];
    let started = Instant::now();
    while started.elapsed() < SOURCE_LIMIT {
        stream.write_all(&buf)?;
    }
    Ok(())
}

fn serve_sink(mut stream: TcpStream, _peer: SocketAddr) -> std::io::Result<()> {
    // Large reads: with io::copy's 8 KiB the sink's own system calls took a large share of the
    // two vCPUs in the proxy bench's upload row, for every proxy alike.
    let mut buffer = vec![0u8; SINK_READ];
    let mut bytes = 0u64;
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => bytes += n as u64,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    stream.write_all(format!("{bytes}\n").as_bytes())?;
    Ok(())
}

fn serve_http(stream: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request)? == 0 {
            return Ok(());
        }
        let mut keep_alive = request.trim_end().ends_with("HTTP/1.1");
        let mut body_len: u64 = 0;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("connection") {
                    keep_alive = !value.eq_ignore_ascii_case("close");
                } else if name.eq_ignore_ascii_case("content-length") {
                    body_len = value.parse().unwrap_or(0);
                }
            }
        }
        // A request body (e.g. a POST) is read and ignored.
        std::io::copy(&mut (&mut reader).take(body_len), &mut std::io::sink())?;
        let mut parts = request.split_whitespace();
        let method = parts.next().unwrap_or("");
        let path = parts.next().unwrap_or("/");
        let connection = if keep_alive { "keep-alive" } else { "close" };
        match path.strip_prefix("/bytes/").map(str::parse::<u64>) {
            Some(Ok(n)) if n <= MAX_HTTP_BYTES => {
                write!(
                    writer,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\nConnection: {connection}\r\n\r\n"
                )?;
                if method != "HEAD" {
                    let buf = vec![0xa5u8; CHUNK];
                    let mut left = n;
                    while left > 0 {
                        let take = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
                        writer.write_all(&buf[..take])?;
                        left -= take as u64;
                    }
                }
            }
            Some(_) => {
                let body = format!("n must be an integer <= {MAX_HTTP_BYTES}\n");
                write!(
                    writer,
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )?;
                return Ok(());
            }
            None => {
                let body = format!("{peer}\n");
                write!(
                    writer,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
                    body.len()
                )?;
                if method != "HEAD" {
                    writer.write_all(body.as_bytes())?;
                }
            }
        }
        writer.flush()?;
        if !keep_alive {
            return Ok(());
        }
    }
}
