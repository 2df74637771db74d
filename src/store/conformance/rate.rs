//! The rate role: a tenant's shared GCRA bucket, leased out in cells that are never granted
//! twice, given back only while their time has not passed, each call applied once.

use super::*;

use crate::store::{CellCall, CellReturn, RateStore};

/// One cell's time: 10 cells a second.
const T: u64 = 100_000_000;
/// The burst.
const BURST: u32 = 10;
/// A time in Unix nanoseconds.
const NOW: i64 = DAY0 * 1_000_000_000;

fn take(tenant: &str, want: u32, need: u32, now: i64, node: u64, seq: u64) -> CellCall {
    CellCall::new(tenant.into(), want, need, T, BURST, now, ReserveToken::new(node, seq).at(now / 1_000_000_000))
}

fn back(tenant: &str, cells: u32, lease_end: i64, now: i64, node: u64, seq: u64) -> CellReturn {
    CellReturn::new(tenant.into(), cells, T, lease_end, now, ReserveToken::new(node, seq).at(now / 1_000_000_000))
}

/// Eight senders take cells at once until the bucket refuses them: together they get the
/// burst exactly, never a cell twice; half a second later, five more (10 a second), and no
/// more; another tenant's bucket is its own.
pub async fn cells_are_never_granted_twice<S: ?Sized + RateStore>(h: &mut StoreUnderTest<S>) {
    let mut tasks = tokio::task::JoinSet::new();
    for node in 1..=8u64 {
        let s = h.shared();
        tasks.spawn(async move {
            let (mut got, mut seq) = (0u32, 0u64);
            loop {
                seq += 1;
                let g = s.take_cells(&take("t", 3, 1, NOW, node, seq)).await.unwrap();
                if g.granted == 0 {
                    return got;
                }
                assert!(g.granted <= 3);
                got += g.granted;
            }
        });
    }
    let mut total = 0;
    while let Some(got) = tasks.join_next().await {
        total += got.unwrap();
    }
    assert_eq!(total, BURST, "the burst, each cell once");
    let s = h.s();
    let half = NOW + 5 * T as i64;
    let g = s.take_cells(&take("t", 8, 1, half, 9, 1)).await.unwrap();
    assert_eq!(g.granted, 5, "half a second: five cells back");
    assert_eq!(g.tat, half + 10 * T as i64, "the bucket's time: full again in a second");
    assert_eq!(s.take_cells(&take("t", 8, 1, half, 9, 2)).await.unwrap().granted, 0);
    // Fewer than needed fit: none granted, the bucket untouched.
    let later = half + 2 * T as i64;
    assert_eq!(s.take_cells(&take("t", 8, 3, later, 9, 3)).await.unwrap().granted, 0);
    assert_eq!(s.take_cells(&take("t", 8, 2, later, 9, 4)).await.unwrap().granted, 2);
    assert_eq!(s.take_cells(&take("u", 20, 1, NOW, 9, 5)).await.unwrap().granted, BURST, "each tenant its own bucket");
}

/// Unspent cells given back return only the part of their lease still ahead: once its end
/// has passed, nothing; and a bucket never goes below the present (no cells of time past).
pub async fn a_return_never_gives_back_cells_whose_time_has_passed<S: ?Sized + RateStore>(h: &mut StoreUnderTest<S>) {
    let s = h.s();
    let g = s.take_cells(&take("t", 10, 1, NOW, 1, 1)).await.unwrap();
    assert_eq!((g.granted, g.tat), (10, NOW + 10 * T as i64));
    // 0.9 s later, 5 of the lease unspent: 0.1 s of it is still ahead, one cell's worth.
    let at = NOW + 9 * T as i64;
    s.return_cells(&back("t", 5, g.tat, at, 1, 2)).await.unwrap();
    assert_eq!(s.take_cells(&take("t", 20, 1, at, 2, 1)).await.unwrap().granted, 10, "9 come back with time, 1 given");
    // A lease whose end has passed gives nothing back.
    let g = s.take_cells(&take("u", 4, 1, NOW, 1, 3)).await.unwrap();
    s.return_cells(&back("u", 4, g.tat, g.tat + 1, 1, 4)).await.unwrap();
    let at = g.tat + 1;
    assert_eq!(s.take_cells(&take("u", 20, 1, at, 2, 2)).await.unwrap().granted, BURST, "full again, not fuller");
    // A return of more than was taken stops at the present: no cell of the past.
    let g = s.take_cells(&take("v", 10, 1, NOW, 1, 5)).await.unwrap();
    s.return_cells(&back("v", 15, g.tat + 50 * T as i64, NOW, 1, 6)).await.unwrap();
    assert_eq!(s.take_cells(&take("v", 20, 1, NOW, 2, 3)).await.unwrap().granted, BURST, "the burst, not more");
    // A return to a bucket never taken from changes nothing.
    s.return_cells(&back("w", 5, NOW + 5 * T as i64, NOW, 1, 7)).await.unwrap();
    assert_eq!(s.take_cells(&take("w", 20, 1, NOW, 2, 4)).await.unwrap().granted, BURST);
}

/// A call re-sent with its token (a retry after a timeout) is answered as it was, not applied
/// again; an older call of the same sender gets nothing; a re-sent return gives back once.
/// The bucket outlives a restart of the store.
pub async fn a_resent_rate_call_is_applied_once<S: ?Sized + RateStore>(h: &mut StoreUnderTest<S>) {
    let s = h.s();
    let first = s.take_cells(&take("t", 4, 1, NOW, 1, 7)).await.unwrap();
    assert_eq!(first.granted, 4);
    assert_eq!(s.take_cells(&take("t", 4, 1, NOW, 1, 7)).await.unwrap(), first, "re-sent: the same answer");
    assert_eq!(s.take_cells(&take("t", 4, 1, NOW, 1, 6)).await.unwrap().granted, 0, "an older call: nothing");
    h.restart().await;
    let s = h.s();
    assert_eq!(s.take_cells(&take("t", 4, 1, NOW, 1, 7)).await.unwrap(), first, "re-sent after a restart");
    assert_eq!(s.take_cells(&take("t", 20, 1, NOW, 2, 1)).await.unwrap().granted, BURST - 4);
    // A return re-sent gives back once.
    let at = NOW + T as i64;
    s.return_cells(&back("t", 2, first.tat, at, 1, 8)).await.unwrap();
    s.return_cells(&back("t", 2, first.tat, at, 1, 8)).await.unwrap();
    assert_eq!(s.take_cells(&take("t", 20, 1, at, 2, 2)).await.unwrap().granted, 3, "1 back with time, 2 given");
}
