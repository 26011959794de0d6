//! Network namespaces for tests that need several hosts on one machine: one namespace per
//! member, each with one veth whose other end is enslaved to a bridge in a namespace of its
//! own, all on `10.99.0.0/24`. Nothing is created in the root namespace, so the host's
//! network is never touched, and every address and interface name lives inside the test's
//! own namespaces: parallel runs cannot collide. Namespace names carry the process id and
//! a counter.
//!
//! Links are cut with iptables DROP rules (INPUT and OUTPUT) inside one member's namespace;
//! the rules go away with the namespace. [`Netns`] deletes its namespaces when dropped,
//! also when the test panics (or when creating them failed halfway).
//!
//! Needs root, `ip` (iproute2) and, for cuts, `iptables` (tests/run installs both).

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cmd::{run, run_ok};

const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<()> {
    run_ok(Command::new("ip").args(args), COMMAND_TIMEOUT).map(drop)
}

/// Why namespaces cannot be used here, or `None` when they can: root, `ip netns`, veth and
/// bridge support, and `iptables` inside a namespace.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    for tool in ["ip", "iptables"] {
        let found = run(Command::new("sh").args(["-c", &format!("command -v {tool}")]), COMMAND_TIMEOUT)
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("`{tool}` is not installed (tests/run installs iproute2 and iptables)"));
        }
    }
    match Netns::create(&["probe"]) {
        Ok(netns) => match netns.iptables(0, &["-S"]) {
            Ok(()) => None,
            Err(e) => Some(format!("iptables does not work inside a namespace: {e:#}")),
        },
        Err(e) => Some(format!("cannot create namespaces with veths and a bridge: {e:#}")),
    }
}

/// Namespaces joined by a bridge. Removed on drop.
#[derive(Debug)]
pub struct Netns {
    /// Member namespaces, in the order given to [`Netns::create`].
    members: Vec<String>,
    /// The namespace holding the bridge.
    bridge: String,
    /// Every namespace created so far (deleted on drop).
    created: Vec<String>,
}

impl Netns {
    /// Creates one namespace per member (named `k<pid>n<counter><member>`), plus one for
    /// the bridge. Member i gets address `10.99.0.(i + 1)` on its `eth0`.
    pub fn create(members: &[&str]) -> Result<Self> {
        assert!(members.len() < 200, "one /24 for every member");
        let prefix = format!("k{}n{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let mut netns = Self {
            members: members.iter().map(|m| format!("{prefix}{m}")).collect(),
            bridge: format!("{prefix}br"),
            created: Vec::new(),
        };
        // From here on, a failure drops `netns`, which deletes what was created.
        ip(&["netns", "add", &netns.bridge])?;
        netns.created.push(netns.bridge.clone());
        ip(&["-n", &netns.bridge, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &netns.bridge, "link", "set", "br0", "up"])?;
        for (i, ns) in netns.members.clone().iter().enumerate() {
            ip(&["netns", "add", ns])?;
            netns.created.push(ns.clone());
            let port = format!("p{i}");
            // Both ends are created inside the test's namespaces, never in the root one.
            ip(&["-n", &netns.bridge, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
            ip(&["-n", &netns.bridge, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{}/24", netns.ip(i)), "dev", "eth0"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(netns)
    }

    /// Member `i`'s namespace name.
    pub fn name(&self, i: usize) -> &str {
        &self.members[i]
    }

    /// Member `i`'s address.
    pub fn ip(&self, i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 99, 0, i as u8 + 1))
    }

    /// The command prefix that runs a program in member `i`'s namespace.
    pub fn exec_prefix(&self, i: usize) -> Vec<String> {
        ["ip", "netns", "exec", self.name(i)].map(String::from).to_vec()
    }

    /// Runs `iptables ARGS` in member `i`'s namespace.
    pub fn iptables(&self, i: usize, args: &[&str]) -> Result<()> {
        let output = run(
            Command::new("ip").args(["netns", "exec", self.name(i), "iptables", "-w"]).args(args),
            COMMAND_TIMEOUT,
        )?;
        if !output.status.success() {
            bail!("{}", output.describe());
        }
        Ok(())
    }

    /// Cuts (or restores) all traffic between members `a` and `b`, both ways, with DROP
    /// rules in `a`'s namespace.
    pub fn cut(&self, a: usize, b: usize, cut: bool) -> Result<()> {
        let peer = self.ip(b).to_string();
        let action = if cut { "-A" } else { "-D" };
        self.iptables(a, &[action, "INPUT", "-s", &peer, "-j", "DROP"])
            .and_then(|()| self.iptables(a, &[action, "OUTPUT", "-d", &peer, "-j", "DROP"]))
            .with_context(|| {
                format!("{} the link {} - {}", if cut { "cut" } else { "restore" }, self.name(a), self.name(b))
            })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends (and so their peers), its bridge and
        // its iptables rules. Processes still inside keep it alive until they exit; the
        // cluster kills them before dropping this.
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("failed to delete network namespace {ns}: {e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed() -> String {
        run_ok(Command::new("ip").args(["netns", "list"]), COMMAND_TIMEOUT).map(|o| o.stdout).unwrap_or_default()
    }

    /// The namespaces (and with them the veths, the bridge and the iptables rules) are
    /// gone after a test that made them panics.
    #[test]
    fn namespaces_are_deleted_when_a_test_panics() {
        if let Some(why) = unavailable() {
            eprintln!("SKIPPED: network namespaces unavailable: {why}");
            return;
        }
        let names = std::thread::spawn(|| {
            let netns = Netns::create(&["x", "y"]).expect("create namespaces");
            netns.cut(0, 1, true).expect("cut");
            let names: Vec<String> = [netns.name(0), netns.name(1), &netns.bridge].map(String::from).to_vec();
            assert!(names.iter().all(|n| listed().contains(n.as_str())), "namespaces not created: {}", listed());
            std::panic::panic_any(names);
        })
        .join()
        .expect_err("the thread panics");
        let names = names.downcast::<Vec<String>>().expect("the names");
        let after = listed();
        for name in names.iter() {
            assert!(!after.contains(name.as_str()), "namespace {name} survived the panic: {after}");
        }
    }
}
