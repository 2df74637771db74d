//! The quota role's open values: a tenant's values of an open dimension in a month, one row the
//! fleet shares, never holding more than its cap, whatever calls race it.

use super::super::*;
use crate::store::{QuotaStore, QuotaStoreExt, ValueCall};

/// March 2026's first second (a calendar month's start), and April's.
const MARCH: i64 = 1_772_323_200;
const APRIL: i64 = 1_775_001_600;
/// A row's `keep_until`: 35 days after March.
const KEPT: i64 = APRIL + 35 * DAY;

fn call(tenant: &str, values: &[&str], cap: u32) -> ValueCall {
    ValueCall::new(tenant.into(), "tokens".into(), "model", MARCH, cap, KEPT).with_values(values.iter().copied())
}

/// A claim adds the values the row lacks while it has room, in order, and answers the row:
/// sent again, it finds them held and changes nothing. A read changes nothing.
pub async fn a_values_claim_is_idempotent_and_answers_the_row<S: ?Sized + QuotaStore>(h: &mut StoreUnderTest<S>) {
    let s = h.s();
    assert!(s.read_values(&call("t", &[], 3)).await.unwrap().values.is_empty(), "no row yet");
    let held = s.claim_values(&call("t", &["m-b", "m-a"], 3)).await.unwrap();
    assert_eq!(held.values, ["m-a", "m-b"]);
    assert!(!held.is_full());
    assert_eq!(s.claim_values(&call("t", &["m-b", "m-a"], 3)).await.unwrap(), held, "sent again");
    let held = s.claim_values(&call("t", &["m-d", "m-c", "m-e"], 3)).await.unwrap();
    assert_eq!(held.values, ["m-a", "m-b", "m-d"], "m-c and m-e found the row full");
    assert!(held.is_full() && held.holds("m-d") && !held.holds("m-c"));
    assert_eq!(s.read_values(&call("t", &["m-x"], 3)).await.unwrap(), held, "a read adds nothing");
    // A lowered cap keeps what is held, and admits nothing new.
    assert_eq!(s.claim_values(&call("t", &["m-z"], 1)).await.unwrap().values, ["m-a", "m-b", "m-d"]);
}

/// Sixteen callers claim 20 values each at once, overlapping, under a cap of 50: the row ends
/// holding exactly 50, and each caller's answer is the row as its call left it (every value
/// it was told is held stays held).
pub async fn concurrent_claims_never_pass_the_values_cap<S: ?Sized + QuotaStore>(h: &mut StoreUnderTest<S>) {
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..16u32 {
        let s = h.shared();
        tasks.spawn(async move {
            let mine: Vec<String> = (0..20).map(|i| format!("m-{}", caller * 5 + i)).collect();
            let c = ValueCall::new("t".into(), "tokens".into(), "model", MARCH, 50, KEPT).with_values(mine.clone());
            let held = s.claim_values(&c).await.unwrap();
            assert!(held.values.len() <= 50, "{held:?}");
            mine.into_iter().filter(|v| held.holds(v)).collect::<Vec<_>>()
        });
    }
    let mut told = std::collections::BTreeSet::new();
    while let Some(held) = tasks.join_next().await {
        told.extend(held.unwrap());
    }
    let row = h.s().read_values(&call("t", &[], 50)).await.unwrap();
    assert_eq!(row.values.len(), 50, "the cap exactly: {row:?}");
    assert!(told.iter().all(|v| row.holds(v)), "a value a caller was told held is held");
    // Another tenant's row is its own.
    assert_eq!(h.s().claim_values(&call("u", &["m-1"], 50)).await.unwrap().values, ["m-1"]);
}

/// A row is per (tenant, meter, dimension, month), and outlives a restart of the store; forget
/// frees a place; values out of the grammar are never stored.
pub async fn values_rows_are_apart_outlive_a_restart_and_free_a_place_when_forgotten<S: ?Sized + QuotaStore>(
    h: &mut StoreUnderTest<S>,
) {
    let s = h.s();
    s.claim_values(&call("t", &["m-a", "m-b"], 2)).await.unwrap();
    let mut other_meter = call("t", &["m-c"], 2);
    other_meter.meter = "images".into();
    let mut other_dimension = call("t", &["m-c"], 2);
    other_dimension.dimension = "region".into();
    let mut april = call("t", &["m-c"], 2);
    april.period = APRIL;
    for c in [&other_meter, &other_dimension, &april] {
        assert_eq!(s.claim_values(c).await.unwrap().values, ["m-c"], "{c:?}");
    }
    let long = "x".repeat(65);
    let refused = call("v", &["", "a b", "m\u{0}x", "m:x", "m}x", "%", "é", "*", long.as_str()], 50);
    assert!(s.claim_values(&refused).await.unwrap().values.is_empty());
    h.restart().await;
    let s = h.s();
    assert_eq!(s.read_values(&call("t", &[], 2)).await.unwrap().values, ["m-a", "m-b"]);
    assert_eq!(s.read_values(&april).await.unwrap().values, ["m-c"]);
    assert_eq!(s.forget_values(&call("t", &["m-a"], 2)).await.unwrap().values, ["m-b"]);
    assert_eq!(s.claim_values(&call("t", &["m-z"], 2)).await.unwrap().values, ["m-b", "m-z"]);
    assert!(s.read_values(&call("v", &[], 50)).await.unwrap().values.is_empty());
}
