//! The load generators and what they measure, from threads in the LAN clients' namespaces with
//! std sockets: the spread check, requests per second over keep-alive connections and with a
//! name on a fresh connection each, one large download, one large upload through a CONNECT
//! tunnel, and the latency a request gains through the proxy; plus the small HTTP/1.1 client
//! and the namespace helpers they share.

use std::{
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use balancer_tests::lab::{DNS_NAME, HTTP_PORT, LAN_GATEWAY, Lab, SERVER_ADDR, SINK_PORT};

use super::{DOWNLOAD_LIMIT, IO_TIMEOUT, Params, Proxy, SMALL_BYTES, median};

/// 30 requests through `proxy`, each on a fresh connection; the internet host answers with the
/// address it saw. Every uplink must carry some (an ISP drops other sources, so a request that
/// left by the wrong uplink fails instead).
pub(super) fn check_spread(lab: &Lab, proxy: Proxy) -> anyhow::Result<Vec<(Ipv4Addr, u32)>> {
    let target = SocketAddrV4::new(LAN_GATEWAY, proxy.port());
    let request = format!(
        "GET http://{SERVER_ADDR}:{HTTP_PORT}/ HTTP/1.1\r\nHost: {SERVER_ADDR}:{HTTP_PORT}\r\nConnection: close\r\n\r\n"
    );
    let bodies = in_namespace(&lab.client(1), move || {
        let mut bodies = Vec::new();
        for _ in 0..30 {
            let mut stream = connect(target)?;
            let deadline = Instant::now() + IO_TIMEOUT;
            let response = exchange(&mut stream, request.as_bytes(), deadline, true)?;
            ensure!(
                response.status == 200,
                "{} answered {}",
                proxy.name(),
                response.status
            );
            bodies.push(String::from_utf8_lossy(&response.body).into_owned());
        }
        Ok(bodies)
    })
    .with_context(|| format!("requests through {}", proxy.name()))?;
    let mut seen: Vec<(Ipv4Addr, u32)> = Vec::new();
    for body in bodies {
        let ip: Ipv4Addr = body
            .trim()
            .split(':')
            .next()
            .and_then(|ip| ip.parse().ok())
            .with_context(|| format!("not an address: {body:?}"))?;
        match seen.iter_mut().find(|(seen, _)| *seen == ip) {
            Some((_, n)) => *n += 1,
            None => seen.push((ip, 1)),
        }
    }
    seen.sort();
    let sources: Vec<Ipv4Addr> = (1..=lab.uplinks()).map(|i| lab.uplink_source(i)).collect();
    ensure!(
        seen.len() == sources.len() && seen.iter().all(|(ip, _)| sources.contains(ip)),
        "{}: the server saw {seen:?}, not every one of {sources:?}",
        proxy.name()
    );
    Ok(seen)
}

/// `connections` keep-alive client connections (alternating between the two LAN clients), each
/// sending small requests one after another for `seconds`: (responses per second, errors).
pub(super) fn requests_per_second(
    lab: &Lab,
    proxy: Proxy,
    params: &Params,
) -> anyhow::Result<(f64, u64)> {
    let target = SocketAddrV4::new(LAN_GATEWAY, proxy.port());
    let request = format!(
        "GET http://{SERVER_ADDR}:{HTTP_PORT}/bytes/{SMALL_BYTES} HTTP/1.1\r\nHost: {SERVER_ADDR}:{HTTP_PORT}\r\n\r\n"
    );
    let request = request.as_str();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(params.seconds);
    let results: Vec<anyhow::Result<(u64, u64)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..params.connections)
            .map(|k| {
                let ns = lab.client(1 + (k as usize % 2));
                scope.spawn(move || {
                    enter(&ns)?;
                    Ok(keep_alive_loop(target, request, deadline))
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("worker panicked")))
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let (mut done, mut errors) = (0, 0);
    for result in results {
        let (d, e) = result?;
        done += d;
        errors += e;
    }
    ensure!(
        done > 0,
        "no request through {} succeeded ({errors} errors)",
        proxy.name()
    );
    Ok((done as f64 / elapsed, errors))
}

/// Like [`requests_per_second`], but each request names the server (`www.lab.example`, which
/// the proxy resolves through the lab's DNS) and goes on a fresh client connection, so every
/// request needs the name's address: what a resolver cache saves shows here.
pub(super) fn named_requests_per_second(
    lab: &Lab,
    proxy: Proxy,
    params: &Params,
) -> anyhow::Result<(f64, u64)> {
    let target = SocketAddrV4::new(LAN_GATEWAY, proxy.port());
    let request = format!(
        "GET http://www.{DNS_NAME}:{HTTP_PORT}/bytes/{SMALL_BYTES} HTTP/1.1\r\nHost: www.{DNS_NAME}:{HTTP_PORT}\r\nConnection: close\r\n\r\n"
    );
    let request = request.as_str();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(params.seconds);
    let results: Vec<anyhow::Result<(u64, u64)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..params.connections)
            .map(|k| {
                let ns = lab.client(1 + (k as usize % 2));
                scope.spawn(move || {
                    enter(&ns)?;
                    let (mut done, mut errors) = (0u64, 0u64);
                    while Instant::now() < deadline && errors < 100 {
                        let answer = connect(target).and_then(|mut stream| {
                            exchange(
                                &mut stream,
                                request.as_bytes(),
                                Instant::now() + IO_TIMEOUT,
                                false,
                            )
                        });
                        match answer {
                            Ok(response) if response.status == 200 => done += 1,
                            _ => errors += 1,
                        }
                    }
                    Ok((done, errors))
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("worker panicked")))
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let (mut done, mut errors) = (0, 0);
    for result in results {
        let (d, e) = result?;
        done += d;
        errors += e;
    }
    ensure!(
        done > 0,
        "no named request through {} succeeded ({errors} errors)",
        proxy.name()
    );
    Ok((done as f64 / elapsed, errors))
}

/// One upload of `bytes` from LAN client 1 through a CONNECT tunnel to the internet host's
/// sink: Mbit/s from connect until the last byte was handed to the tunnel (the socket buffers
/// still hold a few MB then, alike for both proxies). The sink's count, when it comes back
/// after the half-close, must match.
pub(super) fn upload(lab: &Lab, proxy: Proxy, bytes: u64) -> anyhow::Result<f64> {
    let target = SocketAddrV4::new(LAN_GATEWAY, proxy.port());
    let request = format!(
        "CONNECT {SERVER_ADDR}:{SINK_PORT} HTTP/1.1\r\nHost: {SERVER_ADDR}:{SINK_PORT}\r\n\r\n"
    );
    upload_to(lab, target, Some(request), bytes)
        .with_context(|| format!("uploading {bytes} bytes through {}", proxy.name()))
}

/// The same upload sent straight to the sink through the gateway's data plane, no proxy: what
/// the lab's client, sink and veths allow, the ceiling of the CONNECT upload row.
pub(super) fn upload_direct(lab: &Lab, bytes: u64) -> anyhow::Result<f64> {
    let target = SocketAddrV4::new(SERVER_ADDR, SINK_PORT);
    upload_to(lab, target, None, bytes).with_context(|| format!("uploading {bytes} bytes directly"))
}

fn upload_to(
    lab: &Lab,
    target: SocketAddrV4,
    connect_head: Option<String>,
    bytes: u64,
) -> anyhow::Result<f64> {
    in_namespace(&lab.client(1), move || {
        let started = Instant::now();
        let mut stream = connect(target)?;
        let Some(request) = connect_head else {
            return send_and_count(stream, started, bytes);
        };
        stream
            .write_all(request.as_bytes())
            .context("sending CONNECT")?;
        let mut head = Vec::with_capacity(256);
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = stream
                .read(&mut byte)
                .context("reading the CONNECT answer")?;
            ensure!(n == 1, "closed before the CONNECT answer");
            head.push(byte[0]);
            ensure!(head.len() < 4096, "CONNECT answer over 4 KiB");
        }
        let text = String::from_utf8_lossy(&head);
        ensure!(
            text.split(' ').nth(1) == Some("200"),
            "CONNECT answered {text:?}"
        );
        send_and_count(stream, started, bytes)
    })
}

/// Sends `bytes` on `stream`, half-closes, and checks the sink's count when it comes back:
/// Mbit/s from `started` until the last byte was handed to the socket.
fn send_and_count(mut stream: TcpStream, started: Instant, bytes: u64) -> anyhow::Result<f64> {
    // Large writes, so the client's own system calls cost little next to what it measures.
    let chunk = vec![0xa5u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left)
            .unwrap_or(chunk.len())
            .min(chunk.len());
        stream
            .write_all(&chunk[..n])
            .with_context(|| format!("uploading, {left} bytes left"))?;
        left -= n as u64;
        ensure!(
            started.elapsed() < DOWNLOAD_LIMIT,
            "upload deadline passed with {left} bytes left"
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    // A proxy that ends the whole tunnel on the client's half-close sends no count.
    let _ = stream.read_to_string(&mut answer);
    if let Ok(counted) = answer.trim().parse::<u64>() {
        ensure!(
            counted == bytes,
            "the sink counted {counted} of {bytes} bytes"
        );
    }
    Ok(bytes as f64 * 8.0 / seconds / 1e6)
}

/// Requests on one connection until `deadline`, reconnecting after an error (at most 100).
fn keep_alive_loop(target: SocketAddrV4, request: &str, deadline: Instant) -> (u64, u64) {
    let (mut done, mut errors) = (0, 0);
    let mut stream: Option<TcpStream> = None;
    while Instant::now() < deadline && errors < 100 {
        let current = match stream.take() {
            Some(stream) => Ok(stream),
            None => connect(target),
        };
        let Ok(mut current) = current else {
            errors += 1;
            continue;
        };
        match exchange(
            &mut current,
            request.as_bytes(),
            Instant::now() + IO_TIMEOUT,
            false,
        ) {
            Ok(response) if response.status == 200 => {
                done += 1;
                stream = Some(current);
            }
            _ => errors += 1,
        }
    }
    (done, errors)
}

/// One download of `bytes` through `proxy` from LAN client 1: Mbit/s from connect to last byte.
pub(super) fn download(lab: &Lab, proxy: Proxy, bytes: u64) -> anyhow::Result<f64> {
    let target = SocketAddrV4::new(LAN_GATEWAY, proxy.port());
    let request = format!(
        "GET http://{SERVER_ADDR}:{HTTP_PORT}/bytes/{bytes} HTTP/1.1\r\nHost: {SERVER_ADDR}:{HTTP_PORT}\r\nConnection: close\r\n\r\n"
    );
    in_namespace(&lab.client(1), move || {
        let started = Instant::now();
        let mut stream = connect(target)?;
        let response = exchange(
            &mut stream,
            request.as_bytes(),
            started + DOWNLOAD_LIMIT,
            false,
        )?;
        let seconds = started.elapsed().as_secs_f64();
        ensure!(
            (response.status, response.length) == (200, bytes),
            "download answered {} with {} bytes",
            response.status,
            response.length
        );
        Ok(bytes as f64 * 8.0 / seconds / 1e6)
    })
    .with_context(|| format!("downloading {bytes} bytes through {}", proxy.name()))
}

/// Medians in milliseconds of `count` small requests from LAN client 1 through `proxy` and as
/// many sent directly to the server through the gateway's data plane, taking turns request by
/// request (so drift in the machine's load hits both alike), each on a fresh connection,
/// connect to last byte: (through the proxy, direct).
pub(super) fn latency(lab: &Lab, proxy: Proxy, count: u32) -> anyhow::Result<(f64, f64)> {
    let through = (
        SocketAddrV4::new(LAN_GATEWAY, proxy.port()),
        format!(
            "GET http://{SERVER_ADDR}:{HTTP_PORT}/bytes/{SMALL_BYTES} HTTP/1.1\r\nHost: {SERVER_ADDR}:{HTTP_PORT}\r\nConnection: close\r\n\r\n"
        ),
    );
    let direct = (
        SocketAddrV4::new(SERVER_ADDR, HTTP_PORT),
        format!(
            "GET /bytes/{SMALL_BYTES} HTTP/1.1\r\nHost: {SERVER_ADDR}:{HTTP_PORT}\r\nConnection: close\r\n\r\n"
        ),
    );
    let (mut through, mut direct) = in_namespace(&lab.client(1), move || {
        let mut times = [
            Vec::with_capacity(count as usize),
            Vec::with_capacity(count as usize),
        ];
        let mut errors = 0;
        for _ in 0..count {
            for (k, (target, request)) in [&through, &direct].into_iter().enumerate() {
                let started = Instant::now();
                let answer = connect(*target).and_then(|mut stream| {
                    exchange(&mut stream, request.as_bytes(), started + IO_TIMEOUT, false)
                });
                match answer {
                    Ok(response) if response.status == 200 => {
                        times[k].push(started.elapsed().as_secs_f64() * 1e3)
                    }
                    _ => errors += 1,
                }
            }
        }
        ensure!(
            errors * 10 <= count,
            "{errors} of {} requests failed",
            2 * count
        );
        let [through, direct] = times;
        Ok((through, direct))
    })
    .with_context(|| format!("latency through {} and direct", proxy.name()))?;
    through.sort_by(f64::total_cmp);
    direct.sort_by(f64::total_cmp);
    Ok((median(&through), median(&direct)))
}

fn connect(target: SocketAddrV4) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&target.into(), IO_TIMEOUT)
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends `request` and reads one response whose body has a Content-Length: (status, the body
/// if `keep_body`, else nothing). Fails past `deadline`.
fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    deadline: Instant,
    keep_body: bool,
) -> anyhow::Result<Response> {
    stream.write_all(request).context("sending the request")?;
    READ_BUFFER.with_borrow_mut(|buffer| read_response(stream, buffer, deadline, keep_body))
}

thread_local! {
    /// Each load thread's read buffer, reused: a fresh zeroed 64 KiB per request cost the
    /// client a memset per request, charged alike to both proxies' request rates.
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 64 * 1024]);
}

