//! The idempotency role of the DynamoStore.

use aws_sdk_dynamodb::primitives::Blob;

use super::*;
use crate::store::{contract::DYNAMODB_MAX_ENCODED_RESPONSE_BYTES, IdempotencySettled, StoredResponse};

/// The counters of stored responses' bytes per bucket: a write per stored response goes to
/// one of these (drawn by its owner), so no one item takes the fleet's writes; each holds its
/// share of the bucket's bytes.
const BYTE_SHARDS: u64 = 16;

/// The state of a live binding, its response decoded.
fn state_of(held: &HashMap<String, AttributeValue>) -> Result<IdempotencyState, StoreError> {
    let completed = held.get("completed").and_then(|v| v.as_bool().ok()).copied().unwrap_or(false);
    if !completed {
        return Ok(IdempotencyState::InFlight);
    }
    let response = match held.get("response").and_then(|v| v.as_b().ok()) {
        Some(bytes) => Some(Box::new(StoredResponse::decode(bytes.as_ref())?)),
        None => None,
    };
    Ok(IdempotencyState::Completed(response))
}

impl DynamoStore {
    /// Frees `key` if `owner` still holds it unsettled.
    async fn release_idempotency(&self, key: &str, owner: u64) -> Result<IdempotencySettled, StoreError> {
        let released = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(idempotency_pk(key)))
            .key("sk", s("I"))
            .condition_expression("#owner = :o AND completed = :no")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":o", s(hex_node(owner)))
            .expression_attribute_values(":no", AttributeValue::Bool(false))
            .send()
            .await;
        match released {
            Ok(_) => Ok(IdempotencySettled::Settled),
            Err(e) if is_ccf(&e) => Ok(IdempotencySettled::NotHeld),
            Err(e) => Err(sdk(e)),
        }
    }
}

#[async_trait]
impl IdempotencyStore for DynamoStore {
    async fn claim_idempotency(&self, c: &IdempotencyClaim) -> Result<IdempotencyState, StoreError> {
        let out = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(idempotency_pk(&c.key)))
            .item("sk", s("I"))
            .item("request", s(c.request.as_str()))
            .item("owner", s(hex_node(c.owner)))
            .item("completed", AttributeValue::Bool(false))
            .item("until", n(c.in_flight_until))
            .item("ttl", n(c.expires_at))
            // Free: never claimed, expired (TTL deletion is lazy), or left in flight too long.
            .condition_expression("attribute_not_exists(pk) OR #ttl <= :now OR (completed = :no AND #until <= :now)")
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_names("#until", "until")
            .expression_attribute_values(":now", n(c.now))
            .expression_attribute_values(":no", AttributeValue::Bool(false))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match out {
            Ok(_) => Ok(IdempotencyState::Claimed),
            Err(e) => match e.into_service_error() {
                PutItemError::ConditionalCheckFailedException(held) => {
                    // The binding that holds the key (with its response): without it the
                    // answer cannot be told.
                    let Some(held) = held.item else {
                        return Err(StoreError::Conflict("an Idempotency-Key claim failed without the binding it met"));
                    };
                    if get_s(&held, "request") != Some(c.request.as_str()) {
                        return Ok(IdempotencyState::Mismatch);
                    }
                    state_of(&held)
                }
                e => Err(backend(e)),
            },
        }
    }

    async fn read_idempotency(
        &self,
        key: &str,
        request: &str,
        now: i64,
    ) -> Result<Option<IdempotencyState>, StoreError> {
        let Some(held) = self.get(idempotency_pk(key), "I").await? else { return Ok(None) };
        let completed = held.get("completed").and_then(|v| v.as_bool().ok()).copied().unwrap_or(false);
        // Expired (TTL deletion is lazy), or left in flight past its time: free.
        let expires = get_i(&held, "ttl").unwrap_or(i64::MAX);
        let until = get_i(&held, "until").unwrap_or(i64::MAX);
        if now >= expires || (!completed && now >= until) {
            return Ok(None);
        }
        if get_s(&held, "request") != Some(request) {
            return Ok(Some(IdempotencyState::Mismatch));
        }
        state_of(&held).map(Some)
    }

    async fn settle_idempotency(
        &self,
        key: &str,
        owner: u64,
        how: &IdempotencySettle,
    ) -> Result<IdempotencySettled, StoreError> {
        let done = match how {
            IdempotencySettle::Completed(done) => done,
            IdempotencySettle::Renewed { until } => {
                let renewed = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .key("pk", s(idempotency_pk(key)))
                    .key("sk", s("I"))
                    .update_expression("SET #until = :u")
                    .condition_expression("#owner = :o AND completed = :no")
                    .expression_attribute_names("#owner", "owner")
                    .expression_attribute_names("#until", "until")
                    .expression_attribute_values(":o", s(hex_node(owner)))
                    .expression_attribute_values(":no", AttributeValue::Bool(false))
                    .expression_attribute_values(":u", n(*until))
                    .send()
                    .await;
                return match renewed {
                    Ok(_) => Ok(IdempotencySettled::Settled),
                    Err(e) if is_ccf(&e) => Ok(IdempotencySettled::NotHeld),
                    Err(e) => Err(sdk(e)),
                };
            }
            _ => return self.release_idempotency(key, owner).await,
        };
        let bytes = done.response.encode();
        let size = bytes.len() as u64;
        // An item holds 400 KB, its attribute names included.
        let share = done.bucket_bytes() / BYTE_SHARDS;
        if bytes.len() > DYNAMODB_MAX_ENCODED_RESPONSE_BYTES || size > share {
            return match self.release_idempotency(key, owner).await? {
                IdempotencySettled::Settled => Ok(IdempotencySettled::Refused),
                other => Ok(other),
            };
        }
        // The bytes first: a binding completed after its bytes failed to count would let the
        // store hold more than its bound; bytes counted for a binding that is then not held
        // only make the bound a little stricter until the bucket passes.
        let bucket = done.bucket();
        let counted = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(format!("IB{SEP}{bucket}{SEP}{}", owner % BYTE_SHARDS)))
            .key("sk", s("B"))
            .update_expression("ADD #b :n SET #ttl = :ttl")
            .condition_expression("attribute_not_exists(#b) OR #b <= :room")
            .expression_attribute_names("#b", "bytes")
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_values(":n", n(size))
            .expression_attribute_values(":room", n(share - size))
            .expression_attribute_values(":ttl", n(bucket.saturating_add(2).saturating_mul(done.window)))
            .send()
            .await;
        match counted {
            Ok(_) => {}
            Err(e) if is_ccf(&e) => {
                return match self.release_idempotency(key, owner).await? {
                    IdempotencySettled::Settled => Ok(IdempotencySettled::Refused),
                    other => Ok(other),
                };
            }
            Err(e) => return Err(sdk(e)),
        }
        let settled = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(idempotency_pk(key)))
            .key("sk", s("I"))
            .update_expression("SET completed = :yes, #response = :r")
            .condition_expression("#owner = :o AND completed = :no")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#response", "response")
            .expression_attribute_values(":o", s(hex_node(owner)))
            .expression_attribute_values(":yes", AttributeValue::Bool(true))
            .expression_attribute_values(":no", AttributeValue::Bool(false))
            .expression_attribute_values(":r", AttributeValue::B(Blob::new(bytes)))
            .send()
            .await;
        match settled {
            Ok(_) => Ok(IdempotencySettled::Settled),
            // Not this owner's any more (expired and claimed again): nothing to do.
            Err(e) if is_ccf(&e) => Ok(IdempotencySettled::NotHeld),
            Err(e) => Err(sdk(e)),
        }
    }
}
