//! The numbers every store keeps to, defined once.
//!
//! A store written outside this crate keeps to the same ones, so that an engine behaves alike on
//! every backend (the conformance suite checks what it can of them).
//!
//! Where the backends differed before, the durable stores' values won: aggregates (exported or
//! not) are kept 63 days after their window started on SQLite, DynamoDB and the memory store
//! alike, and flush ids a week on the durable stores. The memory store keeps instead the last
//! [`MEMORY_FLUSH_IDS`] flush ids by count, since only its own process can retry a flush, within
//! seconds, and the process's memory is what is bounded.

/// How long a usage batch's [`FlushId`](super::FlushId) is remembered after its commit (wall
/// clock), so that a retried flush is a no-op. A batch is retried only by the process that
/// made it, while it holds it, and at most a day less than this after it was formed (then it
/// is dropped, counted: its windows are past what a billing system takes), so its id
/// outlives every retry of it, however long the store was down.
pub const FLUSH_IDS_KEPT_SECS: i64 = RETENTION_SECS;

/// The most flush ids the memory store remembers (the oldest go first).
pub const MEMORY_FLUSH_IDS: usize = 1 << 16;

/// How long usage aggregates, exported or not, are kept after their window started, and quota
/// counters after their period ended: no billing system takes usage older than 35 days
/// (Stripe's meter events), so nothing older can be exported or reconciled.
pub const RETENTION_SECS: i64 = 35 * 86_400;

/// How long usage aggregates (a window's units, exported or not) are kept after their window
/// started: 63 days, two calendar months, so that a tenant's previous billing period is all
/// there until the current one ends (the usage route's `previous`, `complete`). Billing takes
/// none past [`RETENTION_SECS`]: older ones are kept to be read, never exported.
pub const USAGE_KEPT_SECS: i64 = 63 * 86_400;

/// How long the tallies of requests admitted and refused ([`Tally`](crate::store::Tally)) are
/// kept after their window started, by the wall clock: two days, so that the dashboard's
/// overview always has the last 24 hours and yesterday whole. Stores return none older, and
/// prune them as they prune usage (DynamoDB: by `ttl`).
pub const TALLY_KEPT_SECS: i64 = 2 * 86_400 + 3_600;

/// The most tallies one [`tallies`](crate::store::UsageStore::tallies) call reads: the
/// fleet's minutes of a day (1,440) many times over, and 10,000 tenants' days.
pub const TALLY_READ_MAX: usize = 10_000;

/// How long usage event ids and webhook event ids are remembered after the event's time: as
/// long as the usage itself (Stripe retries a webhook for 3 days, well within it).
pub const EVENT_IDS_KEPT_SECS: i64 = RETENTION_SECS;

/// The most usage event ids (and, apart, webhook event ids) a store that cannot expire them by
/// itself keeps at once (SQLite, memory). Ids go only by age ([`EVENT_IDS_KEPT_SECS`]): at the
/// cap a new id is refused with [`StoreError::Full`](super::StoreError::Full), retryable, never
/// an id forgotten inside its horizon. DynamoDB expires them by TTL and has no count.
pub const EVENT_IDS_MAX: usize = 1 << 20;

/// The most `Idempotency-Key` bindings a store that cannot expire them by itself (SQLite,
/// memory) keeps at once, whatever `limits.idempotency_keys_max` says: past it, expired ones go
/// first, and a new key finds no room while the others are live
/// ([`IdempotencyState::Full`](super::IdempotencyState::Full)). A live binding is never
/// forgotten to make room.
pub const IDEMPOTENCY_KEYS_MAX: usize = 1 << 20;

/// The senders whose last quota call a counter remembers at least, to answer a re-sent
/// [`ReserveToken`](super::ReserveToken) once. A sender is one quota cell of one engine (a
/// tenant state): a tenant evicted and seen again many times in a period makes many.
///
/// Senders are forgotten by the time of their last call ([`ReserveToken::at`](super::ReserveToken::at)),
/// oldest first, never by sequence number (each node numbers its own calls), and never one
/// that called within [`SENDER_QUIET_SECS`] of the call being applied (its retry may still
/// come). So a counter holds more than this many senders only while they all called within
/// that window. Entries written without a time (by builds before it was recorded) count as
/// the oldest.
pub const SENDERS_KEPT: usize = 64;

/// A sender whose record keeps jobs' reservations (a job's, or a hold still open when its
/// lease went back) is not forgotten for this long after its last call, live or not: its late
/// releases must find it (longer than the longest `limits.hold_timeout`, a day).
pub const SENDER_JOBS_KEPT_SECS: i64 = 2 * 86_400;

