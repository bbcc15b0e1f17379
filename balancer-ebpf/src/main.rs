//! The balancer's kernel side. Entry points stay thin: each classifier only turns the result of
//! its `try_*` function into a tc action (`verdict`); parsing, the flow table, translation and
//! maps live in their own modules.
#![no_std]
#![no_main]
// The BPF atomic OR (`tcp_window::record`): core's atomic types lack read-modify-write here.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod clock;
mod filtering;
mod flow;
mod fragments;
mod hairpin;
mod headers;
mod icmp_error;
mod inbound;
mod lan_ingress;
mod mapping;
mod maps;
mod mss;
mod nat;
mod own_socket;
mod parse;
mod reference;
mod tcp_window;
mod untranslated;
mod uplink_egress;
mod uplink_ingress;
mod verdict;

use aya_ebpf::{macros::classifier, programs::TcContext};
use headers::{ETH_HDR_LEN, RAW_IP_HDR_LEN};

/// LAN-side ingress: sees every frame the office sends towards the gateway; picks uplinks and
/// marks.
#[classifier]
pub fn lan_ingress(ctx: TcContext) -> i32 {
    verdict::action(lan_ingress::try_lan_ingress(&ctx))
}

/// LAN-side hairpinning, tail-called by `lan_ingress` for UDP to an uplink's address.
#[classifier]
pub fn lan_hairpin(ctx: TcContext) -> i32 {
    verdict::action(hairpin::try_lan_hairpin(&ctx))
}

// The uplink programs exist twice, built over a constant link-layer header length: user space
// attaches the raw-IP variant to interfaces without an Ethernet header (PPP, raw-IP LTE, TUN),
// so Ethernet uplinks pay nothing per packet for it.

/// Uplink egress: source NAT of balanced flows, after routing.
#[classifier]
pub fn uplink_egress(ctx: TcContext) -> i32 {
    verdict::action(uplink_egress::try_uplink_egress::<ETH_HDR_LEN>(&ctx))
}

/// Uplink ingress: reverse NAT of replies, before routing.
#[classifier]
pub fn uplink_ingress(ctx: TcContext) -> i32 {
    verdict::action(uplink_ingress::try_uplink_ingress::<ETH_HDR_LEN>(&ctx))
}

/// `uplink_egress` on a raw-IP uplink.
#[classifier]
pub fn uplink_egress_raw_ip(ctx: TcContext) -> i32 {
    verdict::action(uplink_egress::try_uplink_egress::<RAW_IP_HDR_LEN>(&ctx))
}

/// `uplink_ingress` on a raw-IP uplink.
#[classifier]
pub fn uplink_ingress_raw_ip(ctx: TcContext) -> i32 {
    verdict::action(uplink_ingress::try_uplink_ingress::<RAW_IP_HDR_LEN>(&ctx))
}

/// Bench reference: does nothing (`reference`).
#[classifier]
pub fn reference_empty(_ctx: TcContext) -> i32 {
    verdict::PASS
}

/// Bench reference: parse and find the packet's flow, then mark it (`reference`).
#[classifier]
pub fn reference_flow_lookup(ctx: TcContext) -> i32 {
    let _ = reference::flow_lookup(&ctx);
    verdict::PASS
}

/// Bench reference: `reference_flow_lookup` plus one checksum helper (`reference`).
#[classifier]
pub fn reference_translation_floor(ctx: TcContext) -> i32 {
    let _ = reference::translation_floor(&ctx);
    verdict::PASS
}

/// Bench reference: one helper call, the coarse clock (`reference`).
#[classifier]
pub fn reference_helper_call(ctx: TcContext) -> i32 {
    reference::helper_call(&ctx);
    verdict::PASS
}

/// Bench reference: source NAT with one helper per field (`reference`).
#[classifier]
pub fn reference_naive_snat(ctx: TcContext) -> i32 {
    let _ = reference::naive_snat(&ctx);
    verdict::PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach this, so it is never executed; BPF has no
    // way to abort, hence the spin.
    loop {}
}
