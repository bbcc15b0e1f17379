//! TCP by RFC 5382, through BPF_PROG_TEST_RUN: an RST changes a flow only within the receiver's
//! window (scaled when both SYNs announced a scale; an exact match always counts), an RST moves
//! a flow to closing and never ends it, and state written from two CPUs at once never goes
//! backwards. Root only (loading programs).

mod datapath;

use std::net::Ipv4Addr;

use anyhow::ensure;
use balancer_common::{
    flow::{
        FLOW_FLAG_ANSWERED, FLOW_FLAG_REMOTE_FIN, FLOW_FLAG_RESET, FLOW_STATE_CLOSING,
        FLOW_STATE_ESTABLISHED, FlowEntry, FlowKey,
    },
    maps::{PROGRAM_LAN_INGRESS as LAN, PROGRAM_UPLINK_INGRESS as INGRESS},
};
use datapath::{
    check::{flow_key, reply_to},
    harness::{Datapath, uplink_addr},
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_SYN},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const TCP_RST: u8 = 0x04;
/// The client's next expected number from the server, as every test packet acknowledges.
const CLIENT_RCV_NXT: u32 = 0x2000_0000;
/// The window every test packet advertises.
const WINDOW: u32 = 64_240;
/// Window scale option 7, padded with a NOP.
const WSCALE_7: [u8; 4] = [1, 3, 3, 7];

/// An established flow: client SYN, server SYN-ACK, client ACK; with `scaled`, both SYNs
/// announce window scale 7. Returns the flow's key and the server's view of the client.
fn established(dp: &mut Datapath, port: u16, scaled: bool) -> anyhow::Result<(FlowKey, u16)> {
    // Every flow on uplink 1, the one the uplink programs act for.
    dp.set_weights(&[(1, 1)])?;
    let mut syn = Packet::tcp((CLIENT, port), (SERVER, 443), TCP_SYN);
    let mut syn_ack_options = Vec::new();
    if scaled {
        syn = syn.with_tcp_options(&WSCALE_7);
        syn_ack_options = WSCALE_7.to_vec();
    }
    ensure!(dp.run(LAN, &syn.bytes(), 0)?.mark == 1 << 24, "syn");
    let key = flow_key(&syn);
    let nat_port = u16::from_be(flow(dp, &key)?.nat_port);
    let syn_ack = reply_to(&syn, uplink_addr(1), nat_port).with_tcp_options(&syn_ack_options);
    ensure!(
        dp.run(INGRESS, &syn_ack.bytes(), 0)?.mark == 1 << 24,
        "syn-ack"
    );
    let ack = Packet::tcp((CLIENT, port), (SERVER, 443), TCP_ACK);
    dp.run(LAN, &ack.bytes(), 0)?;
    let entry = flow(dp, &key)?;
    ensure!(entry.state == FLOW_STATE_ESTABLISHED && entry.remote_seq_next == CLIENT_RCV_NXT);
    Ok((key, nat_port))
}

fn flow(dp: &Datapath, key: &FlowKey) -> anyhow::Result<FlowEntry> {
    dp.flow(key)?.ok_or_else(|| anyhow::anyhow!("no flow"))
}

/// An RST from the server to the client's translated address with sequence number `seq`.
fn server_rst(nat_port: u16, seq: u32) -> Vec<u8> {
    Packet::tcp((SERVER, 443), (uplink_addr(1), nat_port), TCP_RST | TCP_ACK)
        .with_seq(seq)
        .bytes()
}

#[test]
fn an_rst_from_the_remote_counts_only_within_the_clients_window() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    let (key, nat_port) = established(&mut dp, 40_000, false)?;
    // Beyond the unscaled window, and before the next expected number: passed on (the client
    // judges it), the flow untouched.
    for seq in [CLIENT_RCV_NXT + WINDOW + 10, CLIENT_RCV_NXT - 1] {
        let run = dp.run(INGRESS, &server_rst(nat_port, seq), 0)?;
        ensure!(
            run.mark == 1 << 24,
            "an out-of-window RST is still translated"
        );
        let entry = flow(&dp, &key)?;
        ensure!(
            entry.state == FLOW_STATE_ESTABLISHED && entry.flags & FLOW_FLAG_RESET == 0,
            "out of window {seq:#x} changed the flow: {entry:?}"
        );
    }
    // Within the window: closing, not gone.
    dp.run(INGRESS, &server_rst(nat_port, CLIENT_RCV_NXT + 1000), 0)?;
    let entry = flow(&dp, &key)?;
    ensure!(
        entry.state == FLOW_STATE_CLOSING && entry.flags & FLOW_FLAG_RESET != 0,
        "{entry:?}"
    );
    // The flow still carries the connection's packets.
    let ack = Packet::tcp((CLIENT, 40_000), (SERVER, 443), TCP_ACK);
    ensure!(
        dp.run(LAN, &ack.bytes(), 0)?.mark == 1 << 24,
        "an RST never ends a flow outright"
    );

    // The exact next number always counts.
    let (key, nat_port) = established(&mut dp, 40_001, false)?;
    dp.run(INGRESS, &server_rst(nat_port, CLIENT_RCV_NXT), 0)?;
    ensure!(flow(&dp, &key)?.flags & FLOW_FLAG_RESET != 0, "exact match");
    Ok(())
}

