//! The idempotency role of the DynamoStore.

use super::*;

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
                    // The binding that holds the key: without it the answer cannot be told.
                    let Some(held) = held.item else {
                        return Err(StoreError::Conflict("an Idempotency-Key claim failed without the binding it met"));
                    };
                    let completed = held.get("completed").and_then(|v| v.as_bool().ok()).copied().unwrap_or(false);
                    Ok(if get_s(&held, "request") != Some(c.request.as_str()) {
                        IdempotencyState::Mismatch
                    } else if completed {
                        IdempotencyState::Completed
                    } else {
                        IdempotencyState::InFlight
                    })
                }
                e => Err(backend(e)),
            },
        }
    }

    async fn settle_idempotency(&self, key: &str, owner: u64, how: IdempotencySettle) -> Result<(), StoreError> {
        let pk = idempotency_pk(key);
        let result = match how {
            IdempotencySettle::Completed => self
                .client
                .update_item()
                .table_name(&self.table)
                .key("pk", s(pk))
                .key("sk", s("I"))
                .update_expression("SET completed = :yes")
                .condition_expression("#owner = :o AND completed = :no")
                .expression_attribute_names("#owner", "owner")
                .expression_attribute_values(":o", s(hex_node(owner)))
                .expression_attribute_values(":yes", AttributeValue::Bool(true))
                .expression_attribute_values(":no", AttributeValue::Bool(false))
                .send()
                .await
                .map(drop)
                .map_err(|e| (is_ccf(&e), sdk(e))),
            _ => self
                .client
                .delete_item()
                .table_name(&self.table)
                .key("pk", s(pk))
                .key("sk", s("I"))
                .condition_expression("#owner = :o AND completed = :no")
                .expression_attribute_names("#owner", "owner")
                .expression_attribute_values(":o", s(hex_node(owner)))
                .expression_attribute_values(":no", AttributeValue::Bool(false))
                .send()
                .await
                .map(drop)
                .map_err(|e| (is_ccf(&e), sdk(e))),
        };
        match result {
            // Not this owner's any more (expired and claimed again): nothing to do.
            Ok(()) | Err((true, _)) => Ok(()),
            Err((false, e)) => Err(e),
        }
    }
}
