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

/// How long the month before is kept past the turn at least: a hold recording after the turn
/// records its covered units in its period's last second (`limits.hold_timeout` is a day at
/// most), under the values that month's row holds; with 10 minutes of clock skew.
const PREVIOUS_KEPT_SECS: i64 = 86_400 + 600;

/// How long a value may wait for its claim (the quota role's store failing) before its units
/// are billed under `"other"`, in seconds.
pub(crate) const CLAIM_PATIENCE_SECS: i64 = 60;

/// The most values of open dimensions a node's tenant states know together: past it, a value
/// new to a state counts under `"other"` (the node's bound, never the tenant's refusal).
pub(crate) const NODE_OPEN_VALUES_MAX: usize = 1 << 20;

/// What the node knows of a value in a month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// Counted since `since` (Unix seconds), not claimed yet.
    Waiting { since: i64 },
    /// In the tenant's row of the month.
    Held,
}

/// Whether a value may be counted as a series of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Known this month, or new with room.
    Yes,
    /// New, and the tenant's `max_values` this month are used (as this node knows).
    PastCap,
    /// New, and the node knows [`NODE_OPEN_VALUES_MAX`] values already.
    NodeFull,
}

/// The values of one calendar month.
#[derive(Debug, Default)]
struct Month {
    start: i64,
    /// Per open meter (its index).
    known: HashMap<u8, HashMap<Box<str>, Known>>,
}

impl Month {
    fn len(&self) -> usize {
        self.known.values().map(HashMap::len).sum()
    }

    fn get(&self, meter: u8, value: &str) -> Option<Known> {
        self.known.get(&meter)?.get(value).copied()
    }
}

/// A tenant's open values and their usage on this node: the values of this month and of the
/// month before (until its usage is drained and its values claimed), and the usage by window.
#[derive(Debug, Default)]
pub(crate) struct OpenValues {
    /// The values every tenant state of the node knows (this one's counted in as they come and
    /// go).
    node: Arc<AtomicUsize>,
    /// The usage windows' length, in seconds.
    window_secs: i64,
    current: Month,
    previous: Option<Month>,
    /// Usage per (series index, window index), by value.
    usage: HashMap<(u8, u32), HashMap<Box<str>, u64>>,
}

/// A claim the flush makes: an open meter's values waiting, in one month.
#[derive(Debug)]
pub(crate) struct Waiting {
    /// The open meter (its index).
    pub(crate) meter: u8,
    /// The month they are claimed in (its start).
    pub(crate) month: i64,
    /// The values.
    pub(crate) values: Vec<String>,
}

impl Drop for OpenValues {
    fn drop(&mut self) {
        self.node.fetch_sub(self.len(), Ordering::Relaxed);
    }
}

/// The start of the calendar month of `unix` (UTC).
fn month_of(unix: i64) -> i64 {
    crate::base::Period::Month { anchor_day: 1 }.bounds(unix).0
}

impl OpenValues {
    /// None yet, counted in `node`'s values; usage in windows of `window_secs`.
    pub(crate) fn new(node: Arc<AtomicUsize>, window_secs: i64) -> Self {
        Self { node, window_secs: window_secs.max(1), current: Month::default(), previous: None, usage: HashMap::new() }
    }

    /// How many values the node knows (both months).
    fn len(&self) -> usize {
        self.current.len() + self.previous.as_ref().map_or(0, Month::len)
    }

    /// `f`, the node's count kept with what it changed.
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

    /// The month of `now` made current: the one before kept (its usage drains, its values
    /// waiting are claimed in its row), an older one let go.
    fn roll(&mut self, now: i64) {
        let month = month_of(now);
        if month > self.current.start {
            self.counted(|o| {
                let current = std::mem::replace(&mut o.current, Month { start: month, known: HashMap::new() });
                o.previous = (current.start != 0).then_some(current);
            });
        }
    }

    /// Whether `value` of the open meter `meter` may be counted at `now` (see [`Admit`]):
    /// known in the month of `now`, or new with room for it (fewer than `cap` values of the
    /// meter known that month, fewer than [`NODE_OPEN_VALUES_MAX`] on the node). A month older
    /// than the one before has no room. Changes nothing but the month in force.
    pub(crate) fn check(&mut self, meter: u8, value: &str, cap: u32, now: i64) -> Admit {
        self.roll(now);
        let node = self.node.load(Ordering::Relaxed);
        let Some(month) = self.month(month_of(now)) else { return Admit::PastCap };
        let known = month.known.get(&meter);
        if known.is_some_and(|k| k.contains_key(value)) {
            return Admit::Yes;
        }
        if known.map_or(0, HashMap::len) >= cap as usize {
            return Admit::PastCap;
        }
        if node >= NODE_OPEN_VALUES_MAX {
            return Admit::NodeFull;
        }
        Admit::Yes
    }

