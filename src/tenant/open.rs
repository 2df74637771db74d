//! A tenant's values of open dimensions on this node (`max_values`): the values it used this
//! month as the node knows them (claimed in the quota role's row, or waiting for the flush to
//! claim them), and the usage recorded under each, until the flush takes it.
//!
//! Bounds, per tenant and open meter on a node: at most `max_values` values known, and usage
//! at most per (value, series, window) of the two windows a flush leaves; a value past the
//! bound is never kept. A value new to the tenant is counted at once and claimed by the next
//! flush: the claim finds the tenant's row full (other nodes claimed the month's values first),
//! and the units it recorded are billed under `"other"`, never lost.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

/// The most values of open dimensions a node's tenant states know together: past it, a value
/// new to a state is answered as past its tenant's `max_values`.
pub(crate) const NODE_OPEN_VALUES_MAX: usize = 1 << 20;

/// How long a value may wait for its claim (the quota role's store failing) before its units
/// are billed under `"other"`, in seconds.
pub(crate) const CLAIM_PATIENCE_SECS: i64 = 60;

/// What the node knows of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// Counted since `since` (Unix seconds), not claimed yet.
    Waiting { since: i64 },
    /// In the tenant's row this month.
    Held,
}

/// A tenant's open values and their usage on this node.
#[derive(Debug, Default)]
pub(crate) struct OpenValues {
    /// The values every tenant state of the node knows (this one's counted in as they come and
    /// go).
    node: Arc<AtomicUsize>,
    /// The start of the calendar month the values are known for.
    month: i64,
    /// The values known, per open meter (its index).
    known: HashMap<u8, HashMap<Box<str>, Known>>,
    /// Usage per (series index, window index), by value.
    usage: HashMap<(u8, u32), HashMap<Box<str>, u64>>,
}

/// A claim the flush makes: an open meter's values waiting.
#[derive(Debug)]
pub(crate) struct Waiting {
    /// The open meter (its index).
    pub(crate) meter: u8,
    /// The month they are claimed in.
    pub(crate) month: i64,
    /// The values.
    pub(crate) values: Vec<String>,
}

impl Drop for OpenValues {
    fn drop(&mut self) {
        self.node.fetch_sub(self.len(), Ordering::Relaxed);
    }
}

impl OpenValues {
    /// None yet, counted in `node`'s values.
    pub(crate) fn new(node: Arc<AtomicUsize>) -> Self {
        Self { node, month: 0, known: HashMap::new(), usage: HashMap::new() }
    }

    /// How many values the node knows.
    fn len(&self) -> usize {
        self.known.values().map(HashMap::len).sum()
    }