#[test]
fn the_window_is_scaled_when_both_ends_announce_a_scale() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    let (key, nat_port) = established(&mut dp, 40_010, true)?;
    let entry = flow(&dp, &key)?;
    ensure!(
        entry.client_wscale == 7 && entry.remote_wscale == 7,
        "{entry:?}"
    );
    // 100 000 bytes ahead: outside 64 240, inside 64 240 << 7.
    dp.run(INGRESS, &server_rst(nat_port, CLIENT_RCV_NXT + 100_000), 0)?;
    ensure!(
        flow(&dp, &key)?.flags & FLOW_FLAG_RESET != 0,
        "scaled window"
    );
    let (key, nat_port) = established(&mut dp, 40_011, false)?;
    dp.run(INGRESS, &server_rst(nat_port, CLIENT_RCV_NXT + 100_000), 0)?;
    ensure!(
        flow(&dp, &key)?.flags & FLOW_FLAG_RESET == 0,
        "unscaled window"
    );
    Ok(())
}

#[test]
fn an_rst_from_the_client_counts_only_near_what_it_sends_next() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    let (key, _) = established(&mut dp, 40_020, false)?;
    let next = flow(&dp, &key)?.client_seq_next;
    let rst = |seq: u32| {
        Packet::tcp((CLIENT, 40_020), (SERVER, 443), TCP_RST | TCP_ACK)
            .with_seq(seq)
            .bytes()
    };
    // Far outside the server's window.
    ensure!(dp.run(LAN, &rst(next.wrapping_add(10_000_000)), 0)?.mark == 1 << 24);
    ensure!(
        flow(&dp, &key)?.flags & FLOW_FLAG_RESET == 0,
        "out of window"
    );
    dp.run(LAN, &rst(next), 0)?;
    let entry = flow(&dp, &key)?;
    ensure!(
        entry.flags & FLOW_FLAG_RESET != 0 && entry.state == FLOW_STATE_CLOSING,
        "{entry:?}"
    );
    Ok(())
}

/// Pins the calling thread to `cpu`, so BPF_PROG_TEST_RUN runs the program there.
fn pin_to(cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

#[test]
fn state_written_from_two_cpus_never_goes_backwards() -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism()?.get();
    if cpus < 2 {
        println!("one CPU only: nothing runs concurrently, skipped");
        return Ok(());
    }
    let mut dp = Datapath::load()?;
    // The client streams ACKs on CPU 0 while the server's FIN arrives on CPU 1, 400 times:
    // every FIN must stay recorded, whatever the ACKs on the other CPU wrote meanwhile. (With
    // plain read-modify-write stores, a FIN was lost within the first few dozen rounds.)
    for round in 0..400 {
        let (key, nat_port) = established(&mut dp, 40_030 + round, false)?;
        let ack = Packet::tcp((CLIENT, 40_030 + round), (SERVER, 443), TCP_ACK).bytes();
        let fin = Packet::tcp((SERVER, 443), (uplink_addr(1), nat_port), TCP_FIN | TCP_ACK).bytes();
        std::thread::scope(|scope| -> anyhow::Result<()> {
            let streaming = scope.spawn(|| -> anyhow::Result<()> {
                pin_to(0)?;
                dp.run_repeat(LAN, &ack, 0, 20_000)?;
                Ok(())
            });
            pin_to(1)?;
            std::thread::sleep(std::time::Duration::from_micros(300));
            dp.run(INGRESS, &fin, 0)?;
            streaming
                .join()
                .map_err(|_| anyhow::anyhow!("the streaming thread panicked"))??;
            Ok(())
        })?;
        let entry = flow(&dp, &key)?;
        ensure!(
            entry.flags & (FLOW_FLAG_REMOTE_FIN | FLOW_FLAG_ANSWERED)
                == FLOW_FLAG_REMOTE_FIN | FLOW_FLAG_ANSWERED,
            "round {round}: the FIN was lost: {entry:?}"
        );
        ensure!(
            balancer_common::policy::tcp_phase(entry.state, entry.flags) == FLOW_STATE_CLOSING,
            "round {round}: the flow went back: {entry:?}"
        );
    }
    Ok(())
}
