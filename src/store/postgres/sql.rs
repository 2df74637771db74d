//! SQL text the PostgresStore's statements share: the reserve statement of the quota role,
//! and the largest `bigint`.

use crate::store::contract;

/// The largest value a `bigint` holds: counters saturate there.
pub(super) const MAX_INT: &str = "9223372036854775807";

/// The reserve (and release) statement. The counter's row carries its senders' last calls, so
/// the condition that the token is new, the grant under the limit and the record of the answer
/// are one atomic write; every node of a fleet sees the row as the last one left it.
///
/// `$1..$5` the key, `$6` the node (text), `$7` its sequence number, `$8` the units wanted,
/// `$9` the units added unconditionally (owed; negative to release), `$10` the limit (NULL:
/// none), `$11` the fewest units worth granting, `$12` the call's time, `$13` whether the
/// tenant's own cap on the meter (`quota_cap`) holds the call in place of `$10` when one is
/// stored ([`CapMode::Stored`]; [`Reservation::limit_under`]), read in the same statement, `$14`
/// the most a stored hard cap holds it to (NULL: none), `$15..$17` what the sender keeps
/// besides the grant (lease, held, jobs: `store::quota::Kept`), `$18` when its reservation
/// expires (0: never), `$20` whether the caller reads the answer (false: a release). The grant follows [`Reservation::grant_for`]; a release draws first on
/// a prepaid balance's units forgiven to its sender (`store::quota::release_against`). Each
/// sender's entry is `[seq, granted, reserved, time, lease, held, jobs, expires_at, gone]`
/// (`store::quota::Keeping`; `gone` negative: `store::quota::mark`, −1 once a slow path
/// revived an expired sender or a release took it: this call drops what it keeps and is
/// answered expired; −2 its last call was answered expired). Senders are forgotten by time, oldest first
/// (entries of earlier builds have no time: the oldest), never one that called within
/// [`SENDER_QUIET_SECS`](contract::SENDER_QUIET_SECS) nor one whose reservation is live.
///
/// The statement changes nothing, and so returns no row, when a reservation may have expired
/// (`next_expiry`, a lower bound of the live ones' expiries, is due) or the sender's own had
/// (`gone` > 0): the store then expires them in Rust (`PostgresStore::expire_due`, the rules of
/// `store::quota`) and sends it again.
pub(super) fn reserve_sql(schema: &str) -> String {
    let live_f = "(q.forgiven_until > $12)";
    // A sender whose reservation the store gave back (`store::quota::standing`): revived by
    // the slow path, or left to be told by a release (`mark::TELL`), or one the counter does
    // not remember that says it keeps leased or held units. What it gives back went back at
    // its expiry.
    let revived = "(coalesce((q.senders -> $6::text ->> 8)::bigint, 0) = -1 \
                   OR (q.senders -> $6::text IS NULL AND $15::numeric + $16::numeric + GREATEST(-$9::numeric, 0) > 0))";
    // A release draws on what is forgiven to its sender for the lease it still holds (the
    // entry's sequence number is the sender's last call's), and drops what is forgiven to it
    // for an earlier lease: `store::quota::release_against`.
    let released = "GREATEST(-$9::numeric, 0)";
    let mine = "(q.forgiven_by -> $6::text)";
    let fheld = format!("coalesce(({mine} ->> 0)::numeric, 0)");
    let same = format!("coalesce(({mine} ->> 1)::numeric = (q.senders -> $6::text ->> 0)::numeric, false)");
    let drawn = format!("(CASE WHEN {live_f} AND {same} AND NOT {revived} THEN LEAST({fheld}, {released}) ELSE 0 END)");
    let dropped = format!("(CASE WHEN {live_f} AND $9 < 0 AND NOT {same} THEN {fheld} ELSE 0 END)");
    let by = format!(
        "(CASE WHEN NOT {live_f} THEN '{{}}'::jsonb \
          WHEN $9 >= 0 OR {mine} IS NULL THEN q.forgiven_by \
          WHEN {same} AND {fheld} > {released} THEN jsonb_set(q.forgiven_by, ARRAY[$6::text], \
              jsonb_build_array({fheld} - {released}, {mine} -> 1)) \
          ELSE q.forgiven_by - $6::text END)"
    );
    let delta = format!("(CASE WHEN {revived} AND $9 < 0 THEN 0 ELSE $9 END)");
    let after = format!("GREATEST(LEAST(q.reserved::numeric + {delta} + {drawn}, {MAX_INT}), 0)");
    // A prepaid balance is held to its grants (`granted`), whatever the caller says; a spend
    // counter to the tenant's own hard cap, within `$14`, when one is stored (a soft one: the
    // call's limit; `store::quota::capped_limit`).
    let cap = format!("(SELECT c.cap, c.hard FROM {schema}.quota_cap c WHERE c.tenant = $1 AND c.meter = $2 AND $13)");
    let limit = format!(
        "(CASE WHEN q.granted IS NOT NULL THEN q.granted::numeric \
          WHEN EXISTS {cap} THEN (SELECT CASE WHEN c.hard THEN LEAST(c.cap::numeric, coalesce($14::numeric, c.cap::numeric)) \
              ELSE $10::numeric END FROM {schema}.quota_cap c \
              WHERE c.tenant = $1 AND c.meter = $2) \
          ELSE $10::numeric END)"
    );
    let left = format!("GREATEST({limit} - {after}, 0)");
    let granted = format!(
        "(CASE WHEN {limit} IS NULL THEN $8::numeric ELSE LEAST($8::numeric, GREATEST(ceil({left} / 8), $11), {left}) END)"
    );
    let reserved = format!("LEAST({after} + {granted}, {MAX_INT})");
    let at = "coalesce((value ->> 3)::bigint, 0)";
    // What the sender keeps after the call (`store::quota::Keeping::after`); a revived one
    // keeps only its jobs and this grant.
    // (A caller that keeps no reservation, `$18` 0, keeps nothing of its grant: used.)
    // Of the grant, what the caller uses at once (`$19`) is used, not kept.
    let kept_grant = format!("(CASE WHEN $18::bigint > 0 THEN {granted} - LEAST({granted}, $19::numeric) ELSE 0 END)");
    let lease = format!("(CASE WHEN {revived} THEN {kept_grant} ELSE $15::numeric + {kept_grant} END)");
    let held = format!("(CASE WHEN {revived} THEN 0 ELSE $16::bigint END)");
    // A live entry (`store::quota::Keeping::live`) is never forgotten: it expires first.
    let live = "(coalesce((value ->> 8)::bigint, 0) <= 0 AND coalesce((value ->> 4)::numeric, 0) \
                + coalesce((value ->> 5)::numeric, 0) > 0 AND coalesce((value ->> 7)::bigint, 0) > 0)";
    // A sender keeping jobs' reservations that called within `SENDER_JOBS_KEPT_SECS`: kept
    // (`store::quota::Keeping::unforgettable`).
    let jobs = format!(
        "(coalesce((value ->> 6)::numeric, 0) > 0 AND {at} >= $12::bigint - {})",
        contract::SENDER_JOBS_KEPT_SECS
    );
    // The latest last-call time of the senders forgotten by this call (`store::quota::forgotten`).
    let forgotten = format!(
        "(CASE WHEN (SELECT count(*) FROM jsonb_object_keys(q.senders)) < {kept} THEN q.senders_forgotten_at \
          ELSE GREATEST(q.senders_forgotten_at, coalesce((SELECT max(e.at) FROM ( \
             SELECT {at} AS at, {live} AS live, {jobs} AS jobs, row_number() OVER (ORDER BY {at} DESC, key) AS rank \
             FROM jsonb_each(q.senders)) e \
             WHERE e.rank >= {kept} AND e.at < $12::bigint - {quiet} AND NOT e.live AND NOT e.jobs), 0)) END)",
        kept = contract::SENDERS_KEPT,
        quiet = contract::SENDER_QUIET_SECS,
    );
    // The least expiry of the live reservations, as a bound: this one's joins it (a renewed
    // one's earlier expiry stays until the slow path computes it again).
    let next = format!(
        "(CASE WHEN $18::bigint > 0 AND {lease} + $16::numeric > 0 \
          THEN LEAST(coalesce(q.next_expiry, $18::bigint), $18::bigint) ELSE q.next_expiry END)"
    );
    // `store::quota::mark_after`: a release ($20 false) leaves its sender to be told.
    let mark = format!("(CASE WHEN {revived} THEN (CASE WHEN $20 THEN -2 ELSE -1 END) ELSE 0 END)");
    let kept_all =
        "(SELECT coalesce(sum(coalesce((e.value ->> 4)::numeric, 0) + coalesce((e.value ->> 5)::numeric, 0) \
                    + coalesce((e.value ->> 6)::numeric, 0)), 0) FROM jsonb_each(q.senders) e)";
    format!(
        "UPDATE {schema}.quota AS q SET reserved = {reserved}::bigint, answer = {granted}::bigint, \
         answer_expired = {revived}, next_expiry = {next}, \
         forgiven = (CASE WHEN {live_f} THEN GREATEST(q.forgiven - {drawn} - {dropped}, 0) ELSE 0 END)::bigint, \
         forgiven_by = {by}, senders_forgotten_at = {forgotten}, \
         senders = (SELECT coalesce(jsonb_object_agg(e.key, e.value), '{{}}'::jsonb) FROM ( \
             SELECT key, value, {at} AS at, {live} AS live, {jobs} AS jobs, \
                 row_number() OVER (ORDER BY {at} DESC, key) AS rank \
             FROM jsonb_each(q.senders || jsonb_build_object($6::text, \
                 jsonb_build_array($7::bigint, {granted}, {reserved}, $12::bigint, {lease}, {held}, $17::bigint, \
                     $18::bigint, {mark})))) e \
             WHERE e.rank <= {kept} OR e.at >= $12::bigint - {quiet} OR e.live OR e.jobs) \
         WHERE q.tenant = $1 AND q.meter = $2 AND q.period = $3 AND q.start_at = $4 AND q.end_at = $5 \
         AND coalesce((q.senders -> $6::text ->> 0)::numeric < $7, \
             NOT (q.senders_forgotten_at > 0 AND $12::bigint <= q.senders_forgotten_at + {slack})) \
         AND (q.next_expiry IS NULL OR q.next_expiry > $12::bigint) \
         AND coalesce((q.senders -> $6::text ->> 8)::bigint, 0) <= 0 \
         RETURNING q.answer, q.reserved, q.granted, \
             (SELECT c.cap FROM {schema}.quota_cap c WHERE c.tenant = $1 AND c.meter = $2 AND $13), \
             (SELECT c.hard FROM {schema}.quota_cap c WHERE c.tenant = $1 AND c.meter = $2 AND $13), \
             GREATEST(q.reserved - {kept_all}, 0)::bigint, q.answer_expired",
        live_f = "(q.forgiven_until > $12)",
        kept = contract::SENDERS_KEPT,
        quiet = contract::SENDER_QUIET_SECS,
        slack = contract::FORGOTTEN_SLACK_SECS,
    )
}