/// How long after its last quota call a sender is never forgotten by a counter (see
/// [`SENDERS_KEPT`]). A call may be re-sent later than that (an engine re-sends an unanswered
/// call at its cell's next call, which for an idle tenant is its eviction): a counter keeps the
/// latest last-call time of the senders it forgot, and a call from a sender it does not
/// remember that is no later (within [`FORGOTTEN_SLACK_SECS`]) is answered as an older call
/// (nothing granted), never applied again. A new node's first call is taken for one only if
/// its clock is this far behind (less the slack).
pub const SENDER_QUIET_SECS: i64 = 600;

/// How long after another period of a meter has started a counter's period that ended is kept:
/// the first call on a period drops those of the meter that ended this long before the new one
/// started (see [`QuotaKey::drops_ended_before`](super::QuotaKey::drops_ended_before)). Nodes
/// choose periods by their own clocks, so a node up to this far behind (or ahead of) the others
/// still finds the minute they are in (a minute quota; `limits.clock_skew` must be within it);
/// days and months drop the period before last, as ever.
pub const ENDED_PERIODS_KEPT_SECS: i64 = crate::base::ENDED_PERIODS_KEPT_SECS;

/// How much later than the last sender forgotten a call may be dated and still be answered as
/// an older call ([`SENDER_QUIET_SECS`]): a store that moves calls onto its own clock (the
/// RedisStore) may move a call sent again a second or two off its first time, as its two
/// sends measure the clocks apart. Harmless for a new sender: one is forgotten only after
/// [`SENDER_QUIET_SECS`] of quiet, so a new node's first call is taken for an older one only
/// if its clock is that far behind, less this.
pub const FORGOTTEN_SLACK_SECS: i64 = 5;

/// How long units forgiven by a close or a refund are kept
/// ([`CreditBalance::forgiven`](super::CreditBalance::forgiven)): long enough for every lease
/// outstanding at the close to be spent or given back (a node gives back an idle tenant's
/// leases after `limits.idle_timeout`, 15 minutes by default), after which releases lower the
/// balance's used units again in full.
pub const FORGIVEN_SECS: i64 = 2 * 3_600;

/// How long a refund that arrived before its grant is kept
/// ([`RefundOutcome::Kept`](super::RefundOutcome::Kept)): as long as usage (Stripe retries a
/// payment's event for 3 days, well within it).
pub const REFUNDS_KEPT_SECS: i64 = RETENTION_SECS;

/// The most refunds a store keeps for grants that have not landed: past it a refund is not
/// kept ([`RefundOutcome::Full`](super::RefundOutcome::Full)) and is asked for again later
/// (Stripe delivers its event again).
pub const REFUNDS_KEPT_MAX: usize = 10_000;

/// The most open credit grants a tenant holds on one meter: a grant past them is refused
/// ([`GrantOutcome::TooMany`](super::GrantOutcome::TooMany)).
pub const OPEN_GRANTS_MAX: usize = 1000;

/// How long a closed credit grant (expired or revoked) is kept at least, listed and known by
/// its id (a grant sent again under its id within this time adds nothing): then a later close
/// on its balance drops it (DynamoDB's TTL, too).
pub const CLOSED_GRANTS_KEPT_SECS: i64 = RETENTION_SECS;

/// How long a credit grant that closed used up ([`Closed::UsedUp`](super::Closed::UsedUp)) is
/// kept at least: a refund or a dispute of its payment within this time still takes what it
/// would have, had the grant stayed open (card networks take disputes up to 120 days after a
/// charge). Then a later close on its balance drops it, as other closed grants after
/// [`CLOSED_GRANTS_KEPT_SECS`].
pub const USED_UP_GRANTS_KEPT_SECS: i64 = 180 * 86_400;

/// The most units a prepaid balance's open grants hold together (2^50): a grant past it is
/// refused ([`GrantOutcome::TooLarge`](super::GrantOutcome::TooLarge)), so no store's
/// arithmetic overflows.
pub const MAX_BALANCE: u64 = crate::base::MAX_BALANCE;

/// The longest body of a stored `Idempotency-Key` response on DynamoDB:
/// `limits.idempotency_max_body` is refused above it for a DynamoDB idempotency store. An item
/// holds at most 400 KB (409,600 bytes), its attribute names and the binding's other attributes
/// included: the encoded response (status, headers, body) may take
/// [`DYNAMODB_MAX_ENCODED_RESPONSE_BYTES`], leaving the headers some 50 KB; a response whose
/// headers push it over is not stored (its key is released). Such writes cost one write unit
/// per KB.
pub const DYNAMODB_MAX_RESPONSE_BYTES: usize = crate::base::DYNAMODB_MAX_RESPONSE_BYTES;

/// The most bytes of one encoded stored response on DynamoDB (see
/// [`DYNAMODB_MAX_RESPONSE_BYTES`]).
pub const DYNAMODB_MAX_ENCODED_RESPONSE_BYTES: usize = 400_000;
