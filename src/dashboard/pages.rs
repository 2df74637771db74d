//! Each page's HTML, from its data ([`super::data`]).

use super::data::{
    AlertsData, AuditData, BillingData, ListView, MoneyData, NodeData, OverviewData, PlansData, Reversal, RouteView,
    Sort, TenantData, TenantsData, TopTenant, HOURS, LEDGER_HOURS, MONEY_WINDOW, ROWS, STATES, WINDOW,
};
use super::html::{Esc, Frame, Minor, Money, Num, Page, Seg, Unit, When, Wrap};
use crate::{
    base::Period,
    store::{AuditRecord, OutboxEntry},
};

/// The query of `view` (`plan=…&state=…&sort=…`, percent-encoded; empty for the plain list).
pub(crate) fn view_query(view: &ListView) -> String {
    let mut pairs: Vec<String> = Vec::new();
    if let Some(plan) = &view.plan {
        pairs.push(format!("plan={}", Seg(plan)));
    }
    if let Some(state) = view.state {
        pairs.push(format!("state={}", Seg(state)));
    }
    if view.sort != Sort::Id {
        pairs.push(format!("sort={}", view.sort.name()));
    }
    pairs.join("&")
}

/// The address of the list with `view` (and a search's text), `after` where it starts.
fn list_href(base: &str, search: Option<&str>, view: &ListView, after: Option<&str>) -> String {
    let mut pairs: Vec<String> = Vec::new();
    if let Some(q) = search {
        pairs.push(format!("q={}", Seg(q)));
    }
    let view = view_query(view);
    if !view.is_empty() {
        pairs.push(view);
    }
    if let Some(after) = after {
        pairs.push(format!("after={}", Seg(after)));
    }
    match pairs.is_empty() {
        true => format!("{base}/tenants"),
        false => format!("{base}/tenants?{}", pairs.join("&")),
    }
}

/// The tenants page.
pub(crate) fn tenants(base: &str, frame: Frame, data: &TenantsData) -> String {
    let mut p = Page::new(base, "Tenants", "/tenants", frame);
    let text = data.search.as_ref().map_or("", |s| s.text.as_str());
    let search = data.search.as_ref().map(|s| s.text.as_str());
    let view = &data.view;
    p.fmt(format_args!(
        "<form class=\"search\" method=\"post\" action=\"{}/search\"><input type=\"search\" name=\"q\" value=\"{}\" \
         maxlength=\"128\" placeholder=\"tenant id, billing customer or key prefix (tg_live_…)\" \
         aria-label=\"search\"><button type=\"submit\">Search</button></form>",
        Esc(base),
        Esc(text)
    ));
    // The filter and the order: a form of the address (GET), no script.
    p.fmt(format_args!("<form class=\"view\" method=\"get\" action=\"{}/tenants\">", Esc(base)));
    if let Some(q) = search {
        p.fmt(format_args!("<input type=\"hidden\" name=\"q\" value=\"{}\">", Esc(q)));
    }
    p.raw("<label>plan <select name=\"plan\"><option value=\"\">any</option>");
    let mut plans: Vec<&str> = data.plans.iter().map(String::as_str).collect();
    if let Some(asked) = view.plan.as_deref().filter(|a| !plans.contains(a)) {
        plans.push(asked);
    }
    for plan in plans {
        let selected = if view.plan.as_deref() == Some(plan) { " selected" } else { "" };
        p.fmt(format_args!("<option value=\"{}\"{selected}>{}</option>", Esc(plan), Esc(plan)));
    }
    p.raw("</select></label> <label>state <select name=\"state\"><option value=\"\">any</option>");
    for state in STATES {
        let selected = if view.state == Some(state) { " selected" } else { "" };
        p.fmt(format_args!("<option value=\"{state}\"{selected}>{state}</option>"));
    }
    p.raw("</select></label> <label>sort <select name=\"sort\">");
    for sort in Sort::ALL {
        let selected = if view.sort == sort { " selected" } else { "" };
        p.fmt(format_args!("<option value=\"{}\"{selected}>{}</option>", sort.name(), sort.label()));
    }
    p.raw("</select></label> <button type=\"submit\">Show</button></form>");
    if let Some(s) = &data.search {
        p.fmt(format_args!("<p class=\"found\">{} found for <q>{}</q>", Num(data.rows.len() as u64), Esc(&s.text)));
        if s.scanned > 0 {
            p.fmt(format_args!("; the keys of {} tenants read", Num(s.scanned as u64)));
        }
        if s.cut {
            p.raw(" (the scan stopped there: the next page reads on)");
        }
        p.raw("</p>");
    }
    if let Some((read, matched)) = data.window {
        p.fmt(format_args!(
            "<p class=\"window\">{} of the {} tenants read match, {} (a page reads at most {} tenants in id \
             order",
            Num(matched as u64),
            Num(read as u64),
            view.sort.label(),
            Num(WINDOW as u64)
        ));
        p.raw(")</p>");
    }
    // Each heading orders the list by its column.
    let heading = |p: &mut Page, sort: Sort, name: &str| {
        let to = ListView { sort, ..view.clone() };
        let current = match (view.sort == sort, sort) {
            (false, _) => "",
            (true, Sort::Refusals) => " aria-sort=\"descending\"",
            (true, _) => " aria-sort=\"ascending\"",
        };
        p.fmt(format_args!("<th{current}><a href=\"{}\">{name}</a></th>", Esc(&list_href(base, search, &to, None))));
    };
    p.raw("<table class=\"tenants\"><thead><tr>");
    heading(&mut p, Sort::Id, "tenant");
    heading(&mut p, Sort::Plan, "plan");
    p.raw("<th>billing customer</th>");
    heading(&mut p, Sort::Balance, "balance left");
    heading(&mut p, Sort::Refusals, "refused today");
    heading(&mut p, Sort::State, "state");
    p.raw("</tr></thead><tbody>");
    for row in &data.rows {
        let r = &row.record;
        p.fmt(format_args!(
            "<tr><td><a class=\"tenant\" href=\"{}/tenants/{}\">{}</a>",
            Esc(base),
            Seg(r.id.as_str()),
            Esc(r.id.as_str())
        ));
        if let Some(why) = &row.why {
            p.fmt(format_args!(" <small>({})</small>", Esc(why)));
        }
        p.fmt(format_args!(
            "</td><td class=\"plan\">{}</td><td>{}</td><td class=\"balance\">",
            Esc(r.plan.as_str()),
            Esc(r.customer.as_deref().or(r.metronome_customer.as_deref()).unwrap_or("-"))
        ));
        if row.balances.is_empty() {
            p.raw("-");
        }
        for (meter, left, granted) in &row.balances {
            p.fmt(format_args!("<span>{} {} left of {}</span> ", Esc(meter.as_str()), Num(*left), Num(*granted)));
        }
        p.raw("</td>");
        match row.refusals {
            Some(n) => p.fmt(format_args!("<td class=\"refusals n\">{}</td>", Num(n))),
            None => p.raw("<td class=\"refusals n\" title=\"the tallies could not be read\">?</td>"),
        };
        p.fmt(format_args!("<td class=\"state\">{}</td></tr>", Esc(row.state)));
    }
    if data.rows.is_empty() {
        p.raw("<tr><td colspan=\"6\">no tenant</td></tr>");
    }
    p.raw("</tbody></table>");
    if let Some(next) = &data.next {
        let label = if data.window.is_some() { "next tenants" } else { "next page" };
        p.fmt(format_args!(
            "<p><a rel=\"next\" href=\"{}\">{label}</a></p>",
            Esc(&list_href(base, search, view, Some(next.as_str())))
        ));
    }
    p.finish()
}

