//! HTML written on the server: every value from the store goes through [`Esc`], the markup
//! itself is `'static` text; gauges are `<meter>` elements and charts plain SVG, so the pages
//! need no script and no inline style (the Content-Security-Policy allows neither).

use std::fmt::{self, Write as _};

/// A value written into HTML text or a quoted attribute, escaped: `&`, `<`, `>`, `"` and `'`
/// become entities, so that no value from the store can open a tag or leave an attribute.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Esc<'a>(pub(crate) &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..i])?;
            f.write_str(match rest.as_bytes()[i] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[i + 1..];
        }
        f.write_str(rest)
    }
}

/// An identifier escaped as [`Esc`] does, with a line-break opportunity (`<wbr>`) after each
/// `.`, `:`, `/`, `_` and `@`, so that `quota.threshold_crossed:acme:requests:80` wraps between
/// its parts rather than inside a word.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wrap<'a>(pub(crate) &'a str);

impl fmt::Display for Wrap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(['.', ':', '/', '_', '@']) {
            write!(f, "{}<wbr>", Esc(&rest[..=i]))?;
            rest = &rest[i + 1..];
        }
        write!(f, "{}", Esc(rest))
    }
}

/// A path segment percent-encoded (every byte but unreserved ones), for a tenant id in a link.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seg<'a>(pub(crate) &'a str);

/// Bytes a path segment or query value keeps as they are: RFC 3986's unreserved characters.
const SEGMENT: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

impl fmt::Display for Seg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only unreserved characters and `%` are left: nothing to escape in HTML.
        write!(f, "{}", percent_encoding::utf8_percent_encode(self.0, SEGMENT))
    }
}

/// A count with thousands separated (`12,345`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Num(pub(crate) u64);

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.0.to_string();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                f.write_char(',')?;
            }
            f.write_char(c)?;
        }
        Ok(())
    }
}

/// Nano-units of money in the currency's format: its minor digits (`2.50 USD`, `1,250 JPY`),
/// thousands separated; without a currency, two decimals.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Money<'a>(pub(crate) u64, pub(crate) Option<&'a str>);

impl fmt::Display for Money<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.1.map_or(2, crate::base::minor_digits);
        let amount = crate::base::amount_of(self.0).round_dp(digits);
        let text = format!("{amount:.prec$}", prec = digits as usize);
        let (whole, fraction) = text.split_once('.').unwrap_or((&text, ""));
        write!(f, "{}", Num(whole.parse().unwrap_or(0)))?;
        if !fraction.is_empty() {
            write!(f, ".{fraction}")?;
        }
        match self.1 {
            Some(currency) => write!(f, " {}", Esc(&currency.to_ascii_uppercase())),
            None => Ok(()),
        }
    }
}

/// An amount in the currency's smallest unit (cents of `usd`, as Stripe counts payments and
/// recharges), shown as [`Money`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Minor<'a>(pub(crate) u64, pub(crate) Option<&'a str>);

impl fmt::Display for Minor<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.1.map_or(2, crate::base::minor_digits);
        let per = 10u64.pow(9u32.saturating_sub(digits));
        Money(self.0.saturating_mul(per), self.1).fmt(f)
    }
}

/// What a chart counts: units of a meter, or money in nano-units of the currency.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Unit<'a> {
    /// Units, named (`requests`).
    Count(&'a str),
    /// Money in nano-units, in the currency (`[billing] currency`).
    Money(Option<&'a str>),
}

impl Unit<'_> {
    /// A value with its unit (a bar's title, the limit).
    fn show(self, v: u64) -> String {
        match self {
            Unit::Count(name) => format!("{} {name}", Num(v)),
            Unit::Money(currency) => Money(v, currency).to_string(),
        }
    }

    /// A value of the scale: the number alone (the unit is the scale's title), money with
    /// its currency's decimals.
    fn tick(self, v: u64) -> String {
        match self {
            Unit::Count(_) => Num(v).to_string(),
            Unit::Money(None) => Money(v, None).to_string(),
            Unit::Money(Some(currency)) => {
                let text = Money(v, Some(currency)).to_string();
                let code = format!(" {}", Esc(&currency.to_ascii_uppercase()));
                text.strip_suffix(&code).unwrap_or(&text).to_owned()
            }
        }
    }

    /// The scale's title: the meter's name, or the currency.
    fn title(self) -> String {
        match self {
            Unit::Count(name) => name.to_owned(),
            Unit::Money(currency) => currency.map_or_else(|| "money".to_owned(), str::to_ascii_uppercase),
        }
    }
}

