//! Upstream connections: resolve through the chosen uplink, refuse forbidden addresses, connect
//! from the uplink's source address, and race a second uplink when the first is slow (Happy
//! Eyeballs across uplinks, RFC 8305's idea applied to links instead of address families).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    sync::Arc,
    time::Instant,
};

use tokio::net::{TcpSocket, TcpStream};

use super::{
    ProxyUplink, Shared,
    counters::UplinkCounters,
    dns::{self, DnsError},
    guard,
};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no uplink is usable")]
    NoUplink,
    #[error("{host} is {address}: {reason}")]
    Forbidden {
        host: String,
        address: Ipv4Addr,
        reason: &'static str,
    },
    #[error("{host} is {address}, in {network}, an office network the proxy does not reach")]
    Refused {
        host: String,
        address: Ipv4Addr,
        network: ipnet::Ipv4Net,
    },
    #[error("IPv6 destinations are not supported")]
    Ipv6,
    #[error("resolving {host} through uplink {uplink}")]
    Dns {
        host: String,
        uplink: String,
        #[source]
        source: DnsError,
    },
    #[error("connecting to {address} through uplink {uplink}")]
    Connect {
        address: SocketAddrV4,
        uplink: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no uplink connected to {host}:{port} within {seconds:.1}s")]
    Timeout {
        host: String,
        port: u16,
        seconds: f64,
    },
}

impl UpstreamError {
    /// Errors another uplink would not change: racing or retrying is pointless.
    fn is_final(&self) -> bool {
        matches!(
            self,
            UpstreamError::Forbidden { .. }
                | UpstreamError::Refused { .. }
                | UpstreamError::Ipv6
                | UpstreamError::Dns {
                    source: DnsError::BadName { .. },
                    ..
                }
        )
    }
}

/// A connected upstream socket and the uplink that carries it.
pub struct Connected {
    pub stream: TcpStream,
    pub uplink: ProxyUplink,
    pub counters: Arc<UplinkCounters>,
    /// To an office destination `proxy.allow` opened: by the main table, not the uplink.
    pub direct: bool,
    /// The origin's address that answered.
    pub origin: SocketAddrV4,
}

impl Connected {
    /// The name the access log gives the way out.
    pub fn way(&self) -> String {
        if self.direct {
            "direct".to_string()
        } else {
            self.uplink.name.clone()
        }
    }
}

/// Connects to `host:port` for `client` through the policy's uplink, racing a second one when
/// the first has not connected within the race delay. The first to connect wins; the loser's
/// attempt is dropped (its socket closed).
pub async fn connect(
    shared: &Shared,
    client: IpAddr,
    host: &str,
    port: u16,
) -> Result<Connected, UpstreamError> {
    let choice = choose(shared, client, host)?;
    connect_via(shared, client, host, port, &choice).await
}

/// The usable uplinks as the proxy sees them now, and the one the policy picked.
pub struct Choice {
    uplinks: Vec<ProxyUplink>,
    first: ProxyUplink,
}

impl Choice {
    pub fn uplink(&self) -> &ProxyUplink {
        &self.first
    }
}

/// Asks the policy for an uplink (a round robin moves on by one per call).
pub fn choose(shared: &Shared, client: IpAddr, host: &str) -> Result<Choice, UpstreamError> {
    let uplinks = shared.view.borrow().uplinks.clone();
    let chosen = shared
        .chooser
        .lock()
        .ok()
        .and_then(|mut c| c.choose(client, host, &uplinks, Instant::now()));
    let first = chosen
        .and_then(|id| uplinks.iter().find(|u| u.id == id))
        .cloned()
        .ok_or(UpstreamError::NoUplink)?;
    Ok(Choice { uplinks, first })
}