/// One tenant's page.
pub(crate) fn tenant(base: &str, frame: Frame, d: &TenantData) -> String {
    let r = &d.record;
    let mut p = Page::new(base, r.id.as_str(), "", frame);
    p.raw("<section class=\"facts\"><dl>");
    p.fmt(format_args!("<dt>plan</dt><dd class=\"plan\">{}", Esc(r.plan.as_str())));
    if !d.plan_known {
        p.raw(" <strong>(not in the configuration)</strong>");
    }
    p.fmt(format_args!(
        "</dd><dt>billing customer</dt><dd class=\"customer\">{}</dd><dt>Metronome customer</dt><dd>{}</dd>\
         <dt>last billing event</dt><dd>{}</dd><dt>overrides</dt><dd><code>{}</code></dd></dl></section>",
        Esc(r.customer.as_deref().unwrap_or("-")),
        Esc(r.metronome_customer.as_deref().unwrap_or("-")),
        When(r.last_event_at),
        Esc(r.overrides.as_deref().unwrap_or("-"))
    ));
    p.raw("<section><h2>Quotas and balances</h2>");
    if d.gauges.is_empty() {
        p.raw("<p>no quota on its plan</p>");
    }
    for g in &d.gauges {
        if g.meter.as_str() == crate::base::SPEND_METER {
            // Money: the spend cap's figures in the currency, not in nano-units.
            let currency = d.currency.as_deref();
            let caption = format!(
                "spend per {} ({}), {} kept unspent by nodes, {} to {}",
                g.period.name(),
                if g.mode == crate::base::QuotaMode::Hard { "hard" } else { "soft" },
                Money(g.kept, currency),
                When(Some(g.start)),
                When(Some(g.end))
            );
            p.raw("<div class=\"meter-spend\">");
            p.gauge_shown("quota", (g.used, Money(g.used, currency)), (g.limit, Money(g.limit, currency)), &caption);
            p.raw("</div>");
            continue;
        }
        let caption = match g.period {
            Period::Prepaid => format!("{} balance, {} kept unspent by nodes", g.meter, g.kept),
            _ => format!(
                "{} per {} ({}), {} kept unspent by nodes, {} to {}",
                g.meter,
                g.period.name(),
                if g.mode == crate::base::QuotaMode::Hard { "hard" } else { "soft" },
                g.kept,
                When(Some(g.start)),
                When(Some(g.end))
            ),
        };
        let class = if g.period == Period::Prepaid { "balance" } else { "quota" };
        p.fmt(format_args!("<div class=\"meter-{}\">", Esc(g.meter.as_str())));
        p.gauge(class, g.used, g.limit, &caption);
        p.raw("</div>");
    }
    match &d.route {
        Some(RouteView::Read(quotas)) if !quotas.is_empty() => {
            // The figures of its usage route (`GET /v1/usage`), which support staff compare.
            p.raw(
                "</section><section><h2>As its usage route reads them</h2><table class=\"route\"><thead><tr>\
                 <th>meter</th><th>period</th><th>used</th><th>held</th><th>remaining</th><th>limit</th></tr></thead>\
                 <tbody>",
            );
            for q in quotas {
                p.fmt(format_args!(
                    "<tr data-meter=\"{}\"><td>{}</td><td>{}</td><td class=\"n used\">{}</td><td class=\"n\">{}</td>\
                     <td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                    Esc(q.meter.as_str()),
                    Esc(q.meter.as_str()),
                    q.period.name(),
                    Num(q.used),
                    Num(q.held),
                    Num(q.remaining),
                    Num(q.limit)
                ));
            }
            p.raw(
                "</tbody></table><p class=\"note\">Read now on this node, as the route reads them (the route \
                 answers a view up to a second old, a minute when the node's budget of views is spent): a \
                 period's usage as flushed by the fleet and not yet flushed here; a balance's units taken by \
                 the fleet, less what this node keeps. The gauges above count what every node keeps unspent \
                 apart.</p>",
            );
        }
        Some(RouteView::NotHeld) => {
            p.raw(
                "</section><section><h2>As its usage route reads them</h2><p class=\"note\">This node holds no state \
             of the tenant (it has not served it lately): the page reads none, so that it never makes a tenant \
             resident. Its own usage route reads it afresh.</p>",
            );
        }
        Some(RouteView::Failed) => {
            p.raw(
                "</section><section><h2>As its usage route reads them</h2><p class=\"note error\">The store did not \
             answer: its usage route's figures could not be read.</p>",
            );
        }
        _ => {}
    }
    p.raw("</section><section><h2>Usage</h2>");
    if d.hourly.is_empty() && d.daily.is_empty() {
        p.raw("<p>no usage in the days read</p>");
    }
    fn unit<'a>(meter: &'a crate::base::MeterId, currency: Option<&'a str>) -> Unit<'a> {
        match meter.as_str() {
            crate::base::SPEND_METER => Unit::Money(currency),
            name => Unit::Count(name),
        }
    }
    for (meter, bars) in &d.hourly {
        p.chart(
            "hourly",
            &format!("{meter}, per hour, last {HOURS} hours (UTC)"),
            bars,
            3600,
            unit(meter, d.currency.as_deref()),
            None,
        );
    }
    for (meter, bars) in &d.daily {
        // A daily quota's limit in force is each day's bar's limit.
        let limit = d.gauges.iter().find(|g| g.meter == *meter && g.period == Period::Day).map(|g| g.limit);
        let label = format!("{meter}, per day, last {} days (UTC)", bars.len());
        p.chart("daily", &label, bars, 86_400, unit(meter, d.currency.as_deref()), limit);
    }
    for b in &d.breakdowns {
        // A meter with dimensions: its series, the most used first.
        p.fmt(format_args!(
            "<h3>{} by {}</h3><table class=\"breakdown\" data-meter=\"{}\"><thead><tr>",
            Esc(b.meter.as_str()),
            Esc(&b.dimensions.join(" and ")),
            Esc(b.meter.as_str())
        ));
        for name in &b.dimensions {
            p.fmt(format_args!("<th>{}</th>", Esc(name)));
        }
        let read = match b.span {
            s if s > 2 * 86_400 => format!("the last {} days", (s + 86_399) / 86_400),
            s => format!("the last {} hours", ((s + 3_599) / 3_600).max(1)),
        };
        p.fmt(format_args!("<th>windows started in the last 24 hours</th><th>{read}</th></tr></thead><tbody>"));
        for (values, day, all) in &b.series {
            p.raw("<tr>");
            for v in values {
                p.fmt(format_args!("<td>{}</td>", Esc(v)));
            }
            p.fmt(format_args!("<td class=\"n\">{}</td><td class=\"n\">{}</td></tr>", Num(*day), Num(*all)));
        }
        p.raw("</tbody></table>");
        if b.total > b.series.len() {
            p.fmt(format_args!(
                "<p class=\"cut\">the {} most used of {} series</p>",
                Num(b.series.len() as u64),
                Num(b.total as u64)
            ));
        }
    }
    p.raw(
        "</section><section><h2>API keys</h2><table class=\"keys\"><thead><tr><th>id</th><th>prefix</th>\
         <th>created</th><th>expires</th></tr></thead><tbody>",
    );
    for k in &d.keys {
        p.fmt(format_args!(
            "<tr><td>{}</td><td class=\"prefix\"><code>{}…</code></td><td>{}</td><td>{}</td></tr>",
            Esc(&k.id),
            Esc(&k.prefix),
            When(Some(k.created_at)),
            When(k.expires_at)
        ));
    }
    if d.keys.is_empty() {
        p.raw("<tr><td colspan=\"4\">no key</td></tr>");
    }
    p.raw("</tbody></table></section>");
    if !d.grants.is_empty() {
        p.raw(
            "<section><h2>Credit grants</h2><table class=\"grants\"><thead><tr><th>meter</th><th>grant</th>\
             <th>units</th><th>bought</th><th>refunded</th><th>granted</th><th>expires</th><th>closed</th></tr>\
             </thead><tbody>",
        );
        for g in &d.grants {
            p.fmt(format_args!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                Esc(g.meter.as_str()),
                Esc(&g.id),
                Num(g.units),
                Num(g.bought),
                Num(g.refunded),
                When(Some(g.granted_at)),
                When(g.expires_at),
                Esc(&g.closed.as_ref().map_or_else(|| "open".to_owned(), |c| format!("{c:?}")))
            ));
        }
        p.raw("</tbody></table>");
        if d.grants_total > d.grants.len() {
            p.fmt(format_args!(
                "<p class=\"cut\">the first {} of {} grants, open ones first</p>",
                Num(d.grants.len() as u64),
                Num(d.grants_total as u64)
            ));
        }
        p.raw("</section>");
    }
    if let Some(cap) = &d.cap {
        p.fmt(format_args!(
            "<section><h2>Spend cap</h2><p class=\"cap\">{} {} ({}), the plan's {}; the tenant's own: {}</p></section>",
            Esc(&cap.currency),
            Esc(&crate::base::amount_of(cap.limit).to_string()),
            if cap.hard { "hard" } else { "soft" },
            Esc(&crate::base::amount_of(cap.plan_limit).to_string()),
            Esc(&cap.own.map_or_else(|| "none".to_owned(), |c| crate::base::amount_of(c.limit).to_string()))
        ));
    }
    p.raw("<section><h2>Changes</h2>");
    match &d.changes {
        Ok(changes) => {
            audit_table(&mut p, base, changes, false);
            p.fmt(format_args!(
                "<p><a href=\"{base}/audit?tenant={}\">every change of {}</a></p>",
                Seg(r.id.as_str()),
                Esc(r.id.as_str())
            ));
        }
        Err(e) => {
            p.fmt(format_args!("<p class=\"error\">Not read: {}</p>", Esc(e)));
        }
    }
    p.raw("</section>");
    if let Some(grace) = &d.past_due {
        p.fmt(format_args!("<section><h2>Past due</h2><p class=\"past-due\">{}</p></section>", Esc(&grace.line())));
    }
    if let Some(tier) = &d.tier {
        p.fmt(format_args!("<section><h2>Tier</h2><p class=\"tier\">{}</p></section>", Esc(&tier.line())));
    }
    for view in &d.recharges {
        p.fmt(format_args!("<section><h2>Auto-recharge of {}</h2><dl class=\"recharge\">", Esc(view.meter.as_str())));
        if let serde_json::Value::Object(fields) = view.to_json() {
            for (k, v) in fields {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                p.fmt(format_args!("<dt>{}</dt><dd>{}</dd>", Esc(&k), Esc(&v)));
            }
        }
        p.raw("</dl></section>");
    }
    p.raw("<section><h2>Requests today, the whole fleet</h2><table class=\"today\"><tbody>");
    match &d.today {
        Ok(Some(t)) => {
            for (outcome, n) in &t.counts {
                if outcome == crate::store::TALLY_SPENT {
                    p.fmt(format_args!(
                        "<tr data-outcome=\"spent\"><td>money spent</td><td class=\"n\">{}</td></tr>",
                        Money(*n, d.currency.as_deref())
                    ));
                } else if outcome == crate::store::TALLY_PAID {
                    p.fmt(format_args!(
                        "<tr data-outcome=\"paid\"><td>money paid</td><td class=\"n\">{}</td></tr>",
                        Minor(*n, d.currency.as_deref())
                    ));
                } else {
                    p.fmt(format_args!(
                        "<tr data-outcome=\"{0}\"><td>{0}</td><td class=\"n\">{1}</td></tr>",
                        Esc(outcome),
                        Num(*n)
                    ));
                }
            }
        }
        Ok(None) => {
            p.raw("<tr><td colspan=\"2\">no request today</td></tr>");
        }
        Err(e) => {
            p.fmt(format_args!("<tr><td colspan=\"2\" class=\"error\">not read: {}</td></tr>", Esc(e)));
        }
    }
    p.raw("</tbody></table></section>");
    if let Some((kinds, since)) = &d.rejections {
        p.raw("<section><h2>Recent rejections on this node</h2>");
        match since {
            Some(since) => p.fmt(format_args!(
                "<p>among this node's last {} refusals of identified tenants, since {} UTC</p>",
                Num(crate::engine::Tollgate::RECENT_REJECTIONS as u64),
                When(Some(*since))
            )),
            None => p.raw("<p>this node refused no identified tenant since it started</p>"),
        };
        p.raw("<table class=\"rejections\"><tbody>");
        for (kind, n) in kinds {
            p.fmt(format_args!("<tr><td>{}</td><td class=\"n\">{}</td></tr>", Esc(kind.label()), Num(*n)));
        }
        if kinds.is_empty() {
            p.raw("<tr><td colspan=\"2\">none</td></tr>");
        }
        p.raw("</tbody></table></section>");
    }
    p.finish()
}

