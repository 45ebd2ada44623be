//! Host ports for the Gateways: from 19100 up, 20 apart, skipping ports already in use.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};

/// Where host ports are taken from: `first`, `first + step`, ... (`count` of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub step: u16,
    pub count: u16,
}

impl PortRange {
    /// OpenClaw's single-host convention: 19100, 19120, 19140, ...
    pub const DEFAULT: PortRange = PortRange {
        first: 19100,
        step: 20,
        count: 500,
    };

    pub fn iter(self) -> impl Iterator<Item = u16> {
        (0..self.count).map_while(move |i| {
            i.checked_mul(self.step)
                .and_then(|offset| self.first.checked_add(offset))
        })
    }

    pub fn contains(self, port: u16) -> bool {
        self.iter().any(|p| p == port)
    }
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange::DEFAULT
    }
}

/// The first port of `range` that is neither in `taken` nor refused by `is_free`.
pub fn allocate(
    range: PortRange,
    taken: &BTreeSet<u16>,
    mut is_free: impl FnMut(u16) -> bool,
) -> Option<u16> {
    range
        .iter()
        .find(|port| !taken.contains(port) && is_free(*port))
}

/// Whether nothing on this host listens on `127.0.0.1:port` (a listener on 0.0.0.0 counts).
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_through_the_range_skipping_taken_and_busy_ports() {
        let range = PortRange::DEFAULT;
        assert_eq!(allocate(range, &BTreeSet::new(), |_| true), Some(19100));
        let taken = BTreeSet::from([19100, 19120]);
        assert_eq!(allocate(range, &taken, |_| true), Some(19140));
        assert_eq!(allocate(range, &taken, |p| p != 19140), Some(19160));
    }

    #[test]
    fn an_exhausted_range_yields_nothing() {
        let range = PortRange {
            first: 65500,
            step: 20,
            count: 100,
        };
        assert_eq!(range.iter().last(), Some(65520));
        assert_eq!(
            allocate(range, &BTreeSet::from([65500, 65520]), |_| true),
            None
        );
    }

    #[test]
    fn a_bound_port_is_not_free() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert!(!port_is_free(port));
        drop(listener);
        assert!(port_is_free(port));
    }
}