    /// Records `quantity` of the series `series` of the open meter `meter` under `value` at
    /// `now`: admitted as [`check`](Self::check) says (a new value waits for its claim in the
    /// month of `now`, since `clock`), else under `"other"`. Returns whether it counted under
    /// `value`.
    #[allow(clippy::too_many_arguments, reason = "where, what, when, how much")]
    pub(crate) fn add(
        &mut self,
        meter: u8,
        series: u8,
        value: &str,
        cap: u32,
        now: i64,
        clock: i64,
        quantity: u64,
    ) -> bool {
        let other = crate::config::OTHER_VALUE;
        let admitted = value != other && self.check(meter, value, cap, now) == Admit::Yes;
        if admitted {
            if let Some(month) = self.month_mut(month_of(now)) {
                let values = month.known.entry(meter).or_default();
                if !values.contains_key(value) {
                    values.insert(value.into(), Known::Waiting { since: clock });
                    self.node.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let value = if admitted { value } else { other };
        let window = u32::try_from(now.max(0) / self.window_secs).unwrap_or(u32::MAX);
        let values = self.usage.entry((series, window)).or_default();
        match values.get_mut(value) {
            Some(q) => *q = q.saturating_add(quantity),
            None => {
                values.insert(value.into(), quantity);
            }
        }
        admitted
    }

    /// The month of a usage window.
    fn month_of_window(&self, window: u32) -> i64 {
        month_of(i64::from(window) * self.window_secs)
    }

    /// The values waiting for a claim that have usage, per open meter and month (`series_of`
    /// maps a series to its meter). Values waiting with no usage (a hold refused after its
    /// value was admitted) are never claimed: they go after [`CLAIM_PATIENCE_SECS`].
    pub(crate) fn waiting(&self, series_of: &dyn Fn(u8) -> Option<u8>) -> Vec<Waiting> {
        let mut out: Vec<Waiting> = Vec::new();
        for ((series, window), values) in &self.usage {
            let Some(meter) = series_of(*series) else { continue };
            let start = self.month_of_window(*window);
            let Some(month) = self.month(start) else { continue };
            for value in values.keys() {
                if !matches!(month.get(meter, value), Some(Known::Waiting { .. })) {
                    continue;
                }
                match out.iter_mut().find(|w| w.meter == meter && w.month == start) {
                    Some(w) if w.values.iter().any(|v| **v == **value) => {}
                    Some(w) => w.values.push(value.to_string()),
                    None => out.push(Waiting { meter, month: start, values: vec![value.to_string()] }),
                }
            }
        }
        out
    }

    fn month(&self, start: i64) -> Option<&Month> {
        if self.current.start == start {
            return Some(&self.current);
        }
        self.previous.as_ref().filter(|m| m.start == start)
    }

    fn month_mut(&mut self, start: i64) -> Option<&mut Month> {
        if self.current.start == start {
            return Some(&mut self.current);
        }
        self.previous.as_mut().filter(|m| m.start == start)
    }

    /// The answer to a claim of `asked` values of `meter` in `month`: the tenant's row holds
    /// `held`. Held ones are known as held; the row's other values too, as far as the node's
    /// bound allows (so that the node claims none of them again); the others are forgotten,
    /// their usage of that month moved to `"other"`. Returns how many were refused.
    pub(crate) fn claimed(
        &mut self,
        meter: u8,
        month: i64,
        asked: &[String],
        held: &crate::store::HeldValues,
        series_of: &dyn Fn(u8) -> Option<u8>,
    ) -> usize {
        let node = self.node.clone();
        let refused = self.counted(|o| {
            let Some(m) = o.month_mut(month) else { return Vec::new() };
            let values = m.known.entry(meter).or_default();
            let mut refused = Vec::new();
            for v in asked {
                if held.holds(v) {
                    values.insert(Box::from(v.as_str()), Known::Held);
                } else {
                    values.remove(v.as_str());
                    refused.push(v.clone());
                }
            }
            // The row's other values, as a cache: not past the node's bound.
            let mut room = NODE_OPEN_VALUES_MAX.saturating_sub(node.load(Ordering::Relaxed));
            for v in &held.values {
                if room == 0 {
                    break;
                }
                if !values.contains_key(v.as_str()) {
                    values.insert(Box::from(v.as_str()), Known::Held);
                    room -= 1;
                }
            }
            refused
        });
        for v in &refused {
            self.fold(meter, month, v, series_of);
        }
        refused.len()
    }

    /// Moves the usage of `value` of `meter`'s series in `month` to `"other"`.
    fn fold(&mut self, meter: u8, month: i64, value: &str, series_of: &dyn Fn(u8) -> Option<u8>) {
        let other = crate::config::OTHER_VALUE;
        let window_secs = self.window_secs;
        for ((series, window), values) in &mut self.usage {
            if series_of(*series) != Some(meter) || month_of(i64::from(*window) * window_secs) != month {
                continue;
            }
            if let Some(q) = values.remove(value) {
                let slot = values.entry(other.into()).or_default();
                *slot = slot.saturating_add(q);
            }
        }
    }

    /// Takes the usage of every value its month's row holds (and `"other"`), by (series,
    /// value, window): a value still waiting keeps its usage for a later flush, until it has
    /// waited [`CLAIM_PATIENCE_SECS`] (or `all`: the last flush), when it is forgotten and
    /// its usage billed under `"other"`; a value its month does not know (refused, forgotten)
    /// is billed under `"other"`. The month before is let go once it has nothing left. Returns
    /// how many values were forgotten for waiting too long.
    pub(crate) fn drain(
        &mut self,
        now: i64,
        all: bool,
        series_of: &dyn Fn(u8) -> Option<u8>,
        mut out: impl FnMut(u8, &str, u32, u64),
    ) -> usize {
        self.roll(now);
        let late =
            |k: Option<Known>| matches!(k, Some(Known::Waiting { since }) if all || now - since >= CLAIM_PATIENCE_SECS);
        let mut forgotten = 0;
        let (current, previous) = (&mut self.current, &mut self.previous);
        let before = current.len() + previous.as_ref().map_or(0, Month::len);
        for m in std::iter::once(current).chain(previous.as_mut()) {
            for values in m.known.values_mut() {
                values.retain(|_, k| {
                    let gone = late(Some(*k));
                    forgotten += usize::from(gone);
                    !gone
                });
            }
        }
        let other = crate::config::OTHER_VALUE;
        let window_secs = self.window_secs;
        let (current, previous) = (&self.current, &self.previous);
        let month = |start: i64| {
            if current.start == start {
                Some(current)
            } else {
                previous.as_ref().filter(|m| m.start == start)
            }
        };
        let mut keep_previous = false;
        for ((series, window), values) in &mut self.usage {
            let start = month_of(i64::from(*window) * window_secs);
            let meter = series_of(*series);
            let mut folded = 0u64;
            values.retain(|value, q| {
                let known = meter.and_then(|m| month(start)?.get(m, value));
                match known {
                    Some(Known::Waiting { .. }) => {
                        keep_previous |= start != current.start;
                        true
                    }
                    Some(Known::Held) => {
                        out(*series, value, *window, *q);
                        false
                    }
                    None if **value == *other => {
                        out(*series, value, *window, *q);
                        false
                    }
                    // Refused, forgotten, or of a month long gone: `other`.
                    None => {
                        folded = folded.saturating_add(*q);
                        false
                    }
                }
            });
            if folded > 0 {
                out(*series, other, *window, folded);
            }
        }
        self.usage.retain(|_, values| !values.is_empty());
        let waiting_before =
            self.previous.as_ref().is_some_and(|m| m.known.values().any(|v| v.values().any(|k| *k != Known::Held)));
        let after = self.len();
        self.node.fetch_sub(before - after, Ordering::Relaxed);
        if !keep_previous && !waiting_before && now >= self.current.start.saturating_add(PREVIOUS_KEPT_SECS) {
            self.counted(|o| o.previous = None);
        }
        if forgotten > 0 {
            tracing::warn!(values = forgotten, "values of an open dimension were never claimed: billed under `other`");
        }
        forgotten
    }

    /// Reads the usage not taken yet, as [`drain`](Self::drain) would bill it now (a value
    /// waiting under itself), without taking it.
    pub(crate) fn peek(&self, mut out: impl FnMut(u8, &str, u32, u64)) {
        for ((series, window), values) in &self.usage {
            for (value, q) in values {
                out(*series, value, *window, *q);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARCH: i64 = 1_772_323_200;
    const APRIL: i64 = 1_775_001_600;

    fn drained(o: &mut OpenValues, now: i64, all: bool) -> Vec<(u8, String, u64)> {
        let series_of = |s: u8| (s == 3).then_some(2u8);
        let mut out = Vec::new();
        o.drain(now, all, &series_of, |s, v, _, q| out.push((s, v.to_owned(), q)));
        out.sort();
        out
    }

    #[test]
    fn a_value_waits_for_its_claim_and_one_refused_is_billed_under_other() {
        let node = Arc::new(AtomicUsize::new(0));
        let series_of = |s: u8| (s == 3).then_some(2u8);
        let mut o = OpenValues::new(node.clone(), 3600);
        let t = MARCH + 100;
        assert!(o.add(2, 3, "m-a", 2, t, t, 10));
        assert!(o.add(2, 3, "m-b", 2, t, t, 4));
        assert_eq!(o.check(2, "m-c", 2, t), Admit::PastCap, "past the cap on the node");
        assert!(!o.add(2, 3, "m-c", 2, t, t, 1), "counted under other");
        assert_eq!(drained(&mut o, t + 1, false), [(3, "other".to_owned(), 1)], "waiting values keep their usage");
        let w = o.waiting(&series_of);
        assert_eq!((w.len(), w[0].month, w[0].values.len()), (1, MARCH, 2));
        // The row holds m-a and another node's m-z: m-b is refused.
        let held = crate::store::HeldValues::new(vec!["m-a".into(), "m-z".into()], 2);
        assert_eq!(o.claimed(2, MARCH, &w[0].values, &held, &series_of), 1);
        assert_eq!(o.check(2, "m-z", 2, t), Admit::Yes, "held by another node's claim");
        assert_eq!(o.check(2, "m-b", 2, t), Admit::PastCap, "refused, and the row is full");
        // A hold recording m-b later: under other.
        assert!(!o.add(2, 3, "m-b", 2, t + 2, t + 2, 5));
        assert_eq!(drained(&mut o, t + 2, false), [(3, "m-a".to_owned(), 10), (3, "other".to_owned(), 9)]);
        assert_eq!(node.load(Ordering::Relaxed), 2, "m-a and m-z");
        drop(o);
        assert_eq!(node.load(Ordering::Relaxed), 0, "a state let go gives its count back");
    }

    #[test]
    fn a_value_never_claimed_goes_to_other_and_months_keep_their_own_values() {
        let node = Arc::new(AtomicUsize::new(0));
        let series_of = |s: u8| (s == 3).then_some(2u8);
        let mut o = OpenValues::new(node.clone(), 3600);
        assert!(o.add(2, 3, "m-q", 5, MARCH + 10, MARCH + 10, 3));
        assert_eq!(drained(&mut o, MARCH + 10 + CLAIM_PATIENCE_SECS, false), [(3, "other".to_owned(), 3)]);
        assert_eq!(node.load(Ordering::Relaxed), 0);
        // A value waiting as the month turns is claimed in its own month's row; the new month
        // has its own room.
        let mut o = OpenValues::new(node.clone(), 3600);
        assert!(o.add(2, 3, "m-a", 1, APRIL - 10, APRIL - 10, 7));
        assert!(o.add(2, 3, "m-b", 1, APRIL + 10, APRIL + 10, 2), "April's one value");
        let mut w = o.waiting(&series_of);
        w.sort_by_key(|w| w.month);
        assert_eq!((w[0].month, &w[0].values[..]), (MARCH, &["m-a".to_owned()][..]));
        assert_eq!((w[1].month, &w[1].values[..]), (APRIL, &["m-b".to_owned()][..]));
        for w in &w {
            let held = crate::store::HeldValues::new(w.values.clone(), 1);
            o.claimed(w.meter, w.month, &w.values, &held, &series_of);
        }
        assert_eq!(drained(&mut o, APRIL + 20, false), [(3, "m-a".to_owned(), 7), (3, "m-b".to_owned(), 2)]);
        assert_eq!(node.load(Ordering::Relaxed), 2, "March kept a day past the turn");
        // A hold's units recorded at March's last second after the turn: under m-a, held.
        assert!(o.add(2, 3, "m-a", 1, APRIL - 1, APRIL + 30, 3));
        assert_eq!(drained(&mut o, APRIL + 40, false), [(3, "m-a".to_owned(), 3)]);
        drained(&mut o, APRIL + PREVIOUS_KEPT_SECS, false);
        assert_eq!(node.load(Ordering::Relaxed), 1, "March let go");
        // At the last flush, a value waiting goes to other at once.
        assert!(o.add(2, 3, "m-b", 1, APRIL + 30, APRIL + 30, 1));
        let mut o2 = OpenValues::new(node.clone(), 3600);
        assert!(o2.add(2, 3, "m-c", 1, APRIL + 30, APRIL + 30, 4));
        assert_eq!(drained(&mut o2, APRIL + 31, true), [(3, "other".to_owned(), 4)]);
    }
}