/// A tenant's id, linked to its page (escaped: the id and the base).
struct TenantLink<'a>(&'a str, &'a str);

impl std::fmt::Display for TenantLink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<a class=\"tenant\" href=\"{}/tenants/{}\">{}</a>", Esc(self.0), Seg(self.1), Esc(self.1))
    }
}

/// A tenant's id, linked to its page, as a cell.
fn tenant_cell(p: &mut Page, base: &str, id: &str) {
    p.fmt(format_args!("<td>{}</td>", TenantLink(base, id)));
}

/// The money page: spend against caps, balances and their grants, recharges, payments with
/// their refunds and disputes, and what grants lost to them, each row linked to its tenant.
pub(crate) fn money(base: &str, frame: Frame, d: &MoneyData) -> String {
    let mut p = Page::new(base, "Money", "/money", frame);
    let currency = d.currency.as_deref();
    p.fmt(format_args!(
        "<p class=\"note\">The money of {} tenants read in id order (at most {MONEY_WINDOW} a page){}. Amounts in {}.</p>",
        Num(d.read as u64),
        if d.next.is_some() { ", more after them" } else { "" },
        Esc(&currency.map_or_else(|| "two decimals (no [billing] currency)".to_owned(), str::to_ascii_uppercase))
    ));
    if d.payments_read {
        p.fmt(format_args!(
            "<p class=\"paid-today\">paid today (UTC) by these {} tenants: <strong>{}</strong> in {} payments, \
             before refunds and disputes</p>",
            Num(d.read as u64),
            Minor(d.paid_today.1, currency),
            Num(d.paid_today.0 as u64)
        ));
    }
    if !d.unreadable.is_empty() {
        p.raw("<section><h2>Not read</h2><ul class=\"unreadable\">");
        for (tenant, why) in d.unreadable.iter().take(ROWS) {
            p.fmt(format_args!(
                "<li><a class=\"tenant\" href=\"{}/tenants/{}\">{}</a>: {}</li>",
                Esc(base),
                Seg(tenant.as_str()),
                Esc(tenant.as_str()),
                Esc(why)
            ));
        }
        p.raw("</ul></section>");
    }
    p.fmt(format_args!(
        "<section><h2>Spend against caps ({})</h2><table class=\"spend\"><thead><tr><th>tenant</th><th>plan</th>\
         <th>period</th><th>spent</th><th>cap</th><th>used</th><th>cap in force</th></tr></thead><tbody>",
        count(d.spend.len())
    ));
    for r in d.spend.iter().take(ROWS) {
        p.raw("<tr>");
        tenant_cell(&mut p, base, r.tenant.as_str());
        let share = if r.cap == 0 { 100 } else { u128::from(r.spent) * 100 / u128::from(r.cap) };
        p.fmt(format_args!(
            "<td class=\"plan\">{}</td><td>{}</td><td class=\"n spent\">{}</td><td class=\"n cap\">{}</td>\
             <td class=\"n\">{}%</td><td>{}, {}</td></tr>",
            Esc(r.plan.as_str()),
            r.period.name(),
            Money(r.spent, currency),
            Money(r.cap, currency),
            share,
            if r.hard { "hard" } else { "soft" },
            if r.own { "the tenant's own" } else { "the plan's" }
        ));
    }
    if d.spend.is_empty() {
        p.raw("<tr><td colspan=\"7\">no spend cap among them</td></tr>");
    }
    p.fmt(format_args!(
        "</tbody></table></section><section><h2>Balances ({})</h2><table class=\"balances\"><thead><tr>\
         <th>tenant</th><th>meter</th><th>left</th><th>granted</th><th>open grants</th><th>soonest expiry</th>\
         <th>last granted</th></tr></thead><tbody>",
        count(d.balances.len())
    ));
    for r in d.balances.iter().take(ROWS) {
        p.raw("<tr>");
        tenant_cell(&mut p, base, r.tenant.as_str());
        p.fmt(format_args!(
            "<td>{}</td><td class=\"n left\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td>\
             <td>{}</td></tr>",
            Esc(r.meter.as_str()),
            Num(r.left),
            Num(r.granted),
            Num(r.open as u64),
            When(r.expires),
            When(r.last)
        ));
    }
    if d.balances.is_empty() {
        p.raw("<tr><td colspan=\"7\">no prepaid balance among them</td></tr>");
    }
    p.fmt(format_args!(
        "</tbody></table></section><section><h2>Recharges ({})</h2><table class=\"recharges\"><thead><tr>\
         <th>tenant</th><th>meter</th><th>state</th><th>below, to</th><th>this month (open or paid)</th>\
         <th>failures</th><th>last</th></tr></thead><tbody>",
        count(d.recharges.len())
    ));
    for v in d.recharges.iter().take(ROWS) {
        let c = Some(v.currency.as_str()).filter(|c| !c.is_empty()).or(currency);
        let state = match (&v.state.open, v.off_reason()) {
            (Some(open), _) => format!(
                "open: recharge {} of {} packs, {}, since {}{}",
                open.n,
                open.packs,
                Minor(open.amount, c),
                When(Some(open.claimed_at)),
                if open.processing { " (payment processing)" } else { "" }
            ),
            (None, Some(why)) => format!("off: {why}"),
            (None, None) => "on".to_owned(),
        };
        let (below, to, limit) = match &v.state.setting {
            Some(s) => (s.below, s.to, s.monthly_limit),
            None => (v.plan.below, v.plan.to, v.plan.monthly_limit),
        };
        p.fmt(format_args!("<tr class=\"recharge-{}\">", MoneyData::recharge_rank(v)));
        tenant_cell(&mut p, base, v.tenant.as_str());
        p.fmt(format_args!(
            "<td>{}</td><td class=\"state\">{}</td><td>{}, {}</td><td>{} recharges, {} of {}</td><td>{}</td>\
             <td class=\"last\">{}</td></tr>",
            Esc(v.meter.as_str()),
            Esc(&state),
            Num(below),
            Num(to),
            v.month_count,
            Minor(v.month_spent, c),
            Minor(limit, c),
            match v.state.failures {
                0 => "-".to_owned(),
                n => format!("{n} in a row, the last at {}", When(Some(v.state.failed_at))),
            },
            Esc(&recharge_last(&v.state, c))
        ));
    }
    if d.recharges.is_empty() {
        p.raw("<tr><td colspan=\"6\">no recharge among them</td></tr>");
    }
    p.fmt(format_args!(
        "</tbody></table></section><section><h2>Refunds, disputes and credits ({})</h2><table class=\"reversals\">\
         <thead><tr><th>tenant</th><th>what</th><th>of</th><th>taken back</th><th>details</th></tr></thead><tbody>",
        count(d.reversals.len())
    ));
    for (tenant, r) in d.reversals.iter().take(ROWS) {
        p.raw("<tr>");
        tenant_cell(&mut p, base, tenant.as_str());
        match r {
            Reversal::Payment { payment, amount, at, refunded, disputes } => {
                let mut details = Vec::new();
                for dp in disputes {
                    let step = match (dp.withdrawn, dp.reinstated) {
                        (_, true) => "won: funds reinstated",
                        (true, false) => "funds withdrawn",
                        (false, false) => "opened",
                    };
                    details.push(format!("dispute {} of {}: {step}", dp.id, Minor(dp.amount, currency)));
                }
                let disputed = disputes
                    .iter()
                    .filter(|d| d.withdrawn && !d.reinstated)
                    .fold(0u64, |sum, d| sum.saturating_add(d.amount));
                // What it no longer counts: never more than it paid (a payment not seen yet: its
                // reversals as told).
                let taken = match amount {
                    0 => refunded.saturating_add(disputed),
                    _ => refunded.saturating_add(disputed).min(*amount),
                };
                p.fmt(format_args!(
                    "<td>payment <code>{}</code>, {}</td><td class=\"n\">{}</td><td class=\"n taken\">{}</td>\
                     <td>{}{}</td>",
                    Esc(payment),
                    When(Some(*at)),
                    match amount {
                        0 => "not seen yet".to_owned(),
                        _ => Minor(*amount, currency).to_string(),
                    },
                    Minor(taken, currency),
                    if *refunded > 0 { format!("refunded {}", Minor(*refunded, currency)) } else { String::new() },
                    Esc(&match (refunded, details.is_empty()) {
                        (0, _) => details.join("; "),
                        (_, true) => String::new(),
                        _ => format!("; {}", details.join("; ")),
                    })
                ));
            }
            Reversal::Grant { meter, grant, bought, refunded, takes } => {
                // Lost: what its refunds took, and each take's units less those a reversed take
                // gave back.
                let removed = takes.iter().fold(*refunded, |sum, t| {
                    sum.saturating_add(if t.given_back { t.removed.saturating_sub(t.unspent) } else { t.removed })
                });
                let details: Vec<String> = takes
                    .iter()
                    .map(|t| {
                        // Stripe's dispute ids; any other take is a credit line's (a proration).
                        let what =
                            if t.id.starts_with("dp_") || t.id.starts_with("du_") { "dispute" } else { "credit" };
                        format!(
                            "{what} {}: {} units{}",
                            t.id,
                            Num(t.units),
                            if t.given_back { ", given back" } else { "" }
                        )
                    })
                    .chain((*refunded > 0).then(|| format!("refunds: {} units", Num(*refunded))))
                    .collect();
                p.fmt(format_args!(
                    "<td>grant <code>{}</code> of {}</td><td class=\"n\">{} units</td><td class=\"n taken\">{} units</td>\
                     <td>{}</td>",
                    Esc(grant),
                    Esc(meter.as_str()),
                    Num(*bought),
                    Num(removed),
                    Esc(&details.join("; "))
                ));
            }
        }
        p.raw("</tr>");
    }
    if d.reversals.is_empty() {
        p.raw("<tr><td colspan=\"5\">none among them</td></tr>");
    }
    p.raw("</tbody></table></section>");
    if !d.payments_read {
        p.raw("<p class=\"note\">No <code>[stripe]</code>: no payment is recorded, so none is listed.</p>");
    }
    if let Some(next) = &d.next {
        p.fmt(format_args!(
            "<p><a rel=\"next\" href=\"{}/money?after={}\">next tenants</a></p>",
            Esc(base),
            Seg(next.as_str())
        ));
    }
    p.finish()
}

