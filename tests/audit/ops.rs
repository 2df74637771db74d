//! The operations an audit sends, drawn from a seed: what users and the world do, and the
//! faults, as one sequence that can be shrunk and printed.

use std::fmt;

/// A tenant of the audit's fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Who {
    /// `q`: hard monthly quotas of requests and tokens.
    Q,
    /// `b`: a prepaid balance of tokens, bought with Stripe payments.
    B,
    /// `s`: priced requests and tokens under a hard spend cap, which it sets and lifts.
    S,
    /// `d`: a tenant of the store's directory, moved between plans and given overrides of its
    /// quotas mid-period by the operator.
    D,
}

impl Who {
    pub(crate) fn id(self) -> &'static str {
        match self {
            Who::Q => "q",
            Who::B => "b",
            Who::S => "s",
            Who::D => "d",
        }
    }

    pub(crate) fn key(self) -> &'static str {
        match self {
            Who::Q => "key-q",
            Who::B => "key-b",
            Who::S => "key-s",
            Who::D => "key-d",
        }
    }

    pub(crate) fn customer(self) -> &'static str {
        match self {
            Who::Q => "cus_q",
            Who::B => "cus_b",
            Who::S => "cus_s",
            Who::D => "cus_d",
        }
    }
}

/// How a held request ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Records its actual (at most, or past, its estimate) and settles.
    Settle,
    /// Streams: records chunks, extending the hold while the limit allows.
    Stream { chunks: u8 },
    /// Cut off after it recorded part: the ticket and the hold dropped.
    Cut,
    /// Fails before it records: the hold dropped, the request given back.
    Fail,
    /// Abandoned open: its ticket and hold never end (a handler stuck; a node killed under
    /// it): settled by `hold_timeout`, the node's shutdown, or the reservation's expiry.
    Abandon,
}

