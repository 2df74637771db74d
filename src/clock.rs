//! Time sources: the system clock, and a fake clock for tests.

use std::{
    cell::Cell,
    fmt,
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use governor::nanos::Nanos;

/// The time source of an engine: wall-clock time for periods and windows, and a monotonic
/// reading for the token buckets.
///
/// The system clock reads the CPU's time-stamp counter (through `quanta`) and derives wall
/// time from it with an offset taken from `SystemTime`; [`Clock::resync`] takes that offset
/// again (the worker does it at every flush), so wall time never drifts further than one
/// flush interval's worth of clock skew.
///
/// [`Clock::system`] is the default. [`Clock::fake`] returns a clock driven by a
/// [`FakeClock`] handle, so tests can cross minute, day and month boundaries at will.
///
/// ```
/// use std::time::Duration;
/// use tollgate::clock::Clock;
/// let (clock, handle) = Clock::fake_at_unix(1_767_225_599); // 2025-12-31T23:59:59Z
/// handle.advance(Duration::from_secs(1));
/// assert_eq!(clock.unix_secs(), 1_767_225_600); // 2026-01-01T00:00:00Z
/// ```
#[derive(Clone)]
pub struct Clock {
    // One pointer: each compiled plan and its limiters hold a clone.
    inner: Arc<Inner>,
}

enum Inner {
    System {
        quanta: quanta::Clock,
        start: quanta::Instant,
        offset: AtomicI64,
    },
    /// A fake time, read `off` nanoseconds away from it (a host whose clock is off).
    Fake(FakeClock, i64),
}

impl Clock {
    /// The system clock.
    #[must_use]
    pub fn system() -> Self {
        let quanta = quanta::Clock::new();
        let start = quanta.now();
        let clock = Self { inner: Arc::new(Inner::System { quanta, start, offset: AtomicI64::new(0) }) };
        clock.resync();
        clock
    }

    /// Takes the offset between the monotonic reading and `SystemTime` again (a no-op for a
    /// fake clock).
    pub fn resync(&self) {
        if let Inner::System { quanta, start, offset } = &*self.inner {
            let wall = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
            let mono = i64::try_from(quanta.now().duration_since(*start).as_nanos()).unwrap_or(i64::MAX);
            offset.store(wall - mono, Ordering::Release);
        }
    }

    /// A fake clock starting at the current wall time, and the handle that moves it.
    #[must_use]
    pub fn fake() -> (Self, FakeClock) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Self::fake_at_unix(now.as_secs() as i64)
    }

    /// A fake clock starting at `unix_secs`, and the handle that moves it.
    #[must_use]
    pub fn fake_at_unix(unix_secs: i64) -> (Self, FakeClock) {
        let handle = FakeClock { nanos: Arc::new(AtomicI64::new(unix_secs.saturating_mul(1_000_000_000))) };
        (Self { inner: Arc::new(Inner::Fake(handle.clone(), 0)) }, handle)
    }

    /// Wall-clock time in nanoseconds since the Unix epoch.
    #[inline]
    #[must_use]
    pub fn unix_nanos(&self) -> i64 {
        match &*self.inner {
            Inner::System { quanta, start, offset } => {
                let mono = quanta.now().duration_since(*start).as_nanos() as i64;
                mono + offset.load(Ordering::Relaxed)
            }
            Inner::Fake(f, off) => f.nanos.load(Ordering::Acquire).saturating_add(*off),
        }
    }

    /// Wall-clock time in whole seconds since the Unix epoch.
    #[inline]
    #[must_use]
    pub fn unix_secs(&self) -> i64 {
        self.unix_nanos().div_euclid(1_000_000_000)
    }

    /// Whether this is a fake clock.
    #[must_use]
    pub fn is_fake(&self) -> bool {
        matches!(*self.inner, Inner::Fake(..))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.inner {
            Inner::System { .. } => f.write_str("Clock::System"),
            Inner::Fake(c, off) => {
                f.debug_tuple("Clock::Fake").field(&c.nanos.load(Ordering::Relaxed).saturating_add(*off)).finish()
            }
        }
    }
}

thread_local! {
    /// The wall time (Unix nanoseconds) of this thread's latest reading of a clock through
    /// governor, so that a request reads the time-stamp counter once for its rate check and its
    /// quota period and usage window.
    static LAST_WALL: Cell<i64> = const { Cell::new(0) };
}

impl Clock {
    /// The wall time, in Unix seconds, of the reading taken by this thread's latest governor
    /// check: call right after one (on the same thread, nothing in between reads another
    /// clock).
    #[inline]
    pub(crate) fn last_check_secs() -> i64 {
        LAST_WALL.with(Cell::get).div_euclid(1_000_000_000)
    }
}

impl governor::clock::Clock for Clock {
    type Instant = Nanos;

    #[inline]
    fn now(&self) -> Nanos {
        let (mono, wall) = match &*self.inner {
            Inner::System { quanta, start, offset } => {
                let mono = quanta.now().duration_since(*start).as_nanos() as i64;
                (mono, mono + offset.load(Ordering::Relaxed))
            }
            // The fake monotonic reading follows the fake wall time (which only moves forward).
            Inner::Fake(f, off) => {
                let wall = f.nanos.load(Ordering::Acquire).saturating_add(*off);
                (wall, wall)
            }
        };
        LAST_WALL.with(|w| w.set(wall));
        Nanos::from(mono.max(0) as u64)
    }
}

impl governor::clock::ReasonablyRealtime for Clock {}

/// The handle of a fake [`Clock`]: moves its time forward.
#[derive(Clone)]
pub struct FakeClock {
    nanos: Arc<AtomicI64>,
}

impl FakeClock {
    /// A clock reading this handle's time: another engine of a test's fleet on the same fake
    /// time.
    #[must_use]
    pub fn clock(&self) -> Clock {
        Clock { inner: Arc::new(Inner::Fake(self.clone(), 0)) }
    }

    /// A clock reading this handle's time `off_secs` seconds away from it (ahead when
    /// positive): an engine of a test's fleet on a host whose clock is off, within the skew
    /// the fleet tolerates ([`Limits::clock_skew`](crate::config::Limits::clock_skew)).
    ///
    /// ```
    /// use tollgate::clock::Clock;
    /// let (clock, handle) = Clock::fake_at_unix(1_000);
    /// let behind = handle.clock_off_by(-90);
    /// assert_eq!((clock.unix_secs(), behind.unix_secs()), (1_000, 910));
    /// ```
    #[must_use]
    pub fn clock_off_by(&self, off_secs: i64) -> Clock {
        Clock { inner: Arc::new(Inner::Fake(self.clone(), off_secs.saturating_mul(1_000_000_000))) }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_nanos()).unwrap_or(i64::MAX);
        self.nanos.fetch_add(by, Ordering::AcqRel);
    }

    /// Moves the clock forward to `unix_secs`.
    ///
    /// # Panics
    /// If that is earlier than the clock's current time: fake time never goes back.
    pub fn set_unix(&self, unix_secs: i64) {
        let target = unix_secs.saturating_mul(1_000_000_000);
        let prev = self.nanos.fetch_max(target, Ordering::AcqRel);
        assert!(prev <= target, "a fake clock never goes back in time");
    }

    /// The current fake time, in seconds since the Unix epoch.
    #[must_use]
    pub fn unix_secs(&self) -> i64 {
        self.nanos.load(Ordering::Acquire).div_euclid(1_000_000_000)
    }
}

impl fmt::Debug for FakeClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("FakeClock").field(&self.nanos.load(Ordering::Relaxed)).finish()
    }
}