/// A recharge's last outcomes: one waiting for the customer (3-D Secure), the last closed
/// unpaid, the last paid.
fn recharge_last(state: &crate::store::RechargeState, currency: Option<&str>) -> String {
    let mut out = Vec::new();
    if let Some(action) = &state.action {
        out.push(format!(
            "recharge {} of {} waits for the customer (3-D Secure) since {}",
            action.n,
            Minor(action.amount, currency),
            When(Some(action.at))
        ));
    }
    if let Some(unpaid) = &state.unpaid {
        out.push(format!(
            "recharge {} of {} closed unpaid{}",
            unpaid.n,
            Minor(unpaid.amount, currency),
            if state.unpaid_failed { " (its payment failed)" } else { "" }
        ));
    }
    if state.paid > 0 {
        out.push(format!("recharge {} paid", state.paid));
    }
    if out.is_empty() {
        return "-".to_owned();
    }
    out.join("; ")
}

/// The billing page.
pub(crate) fn billing(base: &str, frame: Frame, d: &BillingData) -> String {
    let mut p = Page::new(base, "Billing", "/billing", frame);
    p.fmt(format_args!("<p>sink: <strong class=\"sink\">{}</strong></p>", Esc(&d.sink)));
    p.fmt(format_args!(
        "<section><h2>Windows pending export ({})</h2><table class=\"pending\"><thead><tr><th>tenant</th><th>meter</th>\
         <th>window (UTC)</th><th>quantity</th><th>exported</th><th>in flight</th><th>attempts</th></tr></thead><tbody>",
        count(d.pending.len())
    ));
    for a in d.pending.iter().take(ROWS) {
        p.fmt(format_args!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td></tr>",
            TenantLink(base, a.key.tenant.as_str()),
            Esc(a.key.meter.as_str()),
            When(Some(a.key.window_start)),
            Num(a.quantity),
            Num(a.exported),
            a.in_flight.map_or_else(|| "-".to_owned(), |q| Num(q).to_string()),
            a.attempts
        ));
    }
    p.fmt(format_args!(
        "</tbody></table></section><section><h2>Dead letters ({})</h2><table class=\"dead\"><thead><tr><th>tenant</th>\
         <th>meter</th><th>window (UTC)</th><th>units</th><th>reason</th></tr></thead><tbody>",
        count(d.dead.len())
    ));
    for l in d.dead.iter().take(ROWS) {
        p.fmt(format_args!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"reason\">{}</td></tr>",
            TenantLink(base, l.key.tenant.as_str()),
            Esc(l.key.meter.as_str()),
            When(Some(l.key.window_start)),
            Num(l.units),
            Esc(&l.reason)
        ));
    }
    p.fmt(format_args!(
        "</tbody></table></section><section><h2>Lacking in the billing system ({})</h2><p>what reconciliation found \
         the billing system's hourly totals lacking, in the last {LEDGER_HOURS} hours</p><table class=\"lacking\">\
         <thead><tr><th>hour (UTC)</th><th>tenant</th><th>meter</th><th>window (UTC)</th><th>value</th>\
         <th>lacking since</th></tr></thead><tbody>",
        count(d.lacking.len())
    ));
    for e in d.lacking.iter().take(ROWS) {
        p.fmt(format_args!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            When(Some(e.hour())),
            TenantLink(base, e.key.tenant.as_str()),
            Esc(e.key.meter.as_str()),
            When(Some(e.key.window_start)),
            Num(e.send.value),
            When(e.lacking_since)
        ));
    }
    p.raw("</tbody></table>");
    if d.lacking_cut {
        p.fmt(format_args!(
            "<p class=\"cut\">the scan stopped after {} ledger entries: older hours were not read</p>",
            Num(crate::admin::LEDGER_SCAN as u64)
        ));
    }
    p.raw("</section>");
    p.finish()
}