/// One operation.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// `GET /items`: one request.
    Plain { node: u8, who: Who },
    /// `POST /echo` with `Idempotency-Key: k{key}` (a key used again is a request sent again).
    Keyed { node: u8, who: Who, key: u16 },
    /// A request on `/generate` that holds `estimate` tokens and records `actual`.
    Held { node: u8, who: Who, estimate: u64, actual: u64, ending: Ending },
    /// A job's usage event (`job-{job}`, tokens) on `node`: `units` reserved first
    /// (`reserve_event`, refused past the limit), then the work done: recorded with `actual`
    /// of them (fewer give the rest back), retried while the store fails and delivered again
    /// `copies` more times (a queue's redeliveries), its time `late` seconds before now; or,
    /// with `actual` 0, abandoned and released.
    Job { node: u8, who: Who, job: u16, units: u64, actual: u64, copies: u8, late: u16 },
    /// A checkout paid by `b` for `units` tokens: its completion webhook queued `copies` times
    /// (Stripe's redeliveries), and once as the async payment's success.
    Pay { payment: u16, units: u64, copies: u8 },
    /// An invoice of `b`'s paid (`invoice.paid` queued `copies` times): a subscription's
    /// renewal naming `units` in its metadata (`bought` 0), or two packs on its line (1: a
    /// renewal, 2: a one-off invoice).
    Invoice { payment: u16, bought: u8, units: u64, copies: u8 },
    /// A credit note of `percent` of `b`'s invoice to its balance (`credit_note.created`), or
    /// with `void` its oldest note in force voided (`credit_note.voided`).
    Note { payment: u16, percent: u8, void: bool },
    /// `b`'s payment refunded up to `percent` of its amount in all (`charge.refunded`).
    Refund { payment: u16, percent: u8 },
    /// `b`'s payment disputed (once its grant landed): its funds withdrawn, then the dispute
    /// won (reinstated, closed won) or lost (closed lost), the events delivered in any order.
    Dispute { payment: u16, won: bool },
    /// One queued webhook delivered (the `pick`-th, modulo the queue): delayed, reordered.
    Deliver { pick: u16 },
    /// A node dropped without shutdown: its leases, holds and unflushed usage left; a new
    /// node takes its place.
    Kill { node: u8 },
    /// A node's configuration reloaded (its leases go back): with `small`, one whose quotas
    /// lease less at a time (a rolling deploy: the fleet's nodes then differ), else the
    /// fleet's own.
    /// With `raised`, its plan `quota_large` allows more (200 requests, 7,000 tokens a month):
    /// a deploy that changes a plan's limits mid-period.
    Reload { node: u8, small: bool, raised: bool },
    /// The clock moved on.
    Advance { secs: u32 },
    /// `b`'s default payment method changes: pays, declined, needs 3-D Secure, a bank debit.
    Card { card: u8 },
    /// A bank debit settles (or fails); with none processing, an invoice waiting for its
    /// customer's action is paid on its page.
    Settle { pick: u16, succeeds: bool },
    /// The operator moves `d` through a node's admin: to plan `quota` (`to` 0) or
    /// `quota_large` (1), or sets (2) or clears (3) its override of the tokens quota.
    Plan { node: u8, to: u8 },
    /// `d`'s subscription moves it (`customer.subscription.updated` on the price of plan
    /// `quota`, `to` 0, or `quota_large`, 1), or ends (2: `customer.subscription.deleted`,
    /// canceled: `quota`), its event queued `copies` times.
    Subscription { to: u8, copies: u8 },
    /// `s` sets its own spend cap to `cents` (0: lifts it, the plan's holds again), through a
    /// node's admin.
    Cap { node: u8, cents: u16 },
    /// The store's faults switched on or off.
    StoreFaults { on: bool },
    /// Stripe's next meter event calls fail (500; executed and its answer lost; refused).
    StripeFaults { which: u8, count: u8 },
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Plain { node, who } => write!(f, "Op::Plain {{ node: {node}, who: Who::{who:?} }}"),
            Op::Keyed { node, who, key } => write!(f, "Op::Keyed {{ node: {node}, who: Who::{who:?}, key: {key} }}"),
            Op::Held { node, who, estimate, actual, ending } => write!(
                f,
                "Op::Held {{ node: {node}, who: Who::{who:?}, estimate: {estimate}, actual: {actual}, ending: Ending::{ending:?} }}"
            ),
            Op::Job { node, who, job, units, actual, copies, late } => write!(
                f,
                "Op::Job {{ node: {node}, who: Who::{who:?}, job: {job}, units: {units}, actual: {actual}, copies: {copies}, late: {late} }}"
            ),
            Op::Pay { payment, units, copies } => {
                write!(f, "Op::Pay {{ payment: {payment}, units: {units}, copies: {copies} }}")
            }
            Op::Invoice { payment, bought, units, copies } => write!(
                f,
                "Op::Invoice {{ payment: {payment}, bought: {bought}, units: {units}, copies: {copies} }}"
            ),
            Op::Note { payment, percent, void } => {
                write!(f, "Op::Note {{ payment: {payment}, percent: {percent}, void: {void} }}")
            }
            Op::Refund { payment, percent } => write!(f, "Op::Refund {{ payment: {payment}, percent: {percent} }}"),
            Op::Dispute { payment, won } => write!(f, "Op::Dispute {{ payment: {payment}, won: {won} }}"),
            Op::Deliver { pick } => write!(f, "Op::Deliver {{ pick: {pick} }}"),
            Op::Kill { node } => write!(f, "Op::Kill {{ node: {node} }}"),
            Op::Reload { node, small, raised } => {
                write!(f, "Op::Reload {{ node: {node}, small: {small}, raised: {raised} }}")
            }
            Op::Advance { secs } => write!(f, "Op::Advance {{ secs: {secs} }}"),
            Op::Card { card } => write!(f, "Op::Card {{ card: {card} }}"),
            Op::Settle { pick, succeeds } => write!(f, "Op::Settle {{ pick: {pick}, succeeds: {succeeds} }}"),
            Op::Cap { node, cents } => write!(f, "Op::Cap {{ node: {node}, cents: {cents} }}"),
            Op::Plan { node, to } => write!(f, "Op::Plan {{ node: {node}, to: {to} }}"),
            Op::Subscription { to, copies } => write!(f, "Op::Subscription {{ to: {to}, copies: {copies} }}"),
            Op::StoreFaults { on } => write!(f, "Op::StoreFaults {{ on: {on} }}"),
            Op::StripeFaults { which, count } => write!(f, "Op::StripeFaults {{ which: {which}, count: {count} }}"),
        }
    }
}

/// xorshift64: the audit's one source of randomness, from a seed.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        // Spread the seed (splitmix64), and never 0.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Self((z ^ (z >> 31)) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True `per_mille` times in a thousand.
    pub(crate) fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1_000) < per_mille
    }
}

/// The nodes of a seed's fleet: 2 to 4.
pub(crate) fn nodes_of(seed: u64) -> u8 {
    2 + u8::try_from(Rng::new(seed ^ 0x5eed).below(3)).unwrap()
}

/// How far (seconds) the clock of each node's host is off, drawn from `seed`: right in a
/// third of the seeds, else each within 80 s either way, so that two nodes differ by at most
/// the 3 minutes of skew the fleet tolerates (`Limits::clock_skew`) less the 10 s between
/// the flushes that stop a lease gone stale.
pub(crate) fn skews_of(seed: u64, nodes: u8) -> Vec<i64> {
    let mut rng = Rng::new(seed ^ 0xc10c);
    let right = rng.chance(333);
    (0..nodes).map(|_| if right { 0 } else { i64::try_from(rng.below(161)).unwrap() - 80 }).collect()
}

impl Op {
    /// The node it runs on, if any.
    pub(crate) fn node(&self) -> Option<u8> {
        match self {
            Op::Plain { node, .. } | Op::Keyed { node, .. } | Op::Held { node, .. } | Op::Job { node, .. } => {
                Some(*node)
            }
            Op::Kill { node } | Op::Reload { node, .. } | Op::Cap { node, .. } | Op::Plan { node, .. } => Some(*node),
            _ => None,
        }
    }
}

