//! Money, at the bottom of the crate as governor keeps its nanoseconds: amounts of the
//! currency as exact decimals (never floats), counted in nano-units (10⁻⁹) so that per-token
//! prices are exact per request; the reserved spend meter, the bounds of a cap, and a tenant's
//! own cap as the stores keep it, and where a tenant stands in what it has paid (tiers).

use rust_decimal::Decimal;

/// Nano-units (10⁻⁹) of the currency in one unit of it: spend is counted in them, so that
/// per-token prices of AI models ($0.15 per million tokens: 150 nano-dollars a token) are
/// exact per request.
pub const NANOS: u64 = 1_000_000_000;

/// The largest spend cap: 1,000,000,000 units of the currency (10¹⁸ nano-units, within the
/// stores' signed 64-bit counters).
pub const MAX_CAP_NANOS: u64 = 1_000_000_000 * NANOS;

/// The largest integer a structured header field carries (RFC 8941 §3.3.1: at most 15
/// digits): quota limits are bounded by it, spend caps are shown in a unit that fits
/// ([`header_scale`]), and a value past it (a prepaid balance's) is shown as it.
pub(crate) const HEADER_INTEGER_MAX: u64 = 999_999_999_999_999;

/// The nano-units of a spend cap's header unit, for caps up to `max` nano-units: the finest of
/// nano-, micro-, milli-units of the currency in which `max` fits
/// [`HEADER_INTEGER_MAX`], with its prefix (`"nano"`, `"micro"`, `"milli"`).
#[must_use]
pub(crate) fn header_scale(max: u64) -> (u64, &'static str) {
    [(1, "nano"), (1_000, "micro"), (1_000_000, "milli")]
        .into_iter()
        .find(|(scale, _)| max / scale <= HEADER_INTEGER_MAX)
        .unwrap_or((NANOS, ""))
}

/// The name of the meter spend is counted on: reserved (a user meter may not take it).
pub const SPEND_METER: &str = "spend";

/// `amount` (a decimal of the currency) in nano-units, when it is a whole number of them.
#[must_use]
pub fn nanos_of(amount: Decimal) -> Option<u64> {
    let n = amount.checked_mul(Decimal::from(NANOS))?;
    if n.fract() != Decimal::ZERO || n.is_sign_negative() {
        return None;
    }
    u64::try_from(n).ok()
}

/// The decimals of `currency`'s smallest unit as Stripe counts amounts (ISO 4217 code, lower
/// case): 0 for Stripe's zero-decimal currencies, 3 for its three-decimal ones, else 2
/// (<https://docs.stripe.com/currencies#zero-decimal>, `#three-decimal`).
#[must_use]
pub(crate) fn minor_digits(currency: &str) -> u32 {
    const ZERO: &[&str] = &[
        "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf",
    ];
    const THREE: &[&str] = &["bhd", "jod", "kwd", "omr", "tnd"];
    if ZERO.contains(&currency) {
        0
    } else if THREE.contains(&currency) {
        3
    } else {
        2
    }
}

/// `minor` units of `currency` as a decimal string (`2000` cents → `"20.00"`).
pub(crate) fn money_text(minor: u64, currency: &str) -> String {
    Decimal::from_i128_with_scale(i128::from(minor), minor_digits(currency)).to_string()
}

/// Nano-units of `currency` in its smallest unit as Stripe counts amounts (cents of `usd`),
/// when they are a whole number of it.
#[must_use]
pub(crate) fn minor_units_of(nanos: u64, currency: &str) -> Option<u64> {
    let per = 10u64.pow(9 - minor_digits(currency));
    nanos.is_multiple_of(per).then_some(nanos / per)
}

/// Nano-units as a decimal of the currency (`1500000000` → `1.5`).
#[must_use]
pub fn amount_of(nanos: u64) -> Decimal {
    (Decimal::from(nanos) / Decimal::from(NANOS)).normalize()
}

/// The nano-units `units` of a meter cost at `price` (a decimal of the currency per unit), not
/// rounded.
#[must_use]
pub fn cost_nanos(units: u64, price: Decimal) -> Decimal {
    Decimal::from(units).saturating_mul(price).saturating_mul(Decimal::from(NANOS))
}

/// Rounds nano-units up to a whole number of them (`⌈x⌉`), saturating.
#[must_use]
pub fn ceil_nanos(nanos: Decimal) -> u64 {
    u64::try_from(nanos.ceil()).unwrap_or(if nanos.is_sign_negative() { 0 } else { u64::MAX })
}

/// `text` as a decimal amount, for callers outside the configuration (`Admin`, the routes).
///
/// # Errors
/// Not a decimal, negative, zero, more than 9 decimals or past [`MAX_CAP_NANOS`].
pub fn parse_cap(text: &str) -> Result<u64, String> {
    let amount = Decimal::from_str_exact(text.trim()).map_err(|_| format!("\"{text}\" is not a decimal amount"))?;
    match nanos_of(amount) {
        Some(n) if n > 0 && n <= MAX_CAP_NANOS => Ok(n),
        _ => Err(format!("\"{text}\": an amount more than 0, at most 9 decimals, at most 1,000,000,000")),
    }
}

/// A tenant's own cap on one meter (its spend, in nano-units of the currency), kept by the
/// quota store beside the meter's counters, whatever their period: every reservation made
/// with `CapMode::Stored` (in the stores) is held to it in the same atomic step, so a raised cap is seen by
/// the next call of any node, and a lowered one holds from the next call on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct SpendCap {
    /// The limit, in the meter's units.
    pub limit: u64,
    /// Hard: reservations are held to it; soft: everything asked is granted (what is past
    /// it is counted).
    pub hard: bool,
}

impl SpendCap {
    /// A cap of `limit`, `hard` or soft.
    #[must_use]
    pub fn new(limit: u64, hard: bool) -> Self {
        Self { limit, hard }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_counted_exactly_in_nano_units() {
        let per_million = Decimal::from_str_exact("0.00000015").unwrap();
        assert_eq!(cost_nanos(7, per_million), Decimal::from(1_050));
        assert_eq!(ceil_nanos(cost_nanos(7, per_million)), 1_050);
        assert_eq!(ceil_nanos(cost_nanos(1, Decimal::from_str_exact("0.0000000015").unwrap())), 2, "rounded up");
        assert_eq!(nanos_of(Decimal::from_str_exact("50.00").unwrap()), Some(50 * NANOS));
        assert_eq!(nanos_of(Decimal::from_str_exact("0.0000000001").unwrap()), None, "finer than a nano-unit");
        assert_eq!(amount_of(1_500_000_000).to_string(), "1.5");
        assert_eq!(parse_cap("25.00"), Ok(25 * NANOS));
        assert!(parse_cap("-1").is_err() && parse_cap("0").is_err() && parse_cap("abc").is_err());
        assert!(parse_cap("1000000000.01").is_err());
        assert!(parse_cap("25.0000000000000000000000000001").is_err(), "not rounded to 25");
    }
}

/// Where a tenant stands: what it has paid, net, and since when.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Standing {
    /// What it has paid, net of refunds and disputes, in the billing currency's smallest unit.
    pub paid: u64,
    /// When its earliest payment that still counts was paid, Unix seconds.
    pub first_at: Option<i64>,
}

impl Standing {
    /// A standing of `paid` since `first_at`.
    #[must_use]
    pub fn new(paid: u64, first_at: Option<i64>) -> Self {
        Self { paid, first_at }
    }
}
