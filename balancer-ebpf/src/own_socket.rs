//! Whether a packet arriving on an uplink belongs to one of the gateway's own connections (its
//! resolver, updates, the proxy's upstreams, an established inbound connection): asked only for
//! packets that are no translated flow's reply, to tell a line that carries traffic both ways
//! from one that merely receives unsolicited packets (scans, stray datagrams).

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
    },
    helpers::{bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
    programs::TcContext,
};
use balancer_common::flow::{PROTOCOL_TCP, PROTOCOL_UDP};

use crate::parse::Packet;

/// `TCP_LISTEN` in the kernel's socket states: a SYN to a listener is no answer to anything.
const TCP_LISTEN: u32 = 10;

/// True when `packet` reaches an established TCP socket or a connected UDP socket of this
/// namespace: it answers something the gateway itself sent.
#[inline(always)]
pub fn answers(ctx: &TcContext, packet: &Packet) -> bool {
    let protocol = packet.ip.protocol;
    if protocol != PROTOCOL_TCP && protocol != PROTOCOL_UDP {
        return false;
    }
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: packet.ip.src,
                daddr: packet.ip.dst,
                sport: packet.src_port,
                dport: packet.dst_port,
            },
        },
    };
    let size = core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: the context is the one the kernel passed; the tuple lives on this stack frame
    // and `size` is its IPv4 part, as the helpers expect.
    let sock: *mut bpf_sock = unsafe {
        if protocol == PROTOCOL_TCP {
            bpf_sk_lookup_tcp(ctx.skb.skb as *mut _, &mut tuple, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(ctx.skb.skb as *mut _, &mut tuple, size, netns, 0)
        }
    };
    if sock.is_null() {
        return false;
    }
    // SAFETY: a non-null socket from the lookup, readable until it is released below.
    let (state, peer) = unsafe { ((*sock).state, (*sock).dst_ip4) };
    // SAFETY: releases the reference the lookup took, on every path that got one.
    unsafe { bpf_sk_release(sock as *mut _) };
    if protocol == PROTOCOL_TCP {
        state != TCP_LISTEN
    } else {
        peer != 0
    }
}
