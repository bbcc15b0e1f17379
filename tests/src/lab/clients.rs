//! The client helpers: `labtool` clients run in a lab namespace against the internet host's
//! servers (whoami, downloads, many connections, parallel streams, ping), the summaries they
//! print, and interface counters.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    time::Duration,
};

use anyhow::{Context, bail};
use serde::Deserialize;

use super::{HTTP_PORT, Lab, SERVER_ADDR, SOURCE_PORT, WHOAMI_PORT};
use crate::process::{self, DEFAULT_TIMEOUT, run_ok};

/// Transfer summary printed by `labtool download|upload|http-get --count`.
#[derive(Clone, Copy, Debug, Deserialize)]
pub struct Transfer {
    pub bytes: u64,
    pub seconds: f64,
    pub mbit_per_s: f64,
    /// Longest time without data (download and http-get only).
    #[serde(default)]
    pub max_gap_ms: Option<f64>,
    /// The address and port the server saw (after any NAT; `download` only).
    #[serde(default)]
    pub peer: Option<SocketAddrV4>,
}

/// Summary printed by `labtool tcp-many`.
#[derive(Clone, Debug, Deserialize)]
pub struct TcpMany {
    pub count: u32,
    pub succeeded: u32,
    pub failed: u32,
    /// Source address the server saw -> number of connections.
    pub sources: BTreeMap<Ipv4Addr, u32>,
    /// Distinct (address, port) pairs the server saw.
    pub distinct_peers: usize,
    /// Connections not tried after too many failures.
    pub skipped: u32,
    /// The first few errors.
    pub errors: Vec<String>,
}

/// One stream of `labtool streams`.
#[derive(Clone, Debug, Deserialize)]
pub struct StreamResult {
    /// The translated source `<ip>:<port>` the source server saw.
    pub peer: SocketAddrV4,
    pub bytes: u64,
    pub steady_bytes: u64,
    pub seconds: f64,
    pub mbit_per_s: f64,
    pub max_gap_ms: f64,
}

/// Per source address in a `labtool streams` summary.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub struct SourceShare {
    pub streams: u32,
    pub bytes: u64,
    pub steady_bytes: u64,
}

/// Summary printed by `labtool streams`.
#[derive(Clone, Debug, Deserialize)]
pub struct Streams {
    pub count: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub seconds: f64,
    pub bytes: u64,
    pub mbit_per_s: f64,
    pub steady_seconds: f64,
    pub steady_bytes: u64,
    pub steady_mbit_per_s: f64,
    pub sources: BTreeMap<Ipv4Addr, SourceShare>,
    pub streams: Vec<StreamResult>,
    pub errors: Vec<String>,
}

/// Summary printed (last line) by `labtool ping`.
#[derive(Clone, Debug, Deserialize)]
pub struct Ping {
    pub sent: u32,
    pub received: u32,
    /// Source address of the replies -> count.
    pub sources: BTreeMap<Ipv4Addr, u32>,
    pub max_rtt_ms: f64,
}

/// Interface counters (from `ip -s -j link`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

impl Lab {
    /// Packets received by ISP i on its uplink side (`down0`): everything the gateway sent it,
    /// including what the ISP then dropped for a wrong source.
    pub fn isp_rx_packets(&self, i: usize) -> anyhow::Result<u64> {
        Ok(self.link_counters(&self.isp(i), "down0")?.rx_packets)
    }

    /// Counters of interface `ifname` in namespace `ns`.
    pub fn link_counters(&self, ns: &str, ifname: &str) -> anyhow::Result<LinkCounters> {
        self.check_ns(ns)?;
        let json = run_ok(
            Command::new("ip").args(["-n", ns, "-s", "-j", "link", "show", "dev", ifname]),
            DEFAULT_TIMEOUT,
        )?;
        let value: serde_json::Value = serde_json::from_str(&json)
            .with_context(|| format!("parsing `ip -s -j link` of {ns}/{ifname}"))?;
        let stats = &value[0]["stats64"];
        let get = |dir: &str, what: &str| {
            stats[dir][what]
                .as_u64()
                .with_context(|| format!("{ns}/{ifname}: no stats64.{dir}.{what} in {json}"))
        };
        Ok(LinkCounters {
            rx_packets: get("rx", "packets")?,
            rx_bytes: get("rx", "bytes")?,
            tx_packets: get("tx", "packets")?,
            tx_bytes: get("tx", "bytes")?,
        })
    }

