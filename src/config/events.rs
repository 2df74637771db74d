//! `[events]`: usage events reported after the fact.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

use super::ConfigError;
use super::{validator::Validator, MeterSpec};
use crate::base::MeterId;

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEvents {
    pub(crate) max_skew: Option<String>,
    pub(crate) store_timeout: Option<String>,
    #[serde(default)]
    pub(crate) products: BTreeMap<String, String>,
}

/// `[events]`: usage events recorded from jobs and queues
/// ([`Tollgate::record_event`](crate::Tollgate::record_event)).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EventSettings {
    /// How far in the future an event's time may be (clock skew between the producer and
    /// this node) before the event is refused. Default 5 minutes.
    pub max_skew: Duration,
    /// Product codes of queue events (`ProductCode`) and the meter each one records.
    pub products: BTreeMap<String, MeterId>,
    /// How long one batch of events may take to be stored (a batch is written event by
    /// event on DynamoDB). Default 10 seconds.
    pub store_timeout: Duration,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self { max_skew: Duration::from_secs(300), products: BTreeMap::new(), store_timeout: Duration::from_secs(10) }
    }
}

impl EventSettings {
    /// The meter of a product code, if the configuration maps it.
    #[must_use]
    pub fn meter_of(&self, product: &str) -> Option<&MeterId> {
        self.products.get(product)
    }
}

impl Validator<'_, '_> {
    /// `[events]`.
    pub(super) fn events(&self, raw: &RawEvents, meters: &[MeterSpec]) -> Result<EventSettings, ConfigError> {
        let d = EventSettings::default();
        let max_skew = self.duration("events.max_skew", raw.max_skew.as_deref(), d.max_skew)?;
        if max_skew > Duration::from_secs(3600) {
            return Err(self.invalid("events.max_skew", "must be at most 1 hour"));
        }
        let mut products = BTreeMap::new();
        for (code, meter) in &raw.products {
            let path = format!("events.products.{code}");
            if code.is_empty() || code.len() > 256 {
                return Err(self.invalid(&path, "a product code is 1 to 256 bytes"));
            }
            let id = self.meter_ref(meters, &path, meter)?;
            self.counted_alone(meters, &path, &id)?;
            products.insert(code.clone(), id);
        }
        let store_timeout = self.duration("events.store_timeout", raw.store_timeout.as_deref(), d.store_timeout)?;
        if store_timeout.is_zero() {
            return Err(self.invalid("events.store_timeout", "must be longer than zero"));
        }
        Ok(EventSettings { max_skew, products, store_timeout })
    }
}
