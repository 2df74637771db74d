//! `tollgate alerts`: the alerts outbox, its dead letters, an alert sent again.

use tollgate::{
    admin::Admin,
    store::{AlertQuery, AlertState, OutboxEntry},
};

use crate::{
    opt::AlertCommand,
    util::{time_text, Result},
};

fn header() {
    out!(
        "{:<38} {:<20} {:<16} {:<24} {:<10} {:>8}  next / last error",
        "alert",
        "destination",
        "tenant",
        "event",
        "state",
        "attempts"
    );
}

fn line(e: &OutboxEntry) {
    let next = match e.state {
        AlertState::Pending => format!("next {}", time_text(e.next_at)),
        AlertState::Delivered => format!("delivered {}", e.delivered_at.map(time_text).unwrap_or_default()),
        _ => String::new(),
    };
    out!(
        "{:<38} {:<20} {:<16} {:<24} {:<10} {:>8}  {next}{}",
        e.key.id,
        e.key.destination,
        e.tenant.as_str(),
        e.event,
        e.state.as_str(),
        e.attempts,
        e.last_error.as_deref().map(|err| format!(" ({err})")).unwrap_or_default()
    );
}

pub(crate) async fn alerts(admin: &Admin, command: AlertCommand) -> Result<()> {
    match command {
        AlertCommand::List { state, limit } => {
            let mut query = AlertQuery::new(limit);
            if let Some(s) = state {
                query = query.state(
                    AlertState::parse(&s).ok_or_else(|| format!("--state: pending, delivered or dead, not `{s}`"))?,
                );
            }
            let rows = admin.alerts(&query).await?;
            header();
            rows.iter().for_each(line);
            out!("{} alerts", rows.len());
        }
        AlertCommand::DeadLetters => {
            header();
            let (mut after, mut n) = (None, 0);
            loop {
                let page = admin.alert_dead_letters(after, 100).await?;
                let Some(last) = page.last() else { break };
                after = Some(last.key.clone());
                n += page.len();
                page.iter().for_each(line);
            }
            out!("{n} dead letters");
        }
        AlertCommand::Retry { id } => match admin.retry_alert(&id).await? {
            0 => return Err(format!("alert `{id}` has no dead letter (pending or delivered, or no such alert)").into()),
            n => out!("alert `{id}` is pending again ({n} destinations): delivered by the next pass of a node"),
        },
    }
    Ok(())
}