/// `n` operations drawn from `seed`.
pub(crate) fn generate(seed: u64, n: usize) -> Vec<Op> {
    let mut rng = Rng::new(seed);
    let mut ops = Vec::with_capacity(n);
    let mut payments = 0u16;
    let mut invoices = Vec::new();
    let mut jobs = 0u16;
    let nodes = u64::from(nodes_of(seed));
    let node = |rng: &mut Rng| u8::try_from(rng.below(nodes)).unwrap();
    // The store's faults start on in most seeds.
    ops.push(Op::StoreFaults { on: rng.chance(800) });
    for _ in 0..n {
        let roll = rng.below(1_000);
        let who = [Who::Q, Who::B, Who::S, Who::D][usize::try_from(rng.below(4)).unwrap()];
        let op = match roll {
            0..=199 => Op::Plain { node: node(&mut rng), who },
            200..=299 => Op::Keyed { node: node(&mut rng), who, key: u16::try_from(rng.below(12)).unwrap() },
            600..=649 => {
                jobs += 1;
                let units = 1 + rng.below(150);
                Op::Job {
                    node: node(&mut rng),
                    // `s`'s jobs would be charged past its cap (a reservation checks the cap
                    // and holds no cost): q's and b's only.
                    who: if who == Who::S { Who::Q } else { who },
                    job: jobs,
                    units,
                    actual: if rng.chance(150) { 0 } else { 1 + rng.below(units) },
                    copies: u8::try_from(rng.below(3)).unwrap(),
                    late: [0, 0, 600, 3_600][usize::try_from(rng.below(4)).unwrap()],
                }
            }
            300..=599 => {
                let estimate = 1 + rng.below(200);
                let ending = match rng.below(20) {
                    0..=8 => Ending::Settle,
                    9..=12 => Ending::Stream { chunks: 1 + u8::try_from(rng.below(5)).unwrap() },
                    13..=15 => Ending::Cut,
                    16..=18 => Ending::Fail,
                    _ => Ending::Abandon,
                };
                // Mostly at most the estimate; sometimes past it (refused by `Overrun::Refuse`
                // past what the hold can extend to).
                let actual = if rng.chance(150) { estimate + rng.below(100) } else { rng.below(estimate + 1) };
                Op::Held { node: node(&mut rng), who, estimate, actual, ending }
            }
            700..=729 => {
                payments += 1;
                invoices.push(payments);
                Op::Invoice {
                    payment: payments,
                    bought: u8::try_from(rng.below(3)).unwrap(),
                    units: 100 * (1 + rng.below(8)),
                    copies: 1 + u8::try_from(rng.below(2)).unwrap(),
                }
            }
            650..=699 => {
                payments += 1;
                Op::Pay {
                    payment: payments,
                    units: 100 * (1 + rng.below(8)),
                    copies: 1 + u8::try_from(rng.below(3)).unwrap(),
                }
            }
            730..=749 if payments > 0 => Op::Dispute {
                payment: 1 + u16::try_from(rng.below(u64::from(payments))).unwrap(),
                won: rng.chance(400),
            },
            750..=769 if payments > 0 => Op::Refund {
                payment: 1 + u16::try_from(rng.below(u64::from(payments))).unwrap(),
                percent: [25, 50, 100][usize::try_from(rng.below(3)).unwrap()],
            },
            770..=789 if !invoices.is_empty() => Op::Note {
                payment: invoices[usize::try_from(rng.below(invoices.len() as u64)).unwrap()],
                percent: [10, 25, 50][usize::try_from(rng.below(3)).unwrap()],
                void: rng.chance(300),
            },
            790..=804 => Op::Plan { node: node(&mut rng), to: u8::try_from(rng.below(4)).unwrap() },
            805..=819 => Op::Subscription {
                to: u8::try_from(rng.below(3)).unwrap(),
                copies: 1 + u8::try_from(rng.below(2)).unwrap(),
            },
            850..=869 => {
                Op::Cap { node: node(&mut rng), cents: [0, 50, 200, 300][usize::try_from(rng.below(4)).unwrap()] }
            }
            730..=849 => Op::Deliver { pick: u16::try_from(rng.below(64)).unwrap() },
            870..=889 => Op::Kill { node: node(&mut rng) },
            890..=909 => Op::Reload { node: node(&mut rng), small: rng.chance(400), raised: rng.chance(300) },
            910..=959 => Op::Advance { secs: [5, 30, 120, 300][usize::try_from(rng.below(4)).unwrap()] },
            960..=969 => Op::StoreFaults { on: rng.chance(600) },
            970..=979 if rng.chance(500) => Op::Card { card: u8::try_from(rng.below(4)).unwrap() },
            970..=979 => Op::Settle { pick: u16::try_from(rng.below(8)).unwrap(), succeeds: rng.chance(750) },
            _ => Op::StripeFaults {
                which: u8::try_from(rng.below(3)).unwrap(),
                count: 1 + u8::try_from(rng.below(3)).unwrap(),
            },
        };
        ops.push(op);
    }
    ops
}
