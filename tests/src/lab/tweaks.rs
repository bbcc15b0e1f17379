//! Small changes to a lab that is up, for tests of path MTU and filtering: an interface's MTU,
//! a filter that drops ICMP leaving an interface (a network that blocks ICMP), and another
//! address on the internet host (a second server). All only ever touch the lab's own
//! namespaces (`Lab::exec` checks the name).

use super::Lab;

impl Lab {
    /// Sets the MTU of `dev` in lab namespace `ns`.
    pub fn set_mtu(&self, ns: &str, dev: &str, mtu: u32) -> anyhow::Result<()> {
        self.exec_ok(
            ns,
            &["ip", "link", "set", "dev", dev, "mtu", &mtu.to_string()],
        )?;
        Ok(())
    }

    /// Drops every IPv4 ICMP packet leaving `dev` in lab namespace `ns` (an nftables table of
    /// the namespace's own, hooked at postrouting, so the namespace's own errors are dropped
    /// too), like a network that filters ICMP and so breaks path MTU discovery.
    pub fn drop_icmp_leaving(&self, ns: &str, dev: &str) -> anyhow::Result<()> {
        for command in [
            "add table ip bal_tweaks".to_owned(),
            "add chain ip bal_tweaks out { type filter hook postrouting priority 0; }".to_owned(),
            format!("add rule ip bal_tweaks out oifname {dev} ip protocol icmp counter drop"),
        ] {
            self.exec_ok(ns, &["nft", &command])?;
        }
        Ok(())
    }

    /// Adds `addr` (a /32) to the internet host's server interface: a second server, for tests
    /// that need two remote addresses (STUN's alternate address, an unsolicited sender).
    pub fn add_internet_address(&self, addr: &str) -> anyhow::Result<()> {
        self.exec_ok(
            &self.inet(),
            &["ip", "addr", "add", &format!("{addr}/32"), "dev", "srv0"],
        )?;
        Ok(())
    }
}
