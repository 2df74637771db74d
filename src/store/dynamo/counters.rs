//! Reading a tenant's quota counters on DynamoDB (`QuotaStore::counters`).

use super::*;
use crate::{base::MeterId, store::QuotaCounter};

impl DynamoStore {
    /// The counters of `(tenant, meter)`: the items of its quota partition but its floor, by
    /// period start (a consistent read).
    pub(super) async fn quota_counters(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
    ) -> Result<Vec<QuotaCounter>, StoreError> {
        let any = QuotaKey::new(tenant.clone(), meter.clone(), crate::base::Period::Day, 0, 0);
        let mut out = Vec::new();
        let mut cap = None;
        let mut recharge = None;
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(quota_pk(&any)))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(sdk)?;
            for item in page.items.unwrap_or_default() {
                let Some(sk) = get_s(&item, "sk") else { continue };
                if sk == super::quota::CAP_SK {
                    cap = super::quota::cap_of(&item);
                    continue;
                }
                if sk == super::recharge::RECHARGE_SK {
                    recharge = super::recharge::recharge_of(&item)?;
                    continue;
                }
                let mut parts = sk.split(SEP);
                let (Some(tag), Some(from), Some(to)) = (parts.next(), parts.next(), parts.next()) else { continue };
                let window = |t: &str| u64::from_str_radix(t, 16).ok().map(|w| (w ^ (1 << 63)) as i64);
                let (Some(from), Some(to)) = (window(from), window(to)) else { continue };
                let Some(key) = QuotaKey::from_tag(tenant.clone(), meter.clone(), tag, from, to) else { continue };
                let granted = (key.period == crate::base::Period::Prepaid).then(|| get_u(&item, "granted"));
                out.push(
                    QuotaCounter::new(key, get_u(&item, "reserved"), granted).keeping(super::quota::kept_in(&item)),
                );
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        out.sort_by_key(|c| c.key.start);
        let mut out: Vec<_> = out.into_iter().map(|c| c.with_cap(cap)).collect();
        crate::store::quota::recharge_listed(&mut out, tenant, meter, recharge);
        Ok(out)
    }
}
