//! The stores an audit runs on, each new for a run, behind one fault plan.

use std::sync::Arc;

use tollgate::store::{FaultPlan, Faults, MemoryStore, QuotaInspect, StoreInspect};

use crate::{common::NodeStore, fleet::Stores};

/// A backend of the audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Memory,
    Sqlite,
    Postgres,
    PgBouncer,
    /// moto's server: its writes are not atomic, so the fault plan serves one call at a time.
    Dynamo,
    /// The quota, rate, places and idempotency roles on Redis, the rest in memory.
    Redis,
}

impl Kind {
    pub(crate) const ALL: [Kind; 6] =
        [Kind::Memory, Kind::Sqlite, Kind::Postgres, Kind::PgBouncer, Kind::Dynamo, Kind::Redis];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Memory => "memory",
            Kind::Sqlite => "sqlite",
            Kind::Postgres => "postgres",
            Kind::PgBouncer => "pgbouncer",
            Kind::Dynamo => "dynamodb",
            Kind::Redis => "redis",
        }
    }

    pub(crate) fn named(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

fn whole<S: StoreInspect + 'static>(store: Arc<S>, plan: &Arc<FaultPlan>, keep: Option<tempfile::TempDir>) -> Stores {
    let faulty: Arc<dyn StoreInspect> = Arc::new(Faults::new(store.clone(), plan.clone()));
    Stores {
        nodes: NodeStore::Whole(faulty),
        quota: store.clone() as Arc<dyn QuotaInspect>,
        usage: store,
        plan: plan.clone(),
        _keep: keep,
    }
}

/// A new store of `kind` behind a plan drawing from `seed`; `None` when its server is not
/// there (outside CI: the common helpers say so loudly, and fail under CI).
pub(crate) async fn open(kind: Kind, seed: u64) -> Option<Stores> {
    let plan = Arc::new(FaultPlan::new(seed));
    Some(match kind {
        Kind::Memory => whole(Arc::new(MemoryStore::new()), &plan, None),
        Kind::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let store = tollgate::store::SqliteStore::open(dir.path().join("audit.db")).await.unwrap();
            whole(Arc::new(store), &plan, Some(dir))
        }
        Kind::Postgres => {
            let (store, _) = crate::common::postgres::store().await?;
            whole(Arc::new(store), &plan, None)
        }
        Kind::PgBouncer => {
            let options = crate::common::postgres::fresh_behind_bouncer()?;
            let store = tollgate::store::PostgresStore::open(&options).await.unwrap();
            whole(Arc::new(store), &plan, None)
        }
        Kind::Dynamo => {
            let store = crate::common::dynamo::table().await?;
            plan.set_serial(true);
            whole(Arc::new(store), &plan, None)
        }
        Kind::Redis => {
            let (redis, _) = crate::common::redis::store_driven().await?;
            let redis = Arc::new(redis);
            let rest = Arc::new(MemoryStore::new());
            let rest_faulty: Arc<dyn tollgate::store::Store> = Arc::new(Faults::new(rest.clone(), plan.clone()));
            Stores {
                nodes: NodeStore::Beside {
                    rest: rest_faulty,
                    fleet: Arc::new(Faults::new(redis.clone(), plan.clone())),
                },
                quota: redis,
                usage: rest,
                plan,
                _keep: None,
            }
        }
    })
}
