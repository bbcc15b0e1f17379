//! `labtool`: the lab's servers (`serve`, run in the internet namespace) and the small, always
//! time-bounded clients the tests and the demo use against them.
//!
//! Servers (all bound to one address, 198.18.9.1 in the lab):
//! - TCP 9000 "whoami": writes the peer as `<ip>:<port>\n`, discards input until EOF, closes.
//! - UDP 9000 "whoami": answers each datagram with `<ip>:<port>\n`.
//! - HTTP 8080: any request gets 200 with body `<ip>:<port>\n`; `GET /bytes/<n>` gets n bytes.
//! - TCP 9001 "source": first writes the peer it sees as `<ip>:<port>\n` (so a client behind a
//!   NAT learns its translated address), then streams data until the client closes or 60 s pass.
//! - TCP 9002 "sink": discards until EOF, then answers with the byte count as text.
//!
//! Clients (run in the LAN clients or the gateway): `tcp-whoami`, `udp-whoami`, `http-get`,
//! `download`, `upload`, `dns`, `wait-tcp`, and for the data plane `ping` (ICMP echo over a raw
//! socket), `tcp-many` (N sequential short connections, a histogram of the source addresses the
//! server saw) and `streams` (N parallel downloads with the translated source of each).
//! `--bind` takes `ADDR` or `ADDR:PORT` (a fixed source port).
//!
//! Every client exits non-zero on failure or timeout so a caller can assert on the status; the
//! clients that print a JSON summary print it also when they fail, before exiting non-zero.
//!
//! Modules: `serve` (the servers), `clients` (whoami over UDP, HTTP, upload, tcp-many),
//! `source` (download and streams from the source server), `ping`, `dns`, and `net` (the
//! bounded TCP connect from an optional local address, and the UDP ask-and-retry).
//! This file holds the command line, its dispatch and what several clients share.

mod clients;
mod dns;
mod icmp_probe;
mod net;
mod ping;
mod raw;
mod serve;
mod source;
mod tun_relay;
mod udp_peer;

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::{
    clients::{http_get, tcp_many, udp_whoami, upload},
    dns::dns_query,
    icmp_probe::icmp_probe,
    net::connect,
    ping::ping,
    serve::serve,
    source::{download, streams},
    tun_relay::tun_relay,
    udp_peer::udp_peer,
};

/// Upper bound on any client's duration, whatever the caller asks for.
const MAX_CLIENT_SECONDS: f64 = 600.0;
const CHUNK: usize = 64 * 1024;
/// Upper bound on `--count` of the repeating clients (ping, tcp-many).
const MAX_COUNT: u32 = 10_000;
/// Upper bound on parallel streams.
const MAX_STREAMS: u32 = 256;

