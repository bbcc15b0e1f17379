//! The internet host's servers: `labtool serve` (whoami, HTTP, source, sink), iperf3 and
//! dnsmasq, started in their own process groups, and the readiness check that waits for them.

use std::{fmt::Write as _, net::SocketAddrV4, os::unix::process::CommandExt, process::Command};

use anyhow::Context;

use super::{
    DNS_ADDR, DNS_NAME, HTTP_PORT, IPERF_PORTS, LAN_GATEWAY, Lab, SERVER_ADDR, SINK_PORT,
    SOURCE_PORT, WHOAMI_PORT,
};
use crate::process::{self, ChildGuard};

impl Lab {
    pub(super) fn start_servers(&mut self) -> anyhow::Result<()> {
        let inet = self.inet();
        let labtool = self.labtool.to_string_lossy().into_owned();
        let server = SERVER_ADDR.to_string();
        let dir = self.state_dir.to_string_lossy().into_owned();
        let mut servers: Vec<(String, Vec<String>)> = vec![(
            "labtool-serve".into(),
            vec![
                labtool.clone(),
                "serve".into(),
                "--addr".into(),
                server.clone(),
            ],
        )];
        for port in IPERF_PORTS {
            servers.push((
                format!("iperf3-{port}"),
                vec![
                    "iperf3".into(),
                    "-s".into(),
                    "-B".into(),
                    server.clone(),
                    "-p".into(),
                    port.to_string(),
                ],
            ));
        }
        servers.push((
            "dnsmasq".into(),
            vec![
                "dnsmasq".into(),
                "--keep-in-foreground".into(),
                "--conf-file=/dev/null".into(),
                "--no-resolv".into(),
                "--no-hosts".into(),
                format!("--listen-address={DNS_ADDR}"),
                "--bind-interfaces".into(),
                format!("--address=/{DNS_NAME}/{SERVER_ADDR}"),
                // Names for the proxy's "no request reaches the gateway itself" check
                // (tests/tests/proxy_names.rs): the gateway's LAN address, its first uplink's
                // source, and loopback. dnsmasq prefers the longer domain match.
                format!("--address=/gw.{DNS_NAME}/{LAN_GATEWAY}"),
                format!("--address=/wan.{DNS_NAME}/{}", self.uplink_source(1)),
                format!("--address=/loop.{DNS_NAME}/127.0.0.1"),
                // A real TTL (dnsmasq's default for these answers is 0), so resolver caches
                // (the proxy's, squid's) work as they would on the internet.
                "--local-ttl=60".into(),
                // Stay root: the log and pid files live in the root-owned state dir.
                "--user=root".into(),
                "--log-queries".into(),
                format!("--log-facility={dir}/dnsmasq.log"),
                format!("--pid-file={dir}/dnsmasq.pid"),
            ],
        ));
        for (name, argv) in servers {
            let log = self.state_dir.join("logs").join(format!("{name}.log"));
            let mut command = Command::new("ip");
            command.args(["netns", "exec", &inet]).args(&argv);
            // Own process group: a Ctrl-C at the terminal that ran `lab up` must not stop them.
            command.process_group(0);
            let guard = ChildGuard::spawn(&mut command, &log)
                .with_context(|| format!("starting {name} in {inet}"))?;
            self.servers.push(guard);
        }

        // Ready when every TCP port accepts and the DNS server answers.
        let mut ports: Vec<String> = [WHOAMI_PORT, HTTP_PORT, SOURCE_PORT, SINK_PORT]
            .into_iter()
            .chain(IPERF_PORTS)
            .map(|p| SocketAddrV4::new(SERVER_ADDR, p).to_string())
            .collect();
        ports.extend(["--timeout-ms".into(), "5000".into()]);
        let mut args = vec!["wait-tcp"];
        args.extend(ports.iter().map(String::as_str));
        let dns = DNS_ADDR.to_string();
        let ready = self.labtool_exec(&inet, &args).and_then(|out| {
            process::check("labtool wait-tcp", &out)?;
            let out = self.labtool_exec(
                &inet,
                &[
                    "dns",
                    &dns,
                    DNS_NAME,
                    "--timeout-ms",
                    "5000",
                    "--attempts",
                    "10",
                ],
            )?;
            process::check("labtool dns", &out)
        });
        if let Err(e) = ready {
            let mut logs = String::new();
            for server in &mut self.servers {
                if let Ok(Some(status)) = server.try_wait() {
                    let _ = write!(
                        logs,
                        "\n{} exited with {status}: {}",
                        server_name(server),
                        server.log().trim()
                    );
                }
            }
            return Err(e.context(format!("servers in {inet} did not come up{logs}")));
        }
        Ok(())
    }
}

pub(super) fn server_name(guard: &ChildGuard) -> String {
    guard
        .log_path()
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned())
}
