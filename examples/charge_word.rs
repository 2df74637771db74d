//! What one atomic operation for the charge would save, measured before building it: the
//! lease's take and the usage's add as the request path makes them today (two atomic
//! operations on the tenant's first cache line), against the one-word charges that would
//! replace them (issue 59: "taking the lease unit and recording the usage one atomic
//! operation"). The words share one cache line, as on a tenant's first line; a run exercises
//! one variant:
//!
//! - `take`: the lease word's compare-and-swap alone (a tag of 16 bits, the units left in
//!   48), `QuotaRef::try_take`'s loop without its period check: the floor no one-word charge
//!   goes below;
//! - `two`: that take, then a bare add of the usage on the same line (the engine's add also
//!   checks the usage slot's window);
//! - `split`: the same two, the other work split between them, as the handler's work separates
//!   the admission's take from the response's add;
//! - `wide`: one compare-and-swap of a 128-bit word (the lease word and the usage beside it),
//!   through `portable-atomic`, which picks `cmpxchg16b` at run time as a library must;
//! - `packed`: one compare-and-swap of a 64-bit word holding the tag (16 bits), a flag (1),
//!   the units left (23) and the usage not yet flushed (24), with the checks that word would
//!   need (its tag, the flag clear, the units there, the usage's room).
//!
//! `cargo run --release --example charge_word -- VARIANT [THREADS] [OPS] [WORK]`: THREADS (1 by
//! default) run OPS operations each (10,000,000 by default) on the one line, with WORK steps
//! of other work between two (1,000 by default, about a request's time on the machine of
//! `docs/performance.md`). Prints the time per operation. For instructions per operation, run
//! it under `valgrind --tool=callgrind` with WORK 0 and two values of OPS: the difference of
//! the counts over the difference of OPS.
use std::{
    hint::black_box,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use portable_atomic::AtomicU128;

/// A tenant's first line, reduced to the words the charge writes.
#[repr(C, align(64))]
struct Line {
    lease: AtomicU64,
    usage: AtomicU64,
    wide: AtomicU128,
    packed: AtomicU64,
}

const TAG: u64 = 0x1234;
const LEFT48: u64 = (1 << 48) - 1;

/// The lease word's take: `QuotaRef::try_take`'s loop, without its period check.
#[inline(never)]
fn take(lease: &AtomicU64, cost: u64) -> bool {
    let mut word = lease.load(Ordering::Acquire);
    loop {
        if word >> 48 != TAG || (word & LEFT48) < cost {
            return false;
        }
        match lease.compare_exchange_weak(word, word - cost, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(now) => word = now,
        }
    }
}

/// The usage slot's add: `MeterCell::add`.
#[inline(never)]
fn add(usage: &AtomicU64, quantity: u64) {
    usage.fetch_add(quantity, Ordering::AcqRel);
}

/// The take and the usage's add in one 128-bit compare-and-swap: the lease word in the low
/// half, the usage in the high one.
#[inline(never)]
fn take_wide(wide: &AtomicU128, cost: u64) -> bool {
    let mut word = wide.load(Ordering::Acquire);
    loop {
        let lease = word as u64;
        if lease >> 48 != TAG || (lease & LEFT48) < cost {
            return false;
        }
        let next = (word - u128::from(cost)) + (u128::from(cost) << 64);
        match wide.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(now) => word = now,
        }
    }
}

/// The packed word's fields: the tag in bits 48 to 63, a flag in bit 47 (set, the word takes
/// no charge), the units left in bits 24 to 46, the usage not yet flushed in bits 0 to 23.
const DRAINING: u64 = 1 << 47;
const LEFT_SHIFT: u32 = 24;
const LEFT23: u64 = (1 << 23) - 1;
const PENDING24: u64 = (1 << 24) - 1;

/// The take and the usage's add in one 64-bit compare-and-swap of the packed word.
#[inline(never)]
fn take_packed(packed: &AtomicU64, cost: u64) -> bool {
    let mut word = packed.load(Ordering::Acquire);
    loop {
        let left = (word >> LEFT_SHIFT) & LEFT23;
        let pending = word & PENDING24;
        if word >> 48 != TAG || word & DRAINING != 0 || left < cost || pending + cost > PENDING24 {
            return false;
        }
        // Both fields move without a borrow or a carry across them: checked above.
        let next = word - (cost << LEFT_SHIFT) + cost;
        match packed.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(now) => word = now,
        }
    }
}

fn run(line: &Line, variant: &str, ops: u64, work: u64) {
    // The variant is chosen once: the loop holds its operation and the other work alone.
    let op: fn(&Line) = match variant {
        "take" => |line| {
            black_box(take(&line.lease, 1));
        },
        "two" | "split" => |line| {
            black_box(take(&line.lease, 1));
            add(&line.usage, 1);
        },
        "wide" => |line| {
            black_box(take_wide(&line.wide, 1));
        },
        // The units run out every 2^23 operations: the word is set afresh, as a refill and a
        // flush would.
        "packed" => |line| {
            if !take_packed(&line.packed, 1) {
                line.packed.store(fresh_packed(), Ordering::Release);
            }
        },
        other => panic!("unknown variant {other}: take, two, split, wide or packed"),
    };
    if variant == "split" {
        // The take at admission and the add at the response, the handler's work between.
        for i in 0..ops {
            black_box(take(&line.lease, 1));
            for _ in 0..work / 2 {
                black_box(i);
            }
            add(&line.usage, 1);
            for _ in 0..work - work / 2 {
                black_box(i);
            }
        }
        return;
    }
    for i in 0..ops {
        op(line);
        for _ in 0..work {
            black_box(i);
        }
    }
}

fn fresh_packed() -> u64 {
    (TAG << 48) | (LEFT23 << LEFT_SHIFT)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let variant = args.get(1).map_or("two", String::as_str).to_owned();
    let threads: usize = args.get(2).map_or(1, |a| a.parse().expect("THREADS: a number"));
    let ops: u64 = args.get(3).map_or(10_000_000, |a| a.parse().expect("OPS: a number"));
    let work: u64 = args.get(4).map_or(1_000, |a| a.parse().expect("WORK: a number"));
    let line: &'static Line = Box::leak(Box::new(Line {
        lease: AtomicU64::new((TAG << 48) | LEFT48),
        usage: AtomicU64::new(0),
        wide: AtomicU128::new(u128::from((TAG << 48) | LEFT48)),
        packed: AtomicU64::new(fresh_packed()),
    }));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let variant = variant.clone();
            std::thread::spawn(move || run(line, &variant, ops, work))
        })
        .collect();
    for w in workers {
        w.join().expect("a worker panicked");
    }
    let per = start.elapsed().as_secs_f64() * 1e9 / ops as f64;
    println!("{variant}, {threads} thread(s), {work} steps of other work: {per:.2} ns per operation per thread");
}