/// Connects through the chosen uplink, racing a second one as [`connect`] says.
pub async fn connect_via(
    shared: &Shared,
    client: IpAddr,
    host: &str,
    port: u16,
    choice: &Choice,
) -> Result<Connected, UpstreamError> {
    let limits = &shared.settings.limits;
    let uplinks = &choice.uplinks;
    let first = &choice.first;
    let race = async {
        let first_attempt = attempt(shared, first, host, port);
        tokio::pin!(first_attempt);
        let early = tokio::select! {
            result = &mut first_attempt => Some(result),
            () = tokio::time::sleep(limits.race_delay) => None,
        };
        let second = |shared: &Shared| {
            shared
                .chooser
                .lock()
                .ok()
                .and_then(|mut c| c.alternative(first.id, uplinks))
                .and_then(|id| uplinks.iter().find(|u| u.id == id))
        };
        match early {
            Some(Ok(connected)) => Ok(connected),
            Some(Err(error)) if error.is_final() => Err(error),
            Some(Err(error)) => match second(shared) {
                // Failed fast (refused, unreachable): the next uplink, without waiting.
                Some(other) => attempt(shared, other, host, port).await.or(Err(error)),
                None => Err(error),
            },
            None => match second(shared) {
                None => first_attempt.await,
                Some(other) => {
                    let second_attempt = attempt(shared, other, host, port);
                    tokio::pin!(second_attempt);
                    let (mut first_error, mut second_error) = (None, None);
                    loop {
                        tokio::select! {
                            result = &mut first_attempt, if first_error.is_none() => match result {
                                Ok(connected) => break Ok(connected),
                                Err(error) => first_error = Some(error),
                            },
                            result = &mut second_attempt, if second_error.is_none() => match result {
                                Ok(connected) => break Ok(connected),
                                Err(error) => second_error = Some(error),
                            },
                        }
                        if let (Some(_), Some(_)) = (&first_error, &second_error) {
                            break Err(first_error
                                .or(second_error)
                                .unwrap_or(UpstreamError::NoUplink));
                        }
                    }
                }
            },
        }
    };
    let connected = tokio::time::timeout(limits.connect_timeout, race)
        .await
        .map_err(|_| UpstreamError::Timeout {
            host: host.to_string(),
            port,
            seconds: limits.connect_timeout.as_secs_f64(),
        })??;
    if connected.uplink.id != first.id
        && let Ok(mut chooser) = shared.chooser.lock()
    {
        // The chosen uplink did not connect in time: a sticky entry follows the winner.
        chooser.moved(client, host, connected.uplink.id, Instant::now());
    }
    Ok(connected)
}

/// One uplink's attempt: resolve out of it, check, connect from its address.
async fn attempt(
    shared: &Shared,
    uplink: &ProxyUplink,
    host: &str,
    port: u16,
) -> Result<Connected, UpstreamError> {
    let counters = shared.counters.uplink(uplink.id);
    let result = attempt_inner(shared, uplink, &counters, host, port).await;
    if let Err(error) = &result
        && !error.is_final()
    {
        UplinkCounters::add(&counters.upstream_errors, 1);
        tracing::debug!(uplink = %uplink.name, error = %crate::daemon::error_chain(error), "upstream attempt failed");
    }
    result.map(|(stream, direct, origin)| Connected {
        stream,
        origin,
        uplink: uplink.clone(),
        counters,
        direct,
    })
}

