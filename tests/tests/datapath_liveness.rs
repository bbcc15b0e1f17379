//! What the programs tell health about an uplink, and what an uplink out of the rotation keeps:
//! through BPF_PROG_TEST_RUN. Replies of translated flows and packets of the gateway's own
//! connections are answers; everything else received is counted as unsolicited. A flow stays
//! on an uplink that merely left the rotation, until user space releases it (generation).
//! Root only (loading programs); the gateway's own connection is a pair of loopback sockets.

mod datapath;

use std::net::{Ipv4Addr, UdpSocket};

use balancer_common::{
    maps::{PROGRAM_LAN_INGRESS as LAN, PROGRAM_UPLINK_INGRESS as INGRESS},
    stats::{UPLINK_RX_PACKETS, UPLINK_RX_UNSOLICITED},
};
use datapath::{
    check::{flow_key, reply_to},
    harness::{Datapath, uplink_addr},
    packet::{Packet, TCP_ACK, TCP_SYN},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

#[test]
fn only_packets_that_answer_nothing_count_as_unsolicited() -> anyhow::Result<()> {
    let dp = Datapath::load()?;
    let unsolicited = |dp: &Datapath| dp.uplink_counter(1, UPLINK_RX_UNSOLICITED);

    // A reply of a translated flow answers something.
    let syn = Packet::tcp((CLIENT, 40_000), (SERVER, 443), TCP_SYN);
    let mark = dp.run(LAN, &syn.bytes(), 0)?.mark;
    assert_eq!(mark, 1 << 24, "the first flow goes to uplink 1");
    let entry = dp
        .flow(&flow_key(&syn))?
        .ok_or_else(|| anyhow::anyhow!("no flow"))?;
    let reply = reply_to(&syn, uplink_addr(1), u16::from_be(entry.nat_port));
    assert_eq!(dp.run(INGRESS, &reply.bytes(), 0)?.mark, 1 << 24);
    assert_eq!(unsolicited(&dp)?, 0);

    // A datagram of the gateway's own connected socket answers something; the test runs on
    // loopback, so "the gateway" is this process.
    let own = UdpSocket::bind("127.0.0.1:0")?;
    let peer = UdpSocket::bind("127.0.0.1:0")?;
    own.connect(peer.local_addr()?)?;
    let port = |socket: &UdpSocket| -> anyhow::Result<u16> { Ok(socket.local_addr()?.port()) };
    let localhost = Ipv4Addr::LOCALHOST;
    let answer = Packet::udp((localhost, port(&peer)?), (localhost, port(&own)?));
    dp.run(INGRESS, &answer.bytes(), 0)?;
    assert_eq!(unsolicited(&dp)?, 0, "a connected socket's datagram");

    // The same socket from a peer it is not connected to, a port nobody uses, a TCP segment
    // of no connection and a ping: unsolicited, each.
    let stranger = Packet::udp((localhost, 9), (localhost, port(&own)?));
    let nobody = Packet::udp((SERVER, 53), (uplink_addr(1), 40_001));
    let scan = Packet::tcp((SERVER, 80), (uplink_addr(1), 22), TCP_ACK);
    let ping = Packet::icmp_echo(SERVER, uplink_addr(1), 8, 1);
    for packet in [&stranger, &nobody, &scan, &ping] {
        dp.run(INGRESS, &packet.bytes(), 0)?;
    }
    assert_eq!(unsolicited(&dp)?, 4);
    assert_eq!(dp.uplink_counter(1, UPLINK_RX_PACKETS)?, 6);
    Ok(())
}

#[test]
fn a_flow_stays_on_an_uplink_out_of_the_rotation_until_released() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    let syn = Packet::tcp((CLIENT, 40_000), (SERVER, 443), TCP_SYN);
    assert_eq!(dp.run(LAN, &syn.bytes(), 0)?.mark, 1 << 24);
    let ack = Packet::tcp((CLIENT, 40_000), (SERVER, 443), TCP_ACK);

    // Uplink 1 leaves the rotation (a probe verdict, a carrier blip): new flows go elsewhere,
    // the existing one keeps its uplink and its translation.
    dp.set_weights(&[(2, 1), (3, 1)])?;
    let mut uplink = dp.uplink(1)?;
    uplink.enabled = 0;
    dp.set_uplink(1, uplink)?;
    assert_eq!(dp.run(LAN, &ack.bytes(), 0)?.mark, 1 << 24, "kept");
    let other = Packet::tcp((CLIENT, 40_001), (SERVER, 443), TCP_SYN);
    assert_ne!(
        dp.run(LAN, &other.bytes(), 0)?.mark,
        1 << 24,
        "new flows avoid it"
    );

    // Released by user space (silent past the reset delay): the generation moves on and the
    // flow is stale; a new SYN gets a live uplink.
    uplink.generation += 1;
    dp.set_uplink(1, uplink)?;
    assert_eq!(dp.run(LAN, &ack.bytes(), 0)?.mark, 0, "released");
    assert_ne!(dp.run(LAN, &syn.bytes(), 0)?.mark, 1 << 24);
    Ok(())
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock the programs stamp flows with.
fn coarse_ns() -> anyhow::Result<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)?;
    Ok(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// The programs read the coarse clock once per tick and CPU (`clock.rs`): a flow's and a
/// reply's timestamps must still be the coarse clock user space reads, and move on between
/// packets a tick or more apart.
#[test]
fn flow_timestamps_follow_the_coarse_clock() -> anyhow::Result<()> {
    // One tick at HZ=100, the coarsest common setting: a cached reading may lag by that much.
    const TICK_NS: u64 = 10_000_000;
    let dp = Datapath::load()?;
    let request = Packet::udp((CLIENT, 40_000), (SERVER, 53));
    let before = coarse_ns()?;
    dp.run(LAN, &request.bytes(), 0)?;
    let after = coarse_ns()?;
    let entry = dp
        .flow(&flow_key(&request))?
        .ok_or_else(|| anyhow::anyhow!("no flow"))?;
    assert!(
        entry.last_seen_ns + TICK_NS >= before && entry.last_seen_ns <= after,
        "new flow stamped {} outside {before}..={after}",
        entry.last_seen_ns
    );

    for _ in 0..3 {
        std::thread::sleep(std::time::Duration::from_millis(60));
        let before = coarse_ns()?;
        dp.run(LAN, &request.bytes(), 0)?;
        let reply = reply_to(&request, uplink_addr(1), u16::from_be(entry.nat_port));
        dp.run(INGRESS, &reply.bytes(), 0)?;
        let after = coarse_ns()?;
        let seen = dp
            .flow(&flow_key(&request))?
            .ok_or_else(|| anyhow::anyhow!("flow gone"))?
            .last_seen_ns;
        assert!(
            seen + TICK_NS >= before && seen <= after,
            "established packet stamped {seen} outside {before}..={after}"
        );
        let replied = dp
            .reverse_entries()?
            .into_iter()
            .map(|(_, value)| value.last_reply_ns)
            .max()
            .unwrap_or(0);
        assert!(
            replied + TICK_NS >= before && replied <= after,
            "reply stamped {replied} outside {before}..={after}"
        );
    }
    Ok(())
}
