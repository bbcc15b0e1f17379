//! The shipped systemd units under real systemd: `systemd-nspawn` boots this machine's own root
//! (volatile: /etc starts empty) with systemd as PID 1 in the lab gateway's network namespace,
//! with `contrib/systemd/balancer.service` and `run-balancer-bpffs.mount` installed unchanged and
//! driven by `nsenter ... systemctl` (see `shared/notes/field-lab.md`).
//!
//! What it shows: the service starts at boot while an uplink's interface does not exist yet
//! (`hotplug = true`, no network-online wait) and is active (`Type=notify`), and the uplink
//! joins when its interface appears; `systemctl restart` during a transfer keeps it going (the
//! pins live in the mount unit's bpffs, outside the service's private mount namespace);
//! `systemctl reload` keeps the same process; the watchdog is fed; `systemctl stop` leaves
//! forwarding in place; `balancer down` from a shell removes everything.
//!
//! Root only; needs `systemd-nspawn` (package systemd-container, installed by `cargo xtask
//! setup`). The container is stopped by its nspawn process's PID when the test ends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use balancer_tests::{
    lab::{Lab, LabSpec, TcpMany},
    process::{ChildGuard, DEFAULT_TIMEOUT, run_bounded},
};
use common::{
    field::{create_wan, ip},
    *,
};

/// Where the container sees the directory holding the built `balancer` binary.
const BIN_MOUNT: &str = "/mnt/balancer-bin";

/// A booted container whose network namespace is the lab's gateway.
struct Container {
    nspawn: ChildGuard,
    init_pid: u32,
}

impl Container {
    fn boot(lab: &Lab, config: &str) -> Container {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let units = repo.join("contrib/systemd");
        let binary = PathBuf::from(balancer_bin());
        let dir = lab.state_dir().join("systemd");
        // /usr is the host's, read-only: the unit's /usr/local/sbin/balancer is a symlink in a
        // directory mounted over /usr/local/sbin, pointing at the built binary.
        for sub in ["etc", "sbin", "preset"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        fs::copy(config, dir.join("etc/balancer.toml")).unwrap();
        let link = dir.join("sbin/balancer");
        let _ = fs::remove_file(&link);
        symlink(Path::new(BIN_MOUNT).join("balancer"), &link).unwrap();
        // First boot with an empty /etc applies presets: only our service is enabled, so the
        // container runs nothing else of this machine's.
        fs::write(
            dir.join("preset/00-balancer-lab.preset"),
            "enable balancer.service\ndisable *\n",
        )
        .unwrap();

        let bind = |from: &Path, to: &str| format!("--bind-ro={}:{to}", from.display());
        let marker = format!("systemd.setenv=BALANCER_LAB={}", lab.prefix());
        let mut command = Command::new("systemd-nspawn");
        command
            // /proc/sys/net writable for the daemon's sysctls (the namespace is the lab's own).
            .env("SYSTEMD_NSPAWN_API_VFS_WRITABLE", "network")
            .args(["-D", "/", "--volatile=yes", "--register=no", "--keep-unit"])
            .arg(format!("--network-namespace-path=/run/netns/{}", lab.gw()))
            // nspawn's default filter refuses bpf(2); CAP_NET_ADMIN is only granted with a
            // private network of nspawn's own making, so both are asked for.
            .args([
                "--system-call-filter=bpf",
                "--capability=CAP_NET_ADMIN,CAP_BPF",
            ])
            .arg(bind(&dir.join("etc"), "/etc/balancer"))
            .arg(bind(binary.parent().unwrap(), BIN_MOUNT))
            .arg(bind(&dir.join("sbin"), "/usr/local/sbin"))
            .arg(bind(&dir.join("preset"), "/etc/systemd/system-preset"))
            .arg(bind(
                &units.join("balancer.service"),
                "/etc/systemd/system/balancer.service",
            ))
            .arg(bind(
                &units.join("run-balancer-bpffs.mount"),
                "/etc/systemd/system/run-balancer-bpffs.mount",
            ))
            .args(["-b", "--", "systemd.firstboot=off", &marker]);
        let log = lab.state_dir().join("logs/nspawn.log");
        let mut nspawn = ChildGuard::spawn(&mut command, &log).expect("starting systemd-nspawn");

        // The container's systemd: the process carrying this lab's marker.
        let deadline = Instant::now() + Duration::from_secs(30);
        let init_pid = loop {
            let found =
                run_bounded(Command::new("pgrep").args(["-f", &marker]), DEFAULT_TIMEOUT).unwrap();
            let pids: Vec<u32> = String::from_utf8_lossy(&found.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .filter(|&p| p != nspawn.pid())
                .collect();
            if let [pid] = pids[..] {
                break pid;
            }
            if let Some(status) = nspawn.try_wait().unwrap() {
                panic!("systemd-nspawn exited with {status}:\n{}", nspawn.log());
            }
            assert!(
                Instant::now() < deadline,
                "no container init:\n{}",
                nspawn.log()
            );
            thread::sleep(Duration::from_millis(100));
        };
        let container = Container { nspawn, init_pid };
        // Booted when systemd says so (degraded counts: some unit of this machine's may fail).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = container.systemctl(&["is-system-running"]);
            let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
            if state == "running" || state == "degraded" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "container not booted ({state}):\n{}",
                container.nspawn.log()
            );
            thread::sleep(Duration::from_millis(200));
        }
        container
    }

