//! A tenant's recharge of a prepaid meter on DynamoDB: the item `RECHARGE` in the partition of
//! the meter's counters (beside its cap), written on the condition that it is as read; a new
//! claim also checks, in the same transaction, that the balance's item still leaves less than
//! `below` (`room` = granted − reserved), so that nodes crossing together claim once.

use aws_sdk_dynamodb::types::ConditionCheck;

use super::race::{Race, Retries};
use super::*;
use crate::store::{RechargeMode, RechargeSeen, RechargeState};

/// The sort key of a tenant's recharge of a meter, in the partition of the meter's counters
/// (it has no `end`: dropping ended periods never takes it).
pub(super) const RECHARGE_SK: &str = "RECHARGE";

/// A recharge item read back.
pub(super) fn recharge_of(item: &Item) -> Result<Option<RechargeState>, StoreError> {
    get_s(item, "state").map(RechargeState::read).transpose()
}

impl DynamoStore {
    /// Applies `mode` to the tenant's recharge of the key's meter (after the reserve's own
    /// write): read, changed by the one rule ([`RechargeState::apply`]), written back on the
    /// condition that nobody wrote it meanwhile, and read again when somebody did.
    pub(super) async fn recharge(&self, key: &QuotaKey, mode: RechargeMode) -> Result<RechargeSeen, StoreError> {
        let pk = quota_pk(key);
        let balance_sk = quota_sk(&super::credits::prepaid_key(&key.tenant, &key.meter));
        let (pk, balance_sk) = (&pk, &balance_sk);
        self.until_won("a recharge, written by other nodes all along", Retries::QUICK_FIRST, (), |(), _| {
            let mode = mode.clone();
            Box::pin(async move {
                let read = self.get(pk.clone(), RECHARGE_SK).await?;
                let before = read.as_ref().map(recharge_of).transpose()?.flatten().unwrap_or_default();
                let counter = self.get(pk.clone(), balance_sk).await?;
                let left = counter.as_ref().filter(|c| c.contains_key("granted")).map(|c| {
                    let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                    signed(get_u(c, "granted")).saturating_sub(signed(get_u(c, "reserved")))
                });
                let mut after = before.clone();
                let seen = after.apply(mode.clone(), left);
                if after == before {
                    return Ok(Race::Won(seen));
                }
                let put = Put::builder()
                    .table_name(&self.table)
                    .item("pk", s(pk.clone()))
                    .item("sk", s(RECHARGE_SK))
                    .item("state", s(after.to_json()));
                let put = match read.as_ref().and_then(|i| get_s(i, "state")) {
                    Some(old) => put
                        .condition_expression("#state = :old")
                        .expression_attribute_names("#state", "state")
                        .expression_attribute_values(":old", s(old)),
                    None => put.condition_expression("attribute_not_exists(pk)"),
                };
                let mut actions = vec![TransactWriteItem::builder().put(put.build().map_err(backend)?).build()];
                if matches!(seen, RechargeSeen::Claimed { .. }) {
                    // A claim (new, or taken again): only while the balance is still below
                    // `below` as written.
                    let below = after.setting.as_ref().map_or(0, |s| s.below);
                    let check = ConditionCheck::builder()
                        .table_name(&self.table)
                        .key("pk", s(pk.clone()))
                        .key("sk", s(balance_sk.clone()))
                        .condition_expression("attribute_not_exists(#room) OR #room < :below")
                        .expression_attribute_names("#room", "room")
                        .expression_attribute_values(":below", n(int(below)))
                        .build()
                        .map_err(backend)?;
                    actions.push(TransactWriteItem::builder().condition_check(check).build());
                }
                match self.client.transact_write_items().set_transact_items(Some(actions)).send().await {
                    Ok(_) => Ok(Race::Won(seen)),
                    // Written meanwhile, or the balance no longer below: read again.
                    Err(e) if cancellation(&e).is_some_and(|r| lost(&r)) => Ok(Race::Lost(())),
                    Err(e) => Err(sdk(e)),
                }
            })
        })
        .await
    }
}

/// Whether a cancelled transaction lost a race (a condition failed, or another transaction
/// came first), so that reading again and trying again is the answer.
fn lost(reasons: &[Option<String>]) -> bool {
    reasons.iter().flatten().all(|c| c == "ConditionalCheckFailed" || retryable(std::slice::from_ref(&Some(c.clone()))))
}
