//! The few packets user space builds itself (health probes' ICMP echoes, resets sent to LAN
//! clients) share the Internet checksum.

/// RFC 1071 checksum: the one's complement of the one's complement sum of 16-bit words. A
/// buffer that includes its own correct checksum sums to zero.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