    /// Runs `argv` inside the container (all its namespaces), as an operator's shell would.
    fn exec(&self, argv: &[&str]) -> Output {
        let pid = self.init_pid.to_string();
        run_bounded(
            Command::new("nsenter").args(["-t", &pid, "-a"]).args(argv),
            DEFAULT_TIMEOUT,
        )
        .unwrap()
    }

    fn systemctl(&self, args: &[&str]) -> Output {
        let mut argv = vec!["systemctl"];
        argv.extend(args);
        self.exec(&argv)
    }

    fn property(&self, name: &str) -> String {
        let out = self.systemctl(&["show", "balancer", "--value", "-p", name]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn journal(&self) -> String {
        let out = self.exec(&["journalctl", "-u", "balancer", "--no-pager", "-o", "cat"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_active(&self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.property("ActiveState") == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "balancer.service not {want} ({}):\n{}",
                self.property("ActiveState"),
                self.journal()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM makes nspawn shut the container down cleanly; the guard kills it otherwise.
        let _ = self.nspawn.terminate(Duration::from_secs(15));
    }
}

fn many(lab: &Lab, count: u32, timeout: Duration) -> TcpMany {
    lab.tcp_many(&lab.client(1), count, None, timeout).unwrap()
}

#[test]
fn the_shipped_units_under_real_systemd() {
    let mut spec = LabSpec::new(&prefix("sd"), 2);
    spec.rates_mbit = vec![50, 50];
    let lab = Lab::up(spec).unwrap();
    let gw = lab.gw();

    // Uplink 2's modem has not made its interface yet when the gateway boots (a PPP session or
    // an LTE stick not there yet): `hotplug = true` lets the service start without it. isp2 is
    // the last `[[uplink]]` table, so the key appended lands in it.
    ip(&lab, &gw, &["link del wan2".into()]);
    let config = write_config(
        &lab,
        "balancer.toml",
        &format!("{}hotplug = true\n", lab.balancer_config_toml()),
    );
    let container = Container::boot(&lab, &config);
    container.wait_active("active");
    let status = container.exec(&["/usr/local/sbin/balancer", "status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout)
        .unwrap_or_else(|e| panic!("status --json: {e}: {status:?}"));
    let waiting = &status["uplinks"][1];
    assert_eq!(waiting["name"], "isp2", "{status:#}");
    assert_eq!(waiting["stages"]["present"]["ok"], false, "{status:#}");
    assert_eq!(container.property("Type"), "notify");
    assert_eq!(container.property("WatchdogUSec"), "10s");
    let first = many(&lab, 6, Duration::from_secs(2));
    assert_eq!(first.failed, 0, "{first:?}\n{}", container.journal());
    assert_eq!(
        first.sources.get(&lab.uplink_source(1)),
        Some(&6),
        "{first:?}"
    );

    // The uplink joins when its interface appears.
    create_wan(&lab, 2, lab.uplink_source(2));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = many(&lab, 6, Duration::from_secs(2));
        assert_eq!(now.failed, 0, "{now:?}");
        if now.sources.contains_key(&lab.uplink_source(2)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "wan2 never joined: {now:?}\n{}",
            container.journal()
        );
        thread::sleep(Duration::from_millis(500));
    }

    // `systemctl restart` in the middle of a transfer: it goes on without a stall.
    let before = container.property("MainPID");
    let transfer = thread::scope(|scope| {
        let download = scope.spawn(|| lab.download(&lab.client(1), None, 5.0));
        thread::sleep(Duration::from_millis(1500));
        let restart = container.systemctl(&["restart", "balancer"]);
        assert!(
            restart.status.success(),
            "{}",
            String::from_utf8_lossy(&restart.stderr)
        );
        download.join().unwrap()
    })
    .unwrap_or_else(|e| panic!("the transfer broke: {e:#}\n{}", container.journal()));
    eprintln!("transfer across systemctl restart: {transfer:?}");
    assert_ne!(container.property("MainPID"), before, "a new daemon");
    assert!(transfer.bytes > 1_000_000, "{transfer:?}");
    assert!(
        transfer.max_gap_ms.unwrap_or(f64::MAX) < 1000.0,
        "{transfer:?}"
    );
    assert!(
        container.journal().contains("adopted=true"),
        "{}",
        container.journal()
    );

    // `systemctl reload` (SIGHUP) keeps the same process, and the watchdog keeps it alive.
    let pid = container.property("MainPID");
    assert!(
        container
            .systemctl(&["reload", "balancer"])
            .status
            .success()
    );
    thread::sleep(Duration::from_secs(12));
    assert_eq!(container.property("MainPID"), pid);
    assert_eq!(container.property("ActiveState"), "active");
    assert_eq!(
        container.property("NRestarts"),
        "0",
        "{}",
        container.journal()
    );

    // Stopped: forwarding stays.
    assert!(container.systemctl(&["stop", "balancer"]).status.success());
    container.wait_active("inactive");
    let stopped = many(&lab, 4, Duration::from_secs(2));
    assert_eq!(stopped.failed, 0, "forwarding after stop: {stopped:?}");

    // `balancer down` from a shell: everything goes, so the ISPs drop untranslated traffic.
    let down = container.exec(&["/usr/local/sbin/balancer", "down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let rules = lab.exec_ok(&gw, &["ip", "rule"]).unwrap();
    assert!(!rules.contains("proto 77"), "{rules}");
    let gone = many(&lab, 2, Duration::from_millis(500));
    assert_eq!(gone.succeeded, 0, "nothing translates after down: {gone:?}");
}