    /// Asks the TCP whoami server from `ns` (optionally bound to `bind`); returns what it saw.
    pub fn tcp_whoami(
        &self,
        ns: &str,
        bind: Option<Ipv4Addr>,
        timeout: Duration,
    ) -> anyhow::Result<SocketAddrV4> {
        self.whoami("tcp-whoami", ns, bind, timeout)
    }

    /// Asks the UDP whoami server from `ns` (optionally bound to `bind`); returns what it saw.
    pub fn udp_whoami(
        &self,
        ns: &str,
        bind: Option<Ipv4Addr>,
        timeout: Duration,
    ) -> anyhow::Result<SocketAddrV4> {
        self.whoami("udp-whoami", ns, bind, timeout)
    }

    fn whoami(
        &self,
        cmd: &str,
        ns: &str,
        bind: Option<Ipv4Addr>,
        timeout: Duration,
    ) -> anyhow::Result<SocketAddrV4> {
        let server = SocketAddrV4::new(SERVER_ADDR, WHOAMI_PORT).to_string();
        let ms = timeout.as_millis().to_string();
        let bind = bind.map(|b| b.to_string());
        let mut args = vec![cmd, server.as_str(), "--timeout-ms", ms.as_str()];
        if let Some(bind) = &bind {
            args.extend(["--bind", bind.as_str()]);
        }
        let output = self.labtool_exec(ns, &args)?;
        process::check(&format!("in {ns}: labtool {}", args.join(" ")), &output)?;
        let text = String::from_utf8_lossy(&output.stdout);
        text.trim()
            .parse()
            .with_context(|| format!("whoami answered {text:?}"))
    }

    /// Reads from the source server (port 9001) for `seconds` from `ns`, optionally bound.
    pub fn download(
        &self,
        ns: &str,
        bind: Option<Ipv4Addr>,
        seconds: f64,
    ) -> anyhow::Result<Transfer> {
        let server = SocketAddrV4::new(SERVER_ADDR, SOURCE_PORT).to_string();
        let secs = seconds.to_string();
        let bind = bind.map(|b| b.to_string());
        let mut args = vec!["download", server.as_str(), "--seconds", secs.as_str()];
        if let Some(bind) = &bind {
            args.extend(["--bind", bind.as_str()]);
        }
        let output = self.labtool_exec(ns, &args)?;
        process::check(&format!("in {ns}: labtool {}", args.join(" ")), &output)?;
        serde_json::from_slice(&output.stdout).context("parsing the download summary")
    }

    /// `labtool http-get /bytes/<bytes> --count` from `ns`: a download of exactly `bytes` bytes
    /// that must finish within `timeout`. The client fails on a short body, a reset or the
    /// timeout; the summary has the longest stall (`max_gap_ms`).
    pub fn http_download(
        &self,
        ns: &str,
        bytes: u64,
        timeout: Duration,
    ) -> anyhow::Result<Transfer> {
        let server = SocketAddrV4::new(SERVER_ADDR, HTTP_PORT).to_string();
        let path = format!("/bytes/{bytes}");
        let ms = timeout.as_millis().to_string();
        let args = [
            "http-get",
            server.as_str(),
            "--path",
            path.as_str(),
            "--count",
            "--timeout-ms",
            ms.as_str(),
        ];
        let tool = self.labtool.to_string_lossy().into_owned();
        let argv: Vec<&str> = std::iter::once(tool.as_str())
            .chain(args.iter().copied())
            .collect();
        let output = self.exec_timeout(ns, &argv, timeout + DEFAULT_TIMEOUT)?;
        process::check(&format!("in {ns}: labtool {}", args.join(" ")), &output)?;
        serde_json::from_slice(&output.stdout).context("parsing the http-get summary")
    }