    /// `f`, the node's count kept with what it changed of `known`.
    fn counted<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let before = self.len();
        let out = f(self);
        let after = self.len();
        if after > before {
            self.node.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.node.fetch_sub(before - after, Ordering::Relaxed);
        }
        out
    }

    /// Whether `value` of the open meter `meter` may be counted at `now`, in the calendar
    /// month starting at `month`: known, or new with room for it (fewer than `cap` values known
    /// of the meter, fewer than [`NODE_OPEN_VALUES_MAX`] on the node). A new month forgets what
    /// was known held (its values are claimed again in the new month's row; those waiting are
    /// claimed there).
    pub(crate) fn admit(&mut self, meter: u8, value: &str, cap: u32, month: i64, now: i64) -> bool {
        if month != self.month {
            self.counted(|o| {
                o.month = month;
                for values in o.known.values_mut() {
                    values.retain(|_, k| matches!(k, Known::Waiting { .. }));
                }
            });
        }
        let known = self.known.get(&meter);
        if known.is_some_and(|k| k.contains_key(value)) {
            return true;
        }
        if known.map_or(0, HashMap::len) >= cap as usize || self.node.load(Ordering::Relaxed) >= NODE_OPEN_VALUES_MAX {
            return false;
        }
        self.known.entry(meter).or_default().insert(value.into(), Known::Waiting { since: now });
        self.node.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Adds `quantity` of the series `series` under `value` in window `window`.
    pub(crate) fn add(&mut self, series: u8, value: &str, window: u32, quantity: u64) {
        let values = self.usage.entry((series, window)).or_default();
        match values.get_mut(value) {
            Some(q) => *q = q.saturating_add(quantity),
            None => {
                values.insert(value.into(), quantity);
            }
        }
    }

    /// The values waiting for a claim, per open meter.
    pub(crate) fn waiting(&self) -> Vec<Waiting> {
        let mut out = Vec::new();
        for (meter, values) in &self.known {
            let waiting: Vec<String> =
                values.iter().filter(|(_, k)| matches!(k, Known::Waiting { .. })).map(|(v, _)| v.to_string()).collect();
            if !waiting.is_empty() {
                out.push(Waiting { meter: *meter, month: self.month, values: waiting });
            }
        }
        out
    }

    /// The answer to a claim of `asked` values of `meter` in `month`: the tenant's row holds
    /// `held`. Held ones are known as held (with every value the row holds, so that the node
    /// claims none of them again); the others are forgotten, their usage moved to `"other"`
    /// (`series_of` maps a series to its meter).
    pub(crate) fn claimed(
        &mut self,
        meter: u8,
        month: i64,
        asked: &[String],
        held: &crate::store::HeldValues,
        series_of: &dyn Fn(u8) -> Option<u8>,
    ) {
        if month != self.month {
            // The month turned while the claim was out: claimed again in the new one.
            return;
        }
        self.counted(|o| {
            for v in asked {
                if !held.holds(v) {
                    if let Some(values) = o.known.get_mut(&meter) {
                        values.remove(v.as_str());
                    }
                    o.fold(meter, v, series_of);
                }
            }
            let values = o.known.entry(meter).or_default();
            for v in &held.values {
                values.insert(Box::from(v.as_str()), Known::Held);
            }
        });
    }

    /// Moves the usage of `value` of `meter`'s series to `"other"`.
    fn fold(&mut self, meter: u8, value: &str, series_of: &dyn Fn(u8) -> Option<u8>) {
        let other = crate::config::OTHER_VALUE;
        for ((series, _), values) in &mut self.usage {
            if series_of(*series) != Some(meter) {
                continue;
            }
            if let Some(q) = values.remove(value) {
                let slot = values.entry(other.into()).or_default();
                *slot = slot.saturating_add(q);
            }
        }
    }

    /// Takes the usage whose values are claimed (or `"other"`), by (series, value, window):
    /// a value still waiting keeps its usage for a later flush, until it has waited
    /// [`CLAIM_PATIENCE_SECS`] (or `all`: the last flush), when it is forgotten and its usage
    /// billed under `"other"`. Returns how many values were forgotten.
    pub(crate) fn drain(
        &mut self,
        now: i64,
        all: bool,
        series_of: &dyn Fn(u8) -> Option<u8>,
        mut out: impl FnMut(u8, &str, u32, u64),
    ) -> usize {
        let mut late: Vec<(u8, Box<str>)> = Vec::new();
        for (meter, values) in &self.known {
            for (v, k) in values {
                if matches!(k, Known::Waiting { since } if all || now - since >= CLAIM_PATIENCE_SECS) {
                    late.push((*meter, v.clone()));
                }
            }
        }
        for (meter, value) in &late {
            tracing::warn!(value = &**value, "a value of an open dimension was never claimed: billed under `other`");
            self.counted(|o| o.known.get_mut(meter).map(|values| values.remove(value)));
            self.fold(*meter, value, series_of);
        }
        let known = &self.known;
        for ((series, window), values) in &mut self.usage {
            let meter = series_of(*series);
            values.retain(|value, q| {
                let waiting = meter
                    .and_then(|m| known.get(&m))
                    .is_some_and(|k| matches!(k.get(value), Some(Known::Waiting { .. })));
                if waiting {
                    return true;
                }
                out(*series, value, *window, *q);
                false
            });
        }
        self.usage.retain(|_, values| !values.is_empty());
        late.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_waits_for_its_claim_and_one_refused_is_billed_under_other() {
        let node = Arc::new(AtomicUsize::new(0));
        let mut o = OpenValues::new(node.clone());
        let series_of = |s: u8| (s == 3).then_some(2u8);
        assert!(o.admit(2, "m-a", 2, 100, 5));
        assert!(o.admit(2, "m-b", 2, 100, 5));
        assert!(!o.admit(2, "m-c", 2, 100, 5), "past the cap on the node");
        o.add(3, "m-a", 7, 10);
        o.add(3, "m-b", 7, 4);
        let mut out = Vec::new();
        assert_eq!(o.drain(6, false, &series_of, |s, v, w, q| out.push((s, v.to_owned(), w, q))), 0);
        assert!(out.is_empty(), "waiting values keep their usage");
        let w = o.waiting();
        assert_eq!(w.len(), 1);
        // The row holds m-a and another node's m-z: m-b is refused.
        let held = crate::store::HeldValues::new(vec!["m-a".into(), "m-z".into()], 2);
        o.claimed(2, 100, &w[0].values, &held, &series_of);
        assert!(o.admit(2, "m-z", 2, 100, 6), "held by another node's claim");
        assert!(!o.admit(2, "m-b", 2, 100, 6), "refused, and the row is full");
        o.drain(7, false, &series_of, |s, v, w, q| out.push((s, v.to_owned(), w, q)));
        out.sort();
        assert_eq!(out, [(3, "m-a".to_owned(), 7, 10), (3, "other".to_owned(), 7, 4)]);
        assert_eq!(node.load(Ordering::Relaxed), 2, "m-a and m-z");
        drop(o);
        assert_eq!(node.load(Ordering::Relaxed), 0, "a state let go gives its count back");
        // A value never claimed goes to `other` after the patience.
        let mut o = OpenValues::new(node.clone());
        assert!(o.admit(2, "m-q", 5, 100, 10));
        o.add(3, "m-q", 1, 3);
        let mut out = Vec::new();
        assert_eq!(
            o.drain(10 + CLAIM_PATIENCE_SECS, false, &series_of, |s, v, w, q| out.push((s, v.to_owned(), w, q))),
            1
        );
        assert_eq!(out, [(3, "other".to_owned(), 1, 3)]);
        assert_eq!((o.len(), node.load(Ordering::Relaxed)), (0, 0));
        // A new month forgets the values held.
        let mut o = OpenValues::new(node.clone());
        assert!(o.admit(2, "m-a", 1, 100, 10));
        o.claimed(2, 100, &["m-a".into()], &crate::store::HeldValues::new(vec!["m-a".into()], 1), &series_of);
        assert!(!o.admit(2, "m-b", 1, 100, 11));
        assert!(o.admit(2, "m-b", 1, 200, 12), "the next month");
    }
}
