//! `tollgate export` (a pass, its dry run, a new identifier namespace) and `tollgate reconcile`:
//! the commands that work against the billing system.

use tollgate::Config;

use crate::util::{now, time_text, Result};

/// One export pass (or, with `dry_run`, what it would send).
pub(crate) async fn export(config: Config, dry_run: bool) -> Result<()> {
    if config.export().sink_kind(config.stripe().is_some()).is_none() {
        return Err("the configuration names no billing sink ([export] sink, or a [stripe] section): \
                    there is nowhere to export to"
            .into());
    }
    let builder = tollgate::Tollgate::builder(config.clone());
    let builder = if dry_run {
        builder
    } else {
        let sink = tollgate::billing::configured_sink(&config)?.ok_or("the configuration names no billing sink")?;
        builder.billing_sink_arc(sink)
    };
    let (engine, _worker) = builder.open().await?;
    if dry_run {
        let events = engine.export_preview().await?;
        out!(
            "{:<12} {:<14} {:<22} {:<20} {:>10} {:>12}  identifier",
            "tenant",
            "event name",
            "window (UTC)",
            "customer",
            "value",
            "timestamp"
        );
        for e in &events {
            out!(
                "{:<12} {:<14} {:<22} {:<20} {:>10} {:>12}  {}",
                e.tenant.as_str(),
                e.event_name,
                time_text(e.window_start),
                e.customer.as_deref().unwrap_or("-"),
                e.value,
                e.timestamp,
                e.identifier
            );
        }
        out!("{} meter events would be sent (dry run: nothing was)", events.len());
        return Ok(());
    }
    let r = engine.export().await?;
    out!(
        "{} meter events sent ({} units), {} retried later, {} dead-lettered, {} windows not billable (no customer)",
        r.events,
        r.units,
        r.retries,
        r.dead_letters,
        r.unbillable
    );
    if r.waiting > 0 {
        out!(
            "{} windows wait for a later export: their tenant's directory record could not be read, \
             or no directory holds the tenant (see the log)",
            r.waiting
        );
    }
    if r.halted {
        return Err("Stripe refused the API key (401/403): the export stopped; check STRIPE_SECRET_KEY".into());
    }
    Ok(())
}

/// `export --new-namespace`: an export pass and a reconciliation of the last 35 days under the
/// current namespace, then a new one.
pub(crate) async fn new_namespace_of(config: Config) -> Result<()> {
    let kind = config.export().sink_kind(config.stripe().is_some());
    if kind.is_none() {
        return Err("the configuration names no billing sink: identifiers are the billing system's".into());
    }
    let sink = tollgate::billing::configured_sink(&config)?.ok_or("the configuration names no billing sink")?;
    let (engine, _worker) = tollgate::Tollgate::builder(config.clone()).billing_sink_arc(sink).open().await?;
    let r = engine.export().await?;
    if r.halted {
        return Err("the billing system refused the key (401/403): nothing was changed".into());
    }
    out!("{} meter events sent, {} dead-lettered under the current namespace", r.events, r.dead_letters);
    if kind == Some(tollgate::config::SinkKind::Metronome) {
        // Metronome is not read back: exports in flight keep their identifiers; nothing to
        // reconcile first.
        engine.shutdown().await?;
        let admin = crate::util::open_admin(&config).await?;
        let (old, new) = admin.new_identifier_namespace().await?;
        let old = if old.is_empty() { "(empty)" } else { old.as_str() };
        out!("identifier namespace changed from {old} to {new}");
        return Ok(());
    }
    let to = now();
    let request = tollgate::report::ReconcileRequest::new(to - 35 * 86_400, to).fix(true);
    let r = engine.reconcile(&request).await?;
    out!(
        "reconciled {} hours: {} dead letters confirmed, {} requeued, {} hours of drift",
        r.compared,
        r.confirmed,
        r.requeued,
        r.drift.len() + r.more_drift
    );
    engine.shutdown().await?;
    let admin = crate::util::open_admin(&config).await?;
    let (old, new) = admin.new_identifier_namespace().await?;
    let old = if old.is_empty() { "(empty)" } else { old.as_str() };
    out!("identifier namespace changed from {old} to {new}");
    Ok(())
}