/// The least of 1, 2 or 5 times a power of ten at or above `v` (a scale's round top).
pub(crate) fn nice_ceil(v: u64) -> u64 {
    let mut power: u64 = 1;
    loop {
        for m in [1, 2, 5] {
            let candidate = power.saturating_mul(m);
            if candidate >= v || candidate == u64::MAX {
                return candidate;
            }
        }
        if power > u64::MAX / 10 {
            return u64::MAX;
        }
        power *= 10;
    }
}

/// A Unix time as UTC text (`2026-11-27 14:00`), or `-`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct When(pub(crate) Option<i64>);

impl fmt::Display for When {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.and_then(|t| chrono::DateTime::from_timestamp(t, 0)) {
            Some(t) => write!(f, "{}", t.format("%Y-%m-%d %H:%M")),
            None => f.write_str("-"),
        }
    }
}

/// A page being written.
#[derive(Debug)]
pub(crate) struct Page {
    pub(crate) out: String,
}

/// The pages of the navigation bar: (path under the dashboard, label).
const NAV: [(&str, &str); 8] = [
    ("/", "Overview"),
    ("/tenants", "Tenants"),
    ("/plans", "Plans"),
    ("/money", "Money"),
    ("/billing", "Billing"),
    ("/alerts", "Alerts"),
    ("/audit", "Audit"),
    ("/node", "Node"),
];

/// What the frame of a page shows besides its title: the node's page in the navigation (a
/// mounted router's), and the sign-out button (a session of the login form's).
#[derive(Debug, Clone, Default)]
pub(crate) struct Frame {
    /// Whether the node's page exists.
    pub(crate) node: bool,
    /// Whether the reader came with a session cookie, which the button ends.
    pub(crate) signed_in: bool,
    /// When the page's figures were read (Unix seconds), shown as "as of".
    pub(crate) as_of: Option<i64>,
    /// Whether the page reloads itself every [`REFRESH_SECS`] (`?refresh=on`), by a `<meta>`
    /// refresh: no script.
    pub(crate) refresh: bool,
    /// What of the page's query its refresh link keeps (percent-encoded: the list's filter
    /// and order; never a search's text).
    pub(crate) keep: String,
}

/// How often a page asked to refresh reloads itself, in seconds.
pub(crate) const REFRESH_SECS: u32 = 10;

