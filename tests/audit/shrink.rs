//! The driver's own shrinker: a failing sequence cut down (delta debugging: chunks removed
//! while the run still fails the same invariant) to one that a person can read, and that a
//! regression test replays.

use std::time::{Duration, Instant};

use tollgate::store::Defect;

use crate::{driver::run, ops::Op, stores::Kind};

/// What a violation says, without its numbers and ids: a shrunk sequence must break the same
/// rule the same way (a paid invoice never credited is not a month charged past its limit).
fn rule(violation: &str) -> String {
    let words: Vec<&str> = violation.split_whitespace().filter(|w| !w.chars().any(|c| c.is_ascii_digit())).collect();
    words.join(" ")
}

/// Whether `ops` still fails `wanted`: tried twice, as interleavings vary from run to run.
async fn fails(kind: Kind, seed: u64, ops: &[Op], defect: Option<Defect>, wanted: &str) -> Option<Vec<String>> {
    for _ in 0..2 {
        let outcome = run(kind, seed, ops, defect).await;
        if outcome.violations.iter().any(|v| rule(v) == wanted) {
            return Some(outcome.violations);
        }
    }
    None
}

/// `ops`, which failed with `violations`, shrunk within `budget`: the shortest sequence found
/// that still breaks the first violation's invariant, and what it broke.
pub(crate) async fn shrink(
    kind: Kind,
    seed: u64,
    ops: Vec<Op>,
    defect: Option<Defect>,
    violations: Vec<String>,
    budget: Duration,
) -> (Vec<Op>, Vec<String>) {
    let wanted = rule(&violations[0]);
    let started = Instant::now();
    let (mut current, mut found) = (ops, violations);
    let mut parts = 2usize;
    while current.len() >= 2 && started.elapsed() < budget {
        let chunk = current.len().div_ceil(parts);
        let mut cut = None;
        for i in 0..parts {
            let (from, to) = (i * chunk, ((i + 1) * chunk).min(current.len()));
            if from >= to || started.elapsed() >= budget {
                break;
            }
            let candidate: Vec<Op> = current[..from].iter().chain(&current[to..]).cloned().collect();
            if let Some(v) = fails(kind, seed, &candidate, defect, &wanted).await {
                cut = Some((candidate, v));
                break;
            }
        }
        match cut {
            Some(smaller) => {
                (current, found) = smaller;
                parts = (parts - 1).max(2);
            }
            None if parts >= current.len() => break,
            None => parts = (parts * 2).min(current.len()),
        }
    }
    (current, found)
}