/// Many releases in one statement: the reserve statement with each release's parameters read
/// from arrays (`unnest`, one row per release) and those a release does not use set to what
/// [`release_call`](super::PostgresStore) sends (no units wanted, no limit, no cap, nothing
/// taken, no answer read), so the rule stays the one written above. `$1..$13` are the arrays of the key (five),
/// the node, the sequence number, the units given back as a negative delta, the call's time,
/// and the lease, held, jobs and expiry kept. It returns the position (from 1) of each release
/// applied; one that is not (a counter to create, a reservation to expire first, a token seen
/// already) goes alone after, through the one-call path. Each counter may appear once in the
/// arrays: `UPDATE … FROM` applies one source row per target row.
pub(super) fn release_batch_sql(schema: &str) -> String {
    let one = reserve_sql(schema);
    let (update, _) = one.split_once(" RETURNING ").expect("the reserve statement returns its answer");
    // From the highest number down, so `$1` never matches the start of `$12`.
    let from_arrays = [20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1];
    let mut body = update.to_owned();
    for n in from_arrays {
        let to = match n {
            8 | 11 | 19 => "(0::bigint)".to_owned(),
            10 | 14 => "(NULL::bigint)".to_owned(),
            13 | 20 => "false".to_owned(),
            _ => format!("r.p{n}"),
        };
        body = body.replace(&format!("${n}"), &to);
    }
    let (set, filter) = body.split_once(" WHERE q.tenant = ").expect("the reserve statement names its row");
    format!(
        "{set} FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[], \
         $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[]) \
         WITH ORDINALITY AS r(p1, p2, p3, p4, p5, p6, p7, p9, p12, p15, p16, p17, p18, i) \
         WHERE q.tenant = {filter} RETURNING r.i"
    )
}