impl Page {
    /// A page titled `title`, under the dashboard mounted at `base`, with `current` (a path of
    /// [`NAV`]) marked, in `frame`.
    pub(crate) fn new(base: &str, title: &str, current: &str, frame: Frame) -> Self {
        let mut out = String::with_capacity(8192);
        let _ = write!(
            out,
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>{} · tollgate</title><link rel=\"stylesheet\" href=\"{}/assets/dashboard.css\">{}</head>\
             <body><header><a class=\"brand\" href=\"{}/\">tollgate</a><nav>",
            Esc(title),
            Esc(base),
            if frame.refresh {
                format!("<meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">")
            } else {
                String::new()
            },
            Esc(base)
        );
        for (path, label) in NAV {
            if path == "/node" && !frame.node {
                continue;
            }
            let class = if path == current { " class=\"current\"" } else { "" };
            let _ = write!(out, "<a{class} href=\"{}{path}\">{label}</a>", Esc(base));
        }
        out.push_str("</nav><span class=\"ro\">read-only</span>");
        if let Some(t) = frame.as_of.and_then(|t| chrono::DateTime::from_timestamp(t, 0)) {
            let _ = write!(out, "<span class=\"asof\">as of {} UTC</span>", t.format("%Y-%m-%d %H:%M:%S"));
            // A query alone keeps the page's path: the refresh drops a search's text.
            let (keep, and) = (Esc(&frame.keep), if frame.keep.is_empty() { "" } else { "&amp;" });
            let _ = match frame.refresh {
                true => write!(out, "<a class=\"refresh\" href=\"?{keep}\">stop refreshing</a>"),
                false => write!(
                    out,
                    "<a class=\"refresh\" href=\"?{keep}{and}refresh=on\">refresh every {REFRESH_SECS} s</a>"
                ),
            };
        }
        if frame.signed_in {
            let _ = write!(
                out,
                "<form class=\"signout\" method=\"post\" action=\"{}/logout\"><button type=\"submit\">Sign out\
                 </button></form>",
                Esc(base)
            );
        }
        let _ = write!(out, "</header><main><h1>{}</h1>", Esc(title));
        Self { out }
    }

    /// Ends the page.
    pub(crate) fn finish(mut self) -> String {
        self.out.push_str("</main></body></html>\n");
        self.out
    }

    /// Static markup.
    pub(crate) fn raw(&mut self, markup: &'static str) -> &mut Self {
        self.out.push_str(markup);
        self
    }

    /// Formatted markup: every value from the store must be [`Esc`], [`Seg`], [`Num`] or [`When`].
    pub(crate) fn fmt(&mut self, args: fmt::Arguments<'_>) -> &mut Self {
        let _ = self.out.write_fmt(args);
        self
    }

    /// A `<meter>` gauge of `value` out of `max` with its figures beside it, `class` naming
    /// what it is (for the tests and the style).
    pub(crate) fn gauge(&mut self, class: &'static str, value: u64, max: u64, caption: &str) -> &mut Self {
        self.gauge_shown(class, (value, Num(value)), (max, Num(max)), caption)
    }

    /// A gauge whose figures are shown as `value.1` and `max.1` (money, say).
    pub(crate) fn gauge_shown(
        &mut self,
        class: &'static str,
        value: (u64, impl fmt::Display),
        max: (u64, impl fmt::Display),
        caption: &str,
    ) -> &mut Self {
        let high = max.0 - max.0 / 5;
        self.fmt(format_args!(
            "<div class=\"gauge {class}\"><meter min=\"0\" max=\"{}\" low=\"{high}\" high=\"{high}\" \
             optimum=\"0\" value=\"{}\"></meter> <span class=\"figures\"><span class=\"value\">{}</span> of \
             <span class=\"max\">{}</span></span> <span class=\"caption\">{}</span></div>",
            max.0,
            value.0.min(max.0),
            value.1,
            max.1,
            Esc(caption)
        ))
    }

    /// A bar chart of `bars` (each a window's start and its quantity), `width` seconds apart,
    /// drawn as SVG: each bar with its figure as a title, the highest figure and the range as
    /// text.
    /// A bar chart of `bars` (each a window of `width` seconds from its start, and its units),
    /// with a scale of round values on the left in `unit`, the time of its first, middle and
    /// last window below, and `limit` (a quota's limit per bar) drawn across it as a dashed line
    /// when it is within four times the highest bar (else the caption says it is above).
    pub(crate) fn chart(
        &mut self,
        class: &'static str,
        label: &str,
        bars: &[(i64, u64)],
        width: i64,
        unit: Unit<'_>,
        limit: Option<u64>,
    ) -> &mut Self {
        const W: u64 = 720;
        const H: u64 = 160;
        // The scale's column on the left, the bars to its right.
        const LEFT: u64 = 64;
        const TOP: u64 = 22;
        let highest = bars.iter().map(|b| b.1).max().unwrap_or(0);
        let drawn = limit.filter(|l| *l > 0 && *l <= highest.saturating_mul(4).max(1));
        let top = nice_ceil(highest.max(drawn.unwrap_or(0)).max(1));
        let n = bars.len().max(1) as u64;
        let step = ((W - LEFT) / n).max(1);
        let y = |v: u64| H - (u128::from(v) * u128::from(H - TOP)).div_ceil(u128::from(top)) as u64;
        let caption = match (limit, drawn) {
            (Some(l), None) if l > 0 => {
                let per = match width {
                    3600 => "an hour",
                    86_400 => "a day",
                    _ => "a bar",
                };
                format!("{label}; limit {} {per}, above the scale", unit.show(l))
            }
            _ => label.to_owned(),
        };
        self.fmt(format_args!(
            "<figure class=\"chart {class}\"><figcaption>{}</figcaption>\
             <svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {}\" role=\"img\" aria-label=\"{}\">",
            Esc(&caption),
            H + 20,
            Esc(&caption),
        ));
        // The scale: its unit above it; 0, half and the top, each a faint line with its value.
        self.fmt(format_args!(
            "<text x=\"{}\" y=\"10\" class=\"axis end unit\">{}</text>",
            LEFT - 6,
            Esc(&unit.title())
        ));
        let mut marks = vec![0, top / 2, top];
        marks.dedup();
        for v in marks {
            self.fmt(format_args!(
                "<line x1=\"{LEFT}\" y1=\"{0}\" x2=\"{W}\" y2=\"{0}\" class=\"{1}\"/>\
                 <text x=\"{2}\" y=\"{3}\" class=\"axis end scale\">{4}</text>",
                y(v),
                if v == 0 { "base" } else { "grid" },
                LEFT - 6,
                y(v) + 4,
                Esc(&unit.tick(v))
            ));
        }
        for (i, (start, q)) in bars.iter().enumerate() {
            let x = LEFT + i as u64 * step;
            self.fmt(format_args!(
                "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" data-start=\"{start}\" data-value=\"{q}\">\
                 <title>{}: {}</title></rect>",
                x + 1,
                y(*q),
                step.saturating_sub(2).max(1),
                H - y(*q),
                When(Some(*start)),
                Esc(&unit.show(*q))
            ));
        }
        if let Some(l) = drawn {
            self.fmt(format_args!(
                "<line x1=\"{LEFT}\" y1=\"{0}\" x2=\"{W}\" y2=\"{0}\" class=\"limit\" data-limit=\"{l}\"/>\
                 <text x=\"{W}\" y=\"{1}\" class=\"axis end limit\">limit {2}</text>",
                y(l),
                y(l).saturating_sub(3).max(9),
                Esc(&unit.show(l))
            ));
        }
        if let (Some(first), Some(last)) = (bars.first(), bars.last()) {
            let middle = bars[bars.len() / 2].0;
            self.fmt(format_args!(
                "<text x=\"{LEFT}\" y=\"{0}\" class=\"axis\">{1}</text>\
                 <text x=\"{2}\" y=\"{0}\" class=\"axis middle\">{3}</text>\
                 <text x=\"{W}\" y=\"{0}\" class=\"axis end\">{4}</text>",
                H + 16,
                When(Some(first.0)),
                LEFT + (bars.len() / 2) as u64 * step,
                When(Some(middle)),
                When(Some(last.0 + width))
            ));
        }
        self.raw("</svg></figure>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_tag_and_no_way_out_of_an_attribute() {
        let hostile = "<script>alert(1)</script>\"'&";
        let text = Esc(hostile).to_string();
        assert_eq!(text, "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;");
        assert_eq!(Esc("plain").to_string(), "plain");
        assert_eq!(Wrap("a.b:<c>").to_string(), "a.<wbr>b:<wbr>&lt;c&gt;", "escaped, with break points");
        assert_eq!(Seg("a/b c<").to_string(), "a%2Fb%20c%3C");
        assert_eq!(Num(1_234_567).to_string(), "1,234,567");
        assert_eq!(Num(12).to_string(), "12");
        assert_eq!(When(Some(0)).to_string(), "1970-01-01 00:00");
        assert_eq!(When(None).to_string(), "-");
    }

    #[test]
    fn a_scale_tops_at_a_round_value() {
        assert_eq!([0, 1, 2, 3, 7, 10, 11, 26, 501, 1_000].map(nice_ceil), [1, 1, 2, 5, 10, 10, 20, 50, 1_000, 1_000]);
        assert_eq!(nice_ceil(u64::MAX), u64::MAX);
        assert_eq!(nice_ceil(u64::MAX / 3), 10_000_000_000_000_000_000);
    }

    #[test]
    fn a_money_scale_has_its_currencys_decimals() {
        assert_eq!(Unit::Money(Some("jpy")).tick(1_000 * 1_000_000_000), "1,000");
        assert_eq!(Unit::Money(Some("usd")).tick(1_500_000_000), "1.50");
        assert_eq!(Unit::Money(Some("usd")).title(), "USD");
    }

    #[test]
    fn a_limit_far_above_the_bars_is_said_not_drawn() {
        let mut page = Page::new("/ops", "t", "/", Frame::default());
        page.chart("daily", "requests", &[(0, 5)], 86_400, Unit::Count("requests"), Some(1_000));
        let html = page.finish();
        assert!(!html.contains("data-limit"), "{html}");
        assert!(html.contains("limit 1,000 requests a day, above the scale"), "{html}");
    }

    #[test]
    fn charts_and_gauges_carry_their_figures() {
        let mut page = Page::new("/ops\"", "t<", "/", Frame::default());
        page.gauge("quota", 30, 100, "<b>").chart(
            "hourly",
            "req<",
            &[(0, 5), (3600, 10)],
            3600,
            Unit::Count("r<"),
            Some(12),
        );
        let html = page.finish();
        assert!(html.contains("value=\"30\""));
        assert!(html.contains("data-value=\"10\""));
        // (`Audit</a>` holds `t<`: the title's text is looked for where the title stands.)
        assert!(
            !html.contains("<b>") && !html.contains("req<") && !html.contains(">t<") && !html.contains("r<"),
            "{html}"
        );
        assert!(html.contains("data-limit=\"12\""), "the limit drawn: {html}");
        assert!(html.contains(">20</text>"), "the scale's round top above the limit: {html}");
        assert!(html.contains(">r&lt;</text>"), "the scale's unit, escaped: {html}");
        assert!(html.contains("/ops&quot;/assets/dashboard.css"));
        assert!(!html.contains("href=\"/ops\"/node"), "the node's page is left out without an engine");
    }
}