/// Before `--requeue-all`: the dead letters Stripe may hold are reconciled (confirmed when it
/// holds them, requeued once proven it does not), when the configuration has `[stripe]` and the
/// key is set; nothing else is sent. A failure is said, and `--requeue-all` goes on with what
/// Stripe refused.
pub(crate) async fn settle_letters(config: &Config) {
    if config.stripe().is_none() || config.export().sink_kind(true) != Some(tollgate::config::SinkKind::Stripe) {
        return;
    }
    let Ok(sink) = stripe_sink(config) else {
        out!("no Stripe key: the dead letters Stripe may hold are left for `tollgate reconcile --fix`");
        return;
    };
    let settled = async {
        // The worker is never started and the engine never shut down: no export runs.
        let (engine, _worker) = tollgate::Tollgate::builder(config.clone()).billing_sink(sink).open().await?;
        // An empty range (one whole hour to itself): the open dead letters alone, with the
        // hours they are stamped in.
        let hour = now() - now().rem_euclid(3600);
        let r = engine.reconcile(&tollgate::report::ReconcileRequest::new(hour, hour).fix(true)).await?;
        Ok::<_, Box<dyn std::error::Error>>(r)
    };
    match settled.await {
        Ok(r) => {
            out!("reconciled the dead letters Stripe may hold: {} confirmed, {} requeued", r.confirmed, r.requeued)
        }
        Err(e) => out!("the dead letters Stripe may hold could not be reconciled ({e}): they are left"),
    }
}

/// One reconciliation pass against Stripe, printed as a table of the hours that differ.
pub(crate) async fn reconcile(config: Config, request: &tollgate::report::ReconcileRequest) -> Result<()> {
    not_metronome(&config, "reconciliation reads Stripe's meter event summaries")?;
    if config.stripe().is_none() {
        return Err("the configuration has no [stripe] section: there is nothing to reconcile with".into());
    }
    let (engine, _worker) =
        tollgate::Tollgate::builder(config.clone()).billing_sink(stripe_sink(&config)?).open().await?;
    let r = engine.reconcile(request).await?;
    out!(
        "{:<20} {:<12} {:<12} {:<20} {:>10} {:>10} {:>8}  action",
        "hour (UTC)",
        "tenant",
        "meter",
        "customer",
        "exported",
        "stripe",
        "letters"
    );
    for d in &r.drift {
        let action = match d.action {
            tollgate::report::DriftAction::Lacking { since } => format!("lacking since {}", time_text(since)),
            other => other.label().to_owned(),
        };
        out!(
            "{:<20} {:<12} {:<12} {:<20} {:>10} {:>10} {:>8}  {action}",
            time_text(d.hour),
            d.tenant.as_str(),
            d.meter.as_str(),
            d.customer,
            d.expected,
            d.held,
            d.letters
        );
    }
    if r.more_drift > 0 {
        out!("… and {} more hours", r.more_drift);
    }
    out!(
        "{} hours compared ({} reads of Stripe), {} settling; Stripe lacks {} units and holds {} more; \
         {} resent, {} dead letters confirmed, {} requeued",
        r.compared,
        r.reads,
        r.settling,
        r.lacking_units,
        r.surplus_units,
        r.resent,
        r.confirmed,
        r.requeued
    );
    if r.not_compared > 0 {
        out!("{} events of pre-aggregated meters are not compared (Stripe keeps their newest value)", r.not_compared);
    }
    Ok(())
}

/// Refuses a command that works against Stripe only when the sink is Metronome.
fn not_metronome(config: &Config, why: &str) -> Result<()> {
    if config.export().sink == Some(tollgate::config::SinkKind::Metronome) {
        return Err(format!(
            "export.sink is \"metronome\": {why}, and tollgate does not reconcile with Metronome (docs/metronome.md)"
        )
        .into());
    }
    Ok(())
}

#[cfg(feature = "stripe")]
fn stripe_sink(config: &Config) -> Result<tollgate::billing::StripeSink> {
    Ok(tollgate::billing::StripeSink::from_config(config)?)
}

#[cfg(not(feature = "stripe"))]
fn stripe_sink(_: &Config) -> Result<tollgate::billing::JsonlSink> {
    Err("this tollgate was built without the `stripe` feature".into())
}