#[derive(Parser)]
#[command(
    name = "labtool",
    about = "Servers and clients for the balancer's namespace lab"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run all servers (TCP/UDP whoami 9000, HTTP 8080, source 9001, sink 9002) until killed.
    Serve {
        /// Address every server binds to.
        #[arg(long, default_value = "198.18.9.1")]
        addr: Ipv4Addr,
    },
    /// Connect to a TCP whoami server and print the address it saw us as.
    TcpWhoami(ClientOpts),
    /// Ask a UDP whoami server (a few attempts within the timeout) and print the address it saw.
    UdpWhoami {
        #[command(flatten)]
        opts: ClientOpts,
        /// Datagrams to send, spread over the timeout; the first answer wins.
        #[arg(long, default_value_t = 3)]
        attempts: u32,
    },
    /// HTTP GET a path and print the body (or, with --count, the number of body bytes and rate).
    HttpGet {
        #[command(flatten)]
        opts: ClientOpts,
        #[arg(long, default_value = "/")]
        path: String,
        /// Print a JSON summary of the transfer instead of the body.
        #[arg(long)]
        count: bool,
    },
    /// Read from a source server for a few seconds; prints JSON {bytes, seconds, mbit_per_s}.
    Download {
        #[command(flatten)]
        opts: ClientOpts,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Write to a sink server for a few seconds; prints JSON {bytes, seconds, mbit_per_s}
    /// where bytes is the count the server confirmed.
    Upload {
        #[command(flatten)]
        opts: ClientOpts,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Resolve a name with one A query to a DNS server and print the addresses, one per line.
    Dns {
        /// The DNS server, e.g. 198.18.9.53 (port 53 unless given).
        server: String,
        name: String,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        #[arg(long, default_value_t = 3)]
        attempts: u32,
        /// Local address to send from.
        #[arg(long)]
        bind: Option<IpAddr>,
    },
    /// Send ICMP echo requests (raw socket, needs root), one at a time, each waiting up to the
    /// timeout for its reply. Prints one line per reply, then a JSON summary
    /// {sent, received, sources: {addr: n}, max_rtt_ms}; fails unless every request was answered.
    Ping {
        addr: Ipv4Addr,
        #[arg(long, default_value_t = 3)]
        count: u32,
        /// How long to wait for each reply.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Pause between a reply and the next request.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        /// ICMP identifier (default: from the PID).
        #[arg(long)]
        id: Option<u16>,
        /// Payload bytes per request (at most 8000; above the MTU the requests are fragmented).
        #[arg(long, default_value_t = 32)]
        size: usize,
    },
    /// Make N sequential short connections to a TCP whoami server. Prints JSON {count, succeeded,
    /// failed, sources: {addr: n}, errors}; fails if any connection failed.
    TcpMany {
        #[command(flatten)]
        opts: ClientOpts,
        #[arg(long, default_value_t = 10)]
        count: u32,
        /// Stop early after this many failed connections (a broken path fails fast).
        #[arg(long, default_value_t = 10)]
        max_failures: u32,
    },
    /// Run N parallel downloads from a source server for S seconds. Prints JSON with each
    /// stream's bytes, its translated source (from the server's header line) and its longest
    /// stall, the total, and the bytes received after --warmup seconds (the steady-state rate);
    /// fails if any stream failed.
    Streams {
        #[command(flatten)]
        opts: ClientOpts,
        #[arg(long, default_value_t = 4)]
        count: u32,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Bytes received before this many seconds count only in the total, not the steady rate.
        #[arg(long, default_value_t = 0.0)]
        warmup: f64,
    },
    /// Send a UDP datagram (TTL --ttl) and print the ICMP error it brings back as JSON
    /// {local, from, icmp_type, icmp_code, quoted_src, quoted_dst, socket_error}.
    IcmpProbe {
        addr: SocketAddrV4,
        #[arg(long, default_value_t = 64)]
        ttl: u32,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Send packets no ordinary socket sends: `--protocol N` (a raw IPv4 packet of that
    /// protocol), `--stray-tcp` (an ACK of no connection to --dst-port), `--udp-from PORT` (a
    /// UDP datagram from PORT to --dst-port, even if a socket holds PORT), or `--dhcp IFACE` (UDP
    /// 0.0.0.0:68 -> 255.255.255.255:67 in a broadcast frame); prints `sent N`.
    RawSend {
        /// Destination (ignored with --dhcp).
        #[arg(default_value = "255.255.255.255")]
        dst: Ipv4Addr,
        #[arg(long, conflicts_with_all = ["stray_tcp", "dhcp"])]
        protocol: Option<u8>,
        #[arg(long, conflicts_with = "dhcp")]
        stray_tcp: bool,
        #[arg(long, conflicts_with_all = ["protocol", "stray_tcp", "dhcp"])]
        udp_from: Option<u16>,
        /// Source address of `--udp-from` (default: the route's).
        #[arg(long, default_value = "0.0.0.0", requires = "udp_from")]
        src: Ipv4Addr,
        #[arg(long, default_value_t = 9000)]
        dst_port: u16,
        #[arg(long)]
        dhcp: Option<String>,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// A raw-IP point-to-point link (what PPP or an LTE modem's raw-IP interface is to tc): a
    /// TUN device here and one in another namespace, relayed by this process until killed or
    /// --seconds pass. Ending the relay deletes both interfaces. Prints `ready` when both exist.
    TunRelay {
        /// The device in this process's namespace, e.g. wan2.
        local: String,
        /// The other namespace's name (under /run/netns).
        #[arg(long)]
        peer_netns: String,
        /// The device in the other namespace, e.g. down0.
        #[arg(long)]
        peer: String,
        /// Lifetime bound (at most a day).
        #[arg(long, default_value_t = 21_600)]
        seconds: u64,
    },
    /// A UDP peer on a fixed `--bind ADDR:PORT`: sends to each `--send-to` every
    /// `--interval-ms` (at most `--sends` rounds) and records every datagram it receives, with
    /// its source, until `--seconds` pass; prints JSON {local, sent, received: [{from, payload}]}.
    UdpPeer {
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long)]
        send_to: Vec<SocketAddr>,
        #[arg(long, default_value_t = 5)]
        sends: u32,
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Answer every datagram received (a service).
        #[arg(long)]
        answer: bool,
    },
    /// Wait until every given TCP address accepts a connection.
    WaitTcp {
        #[arg(required = true)]
        addrs: Vec<SocketAddr>,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
}

#[derive(clap::Args)]
struct ClientOpts {
    /// Server address, e.g. 198.18.9.1:9000.
    addr: SocketAddr,
    /// Local address to bind, `ADDR` or `ADDR:PORT` (the address selects the policy route; a
    /// port fixes the source port).
    #[arg(long, value_parser = parse_bind)]
    bind: Option<SocketAddr>,
    /// Keep a TCP connection open this long after the answer (tcp-whoami), so flows overlap.
    #[arg(long, default_value_t = 0)]
    hold_ms: u64,
    /// Overall deadline for connecting and for the answer.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
}

impl ClientOpts {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(1))
    }
}

/// `ADDR` (port 0: the kernel picks) or `ADDR:PORT`.
fn parse_bind(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    text.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 0))
        .map_err(|_| format!("{text:?} is neither ADDR nor ADDR:PORT"))
}

