//! Uplink health: probes each uplink's `track` targets out of that uplink only, judges the
//! results with a state machine per uplink, and publishes the verdicts. It only observes: the
//! daemon turns a verdict into data plane and routing changes. Carrier loss needs no probe: the
//! daemon sees it in the kernel's link events and disables the uplink at once.
//!
//! One task per tracked uplink and one per probe round (rounds overlap when the timeout is
//! longer than the interval); no process per probe. A round is judged at its deadline, but its
//! probes wait longer: a late answer still teaches the RTT, so deadlines follow a line's delay
//! under load, and counts as an answer for `liveness`.

pub mod liveness;
pub mod passive;
pub mod probe;
pub mod release;
mod tracker;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

pub use self::{
    liveness::Liveness,
    tracker::{State, Tracker, Transition},
};
use crate::config::{Config, Health, ProbeTarget, Uplink};

/// What `balancer status` shows about one uplink's health.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UplinkHealth {
    pub state: State,
    /// False when the uplink has no `track` targets: only its carrier is watched.
    pub tracked: bool,
    pub loss_percent: f64,
    pub rtt_ms: Option<f64>,
    pub last_change_unix: Option<u64>,
    /// Why the state last changed.
    pub reason: Option<String>,
    pub transitions: u64,
    /// Set while passive detection holds the uplink down (traffic unanswered), with why.
    #[serde(default)]
    pub passive: Option<String>,
}

/// Live figures for every uplink (updated every round) and the verdicts (changed only on a
/// transition, so the daemon re-plans only when it matters).
#[derive(Clone)]
pub struct Monitor {
    pub figures: Arc<Mutex<BTreeMap<u32, UplinkHealth>>>,
    pub verdicts: watch::Receiver<BTreeMap<u32, State>>,
    sender: Arc<watch::Sender<BTreeMap<u32, State>>>,
    /// The probing task of each uplink, with the uplink (source included) and settings it
    /// probes with.
    tasks: Arc<Mutex<BTreeMap<u32, ProbingTask>>>,
    /// When each uplink last answered anything (probes or traffic), and its smoothed RTT.
    pub liveness: Liveness,
}

struct ProbingTask {
    uplink: Uplink,
    settings: Health,
    task: tokio::task::AbortHandle,
}

