//! The quota role's open values: the values of a meter's open dimension (`max_values`) a tenant
//! used in a period, one set the fleet shares, never larger than its cap.
//!
//! A meter's closed dimension lists its values in the configuration; an open one takes any value
//! in the grammar, at most `max_values` of them per tenant and month. The set is what bounds
//! the series a tenant can make, on every store and in every node's memory: a value is counted
//! as its own series only once the tenant's row holds it.

use std::{collections::BTreeSet, fmt};

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::base::{is_dimension_value, MeterId, TenantId, MAX_OPEN_VALUES};

/// A call on a tenant's values of one open dimension in one period: one atomic
/// read-modify-write of the row of `(tenant, meter, dimension, period)`, with the rules of
/// [`ValueRow::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ValueCall {
    /// Whose values.
    pub tenant: TenantId,
    /// The meter (its name, not a series).
    pub meter: MeterId,
    /// The open dimension.
    pub dimension: String,
    /// The period's start, Unix seconds: the first second of a UTC calendar month.
    pub period: i64,
    /// The values to claim or forget (none to read), in the order they came. A claim applies
    /// at most [`MAX_OPEN_VALUES`] of them.
    pub values: Vec<String>,
    /// The most values the row may hold (`max_values`, at most [`MAX_OPEN_VALUES`]).
    pub cap: u32,
    /// Until when the row is kept, Unix seconds: a store drops it after.
    pub keep_until: i64,
}

impl ValueCall {
    /// A call on `tenant`'s values of `dimension` of `meter` in the period starting at
    /// `period`, the row holding `cap` values at most and kept until `keep_until`.
    #[must_use]
    pub fn new(
        tenant: TenantId,
        meter: MeterId,
        dimension: impl Into<String>,
        period: i64,
        cap: u32,
        keep_until: i64,
    ) -> Self {
        Self { tenant, meter, dimension: dimension.into(), period, values: Vec::new(), cap, keep_until }
    }

    /// The same call on `values`.
    #[must_use]
    pub fn with_values<I, V>(mut self, values: I) -> Self
    where
        I: IntoIterator<Item = V>,
        V: Into<String>,
    {
        self.values = values.into_iter().map(Into::into).collect();
        self
    }
}

/// What a [`ValueCall`] does. Not `#[non_exhaustive]`: a store matches on every mode, and a new
/// one is a change it must make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueMode {
    /// Adds each value the row lacks while it holds fewer than `cap`, in the call's order.
    Claim,
    /// Reads the row.
    Read,
    /// Takes the call's values out of the row (an operator frees a place; the usage already
    /// counted under them stays).
    Forget,
}

impl ValueMode {
    /// The call's name, for logs and errors.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            ValueMode::Claim => "claim values",
            ValueMode::Read => "read values",
            ValueMode::Forget => "forget values",
        }
    }
}

/// The values a tenant's row holds after a [`ValueCall`], sorted, and the call's cap: a value
/// of the call was claimed (now or earlier, by any node) if and only if the row holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeldValues {
    /// The values held, sorted.
    pub values: Vec<String>,
    /// The call's cap.
    pub cap: u32,
}

impl HeldValues {
    /// `values` (sorted here) under `cap`.
    #[must_use]
    pub fn new(mut values: Vec<String>, cap: u32) -> Self {
        values.sort_unstable();
        values.dedup();
        Self { values, cap }
    }

    /// Whether the row holds `value`.
    #[must_use]
    pub fn holds(&self, value: &str) -> bool {
        self.values.binary_search_by(|v| v.as_str().cmp(value)).is_ok()
    }

    /// Whether the row has no room for a value it lacks.
    #[must_use]
    pub fn is_full(&self) -> bool {
        self.values.len() >= self.cap as usize
    }
}

/// One tenant's values of an open dimension in a period, as a store keeps them (JSON of
/// [`to_json`](Self::to_json)), with the rules of the role applied to it.
///
/// The JSON is `{"v": [values, sorted], "u": keep_until}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueRow {
    #[serde(rename = "v")]
    values: BTreeSet<String>,
    #[serde(rename = "u")]
    until: i64,
}

impl ValueRow {
    /// A row as stored (empty text: none).
    ///
    /// # Errors
    /// The text is not what [`to_json`](Self::to_json) writes.
    pub fn from_json(text: &str) -> Result<Self, StoreError> {
        if text.is_empty() {
            return Ok(Self::default());
        }
        serde_json::from_str(text).map_err(|e| StoreError::Backend(format!("a values row does not read: {e}").into()))
    }