async fn attempt_inner(
    shared: &Shared,
    uplink: &ProxyUplink,
    counters: &UplinkCounters,
    host: &str,
    port: u16,
) -> Result<(TcpStream, bool, SocketAddrV4), UpstreamError> {
    let addresses = match guard::literal(host) {
        Some(IpAddr::V4(address)) => vec![address],
        Some(IpAddr::V6(_)) => return Err(UpstreamError::Ipv6),
        None => match shared.dns_cache.get(uplink.id, host, Instant::now()) {
            Some(addresses) => addresses,
            None => {
                UplinkCounters::add(&counters.dns_queries, 1);
                let servers = dns::resolvers(&uplink.dns);
                let timeout = shared.settings.limits.dns_timeout;
                let (addresses, ttl) =
                    dns::resolve(host, uplink.source, &servers, timeout, &uplink.name)
                        .await
                        .map_err(|source| UpstreamError::Dns {
                            host: host.to_string(),
                            uplink: uplink.name.clone(),
                            source,
                        })?;
                shared
                    .dns_cache
                    .put(uplink.id, host, &addresses, ttl, Instant::now());
                addresses
            }
        },
    };
    let mut last = None;
    for (address, source) in checked(shared, uplink, host, addresses)? {
        let target = SocketAddrV4::new(address, port);
        match connect_from(source, target).await {
            Ok(stream) => return Ok((stream, source.is_none(), target)),
            Err(source) => {
                last = Some(UpstreamError::Connect {
                    address: target,
                    uplink: uplink.name.clone(),
                    source,
                })
            }
        }
    }
    Err(last.unwrap_or(UpstreamError::NoUplink))
}

/// Checks every answer (connecting goes to exactly the addresses that passed), and pairs each
/// with the source address to bind: the uplink's, or none for an office destination that
/// `proxy.allow` opens (not on the internet: reached by the main table, not out of an uplink).
fn checked(
    shared: &Shared,
    uplink: &ProxyUplink,
    host: &str,
    addresses: Vec<Ipv4Addr>,
) -> Result<Vec<(Ipv4Addr, Option<Ipv4Addr>)>, UpstreamError> {
    let local = shared.local.get();
    if let Some((address, reason)) = addresses
        .iter()
        .find_map(|a| guard::forbidden(*a, &local).map(|reason| (*a, reason)))
    {
        return Err(UpstreamError::Forbidden {
            host: host.to_string(),
            address,
            reason,
        });
    }
    let view = shared.view.borrow();
    let refused = &view.refused;
    if let Some((address, network)) = addresses.iter().find_map(|a| {
        guard::refused_by(*a, refused, &shared.settings.allow).map(|network| (*a, network))
    }) {
        return Err(UpstreamError::Refused {
            host: host.to_string(),
            address,
            network,
        });
    }
    Ok(addresses
        .into_iter()
        .map(|address| {
            let office = refused.iter().any(|net| net.contains(&address));
            (address, (!office).then_some(uplink.source))
        })
        .collect())
}

/// Where a connection through `uplink` to `host:port` could lead, known without asking
/// anyone: a literal address or a cached answer, each checked as for a new connection. `None`
/// when the name is not cached or an answer is refused (a new connection then says why).
pub fn known_targets(
    shared: &Shared,
    uplink: &ProxyUplink,
    host: &str,
    port: u16,
) -> Option<Vec<(SocketAddrV4, Option<Ipv4Addr>)>> {
    let addresses = match guard::literal(host) {
        Some(IpAddr::V4(address)) => vec![address],
        Some(IpAddr::V6(_)) => return None,
        None => shared.dns_cache.get(uplink.id, host, Instant::now())?,
    };
    let checked = checked(shared, uplink, host, addresses).ok()?;
    Some(
        checked
            .into_iter()
            .map(|(address, source)| (SocketAddrV4::new(address, port), source))
            .collect(),
    )
}

/// A TCP connection from `source` (so the `from <source>` rule routes it out of that uplink).
/// IP_BIND_ADDRESS_NO_PORT defers the port choice to connect(), where the kernel can reuse a
/// port per destination instead of reserving one per bind: thousands of upstream connections
/// do not exhaust the local port range.
async fn connect_from(
    source: Option<Ipv4Addr>,
    target: SocketAddrV4,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    let Some(source) = source else {
        let stream = socket.connect(SocketAddr::V4(target)).await?;
        stream.set_nodelay(true)?;
        return Ok(stream);
    };
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a pointer to an int that lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))?;
    let stream = socket.connect(SocketAddr::V4(target)).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