#[derive(Serialize)]
struct Transfer {
    bytes: u64,
    seconds: f64,
    mbit_per_s: f64,
    /// Longest time between two reads that returned data (download and http-get).
    #[serde(skip_serializing_if = "Option::is_none")]
    max_gap_ms: Option<f64>,
    /// The source the server saw (download).
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
}

impl Transfer {
    fn new(bytes: u64, elapsed: Duration) -> Self {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        Self {
            bytes,
            seconds,
            mbit_per_s: bytes as f64 * 8.0 / seconds / 1e6,
            max_gap_ms: None,
            peer: None,
        }
    }
}

fn main() -> std::process::ExitCode {
    // Print the error chain on one line: callers show it in their own failures.
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("labtool: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Serve { addr } => serve(addr),
        Cmd::TcpWhoami(opts) => {
            let stream = connect(&opts)?;
            stream.set_read_timeout(Some(opts.timeout()))?;
            let mut line = String::new();
            BufReader::new(&stream)
                .read_line(&mut line)
                .context("reading the whoami answer")?;
            if line.is_empty() {
                bail!("{} closed without an answer", opts.addr);
            }
            print!("{line}");
            std::io::stdout().flush()?;
            if opts.hold_ms > 0 {
                thread::sleep(Duration::from_millis(opts.hold_ms.min(60_000)));
            }
            let _ = stream.shutdown(Shutdown::Write);
            Ok(())
        }
        Cmd::UdpWhoami { opts, attempts } => udp_whoami(&opts, attempts.max(1)),
        Cmd::UdpPeer {
            bind,
            send_to,
            sends,
            interval_ms,
            seconds,
            answer,
        } => udp_peer(
            bind,
            &send_to,
            sends.min(MAX_COUNT),
            Duration::from_millis(interval_ms),
            seconds,
            answer,
        ),
        Cmd::HttpGet { opts, path, count } => http_get(&opts, &path, count),
        Cmd::Download { opts, seconds } => download(&opts, seconds),
        Cmd::Upload { opts, seconds } => upload(&opts, seconds),
        Cmd::Dns {
            server,
            name,
            timeout_ms,
            attempts,
            bind,
        } => {
            let server: SocketAddr = match server.parse() {
                Ok(addr) => addr,
                Err(_) => SocketAddr::new(server.parse().context("DNS server address")?, 53),
            };
            let addrs = dns_query(
                server,
                bind,
                &name,
                Duration::from_millis(timeout_ms),
                attempts.max(1),
            )?;
            if addrs.is_empty() {
                bail!("{server} had no A record for {name}");
            }
            for addr in addrs {
                println!("{addr}");
            }
            Ok(())
        }
        Cmd::Ping {
            addr,
            count,
            timeout_ms,
            interval_ms,
            id,
            size,
        } => ping(
            addr,
            bounded_count(count)?,
            Duration::from_millis(timeout_ms.clamp(1, 60_000)),
            Duration::from_millis(interval_ms.min(10_000)),
            id.unwrap_or((std::process::id() & 0xffff) as u16),
            size.min(8000),
        ),
        Cmd::TcpMany {
            opts,
            count,
            max_failures,
        } => tcp_many(&opts, bounded_count(count)?, max_failures.max(1)),
        Cmd::Streams {
            opts,
            count,
            seconds,
            warmup,
        } => {
            if count == 0 || count > MAX_STREAMS {
                bail!("--count must be 1..={MAX_STREAMS}");
            }
            let duration = bounded_seconds(seconds)?;
            if !(0.0..seconds).contains(&warmup) {
                bail!("--warmup must be in [0, --seconds)");
            }
            streams(&opts, count, duration, Duration::from_secs_f64(warmup))
        }
        Cmd::IcmpProbe {
            addr,
            ttl,
            timeout_ms,
        } => icmp_probe(
            addr,
            ttl.clamp(1, 255),
            Duration::from_millis(timeout_ms.clamp(1, 60_000)),
        ),
        Cmd::RawSend {
            dst,
            protocol,
            stray_tcp,
            udp_from,
            src,
            dst_port,
            dhcp,
            count,
        } => {
            let kind = match (protocol, stray_tcp, udp_from, dhcp) {
                (Some(protocol), false, None, None) => raw::RawKind::Protocol(protocol),
                (None, true, None, None) => raw::RawKind::StrayTcp {
                    src_port: 40_404,
                    dst_port,
                },
                (None, false, Some(src_port), None) => raw::RawKind::UdpFrom {
                    src,
                    src_port,
                    dst_port,
                },
                (None, false, None, Some(interface)) => raw::RawKind::DhcpBroadcast { interface },
                _ => bail!("give exactly one of --protocol, --stray-tcp, --udp-from, --dhcp"),
            };
            raw::raw_send(&kind, dst, bounded_count(count)?)
        }
        Cmd::TunRelay {
            local,
            peer_netns,
            peer,
            seconds,
        } => tun_relay(
            &local,
            &peer_netns,
            &peer,
            Duration::from_secs(seconds.clamp(1, 86_400)),
        ),
        Cmd::WaitTcp { addrs, timeout_ms } => {
            let deadline = Instant::now() + Duration::from_millis(timeout_ms);
            for addr in addrs {
                loop {
                    match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                        Ok(_) => break,
                        Err(e) if Instant::now() >= deadline => {
                            bail!("{addr} not accepting connections: {e}")
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            }
            Ok(())
        }
    }
}

fn bounded_count(count: u32) -> anyhow::Result<u32> {
    if count == 0 || count > MAX_COUNT {
        bail!("--count must be 1..={MAX_COUNT}");
    }
    Ok(count)
}

fn bounded_seconds(seconds: f64) -> anyhow::Result<Duration> {
    if !(seconds > 0.0 && seconds <= MAX_CLIENT_SECONDS) {
        bail!("--seconds must be in (0, {MAX_CLIENT_SECONDS}]");
    }
    Ok(Duration::from_secs_f64(seconds))
}
