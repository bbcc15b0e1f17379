//! The proxy tests' fixture: a lab whose gateway runs `balancer run` with a `[proxy]` section,
//! curl in a LAN client, and a raw TCP client that runs inside a lab namespace (for what curl
//! will not send: conflicting framing, a head trickled a byte a second).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use balancer_tests::{
    lab::{DNS_ADDR, LAN_NETWORK, Lab, LabSpec},
    process::ChildGuard,
};

use crate::common::{balancer, prefix, start_daemon, write_config};

pub const PROXY: &str = "http://198.18.0.1:3128";

pub struct ProxyLab {
    pub lab: Lab,
    pub daemon: Option<ChildGuard>,
    /// Replaces the lab's LAN network in `[lan] networks` when set.
    pub lan_networks: Option<String>,
    /// Added to every `[[uplink]]` (e.g. `track = [...]`).
    pub uplink_keys: String,
    /// Leave `source` out of every `[[uplink]]`: the daemon learns it, and follows a renumbering.
    pub learned_sources: bool,
}

impl ProxyLab {
    /// A 3-uplink lab (weights 2:2:1) whose daemon runs the proxy with `proxy_keys` added to
    /// `[proxy]`; every uplink has the lab's DNS server as its resolver.
    pub fn up(tag: &str, proxy_keys: &str) -> ProxyLab {
        let lab =
            Lab::up(LabSpec::new(&prefix(tag), 3)).unwrap_or_else(|e| panic!("lab up: {e:#}"));
        let mut gw = ProxyLab {
            lab,
            daemon: None,
            lan_networks: None,
            uplink_keys: String::new(),
            learned_sources: false,
        };
        gw.start(proxy_keys);
        gw
    }

    /// As [`ProxyLab::up`], with `[lan] networks` set to `networks` (a TOML array's inside).
    pub fn up_with_lan(tag: &str, proxy_keys: &str, networks: &str) -> ProxyLab {
        let lab =
            Lab::up(LabSpec::new(&prefix(tag), 3)).unwrap_or_else(|e| panic!("lab up: {e:#}"));
        let mut gw = ProxyLab {
            lab,
            daemon: None,
            lan_networks: Some(networks.to_string()),
            uplink_keys: String::new(),
            learned_sources: false,
        };
        gw.start(proxy_keys);
        gw
    }

    /// As [`ProxyLab::up`], with every uplink probing the internet host (health checks on) and
    /// its address learned, and waits until every uplink is judged up.
    pub fn up_tracked(tag: &str, proxy_keys: &str) -> ProxyLab {
        let lab =
            Lab::up(LabSpec::new(&prefix(tag), 3)).unwrap_or_else(|e| panic!("lab up: {e:#}"));
        let mut gw = ProxyLab {
            lab,
            daemon: None,
            lan_networks: None,
            uplink_keys: "track = [\"198.18.9.1\"]\n".to_string(),
            learned_sources: true,
        };
        gw.start(proxy_keys);
        wait_until(Duration::from_secs(5), || {
            (1..=3).all(|i| gw.health(i)["state"] == "up")
        });
        gw
    }

    /// Uplink `i`'s (1-based) health object in the status.
    pub fn health(&self, i: usize) -> serde_json::Value {
        self.status()["uplinks"][i - 1]["health"].clone()
    }

    pub fn start(&mut self, proxy_keys: &str) {
        let mut base = self.lab.balancer_config_toml().replace(
            "weight =",
            &format!("dns = [\"{DNS_ADDR}\"]\n{}weight =", self.uplink_keys),
        );
        if self.learned_sources {
            base = base
                .lines()
                .filter(|line| !line.starts_with("source = "))
                .map(|line| format!("{line}\n"))
                .collect();
        }
        if let Some(networks) = &self.lan_networks {
            base = base.replace(&format!("\"{LAN_NETWORK}\""), networks);
        }
        let text = format!("{base}\n[proxy]\n{proxy_keys}\n");
        let config = write_config(&self.lab, "balancer.toml", &text);
        self.daemon = Some(start_daemon(&self.lab, &config));
        // The proxy serves once the first apply is done, which the status answer follows.
        wait_until(Duration::from_secs(5), || {
            self.status()["proxy"].is_object()
        });
    }