    /// `labtool tcp-many` from `ns` to the whoami server: `count` sequential connections, each
    /// with `timeout`, stopping after 10 failures. Returns the summary also when connections
    /// failed (the caller asserts on `failed`); an error only if the client printed none.
    pub fn tcp_many(
        &self,
        ns: &str,
        count: u32,
        bind: Option<SocketAddrV4>,
        timeout: Duration,
    ) -> anyhow::Result<TcpMany> {
        let server = SocketAddrV4::new(SERVER_ADDR, WHOAMI_PORT).to_string();
        let count_text = count.to_string();
        let ms = timeout.as_millis().to_string();
        let bind = bind.map(|b| b.to_string());
        let mut args = vec![
            "tcp-many",
            server.as_str(),
            "--count",
            count_text.as_str(),
            "--timeout-ms",
            ms.as_str(),
        ];
        if let Some(bind) = &bind {
            args.extend(["--bind", bind.as_str()]);
        }
        // Successes take milliseconds; at most 10 failures take the timeout each.
        let bound = Duration::from_millis(20) * count + timeout * 11 + DEFAULT_TIMEOUT;
        self.labtool_json(ns, &args, bound)
    }

    /// `labtool streams` from `ns`: `count` parallel downloads from the source server for
    /// `seconds`, the first `warmup` seconds left out of the steady rate. Returns the summary also
    /// when streams failed (the caller asserts on `failed`).
    pub fn streams(
        &self,
        ns: &str,
        count: u32,
        seconds: f64,
        warmup: f64,
    ) -> anyhow::Result<Streams> {
        let server = SocketAddrV4::new(SERVER_ADDR, SOURCE_PORT).to_string();
        let count_text = count.to_string();
        let secs = seconds.to_string();
        let warm = warmup.to_string();
        let args = [
            "streams",
            server.as_str(),
            "--count",
            count_text.as_str(),
            "--seconds",
            secs.as_str(),
            "--warmup",
            warm.as_str(),
        ];
        let bound = Duration::from_secs_f64(seconds.clamp(0.0, 600.0)) + DEFAULT_TIMEOUT;
        self.labtool_json(ns, &args, bound)
    }

    /// `labtool ping` from `ns` to `addr`: `count` echo requests, each waiting up to `timeout`.
    /// Returns the summary also when replies were missing (the caller asserts on `received`).
    pub fn ping(
        &self,
        ns: &str,
        addr: Ipv4Addr,
        count: u32,
        timeout: Duration,
    ) -> anyhow::Result<Ping> {
        let addr = addr.to_string();
        let count_text = count.to_string();
        let ms = timeout.as_millis().to_string();
        let args = [
            "ping",
            addr.as_str(),
            "--count",
            count_text.as_str(),
            "--timeout-ms",
            ms.as_str(),
        ];
        let bound = timeout * count + DEFAULT_TIMEOUT;
        self.labtool_json(ns, &args, bound)
    }

    /// Runs a labtool client that prints a JSON summary as its last stdout line, and parses it
    /// whether or not the client succeeded.
    fn labtool_json<T: serde::de::DeserializeOwned>(
        &self,
        ns: &str,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<T> {
        let tool = self.labtool.to_string_lossy().into_owned();
        let argv: Vec<&str> = std::iter::once(tool.as_str())
            .chain(args.iter().copied())
            .collect();
        let output = self.exec_timeout(ns, &argv, timeout)?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let last = stdout.lines().rev().find(|l| l.starts_with('{'));
        match last.map(serde_json::from_str::<T>) {
            Some(Ok(summary)) => Ok(summary),
            Some(Err(e)) => Err(e).with_context(|| {
                format!("in {ns}: labtool {}: parsing {stdout:?}", args.join(" "))
            }),
            None => bail!(
                "in {ns}: labtool {} printed no summary ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        }
    }
}
