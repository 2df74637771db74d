//! What the DynamoStore's usage reads cost: queries, items read, read units.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;

/// What a [`DynamoStore`](super::DynamoStore)'s usage reads cost ([`DynamoStore::usage_reads`](super::DynamoStore::usage_reads)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DynamoReads {
    /// Queries sent.
    pub queries: u64,
    /// Items DynamoDB read (`ScannedCount`).
    pub items_read: u64,
    /// Read units billed, as DynamoDB bills a strongly consistent query: the size of the items
    /// it read, rounded up to 4 KB, at least one a query.
    pub read_units: u64,
}

/// [`DynamoReads`] as counted.
#[derive(Debug, Default)]
pub(super) struct ReadCounts {
    pub(super) queries: std::sync::atomic::AtomicU64,
    pub(super) items: std::sync::atomic::AtomicU64,
    pub(super) units: std::sync::atomic::AtomicU64,
}

impl ReadCounts {
    /// Counts a query that read `scanned` items and answered `items` (every item it read: a
    /// query by key range filters nothing).
    pub(super) fn counted(&self, scanned: i32, items: &[HashMap<String, AttributeValue>]) {
        use std::sync::atomic::Ordering::Relaxed;
        let bytes: usize = items.iter().map(item_size).sum();
        self.queries.fetch_add(1, Relaxed);
        self.items.fetch_add(u64::try_from(scanned).unwrap_or(0), Relaxed);
        self.units.fetch_add(bytes.div_ceil(4096).max(1) as u64, Relaxed);
    }
}

/// An item's size as DynamoDB counts it: each attribute's name and value (a string's bytes, a
/// number's about one byte per two digits and one more).
fn item_size(item: &HashMap<String, AttributeValue>) -> usize {
    item.iter()
        .map(|(name, value)| {
            name.len()
                + match value {
                    AttributeValue::S(t) => t.len(),
                    AttributeValue::N(t) => t.len().div_ceil(2) + 1,
                    AttributeValue::B(b) => b.as_ref().len(),
                    AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
                    _ => 16,
                }
        })
        .sum()
}