    pub fn stop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let exit = daemon.terminate(Duration::from_secs(5)).unwrap();
            assert!(exit.success(), "daemon exit: {exit}\n{}", daemon.log());
        }
    }

    pub fn log(&self) -> String {
        self.daemon
            .as_ref()
            .map(ChildGuard::log)
            .unwrap_or_default()
    }

    pub fn status(&self) -> serde_json::Value {
        let output = balancer(&self.lab, &["status", "--json"]);
        serde_json::from_slice(&output.stdout).unwrap_or_default()
    }

    /// `curl` through the proxy from LAN client `client`: (HTTP status, body, seconds).
    pub fn curl(&self, client: usize, args: &[&str]) -> Curl {
        let mut argv = vec![
            "curl",
            "-sS",
            "--max-time",
            "8",
            "--proxy",
            PROXY,
            "-o",
            "-",
            "-w",
            "\n%{http_code} %{http_connect} %{time_total} %{num_connects} %{size_download}",
        ];
        argv.extend_from_slice(args);
        let output = self.lab.exec(&self.lab.client(client), &argv).unwrap();
        Curl::parse(&output.stdout, &output.stderr)
    }

    /// The source address and port the internet host saw for a plain request to `url`.
    pub fn seen(&self, client: usize, url: &str) -> SocketAddrV4 {
        let curl = self.curl(client, &[url]);
        assert_eq!(curl.code, 200, "{url}: {curl:?}\n{}", self.log());
        curl.body
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{url}: not an address: {curl:?}"))
    }

    /// The uplink index (1-based) whose source address is `ip`.
    pub fn uplink_of(&self, ip: Ipv4Addr) -> usize {
        (1..=self.lab.uplinks())
            .find(|&i| self.lab.uplink_source(i) == ip)
            .unwrap_or_else(|| panic!("{ip} is not an uplink address"))
    }

    /// dnsmasq's log: the address each query for `name` came from.
    pub fn dns_queries_from(&self, name: &str) -> Vec<Ipv4Addr> {
        let log =
            std::fs::read_to_string(self.lab.state_dir().join("dnsmasq.log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains(&format!("query[A] {name} from ")))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect()
    }
}

impl Drop for ProxyLab {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = daemon.terminate(Duration::from_secs(5));
        }
        let _ = balancer(&self.lab, &["down"]);
    }
}

#[derive(Debug)]
pub struct Curl {
    pub code: u16,
    pub connect_code: u16,
    pub body: String,
    pub seconds: f64,
    pub connects: u32,
    /// Body bytes received (curl's count; the body above went through a lossy UTF-8 decode).
    pub size: u64,
    pub stderr: String,
}

impl Curl {
    fn parse(stdout: &[u8], stderr: &[u8]) -> Curl {
        let text = String::from_utf8_lossy(stdout);
        let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
        let fields: Vec<&str> = tail.split_whitespace().collect();
        let field = |i: usize| fields.get(i).copied().unwrap_or("0");
        Curl {
            code: field(0).parse().unwrap_or(0),
            connect_code: field(1).parse().unwrap_or(0),
            seconds: field(2).parse().unwrap_or(f64::MAX),
            connects: field(3).parse().unwrap_or(0),
            size: field(4).parse().unwrap_or(0),
            body: body.to_string(),
            stderr: String::from_utf8_lossy(stderr).into_owned(),
        }
    }
}

/// Counts per uplink index.
pub fn tally(uplinks: impl IntoIterator<Item = usize>) -> BTreeMap<usize, u32> {
    let mut counts = BTreeMap::new();
    for u in uplinks {
        *counts.entry(u).or_insert(0) += 1;
    }
    counts
}

pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `f` on a thread that has entered network namespace `ns` (setns is per thread, so the
/// test's other threads stay where they are).
pub fn in_namespace<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
    })
}

/// Sends `request` to the proxy from inside `ns`, then reads the answer until the proxy closes
/// or `limit` passes: (what was read, whether the proxy closed).
pub fn raw_exchange(ns: &str, request: &[u8], limit: Duration) -> (String, bool) {
    in_namespace(ns, || {
        let mut stream = TcpStream::connect("198.18.0.1:3128").unwrap();
        stream.write_all(request).unwrap();
        read_until_closed(&mut stream, limit)
    })
}

pub fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let deadline = Instant::now() + limit;
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (String::from_utf8_lossy(&answer).into_owned(), false);
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buffer) {
            Ok(0) => return (String::from_utf8_lossy(&answer).into_owned(), true),
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (String::from_utf8_lossy(&answer).into_owned(), true);
            }
            Err(_) => return (String::from_utf8_lossy(&answer).into_owned(), false),
        }
    }
}
