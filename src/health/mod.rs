//! Per-node state that outlives topology snapshots: health and administrative drain.
//!
//! A node is identified by its name and address; a reload that keeps both keeps the same
//! `NodeState`, so its health survives. The data plane only reads these atomics; the
//! control plane (checkers, the drain entry point, passive detection) writes them.

pub mod checker;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// Health as last decided for a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Not checked yet.
    Unknown = 0,
    Up = 1,
    Down = 2,
}

#[derive(Debug)]
pub struct NodeState {
    health: AtomicU8,
    /// Whether an unknown node takes traffic (the node's `trust_unknown`).
    trust_unknown: AtomicBool,
    /// Drained by an operator: no new requests, checks go on.
    drained: AtomicBool,
}

impl NodeState {
    pub fn new(trust_unknown: bool) -> Self {
        NodeState {
            health: AtomicU8::new(Health::Unknown as u8),
            trust_unknown: AtomicBool::new(trust_unknown),
            drained: AtomicBool::new(false),
        }
    }

    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Up,
            2 => Health::Down,
            _ => Health::Unknown,
        }
    }

    /// Sets the health and returns the previous one.
    pub fn set_health(&self, h: Health) -> Health {
        match self.health.swap(h as u8, Ordering::Relaxed) {
            1 => Health::Up,
            2 => Health::Down,
            _ => Health::Unknown,
        }
    }

    pub fn set_trust_unknown(&self, trust: bool) {
        self.trust_unknown.store(trust, Ordering::Relaxed);
    }

    pub fn set_drained(&self, drained: bool) {
        self.drained.store(drained, Ordering::Relaxed);
    }

    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }

    /// Whether new requests may go to this node. Relaxed loads: a request that sees a
    /// flip a little late is within the tolerance of health checking itself.
    #[inline]
    pub fn usable(&self) -> bool {
        if self.drained.load(Ordering::Relaxed) {
            return false;
        }
        match self.health.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => self.trust_unknown.load(Ordering::Relaxed),
        }
    }
}

/// Node states by identity, shared by every topology snapshot. Written only when a
/// topology is compiled (control plane), never by requests.
#[derive(Debug, Default)]
pub struct NodeRegistry {
    states: Mutex<HashMap<(String, SocketAddr), Arc<NodeState>>>,
}

impl NodeRegistry {
    /// The state of node `name` at `addr`, created if new.
    pub fn state(&self, name: &str, addr: SocketAddr, trust_unknown: bool) -> Arc<NodeState> {
        // The lock is only taken while compiling a topology, off the hot path.
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let state = states
            .entry((name.to_string(), addr))
            .or_insert_with(|| Arc::new(NodeState::new(trust_unknown)))
            .clone();
        state.set_trust_unknown(trust_unknown);
        state
    }

    /// Forgets nodes that the topology `keep` no longer names.
    pub fn retain(&self, keep: &[(String, SocketAddr)]) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states.retain(|k, _| keep.contains(k));
    }
}
