//! This engine's identity in the fleet: the node id in the tokens of its quota calls, its
//! idempotency claims and its export claims, and the sequence numbers of its quota calls.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The node id (drawn at random when the engine is built and after a SnapStart restore) and
/// the counters its calls are numbered by.
#[derive(Debug)]
pub(crate) struct NodeIds {
    node: AtomicU64,
    /// The sequence number of the latest quota call.
    seq: AtomicU64,
    /// How many quota cells have drawn a sender id.
    senders: AtomicU64,
}

impl NodeIds {
    pub(crate) fn new() -> Self {
        Self { node: AtomicU64::new(crate::base::draw_u64()), seq: AtomicU64::new(0), senders: AtomicU64::new(0) }
    }

    /// This engine's node id.
    #[inline]
    pub(crate) fn node(&self) -> u64 {
        self.node.load(Relaxed)
    }

    /// Draws a new node id (after a SnapStart restore: copies of one snapshot must differ).
    pub(crate) fn renew(&self) {
        self.node.store(crate::base::draw_u64(), Relaxed);
    }

    /// The next sequence number of a call.
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Relaxed) + 1
    }

    /// A sender id for a quota cell's first call: the node id mixed with a number of its own.
    pub(crate) fn new_sender(&self) -> u64 {
        let n = self.senders.fetch_add(1, Relaxed) + 1;
        self.node() ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}
