//! The proxy auto-config file served at `/proxy.pac` and `/wpad.dat` on `proxy.listen`: plain
//! host names and everything the proxy refuses by default (LAN networks, office destinations,
//! the uplinks' subnets) go DIRECT; the rest through the proxy. Made from the config and the
//! refused networks the daemon last reported, so it never sends a browser to a refusal.

use std::net::SocketAddrV4;

use ipnet::Ipv4Net;

/// The paths browsers fetch: the first for DHCP option 252 or a configured URL, the second for
/// WPAD by DNS.
pub const PATHS: [&str; 2] = ["/proxy.pac", "/wpad.dat"];

pub const CONTENT_TYPE: &str = "application/x-ns-proxy-autoconfig";

/// The PAC URL clients should be given.
pub fn url(listen: SocketAddrV4) -> String {
    format!("http://{listen}/proxy.pac")
}

/// The file for a proxy on `listen` that refuses `refused` by default.
pub fn file(listen: SocketAddrV4, refused: &[Ipv4Net]) -> String {
    let mut text = String::from(
        "// Made by balancer from its config: what the proxy refuses goes DIRECT.\n\
         function FindProxyForURL(url, host) {\n\
         \x20 if (isPlainHostName(host)) return \"DIRECT\";\n",
    );
    for network in refused {
        // Also when proxy.allow opens part of it: the office reaches it without the proxy.
        text.push_str(&format!(
            "  if (isInNet(host, \"{}\", \"{}\")) return \"DIRECT\";\n",
            network.network(),
            network.netmask()
        ));
    }
    text.push_str(&format!("  return \"PROXY {listen}\";\n}}\n"));
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn refused_networks_go_direct() {
        let listen: SocketAddrV4 = "198.18.0.1:3128".parse().unwrap();
        let text = file(
            listen,
            &[
                "198.18.0.0/24".parse().unwrap(),
                "198.18.1.0/24".parse().unwrap(),
            ],
        );
        assert!(text.contains("isPlainHostName(host)) return \"DIRECT\""));
        assert!(
            text.contains("isInNet(host, \"198.18.0.0\", \"255.255.255.0\")) return \"DIRECT\"")
        );
        assert!(text.contains("isInNet(host, \"198.18.1.0\", \"255.255.255.0\"))"));
        assert!(text.ends_with("return \"PROXY 198.18.0.1:3128\";\n}\n"));
        assert_eq!(url(listen), "http://198.18.0.1:3128/proxy.pac");
    }
}