fn read_response(
    stream: &mut TcpStream,
    buffer: &mut [u8],
    deadline: Instant,
    keep_body: bool,
) -> anyhow::Result<Response> {
    let mut head = Vec::with_capacity(1024);
    let end = loop {
        let n = stream.read(buffer).context("reading the head")?;
        ensure!(n > 0, "closed before the response head");
        head.extend_from_slice(&buffer[..n]);
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        ensure!(head.len() < 64 * 1024, "response head over 64 KiB");
        ensure!(Instant::now() < deadline, "deadline passed in the head");
    };
    let text = String::from_utf8_lossy(&head[..end]);
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {text:?}"))?;
    let length: u64 = text
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())
                .flatten()
        })
        .with_context(|| format!("no Content-Length in {text:?}"))?;
    let mut body = if keep_body {
        head[end..].to_vec()
    } else {
        Vec::new()
    };
    let mut got = (head.len() - end) as u64;
    ensure!(got <= length, "more than Content-Length arrived");
    while got < length {
        let want = usize::try_from(length - got)
            .unwrap_or(usize::MAX)
            .min(buffer.len());
        let n = stream
            .read(&mut buffer[..want])
            .with_context(|| format!("reading the body after {got} of {length} bytes"))?;
        ensure!(n > 0, "short body: {got} of {length} bytes");
        if keep_body {
            body.extend_from_slice(&buffer[..n]);
        }
        got += n as u64;
        ensure!(
            Instant::now() < deadline,
            "deadline passed after {got} of {length} bytes"
        );
    }
    Ok(Response {
        status,
        length,
        body,
    })
}

/// One response: its status, Content-Length and (when asked for) body.
struct Response {
    status: u16,
    length: u64,
    body: Vec<u8>,
}

/// Moves the calling thread into network namespace `ns`.
fn enter(ns: &str) -> anyhow::Result<()> {
    let file = File::open(format!("/run/netns/{ns}")).with_context(|| format!("opening {ns}"))?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering {ns}"))
}

/// Runs `f` on a thread that entered `ns` (setns is per thread; the caller stays put).
pub(super) fn in_namespace<T: Send>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter(ns)?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("thread in {ns} panicked")))
    })
}