/// A table's count, `100+` when there are more than it shows.
fn count(n: usize) -> String {
    if n > ROWS {
        format!("{ROWS}+")
    } else {
        n.to_string()
    }
}

/// The alerts page.
pub(crate) fn alerts(base: &str, frame: Frame, d: &AlertsData) -> String {
    let mut p = Page::new(base, "Alerts", "/alerts", frame);
    for (title, class, rows) in [
        ("Pending", "pending", &d.pending),
        ("Delivered", "delivered", &d.delivered),
        ("Dead letters", "dead", &d.dead),
    ] {
        p.fmt(format_args!(
            "<section><h2>{title} ({})</h2><table class=\"alerts {class}\"><thead><tr><th>alert</th><th>tenant</th>\
             <th>event</th><th>destination</th><th>written</th><th>attempts</th><th>last error</th></tr></thead><tbody>",
            count(rows.len())
        ));
        for a in rows.iter().take(ROWS) {
            alert_row(&mut p, base, a);
        }
        p.raw("</tbody></table></section>");
    }
    p.finish()
}

/// The audit's page: who changed which tenant's settings, from what to what, newest first, in
/// pages of [`AUDIT_ROWS`](super::data::AUDIT_ROWS).
pub(crate) fn audit(base: &str, frame: Frame, d: &AuditData) -> String {
    let mut p = Page::new(base, "Audit", "/audit", frame);
    match &d.tenant {
        Some(t) => {
            p.fmt(format_args!("<section><h2>Changes of {}</h2>", TenantLink(base, t)));
        }
        None => {
            p.raw("<section><h2>Changes to tenants' settings</h2>");
        }
    }
    audit_table(&mut p, base, &d.records, d.tenant.is_none());
    if let Some(next) = &d.next {
        let tenant = d.tenant.as_deref().map(|t| format!("tenant={}&", Seg(t))).unwrap_or_default();
        p.fmt(format_args!(
            "<p><a rel=\"next\" href=\"{base}/audit?{tenant}before={}\">older changes</a></p>",
            Seg(next)
        ));
    }
    p.raw(
        "<p>Kept 400 days, a tenant's newest 500; <code>tollgate audit [TENANT]</code> lists them too.</p></section>",
    );
    p.finish()
}

