//! `balancer run`: applies the configuration, keeps it applied, and serves its status.
//!
//! On start it adopts whatever an earlier daemon left (the plan is a diff, so nothing is added
//! twice and nothing is removed first). It re-plans when the kernel reports a change to links,
//! addresses, routes or rules, and every 30 seconds; each pass applies per uplink, best effort,
//! and updates the data plane. SIGHUP re-reads the config (`reload`). On SIGTERM or SIGINT it
//! leaves everything in place so a restart or upgrade never cuts the office off, unless told
//! to tear down on exit.

mod publish;
mod release;
mod reload;
mod status_socket;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt;
use rtnetlink::MulticastGroup;
use tokio::{
    net::UnixListener,
    signal::unix::{SignalKind, signal},
};

use crate::{
    config::{Config, ConfigError, LoadError},
    dataplane::{self, Dataplane, DataplaneError, bpffs::PinDir},
    health,
    netlink::{Netlink, NetlinkError},
    plan::{self, Operation, Strictness},
    reconcile::{self, ApplyError, OperationError},
    state::{STATUS_VERSION, StateDir, StateError, Status},
    stats::UplinkName,
    sysctl::{SysctlBackup, SysctlError},
    systemd,
    teardown::{self, TeardownError},
};

const RESYNC_INTERVAL: Duration = Duration::from_secs(30);
/// How often uplinks out of the rotation are checked for connections to reset: the reset
/// deadline (`health.reset_after_ms`) is met to within this.
const RESET_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// How often the data plane's TCP counters are sampled for passive detection: a few map
/// reads, cheap enough to keep the verdict within a tick of the evidence.
const PASSIVE_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// How often expired flows are removed so their NAT ports are free again.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// Changes come in bursts (an interface going down removes several routes); wait for the burst
/// to end before re-planning.
const DEBOUNCE: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("config {path}: {error}")]
    Config { path: String, error: ConfigError },
    #[error("reading the kernel's state")]
    Observe(#[source] OperationError),
    #[error("applying the configuration")]
    Apply(#[source] ApplyError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Sysctl(#[from] SysctlError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("listening on {path}")]
    Listen {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("installing the signal handlers")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Teardown(#[from] TeardownError),
    #[error("setting up the eBPF data plane")]
    Dataplane(#[source] DataplaneError),
    #[error("starting the forward proxy")]
    Proxy(#[source] crate::proxy::ProxyError),
}

pub struct RunOptions {
    pub config_path: PathBuf,
    pub state_dir: StateDir,
    pub teardown_on_exit: bool,
}

struct Daemon {
    /// Feeds the forward proxy the uplinks' usability after each reconcile.
    proxy_feed: Option<crate::proxy::Feed>,
    /// The serving proxy, stopped and bound anew when a reload changes it.
    proxy: Option<crate::proxy::ProxyHandle>,
    config: Config,
    config_path: String,
    state_dir: StateDir,
    netlink: Netlink,
    backup: SysctlBackup,
    status: Arc<Mutex<Status>>,
    dataplane: Option<Dataplane>,
    /// Started after the first apply, when the routes the probes leave by exist.
    health: Option<health::Monitor>,
    /// Uplinks whose new TCP flows go unanswered while others' are answered.
    passive: health::passive::PassiveDetector,
    /// Turns the data plane's answer counters into liveness (see `health::liveness`).
    traffic: health::liveness::TrafficWatch,
    /// When a dead uplink's connections are given up, for the data plane and the proxy alike.
    releases: health::release::ReleaseClock,
    /// Reads the ports the gateway listens on and the host's firewall forwards.
    forwards: crate::host_ports::HostPortsReader,
}

/// What one reconcile pass could not do, per uplink (None: what no uplink owns).
type Failures = Vec<(Option<u32>, String)>;

impl Daemon {
    /// Uplinks judged down by the probes or by passive detection; none when that would be every
    /// configured uplink (then those with carrier keep working rather than cut the office off).
    fn judged_down(&self) -> Vec<u32> {
        let Some(monitor) = &self.health else {
            return Vec::new();
        };
        let mut down = monitor.down();
        for id in self.passive.condemned() {
            if !down.contains(id) {
                down.push(*id);
            }
        }
        if down.len() < self.config.uplinks.len() {
            down
        } else {
            Vec::new()
        }
    }

    /// One pass: observe, plan, apply per uplink (best effort), and update the data plane,
    /// every time. At start (`Strict`) what no uplink owns is all or nothing, as is the data
    /// plane. Returns how many operations it applied.
    async fn reconcile(&mut self, strictness: Strictness) -> Result<usize, DaemonError> {
        let mut observed = reconcile::observe(&self.netlink, &self.config)
            .await
            .map_err(DaemonError::Observe)?;
        observed.down = self.judged_down();
        let desired = plan::desired(&self.config, &observed, strictness).map_err(|error| {
            DaemonError::Config {
                path: self.config_path.clone(),
                error,
            }
        })?;
        let operations = plan::diff(&desired, &observed);
        let mut failures: Failures = Vec::new();
        let (unowned, owned): (Vec<Operation>, Vec<Operation>) = match strictness {
            Strictness::Strict => operations
                .iter()
                .cloned()
                .partition(|op| plan::owner(op, &self.config).is_none()),
            Strictness::Tolerant => (Vec::new(), operations.clone()),
        };
        reconcile::apply(&self.netlink, &mut self.backup, &unowned)
            .await
            .map_err(DaemonError::Apply)?;
        let mut applied = unowned;
        let mut refused = Vec::new();
        for (operation, error) in
            reconcile::apply_best_effort(&self.netlink, &mut self.backup, &owned).await
        {
            let shown = format!("`{operation}` failed: {}", error_chain(&error));
            tracing::warn!(error = %shown, "an uplink's change was refused; retried next pass");
            failures.push((plan::owner(&operation, &self.config), shown));
            refused.push(operation);
        }
        applied.extend(owned.into_iter().filter(|op| !refused.contains(op)));
        let host_ports = self.forwards.read();
        if let Some(dataplane) = &mut self.dataplane {
            if let Err(error) =
                dataplane.write_host_ports(&host_ports, &self.config, &desired.uplinks)
            {
                failures.push((None, format!("the data plane: {}", error_chain(&error))));
            }
            let wanted = dataplane::desired::desired(&self.config, &observed, &desired.uplinks);
            if let Err(error) = dataplane.apply(&wanted) {
                if strictness == Strictness::Strict {
                    // At start, all or nothing: take back the routing this attempt installed.
                    for failure in reconcile::undo(&self.netlink, &mut self.backup, &applied).await
                    {
                        tracing::error!(%failure, "could not undo");
                    }
                    return Err(DaemonError::Dataplane(error));
                }
                failures.push((None, format!("the data plane: {}", error_chain(&error))));
            }
        }
        let refused = crate::proxy::refused_networks(&self.config, &observed);
        self.publish(&desired.uplinks, &failures, refused);
        if let Ok(mut status) = self.status.lock() {
            if failures.is_empty() {
                status.reconciles += 1;
                status.last_reconcile_unix = now_unix();
                status.last_error = None;
            } else {
                let shown: Vec<String> = failures.iter().map(|(_, f)| f.clone()).collect();
                status.last_error = Some(shown.join("; "));
            }
        }
        Ok(operations.len() - failures.len().min(operations.len()))
    }
}

/// Records the uplinks' names for `balancer stats`, which reads the kernel's maps (ids only),
/// also when the daemon is not running. Best effort: stats fall back to ids.
fn write_uplink_names(config: &Config, state_dir: &StateDir) {
    let names: Vec<UplinkName> = config
        .uplinks
        .iter()
        .map(|u| UplinkName {
            id: u.id,
            name: u.name.clone(),
            interface: u.interface.clone(),
        })
        .collect();
    if let Ok(text) = serde_json::to_string_pretty(&names)
        && let Err(error) = std::fs::write(crate::stats::names_path(&state_dir.path), text)
    {
        tracing::warn!(%error, "recording uplink names for `balancer stats`");
    }
}

type HealthFigures =
    std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<u32, health::UplinkHealth>>>;

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub async fn run(options: RunOptions) -> Result<(), DaemonError> {
    let config = Config::load(&options.config_path)?;
    let config_path = options.config_path.display().to_string();
    let state_dir = options.state_dir;
    state_dir.create()?;
    state_dir.claim()?;
    let result = serve(config, config_path, &state_dir, options.teardown_on_exit).await;
    state_dir.release();
    result
}

async fn serve(
    config: Config,
    config_path: String,
    state_dir: &StateDir,
    teardown_on_exit: bool,
) -> Result<(), DaemonError> {
    // First, so a SIGHUP during the start (a reload sent too early) is kept for the loop
    // instead of ending the daemon, which is SIGHUP's default action.
    let mut terminate = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    // Subscribe before the first apply so no change between apply and subscription is missed.
    let (connection, _, mut changes) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv4Rule,
    ])
    .map_err(NetlinkError::Connect)?;
    tokio::spawn(connection);

    let status = Arc::new(Mutex::new(Status {
        version: STATUS_VERSION,
        pid: std::process::id(),
        config: config_path.clone(),
        state_dir: state_dir.path.display().to_string(),
        started_unix: now_unix(),
        reconciles: 0,
        last_reconcile_unix: 0,
        last_error: None,
        uplinks: Vec::new(),
        last_reload: None,
        proxy: None,
    }));
    // Check the config against the kernel before anything is loaded or changed.
    let netlink = Netlink::connect()?;
    let observed = reconcile::observe(&netlink, &config)
        .await
        .map_err(DaemonError::Observe)?;
    plan::desired(&config, &observed, Strictness::Strict).map_err(|error| DaemonError::Config {
        path: config_path.clone(),
        error,
    })?;
    // The forward proxy binds now, so a taken address fails the start with nothing changed;
    // it serves once the first apply has installed the routes its sockets leave by.
    let (proxy_feed, proxy) = match bind_proxy(&config).await? {
        Some((feed, proxy)) => (Some(feed), Some(proxy)),
        None => (None, None),
    };
    // Load (and verify) the programs before touching any routing, so a program the kernel
    // refuses fails the start with nothing changed.
    let pins = PinDir::for_this_namespace().map_err(|e| DaemonError::Dataplane(e.into()))?;
    let mut fresh_pins = false;
    let dataplane = if config.dataplane.enabled {
        let (dataplane, adopted) = Dataplane::load_pinned(&pins, config.dataplane.flow_entries)
            .map_err(DaemonError::Dataplane)?;
        fresh_pins = !adopted;
        tracing::info!(pins = %pins.root.display(), adopted, "eBPF data plane loaded");
        Some(dataplane)
    } else {
        None
    };
    write_uplink_names(&config, state_dir);
    let mut daemon = Daemon {
        proxy_feed,
        proxy: None,
        config,
        config_path,
        state_dir: state_dir.clone(),
        netlink,
        backup: SysctlBackup::open(state_dir.sysctl_backup())?,
        status: status.clone(),
        dataplane,
        health: None,
        passive: Default::default(),
        traffic: Default::default(),
        releases: Default::default(),
        forwards: Default::default(),
    };

    // The first apply is all or nothing for what no uplink owns: a failure rolls back and the
    // daemon exits non-zero. Each uplink's own part is best effort, as in every later pass.
    let changed = match daemon.reconcile(Strictness::Strict).await {
        Ok(changed) => changed,
        Err(error) => {
            if fresh_pins {
                drop(daemon.dataplane.take());
                let _ = dataplane::teardown(&pins);
            }
            return Err(error);
        }
    };
    tracing::info!(
        changed,
        uplinks = daemon.config.uplinks.len(),
        "configuration applied"
    );
    if let Some(proxy) = proxy {
        daemon.proxy = Some(proxy.spawn(status.clone()).map_err(DaemonError::Proxy)?);
    }
    let monitor = health::spawn(&daemon.config);
    let mut verdicts = monitor.verdicts.clone();
    let figures = monitor.figures.clone();
    let liveness = monitor.liveness.clone();
    daemon.health = Some(monitor);
    // Probes for learned addresses start with the next pass; run it now rather than wait.
    if let Err(error) = daemon.reconcile(Strictness::Tolerant).await {
        tracing::warn!(error = %error_chain(&error), "could not keep the configuration applied; will retry");
    }

    let socket = state_dir.socket();
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|source| DaemonError::Listen {
        path: socket.display().to_string(),
        source,
    })?;
    tokio::spawn(status_socket::serve_status(
        listener,
        status.clone(),
        figures.clone(),
    ));
    tracing::info!(socket = %socket.display(), "serving status");
    systemd::notify("READY=1\nSTATUS=configuration applied");
    // Fed from this loop, not a task of its own: a hung loop is what the watchdog is for.
    let watchdog_period = systemd::watchdog_interval();
    let mut watchdog = tokio::time::interval(watchdog_period.unwrap_or(Duration::from_secs(3600)));

    let mut resync = tokio::time::interval(RESYNC_INTERVAL);
    resync.reset();
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    sweep.reset();
    let mut reset_check = tokio::time::interval(RESET_CHECK_INTERVAL);
    let mut passive_check = tokio::time::interval(PASSIVE_CHECK_INTERVAL);
    let (acquittal_results, mut acquittals) = tokio::sync::mpsc::channel::<(u32, bool)>(16);
    let mut acquittals_running = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => {
                daemon.forwards.invalidate();
                daemon.reload().await;
            }
            _ = watchdog.tick() => {
                if watchdog_period.is_some() {
                    systemd::notify("WATCHDOG=1");
                }
                continue;
            }
            _ = resync.tick() => daemon.forwards.invalidate(),
            // A health verdict changed: act at once, no debounce (failover time counts).
            Ok(()) = verdicts.changed() => {}
            _ = passive_check.tick() => {
                let Some(dataplane) = &daemon.dataplane else { continue };
                let counters = match dataplane.tcp_counters() {
                    Ok(counters) => counters,
                    Err(error) => {
                        tracing::warn!(error = %error_chain(&error), "reading the TCP counters");
                        continue;
                    }
                };
                let now = std::time::Instant::now();
                match dataplane.answer_counters() {
                    Ok(answers) => daemon.traffic.observe(now, answers, &liveness),
                    Err(error) => tracing::warn!(error = %error_chain(&error), "reading the answer counters"),
                }
                let newly = daemon.passive.observe(now, counters, &liveness.rtts());
                for (id, why) in &newly {
                    tracing::info!(uplink = id, reason = %why, "uplink down by passive detection");
                    if let Ok(mut figures) = figures.lock()
                        && let Some(entry) = figures.get_mut(id)
                    {
                        entry.passive = Some(why.clone());
                    }
                }
                // A condemned uplink rejoins only after a TCP connect through it succeeds.
                for id in daemon.passive.condemned().clone() {
                    if !acquittals_running.insert(id) {
                        continue;
                    }
                    let elsewhere = dataplane
                        .answered_tcp_remotes(id, health::passive::ACQUITTAL_FROM_FLOWS)
                        .unwrap_or_default();
                    let uplink = daemon.config.uplinks.iter().find(|u| u.id == id).cloned();
                    let source = daemon.current_source(id);
                    let results = acquittal_results.clone();
                    tokio::spawn(async move {
                        let ok = match (uplink, source) {
                            (Some(uplink), Some(source)) => {
                                tokio::time::sleep(Duration::from_millis(500)).await;
                                let targets = health::passive::acquittal_targets(&uplink.track, &elsewhere);
                                let connects = targets.iter().map(|target| health::probe::tcp_probe(source, *target, Duration::from_secs(1)));
                                futures::future::join_all(connects).await.iter().any(Option::is_some)
                            }
                            _ => false,
                        };
                        let _ = results.send((id, ok)).await;
                    });
                }
                if newly.is_empty() {
                    continue;
                }
            }
            Some((id, ok)) = acquittals.recv() => {
                acquittals_running.remove(&id);
                if !ok || !daemon.passive.acquit(id) {
                    continue;
                }
                tracing::info!(uplink = id, "a TCP connect succeeded through the uplink: it rejoins");
                if let Ok(mut figures) = figures.lock()
                    && let Some(entry) = figures.get_mut(&id)
                {
                    entry.passive = None;
                }
            }
            _ = reset_check.tick() => {
                daemon.release_due(&liveness);
                continue;
            }
            _ = sweep.tick() => {
                if let Some(dataplane) = &mut daemon.dataplane {
                    match dataplane.sweep(crate::stats::monotonic_ns()) {
                        Ok(0) => {}
                        Ok(removed) => tracing::debug!(removed, "expired flows removed"),
                        Err(error) => tracing::warn!(error = %error_chain(&error), "sweeping expired flows"),
                    }
                }
                continue;
            }
            Some(_) = changes.next() => {
                tokio::time::sleep(DEBOUNCE).await;
                while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, changes.next()).await {}
            }
        }
        match daemon.reconcile(Strictness::Tolerant).await {
            Ok(0) => {}
            Ok(changed) => {
                tracing::info!(changed, "restored the configuration after a kernel change")
            }
            Err(error) => {
                let shown = error_chain(&error);
                tracing::warn!(error = %shown, "could not keep the configuration applied; will retry");
                if let Ok(mut status) = status.lock() {
                    status.last_error = Some(shown);
                }
            }
        }
    }

    systemd::notify("STOPPING=1");
    if teardown_on_exit {
        let report = teardown::down(&daemon.netlink, state_dir).await?;
        drop(daemon.dataplane.take());
        tracing::info!(
            rules = report.rules,
            routes = report.routes,
            sysctls = report.sysctls,
            "removed everything on exit"
        );
    } else {
        tracing::info!("exiting; routes, rules, settings and the pinned data plane stay in place");
    }
    Ok(())
}

/// The proxy of `config`, bound but not serving, with the channel that feeds it the uplinks.
async fn bind_proxy(
    config: &Config,
) -> Result<Option<(crate::proxy::Feed, crate::proxy::Proxy)>, DaemonError> {
    let Some(settings) = config.proxy.clone() else {
        return Ok(None);
    };
    let (feed, uplinks) = tokio::sync::watch::channel(Default::default());
    let proxy = crate::proxy::Proxy::bind(config, settings, uplinks)
        .await
        .map_err(DaemonError::Proxy)?;
    Ok(Some((feed, proxy)))
}

/// An error and its causes on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut shown = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        shown.push_str(": ");
        shown.push_str(&cause.to_string());
        source = cause.source();
    }
    shown
}