    /// The row, as stored.
    #[must_use]
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Whether the row holds no value (it can go).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Until when the row is kept, Unix seconds.
    #[must_use]
    pub fn expires(&self) -> i64 {
        self.until
    }

    /// Applies a call (`mode`), and answers the values held after it.
    ///
    /// A claim adds each of the call's values the row lacks, in order, while the row holds
    /// fewer than `cap`: the row never holds more than `cap` (a cap lowered since keeps what
    /// it holds, and admits nothing new). A value out of the grammar (see
    /// [`MAX_DIMENSION_LEN`](crate::base::MAX_DIMENSION_LEN)) is never stored, nor a value past
    /// the call's first [`MAX_OPEN_VALUES`]. A claim sent again finds its values held: claims
    /// need no token. Every call but a read keeps the row until the call's `keep_until` at
    /// least.
    pub fn apply(&mut self, call: &ValueCall, mode: ValueMode) -> HeldValues {
        let cap = call.cap.min(MAX_OPEN_VALUES) as usize;
        match mode {
            ValueMode::Claim => {
                for v in call.values.iter().take(MAX_OPEN_VALUES as usize) {
                    if self.values.len() >= cap {
                        break;
                    }
                    if is_dimension_value(v) && !self.values.contains(v.as_str()) {
                        self.values.insert(v.clone());
                    }
                }
                self.until = self.until.max(call.keep_until);
            }
            ValueMode::Read => {}
            ValueMode::Forget => {
                for v in &call.values {
                    self.values.remove(v.as_str());
                }
                self.until = self.until.max(call.keep_until);
            }
        }
        HeldValues { values: self.values.iter().cloned().collect(), cap: call.cap }
    }
}

impl fmt::Display for ValueRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} values kept until {}", self.values.len(), self.until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(values: &[&str], cap: u32) -> ValueCall {
        ValueCall::new("t".into(), "tokens".into(), "model", 0, cap, 100).with_values(values.iter().copied())
    }

    #[test]
    fn a_row_never_holds_more_than_its_cap_and_a_claim_sent_again_reads_held() {
        let mut row = ValueRow::default();
        let held = row.apply(&call(&["m-b", "m-a"], 3), ValueMode::Claim);
        assert_eq!(held.values, ["m-a", "m-b"]);
        assert!(!held.is_full());
        let held = row.apply(&call(&["m-c", "m-d", "m-a"], 3), ValueMode::Claim);
        assert_eq!(held.values, ["m-a", "m-b", "m-c"], "m-d found the row full");
        assert!(held.is_full() && held.holds("m-a") && !held.holds("m-d"));
        assert_eq!(row.apply(&call(&["m-c"], 3), ValueMode::Claim), held, "sent again");
        // A lowered cap keeps what is held and admits nothing new.
        assert_eq!(row.apply(&call(&["m-e"], 1), ValueMode::Claim).values, ["m-a", "m-b", "m-c"]);
        // Forgetting frees a place.
        assert_eq!(row.apply(&call(&["m-b"], 3), ValueMode::Forget).values, ["m-a", "m-c"]);
        assert_eq!(row.apply(&call(&["m-e"], 3), ValueMode::Claim).values, ["m-a", "m-c", "m-e"]);
        assert_eq!(ValueRow::from_json(&row.to_json()).unwrap(), row);
        assert_eq!(row.expires(), 100);
        assert!(ValueRow::from_json("").unwrap().is_empty());
        assert!(ValueRow::from_json("[1]").is_err());
    }

    #[test]
    fn values_out_of_the_grammar_are_never_stored() {
        let long = "x".repeat(65);
        let mut row = ValueRow::default();
        let sent = ["", "a b", "m\u{0}x", "é", "*", "m}x", "a,b=c", "m:x", "%", long.as_str()];
        let held = row.apply(&call(&sent, 1000), ValueMode::Claim);
        assert!(held.values.is_empty(), "{held:?}");
        // Past the call's first MAX_OPEN_VALUES: never stored.
        let many: Vec<String> = (0..=MAX_OPEN_VALUES).map(|i| format!("v{i:04}")).collect();
        let mut big = call(&[], 5000);
        big.values = many.into_iter().rev().collect();
        assert_eq!(row.apply(&big, ValueMode::Claim).values.len(), MAX_OPEN_VALUES as usize);
        assert!(!row.values.contains("v0000"), "the 1,001st value of the call");
    }
}