/// Changes as a table: when, (the tenant,) who, what, before and after.
fn audit_table(p: &mut Page, base: &str, records: &[AuditRecord], tenants: bool) {
    p.raw("<table class=\"audit\"><thead><tr><th>when (UTC)</th>");
    if tenants {
        p.raw("<th>tenant</th>");
    }
    p.raw("<th>who</th><th>what</th><th>before</th><th>after</th></tr></thead><tbody>");
    for r in records {
        p.fmt(format_args!("<tr><td class=\"when\">{}</td>", When(Some(r.at.div_euclid(1_000)))));
        if tenants {
            p.fmt(format_args!("<td>{}</td>", TenantLink(base, r.tenant.as_str())));
        }
        p.fmt(format_args!(
            "<td class=\"who\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            Wrap(&r.actor.to_string()),
            Esc(r.setting.as_str()),
            Wrap(r.before.as_deref().unwrap_or("-")),
            Wrap(r.after.as_deref().unwrap_or("-"))
        ));
    }
    if records.is_empty() {
        p.fmt(format_args!("<tr><td colspan=\"{}\">no change recorded</td></tr>", if tenants { 6 } else { 5 }));
    }
    p.raw("</tbody></table>");
}

/// The plans page: how many tenants are on each version of each plan.
pub(crate) fn plans(base: &str, frame: Frame, d: &PlansData) -> String {
    let mut p = Page::new(base, "Plans", "/plans", frame);
    p.raw(
        "<section><h2>Tenants per plan version</h2><table class=\"plans\"><thead><tr><th>plan</th><th>version</th>\
         <th>tenants</th><th></th></tr></thead><tbody>",
    );
    for (plan, version, n, note) in &d.rows {
        p.fmt(format_args!("<tr><td>{}</td><td>{version}</td><td>{n}</td><td>{}</td></tr>", Esc(plan), Esc(note)));
    }
    p.raw("</tbody></table>");
    if !d.complete {
        p.fmt(format_args!(
            "<p>Counted over the first {} tenants by id: the directory holds more (<code>tollgate plans versions</code> \
             counts up to 100,000).</p>",
            count(d.read)
        ));
    }
    p.raw(
        "<p>A tenant keeps the version it was put on; <code>tollgate plans migrate PLAN --from N --to M</code> moves \
         them.</p></section>",
    );
    p.finish()
}

fn alert_row(p: &mut Page, base: &str, a: &OutboxEntry) {
    // A tenant's own endpoint is named by its URL; its query may carry a token of the
    // receiver's: shown without it.
    let destination = a.key.destination.split(['?', '#']).next().unwrap_or("");
    p.fmt(format_args!(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        Wrap(&a.key.id),
        TenantLink(base, a.tenant.as_str()),
        Wrap(&a.event),
        Wrap(destination),
        When(Some(a.created_at)),
        a.attempts,
        Wrap(a.last_error.as_deref().unwrap_or("-"))
    ));
}

/// The node's page.
pub(crate) fn node(base: &str, frame: Frame, d: &NodeData) -> String {
    let mut p = Page::new(base, "Node", "/node", Frame { node: true, ..frame });
    health(&mut p, &d.health);
    p.raw("<section><h2>Open holds</h2>");
    p.fmt(format_args!(
        "<p class=\"holds\"><span class=\"n\">{}</span> holds open, holding {} units; {} expired, {} refused (full)</p>",
        Num(d.stats.holds_open),
        Num(d.stats.units_held),
        Num(d.stats.holds_expired),
        Num(d.stats.holds_refused_full)
    ));
    // The counters by what they are about, each named for a person, its field beside it.
    for (group, rows) in stat_groups(&d.stats, d.currency.as_deref()) {
        p.fmt(format_args!("</section><section><h2>{group}</h2><table class=\"stats\"><tbody>"));
        for row in rows {
            let warn = if row.warn && row.value != "0" { " class=\"warn\"" } else { "" };
            p.fmt(format_args!(
                "<tr{warn} data-field=\"{}\"><td>{}</td><td class=\"n\">{}</td><td class=\"field\"><code>{}</code></td></tr>",
                row.field,
                row.label,
                Esc(&row.value),
                row.field
            ));
        }
        p.raw("</tbody></table>");
    }
    p.raw("</section>");
    p.finish()
}