impl Monitor {
    /// Ids of the uplinks judged down now.
    pub fn down(&self) -> Vec<u32> {
        self.verdicts
            .borrow()
            .iter()
            .filter(|(_, s)| **s == State::Down)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Probes each uplink in `uplinks` as it is now: `source` is the address it has now (None:
    /// not addressed yet, nothing to probe from). An uplink whose source or targets changed
    /// (renumbered, or a reload) starts over from unknown; one no longer listed stops. The
    /// others keep their state.
    pub fn follow(&self, uplinks: &[(Uplink, Option<std::net::Ipv4Addr>)], settings: &Health) {
        let Ok(mut tasks) = self.tasks.lock() else {
            return;
        };
        let mut wanted = BTreeMap::new();
        for (uplink, source) in uplinks {
            let probed = source
                .filter(|_| !uplink.track.is_empty())
                .map(|source| Uplink {
                    source: Some(source),
                    ..uplink.clone()
                });
            wanted.insert(uplink.id, (uplink.clone(), probed));
        }
        let stale: Vec<u32> = tasks
            .iter()
            .filter(|(id, probing)| {
                probing.settings != *settings
                    || wanted.get(id).and_then(|(_, p)| p.as_ref()) != Some(&probing.uplink)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(probing) = tasks.remove(&id) {
                probing.task.abort();
            }
            self.sender.send_modify(|map| {
                map.insert(id, State::Unknown);
            });
        }
        if let Ok(mut figures) = self.figures.lock() {
            figures.retain(|id, _| wanted.contains_key(id));
            for (id, (uplink, probed)) in &wanted {
                let tracked = !uplink.track.is_empty();
                let entry = figures
                    .entry(*id)
                    .or_insert_with(|| initial_figures(tracked));
                // Starting over: a new probing task, no address to probe from, or targets
                // removed. A passive verdict is the daemon's and stays.
                let fresh = match probed {
                    Some(_) => !tasks.contains_key(id),
                    None => tracked || entry.tracked,
                };
                if fresh {
                    let passive = entry.passive.take();
                    *entry = initial_figures(tracked);
                    entry.passive = passive;
                    if probed.is_none() && tracked {
                        entry.reason = Some("no address to probe from yet".into());
                    }
                }
            }
        }
        self.sender.send_if_modified(|map| {
            let before = map.len();
            map.retain(|id, _| wanted.contains_key(id));
            for id in wanted.keys() {
                map.entry(*id).or_insert(State::Unknown);
            }
            map.len() != before
        });
        for (id, (_, probed)) in wanted {
            if let Some(uplink) = probed
                && !tasks.contains_key(&id)
            {
                let task = tokio::spawn(watch_uplink(
                    uplink.clone(),
                    settings.clone(),
                    self.figures.clone(),
                    self.sender.clone(),
                    self.liveness.clone(),
                ));
                tasks.insert(
                    id,
                    ProbingTask {
                        uplink,
                        settings: settings.clone(),
                        task: task.abort_handle(),
                    },
                );
            }
        }
    }
}

fn initial_figures(tracked: bool) -> UplinkHealth {
    UplinkHealth {
        state: State::Unknown,
        tracked,
        loss_percent: 0.0,
        rtt_ms: None,
        last_change_unix: None,
        reason: (!tracked).then(|| "no track targets: only carrier is watched".to_string()),
        transitions: 0,
        passive: None,
    }
}

/// Starts probing every uplink that has `track` targets and a configured source; the daemon
/// then calls [`Monitor::follow`] with the learned ones. Must run after the routing is in
/// place, or the first probes find no way out.
pub fn spawn(config: &Config) -> Monitor {
    let initial: BTreeMap<u32, State> = config
        .uplinks
        .iter()
        .map(|u| (u.id, State::Unknown))
        .collect();
    let (sender, verdicts) = watch::channel(initial);
    let monitor = Monitor {
        figures: Arc::default(),
        verdicts,
        sender: Arc::new(sender),
        tasks: Arc::default(),
        liveness: Liveness::default(),
    };
    let uplinks: Vec<(Uplink, Option<std::net::Ipv4Addr>)> = config
        .uplinks
        .iter()
        .map(|u| (u.clone(), u.source))
        .collect();
    monitor.follow(&uplinks, &config.health);
    monitor
}

/// How long a probe waits for a late answer after its round was judged lost: long enough for
/// a modem queue of a second or two each way.
const PATIENCE: Duration = Duration::from_secs(5);

/// What a probe round reports: its verdict at the deadline, then maybe a late answer.
enum Probed {
    /// The round ended: the fastest answer within the deadline, or None; `sent` is when it
    /// started, so other traffic answered since then can be taken into account.
    Round {
        sent: std::time::Instant,
        answer: Option<Duration>,
    },
    /// A probe of a round already judged lost was answered after all, this long after it left.
    Late(Duration),
}

async fn watch_uplink(
    uplink: Uplink,
    health: Health,
    figures: Arc<Mutex<BTreeMap<u32, UplinkHealth>>>,
    verdicts: Arc<watch::Sender<BTreeMap<u32, State>>>,
    liveness: Liveness,
) {
    // Only uplinks with an address are probed (see `Monitor::follow`).
    let Some(source) = uplink.source else {
        return;
    };
    let echo = if uplink
        .track
        .iter()
        .any(|t| matches!(t, ProbeTarget::Icmp(_)))
    {
        match probe::EchoProber::new(uplink.id, source) {
            Ok(prober) => Some(Arc::new(prober)),
            Err(error) => {
                tracing::error!(uplink = %uplink.name, %error, "cannot open an ICMP socket; ICMP targets count as lost");
                None
            }
        }
    } else {
        None
    };
    let (results, mut outcomes) = mpsc::channel::<Probed>(64);
    let mut tracker = Tracker::default();
    let mut transitions = 0u64;
    let mut ticker = tokio::time::interval(Duration::from_millis(u64::from(health.interval_ms)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let deadline = tracker.timeout(&health);
                let (targets, echo, results) = (uplink.track.clone(), echo.clone(), results.clone());
                let liveness = liveness.clone();
                let id = uplink.id;
                tokio::spawn(async move {
                    round(&targets, source, echo.as_deref(), deadline, &results, &liveness, id).await;
                });
            }
            Some(probed) = outcomes.recv() => {
                let (answer, sent) = match probed {
                    Probed::Late(rtt) => {
                        tracker.late_answer(rtt);
                        if let Some(rtt) = tracker.smoothed_rtt() {
                            liveness.set_rtt(uplink.id, rtt);
                        }
                        continue;
                    }
                    Probed::Round { sent, answer } => (answer, sent),
                };
                let traffic = liveness.answered_since(uplink.id, sent);
                let transition = tracker.record(answer, traffic, std::time::Instant::now(), &health);
                if let Some(rtt) = tracker.smoothed_rtt() {
                    liveness.set_rtt(uplink.id, rtt);
                }
                if let Some(transition) = &transition {
                    transitions += 1;
                    tracing::info!(
                        uplink = %uplink.name,
                        from = ?transition.from,
                        to = ?transition.to,
                        reason = %transition.reason,
                        "uplink health changed"
                    );
                    verdicts.send_modify(|map| {
                        map.insert(uplink.id, transition.to);
                    });
                }
                if let Ok(mut figures) = figures.lock()
                    && let Some(entry) = figures.get_mut(&uplink.id)
                {
                    entry.state = tracker.state();
                    entry.loss_percent = (tracker.loss() * 1000.0).round() / 10.0;
                    entry.rtt_ms = tracker.rtt().map(|rtt| (rtt.as_secs_f64() * 10_000.0).round() / 10.0);
                    entry.transitions = transitions;
                    if let Some(transition) = transition {
                        entry.last_change_unix = Some(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0));
                        entry.reason = Some(transition.reason);
                    }
                }
            }
        }
    }
}

/// One probe round: every target at once. Reports the fastest answer as soon as there is one,
/// or None at `deadline`; then keeps waiting (up to `PATIENCE`) for a late answer, reported
/// as such. Every answer also goes to `liveness`.
async fn round(
    targets: &[ProbeTarget],
    source: std::net::Ipv4Addr,
    echo: Option<&probe::EchoProber>,
    deadline: Duration,
    results: &mpsc::Sender<Probed>,
    liveness: &Liveness,
    id: u32,
) {
    use futures::StreamExt;
    let sent = std::time::Instant::now();
    let mut probes: futures::stream::FuturesUnordered<_> = targets
        .iter()
        .map(|target| async move {
            match target {
                ProbeTarget::Icmp(address) => match echo {
                    Some(echo) => echo.probe(*address, PATIENCE).await,
                    None => None,
                },
                ProbeTarget::Tcp(address) => probe::tcp_probe(source, *address, PATIENCE).await,
            }
        })
        .collect();
    let judged = tokio::time::sleep(deadline);
    tokio::pin!(judged);
    let mut late = false;
    loop {
        tokio::select! {
            next = probes.next() => match next {
                Some(Some(rtt)) => {
                    liveness.heard(id, std::time::Instant::now());
                    let message = if late {
                        Probed::Late(rtt)
                    } else {
                        Probed::Round { sent, answer: Some(rtt) }
                    };
                    let _ = results.send(message).await;
                    return;
                }
                Some(None) => {}
                None => break,
            },
            _ = &mut judged, if !late => {
                late = true;
                let _ = results.send(Probed::Round { sent, answer: None }).await;
            }
        }
    }
    if !late {
        let _ = results.send(Probed::Round { sent, answer: None }).await;
    }
}
