//! The RedisStore's keys (docs/redis.md, "Keys"), layout version 3 (the names are layout 1's,
//! `:1:` in each; layout 2 adds a calendar period's own row, and reads layout 1's tenants'
//! rows as they were written, moving their calendar counters out as they are next called;
//! layout 3 writes a tenant's quota row and its running periods' counters without a time to
//! live, and takes off the one earlier layouts wrote as it upgrades them):
//!
//! - `PREFIX:layout`: the layout version of the keys under the prefix;
//! - `PREFIX:1:{TENANT}:rate`: a tenant's shared GCRA bucket (`tat`, `senders`);
//! - `PREFIX:1:{TENANT}:places`: a tenant's places in flight (`holders`);
//! - `PREFIX:1:{KEY}:idem`: an `Idempotency-Key` binding (`request`, `owner`, `completed`,
//!   `until`, `expires`, `response`), KEY the digest the engine gives;
//! - `PREFIX:1:{idem-bytes}:BUCKET:SHARD`: the bytes of stored responses counted per window
//!   bucket, in shards;
//! - `PREFIX:1:{TENANT}:quota`: a tenant's quota (`state`: every meter's prepaid balance with
//!   its senders' last calls, its caps, recharges and credit grants, and the calendar periods
//!   it keeps in rows of their own; in layout 1, their counters too);
//! - `PREFIX:1:{TENANT}:counter:METER:PERIOD:START:END`: one calendar period's counter of a
//!   tenant's meter (`state`, its senders' last calls), or a period dropped (`dropped`), METER
//!   with `:` and `%` written `%3A` and `%25`;
//! - `PREFIX:1:{TENANT}:values:METER:DIMENSION:START`: the values of an open dimension of a
//!   tenant's meter used in the month starting at START (`row`: `store::ValueRow`), METER
//!   escaped as a counter's; each write keeps it until 35 days past its month at least (a key
//!   of this kind is new in layout 3: earlier nodes never read it);
//! - `PREFIX:1:{PAYMENT}:payment`: a payment's (or an invoice's) refund kept until its grant
//!   lands (`refund`), then the grant it bought (`grant`);
//! - `PREFIX:1:{credits-due}`: a sorted set of the credit grants that expire, by expiry;
//! - `PREFIX:1:{refunds-kept}:DAY`: how many refunds were kept that day (a counter);
//! - `PREFIX:probe`: the key the check at open writes nothing to.
//!
//! Every row is a hash with its version `v`. The braces are a hash tag: a tenant's keys share a
//! slot of a Redis Cluster. `{`, `}` and `%` in a tenant's id are written `%7B`, `%7D` and
//! `%25`, so that the tag is the whole id.

use crate::base::TenantId;

/// The version of the key layout this tollgate writes and reads.
pub const LAYOUT_VERSION: u32 = 3;

/// The layout whose names the keys keep (`PREFIX:1:…`), and the oldest one this tollgate
/// reads (an earlier tollgate's keys are upgraded in place: see the module's doc).
pub(crate) const NAMES_VERSION: u32 = 1;

/// The keys under one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

/// `text` as a hash tag's content: braces and `%` escaped.
fn tag(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('{');
    for c in text.chars() {
        match c {
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
    out.push('}');
    out
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn layout(&self) -> String {
        format!("{}:layout", self.prefix)
    }

    pub(crate) fn probe(&self) -> String {
        format!("{}:probe", self.prefix)
    }

    pub(crate) fn rate(&self, tenant: &TenantId) -> String {
        format!("{}:{NAMES_VERSION}:{}:rate", self.prefix, tag(tenant.as_str()))
    }

    pub(crate) fn places(&self, tenant: &TenantId) -> String {
        format!("{}:{NAMES_VERSION}:{}:places", self.prefix, tag(tenant.as_str()))
    }

    pub(crate) fn quota(&self, tenant: &TenantId) -> String {
        format!("{}:{NAMES_VERSION}:{}:quota", self.prefix, tag(tenant.as_str()))
    }

    /// The row of `key`'s counter, a calendar period's.
    pub(crate) fn counter(&self, key: &crate::store::QuotaKey) -> String {
        let meter = key.meter.as_str().replace('%', "%25").replace(':', "%3A");
        format!(
            "{}:{NAMES_VERSION}:{}:counter:{meter}:{}:{}:{}",
            self.prefix,
            tag(key.tenant.as_str()),
            key.period_tag(),
            key.start,
            key.end
        )
    }

    /// The row of a tenant's values of `dimension` of `meter` in the month starting at `start`.
    pub(crate) fn values(&self, tenant: &TenantId, meter: &str, dimension: &str, start: i64) -> String {
        let meter = meter.replace('%', "%25").replace(':', "%3A");
        format!("{}:{NAMES_VERSION}:{}:values:{meter}:{dimension}:{start}", self.prefix, tag(tenant.as_str()))
    }

    /// A tenant's payments row (`store::PaymentRow`): kept until written again.
    pub(crate) fn payments(&self, tenant: &TenantId) -> String {
        format!("{}:{NAMES_VERSION}:{}:payments", self.prefix, tag(tenant.as_str()))
    }

    pub(crate) fn payment(&self, payment: &str) -> String {
        format!("{}:{NAMES_VERSION}:{}:payment", self.prefix, tag(payment))
    }

    pub(crate) fn credits_due(&self) -> String {
        format!("{}:{NAMES_VERSION}:{{credits-due}}", self.prefix)
    }

    pub(crate) fn refunds_kept(&self, day: i64) -> String {
        format!("{}:{NAMES_VERSION}:{{refunds-kept}}:{day}", self.prefix)
    }

    pub(crate) fn idempotency(&self, key: &str) -> String {
        format!("{}:{NAMES_VERSION}:{}:idem", self.prefix, tag(key))
    }

    pub(crate) fn idempotency_bytes(&self, bucket: i64, shard: u64) -> String {
        format!("{}:{NAMES_VERSION}:{{idem-bytes}}:{bucket}:{shard}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenants_keys_share_one_hash_tag_whatever_its_id() {
        let keys = Keys::new("tg");
        assert_eq!(keys.rate(&"acme".into()), "tg:1:{acme}:rate");
        assert_eq!(keys.places(&"a}b{c%".into()), "tg:1:{a%7Db%7Bc%25}:places");
        // Escaped, the tag is the whole id: two ids never share it unless equal.
        assert_ne!(tag("a}"), tag("a"));
        assert_eq!(keys.idempotency_bytes(3, 7), "tg:1:{idem-bytes}:3:7");
        let key = crate::store::QuotaKey::new(
            "a{".into(),
            "x:y%".into(),
            crate::base::Period::Month { anchor_day: 15 },
            100,
            200,
        );
        assert_eq!(keys.counter(&key), "tg:1:{a%7B}:counter:x%3Ay%25:month@15:100:200");
    }
}