/// One of the node's counters as its page shows it.
#[derive(Debug)]
pub(crate) struct StatRow {
    /// What it counts, for a person.
    pub(crate) label: &'static str,
    /// Its field of [`Stats`](crate::metrics::Stats) (and so its documentation).
    pub(crate) field: &'static str,
    pub(crate) value: String,
    /// Whether a value above 0 needs a look (errors, losses, refusals of the node's own).
    pub(crate) warn: bool,
}

/// The node's counters in groups, every field of `Stats` once (a test checks it).
pub(crate) fn stat_groups(s: &crate::metrics::Stats, currency: Option<&str>) -> Vec<(&'static str, Vec<StatRow>)> {
    fn count<E>(n: Result<u64, E>) -> String {
        Num(n.unwrap_or(u64::MAX)).to_string()
    }
    macro_rules! row {
        ($label:expr, $field:ident) => {
            StatRow { label: $label, field: stringify!($field), value: count(u64::try_from(s.$field)), warn: false }
        };
        ($label:expr, $field:ident, warn) => {
            StatRow { label: $label, field: stringify!($field), value: count(u64::try_from(s.$field)), warn: true }
        };
    }
    let spend = StatRow {
        label: "money flushed",
        field: "flushed_spend_nanos",
        value: Money(s.flushed_spend_nanos, currency).to_string(),
        warn: false,
    };
    vec![
        (
            "Tenants and memory",
            vec![
                row!("tenants held", tracked_tenants),
                row!("tenants evicted", evictions),
                row!("rate buckets kept after eviction", held_rate_states),
                row!("rate buckets dropped at the cap", rate_states_dropped, warn),
                row!("client addresses held", tracked_clients),
                row!("anonymous requests without an address", anonymous_without_address),
                row!("unknown credentials answered from memory", negative_hits),
                row!("open dimension values known", open_values),
                row!("tenants served without their overrides", overrides_not_served, warn),
                row!("refusals shadow mode let through", shadow_would_refuse),
            ],
        ),
        (
            "Usage pipeline",
            vec![
                row!("flushes", flushes),
                row!("units flushed", flushed_units),
                spend,
                row!("flushes failed", flush_errors, warn),
                row!("flushes that found the buffer full", buffer_full, warn),
                row!("fail-open units dropped", dropped_units, warn),
                row!("give-backs not yet told to the store", give_backs_untold, warn),
            ],
        ),
        (
            "Store",
            vec![
                row!("request-path store calls failed", store_errors, warn),
                row!("store calls skipped after failures", store_fast_failures, warn),
            ],
        ),
        (
            "Holds",
            vec![
                row!("holds open", holds_open),
                row!("units held", units_held),
                row!("holds expired", holds_expired),
                row!("records after a hold was settled", records_after_settle),
                row!("holds refused (node full)", holds_refused_full, warn),
                row!("records beyond what was held", hold_overruns, warn),
            ],
        ),
        (
            "Idempotency",
            vec![
                row!("responses stored for replays", responses_stored),
                row!("responses not stored", responses_not_stored, warn),
                row!("response bytes buffered now", response_bytes_buffered),
            ],
        ),
        (
            "Usage events",
            vec![
                row!("events applied", events_applied),
                row!("events seen before", events_duplicate),
                row!("events refused", events_refused, warn),
                row!("events past a hard quota", events_past_limit, warn),
            ],
        ),
        (
            "Usage views",
            vec![
                row!("usage views refreshed", usage_refreshes),
                row!("usage views over the budget", usage_refreshes_refused, warn),
            ],
        ),
        (
            "Export and billing",
            vec![
                row!("meter events exported", exported_events),
                row!("units exported", exported_units),
                row!("dead letters", dead_letters, warn),
                row!("export retries", export_retries),
                row!("windows without a billing customer", unbillable_windows, warn),
                row!("windows waiting for a customer", waiting_windows),
                row!("exports unconfirmed", unconfirmed_exports, warn),
                row!("revisions exported late", late_revisions, warn),
                row!("meter errors from Stripe", meter_errors, warn),
            ],
        ),
        (
            "Webhooks",
            vec![
                row!("events applied", webhooks_applied),
                row!("events ignored", webhooks_ignored),
                row!("deliveries rejected", webhooks_rejected, warn),
                row!("payments that granted nothing", webhooks_not_credited, warn),
                row!("payments Stripe refused to read", webhooks_api_refused, warn),
            ],
        ),
        (
            "Recharges",
            vec![
                row!("claimed", recharges_claimed),
                row!("charged", recharges_charged),
                row!("paid", recharges_paid),
                row!("failed", recharges_failed, warn),
                row!("stopped by the month's limit", recharges_limited),
                row!("credited without invoice.paid", recharges_credited_unannounced, warn),
            ],
        ),
    ]
}

/// Each role's store health: how long its read took, or why it failed.
fn health(p: &mut Page, health: &[(&'static str, Result<std::time::Duration, String>)]) {
    p.raw("<section><h2>Store health</h2><table class=\"health\"><tbody>");
    for (role, result) in health {
        match result {
            Ok(took) => {
                p.fmt(format_args!("<tr><td>{role}</td><td class=\"ok\">answered in {} ms</td></tr>", took.as_millis()))
            }
            Err(e) => p.fmt(format_args!("<tr><td>{role}</td><td class=\"error\">{}</td></tr>", Esc(e))),
        };
    }
    p.raw("</tbody></table></section>");
}

/// A count read up to a bound of `ROWS + 1`: "more than ROWS" past it.
fn counted(n: usize) -> String {
    if n > ROWS {
        format!("more than {}", Num(ROWS as u64))
    } else {
        Num(n as u64).to_string()
    }
}

/// The overview, the dashboard's home.
pub(crate) fn overview(base: &str, frame: Frame, d: &OverviewData) -> String {
    let mut p = Page::new(base, "Overview", "/", frame);
    let currency = d.currency.as_deref();
    p.raw(
        "<section><h2>Requests, the whole fleet</h2><p class=\"note\">Every node's requests admitted and refused, \
         as each node's flush stores them (every <code>usage.flush_interval</code>), by the minute of the flush \
         for those admitted and of the refusal for those refused.</p>",
    );
    if let Some(why) = &d.unread {
        p.fmt(format_args!("<p class=\"note error\">The tallies could not be read: {}</p>", Esc(why)));
    }
    p.raw(
        "<table class=\"outcomes\"><thead><tr><th>outcome</th><th class=\"n\">last hour</th>\
         <th class=\"n\">last 24 hours</th></tr></thead><tbody>",
    );
    for s in &d.series {
        let (hour, day) = s.totals();
        p.fmt(format_args!(
            "<tr data-outcome=\"{0}\"><td>{0}</td><td class=\"n hour\">{1}</td><td class=\"n day\">{2}</td></tr>",
            Esc(s.group),
            Num(hour),
            Num(day)
        ));
    }
    p.fmt(format_args!(
        "<tr data-outcome=\"spent\"><td>money spent</td><td class=\"n hour\">{}</td><td class=\"n day\">{}</td></tr>",
        Money(d.spent.0, currency),
        Money(d.spent.1, currency)
    ));
    p.raw("</tbody></table>");
    for s in &d.series {
        let admitted = s.group == "admitted";
        let what = if admitted { "admitted".to_owned() } else { format!("refused: {}", s.group) };
        let (minutes, hours) = if admitted { ("minutes", "hours") } else { ("minutes refused", "hours refused") };
        p.raw("<div class=\"pair\">");
        p.chart(
            minutes,
            &format!("{what}, per minute, last hour (UTC)"),
            &s.minutes,
            60,
            Unit::Count("requests"),
            None,
        );
        p.chart(
            hours,
            &format!("{what}, per hour, last 24 hours (UTC)"),
            &s.hours,
            3600,
            Unit::Count("requests"),
            None,
        );
        p.raw("</div>");
    }
    p.raw("</section><section><h2>Top tenants today (UTC)</h2>");
    if d.tenants_cut {
        p.fmt(format_args!(
            "<p class=\"note\">Of the first {} tenants with requests today, in id order: the read stops there.</p>",
            Num(d.tenants_read as u64)
        ));
    }
    let link = |p: &mut Page, t: &TopTenant| {
        p.fmt(format_args!(
            "<td><a class=\"tenant\" href=\"{}/tenants/{}\">{}</a></td>",
            Esc(base),
            Seg(t.tenant.as_str()),
            Esc(t.tenant.as_str())
        ));
    };
    p.raw(
        "<h3>By requests admitted</h3><table class=\"top used\"><thead><tr><th>tenant</th><th class=\"n\">admitted</th>\
         <th class=\"n\">refused</th><th class=\"n\">spent</th></tr></thead><tbody>",
    );
    for t in &d.top_used {
        p.raw("<tr>");
        link(&mut p, t);
        p.fmt(format_args!(
            "<td class=\"n admitted\">{}</td><td class=\"n refused\">{}</td><td class=\"n spent\">{}</td></tr>",
            Num(t.admitted),
            Num(t.refused),
            Money(t.spent, currency)
        ));
    }
    if d.top_used.is_empty() {
        p.raw(match d.unread {
            Some(_) => "<tr><td colspan=\"4\" class=\"error\">not read</td></tr>",
            None => "<tr><td colspan=\"4\">no request admitted today</td></tr>",
        });
    }
    p.raw(
        "</tbody></table><h3>By requests refused</h3><table class=\"top refused\"><thead><tr><th>tenant</th>\
         <th class=\"n\">refused</th><th>mostly</th><th class=\"n\">admitted</th></tr></thead><tbody>",
    );
    for t in &d.top_refused {
        p.raw("<tr>");
        link(&mut p, t);
        p.fmt(format_args!(
            "<td class=\"n refused\">{}</td><td class=\"reason\">{}</td><td class=\"n admitted\">{}</td></tr>",
            Num(t.refused),
            Esc(t.reason.unwrap_or("-")),
            Num(t.admitted)
        ));
    }
    if d.top_refused.is_empty() {
        p.raw(match d.unread {
            Some(_) => "<tr><td colspan=\"4\" class=\"error\">not read</td></tr>",
            None => "<tr><td colspan=\"4\">no request refused today</td></tr>",
        });
    }
    p.raw("</tbody></table>");
    if d.unread.is_some() {
        p.raw("<p class=\"today error\">Today's money: not read.</p>");
    } else {
        p.fmt(format_args!(
            "<p class=\"today\">Today (since midnight UTC), the whole fleet: \
         <span class=\"spent-today\">{}</span> spent, <span class=\"paid-today\">{}</span> paid \
         (payments Stripe's webhooks delivered, before refunds and disputes).</p>",
            Money(d.spent_today, currency),
            Minor(d.paid_today, currency)
        ));
    }
    p.raw("</section><section><h2>Waiting for a look</h2><ul class=\"waiting\">");
    match &d.alerts {
        None => p.raw("<li>alerts: no alerts store</li>"),
        Some(Ok((pending, dead))) => p.fmt(format_args!(
            "<li class=\"alerts\"><a href=\"{}/alerts\">alerts</a>: {} waiting for delivery, {} dead</li>",
            Esc(base),
            counted(*pending),
            counted(*dead)
        )),
        Some(Err(e)) => p.fmt(format_args!("<li class=\"alerts error\">alerts: {}</li>", Esc(e))),
    };
    match &d.dead_letters {
        Some(Ok(n)) => p.fmt(format_args!(
            "<li class=\"dead\"><a href=\"{}/billing\">usage exports</a>: {} dead-lettered</li>",
            Esc(base),
            counted(*n)
        )),
        Some(Err(e)) => p.fmt(format_args!("<li class=\"dead error\">usage exports: {}</li>", Esc(e))),
        None => &mut p,
    };
    p.fmt(format_args!(
        "<li><a href=\"{}/money\">money</a>: payments today, recharges open and failed, refunds and disputes, \
         per tenant</li></ul></section>",
        Esc(base)
    ));
    health(&mut p, &d.health);
    p.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field of `Stats` is on the node's page once: a new counter cannot go unshown.
    #[test]
    fn the_node_page_groups_every_counter_once() {
        let stats = crate::metrics::Stats::default();
        let debug = format!("{stats:?}");
        let fields: Vec<&str> = debug
            .trim_start_matches("Stats")
            .trim_matches(|c| c == ' ' || c == '{' || c == '}')
            .split(", ")
            .filter_map(|f| f.split_once(": ").map(|(name, _)| name))
            .collect();
        let mut shown: Vec<&str> =
            stat_groups(&stats, None).iter().flat_map(|(_, rows)| rows.iter().map(|r| r.field)).collect();
        shown.sort_unstable();
        let mut want = fields.clone();
        want.sort_unstable();
        assert_eq!(shown, want);
    }
}
