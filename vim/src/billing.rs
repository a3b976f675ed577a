//! Pay-per-use bills (docs/billing.md), computed from the usage records and the plans' price
//! histories. Money is `rust_decimal::Decimal` throughout, never a float: a period's fee is
//! kept exact (milliseconds × price) until a VM's total, which is rounded once to the cent; a
//! consumer's total is the sum of its VMs' rounded fees, so the lines add up.

use std::collections::{BTreeMap, HashMap};

use rust_decimal::{Decimal, RoundingStrategy};
use serde::Serialize;
use thiserror::Error;

use crate::db::{EventKind, PriceRow, UsageRecord};

/// The plan of consumers that have none of their own.
pub const DEFAULT_PLAN: &str = "default";

#[derive(Debug, Error, PartialEq)]
pub enum PriceError {
    #[error("{what} {got:?} is not a decimal amount (e.g. 0.0125)")]
    NotDecimal { what: &'static str, got: String },
    #[error("{what} must be between 0 and 1000000 with at most 10 decimals, not {got}")]
    OutOfRange { what: &'static str, got: String },
    #[error("currency {0:?} is not a three-letter code such as EUR")]
    Currency(String),
    #[error("plan {0:?} must be 1 to 64 letters, digits, '-' or '_'")]
    Plan(String),
    #[error("stored price of plan {plan}: {why}")]
    Stored { plan: String, why: String },
}

/// An amount per hour, as a caller writes it: a non-negative decimal, at most 10 places.
pub fn parse_amount(what: &'static str, s: &str) -> Result<Decimal, PriceError> {
    let not = || PriceError::NotDecimal {
        what,
        got: s.chars().take(64).collect(),
    };
    // Plain digits with at most one point: no exponent, sign or separator to misread.
    let plain = s.split('.').count() <= 2 && s.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if !plain || !s.bytes().any(|b| b.is_ascii_digit()) {
        return Err(not());
    }
    let d = Decimal::from_str_exact(s).map_err(|_| not())?;
    if d.is_sign_negative() || d > Decimal::from(1_000_000) || d.scale() > 10 {
        return Err(PriceError::OutOfRange {
            what,
            got: d.to_string(),
        });
    }
    Ok(d.normalize())
}

pub fn check_currency(c: &str) -> Result<(), PriceError> {
    if c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(PriceError::Currency(c.chars().take(16).collect()))
    }
}

pub fn check_plan(p: &str) -> Result<(), PriceError> {
    if (1..=64).contains(&p.len())
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(PriceError::Plan(p.chars().take(64).collect()))
    }
}

/// A plan's prices from `since` on.
#[derive(Debug, Clone, PartialEq)]
struct Price {
    since: i64,
    vcpu_hour: Decimal,
    gib_hour: Decimal,
    currency: String,
}

/// Every plan's price history, oldest first.
#[derive(Debug, Default)]
pub struct Prices(HashMap<String, Vec<Price>>);

impl Prices {
    pub fn new(rows: &[PriceRow]) -> Result<Prices, PriceError> {
        let mut plans: HashMap<String, Vec<Price>> = HashMap::new();
        for r in rows {
            let stored = |e: PriceError| PriceError::Stored {
                plan: r.plan.clone(),
                why: e.to_string(),
            };
            plans.entry(r.plan.clone()).or_default().push(Price {
                since: r.since,
                vcpu_hour: parse_amount("vcpu_hour", &r.vcpu_hour).map_err(stored)?,
                gib_hour: parse_amount("gib_hour", &r.gib_hour).map_err(stored)?,
                currency: r.currency.clone(),
            });
        }
        for p in plans.values_mut() {
            p.sort_by_key(|p| p.since);
        }
        Ok(Prices(plans))
    }

    /// The price in force at `t`, and when the next one starts.
    fn at(&self, plan: &str, t: i64) -> (Option<&Price>, Option<i64>) {
        let Some(list) = self.0.get(plan) else {
            return (None, None);
        };
        let i = list.partition_point(|p| p.since <= t);
        (
            i.checked_sub(1).map(|i| &list[i]),
            list.get(i).map(|p| p.since),
        )
    }

    fn currency(&self, plan: &str) -> String {
        self.0
            .get(plan)
            .and_then(|l| l.first())
            .map(|p| p.currency.clone())
            .unwrap_or_default()
    }
}

/// A stretch of time at one size and one price.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Period {
    /// ms since the epoch, `to` excluded.
    pub from: i64,
    pub to: i64,
    pub seconds: Decimal,
    pub vcpus: i64,
    pub memory_mib: i64,
    /// None: the plan had no price yet (nothing is charged).
    pub vcpu_hour: Option<Decimal>,
    pub gib_hour: Option<Decimal>,
    /// Rounded to the cent; the VM's fee rounds the exact sum.
    pub fee: Decimal,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VmBill {
    pub vm_id: String,
    pub periods: Vec<Period>,
    pub seconds: Decimal,
    pub fee: Decimal,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ConsumerBill {
    pub consumer: String,
    pub plan: String,
    pub currency: String,
    pub vms: Vec<VmBill>,
    pub total: Decimal,
}

/// ms per hour × MiB per GiB: a period's exact fee is `ms × (vcpus × vcpu_hour × 1024 +
/// memory_mib × gib_hour)` over this.
const PER_HOUR_AND_GIB: i64 = 3_600_000 * 1024;

/// Rounded to the cent, always written with two decimals ("0.00", "1.50").
fn cents(d: Decimal) -> Decimal {
    let mut c = d.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
    c.rescale(2);
    c
}

/// The bills for `from`..`to` (ms): `usage` by VM then time (`Db::usage`), each consumer paying
/// by its plan in `plans`, else by [`DEFAULT_PLAN`]. Consumers by name, VMs by id.
pub fn bill(
    usage: &[UsageRecord],
    prices: &Prices,
    plans: &HashMap<String, String>,
    from: i64,
    to: i64,
) -> Vec<ConsumerBill> {
    let mut by_consumer: BTreeMap<&str, Vec<VmBill>> = BTreeMap::new();
    for records in usage.chunk_by(|a, b| a.vm_id == b.vm_id) {
        let owner = records[0].owner.as_str();
        let plan = plans.get(owner).map_or(DEFAULT_PLAN, String::as_str);
        // The size billed from each record on (None: not billed), up to the next.
        let mut spans = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let end = records.get(i + 1).map_or(to, |n| n.ts);
            if r.kind != EventKind::UsageFinished {
                spans.push((r.ts.max(from), end.min(to), r.vcpus, r.memory_mib));
            }
        }
        let mut periods = Vec::new();
        let mut exact = Decimal::ZERO;
        for (mut start, end, vcpus, memory_mib) in spans {
            while start < end {
                let (price, next) = prices.at(plan, start);
                let stop = next.map_or(end, |n| n.min(end));
                let ms = Decimal::from(stop - start);
                let fee = price.map_or(Decimal::ZERO, |p| {
                    ms * (Decimal::from(vcpus) * p.vcpu_hour * Decimal::from(1024)
                        + Decimal::from(memory_mib) * p.gib_hour)
                        / Decimal::from(PER_HOUR_AND_GIB)
                });
                exact += fee;
                periods.push(Period {
                    from: start,
                    to: stop,
                    seconds: ms / Decimal::from(1000),
                    vcpus,
                    memory_mib,
                    vcpu_hour: price.map(|p| p.vcpu_hour),
                    gib_hour: price.map(|p| p.gib_hour),
                    fee: cents(fee),
                });
                start = stop;
            }
        }
        if periods.is_empty() {
            continue;
        }
        by_consumer.entry(owner).or_default().push(VmBill {
            vm_id: records[0].vm_id.clone(),
            seconds: periods.iter().map(|p| p.seconds).sum(),
            periods,
            fee: cents(exact),
        });
    }
    by_consumer
        .into_iter()
        .map(|(consumer, vms)| {
            let plan = plans
                .get(consumer)
                .cloned()
                .unwrap_or_else(|| DEFAULT_PLAN.into());
            ConsumerBill {
                consumer: consumer.into(),
                currency: prices.currency(&plan),
                plan,
                total: vms.iter().map(|v| v.fee).sum(),
                vms,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    fn rec(ts: i64, kind: EventKind, vm: &str, owner: &str, vcpus: i64, mib: i64) -> UsageRecord {
        UsageRecord {
            ts,
            kind,
            vm_id: vm.into(),
            owner: owner.into(),
            vcpus,
            memory_mib: mib,
        }
    }

    fn price(plan: &str, since: i64, vcpu: &str, gib: &str) -> PriceRow {
        PriceRow {
            plan: plan.into(),
            since,
            vcpu_hour: vcpu.into(),
            gib_hour: gib.into(),
            currency: "EUR".into(),
        }
    }

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    /// A VM resized mid-period and a price change mid-period, worked out by hand: 2 vCPUs and
    /// 4 GiB for 1 h at 0.04/vCPU-h + 0.005/GiB-h = 0.10; then 4 vCPUs and 8 GiB for 30 min at
    /// the same prices = 0.10; then the same size for 30 min at 0.05 + 0.01 = 0.14; total 0.34.
    /// A stretch before the period and one after its end are not billed.
    #[test]
    fn resize_and_price_change_mid_period_bill_each_stretch_at_its_rate() {
        let usage = [
            rec(-H, EventKind::UsageStarted, "v1", "alice", 2, 4096),
            rec(H, EventKind::UsageChanged, "v1", "alice", 4, 8192),
            rec(2 * H, EventKind::UsageFinished, "v1", "alice", 4, 8192),
            rec(3 * H, EventKind::UsageStarted, "v1", "alice", 1, 1024),
        ];
        let prices = Prices::new(&[
            price("default", -10 * H, "0.04", "0.005"),
            price("default", H + H / 2, "0.05", "0.01"),
        ])
        .unwrap();
        let bills = bill(&usage, &prices, &HashMap::new(), 0, 2 * H + H / 2);
        assert_eq!(bills.len(), 1);
        let b = &bills[0];
        assert_eq!((b.consumer.as_str(), b.plan.as_str()), ("alice", "default"));
        assert_eq!(b.currency, "EUR");
        let v = &b.vms[0];
        let fees: Vec<Decimal> = v.periods.iter().map(|p| p.fee).collect();
        assert_eq!(fees, [d("0.10"), d("0.10"), d("0.14")]);
        let spans: Vec<(i64, i64)> = v.periods.iter().map(|p| (p.from, p.to)).collect();
        assert_eq!(spans, [(0, H), (H, H + H / 2), (H + H / 2, 2 * H)]);
        assert_eq!(v.seconds, d("7200"));
        assert_eq!(v.fee, d("0.34"));
        assert_eq!(b.total, d("0.34"));
    }

    /// Exact to the millisecond: one vCPU for 1.5 s at 3.6/h is 0.0015, twice that (two VMs)
    /// rounds per VM to 0.00 each; 1000 s is exactly 1.00. No float could be trusted with this.
    #[test]
    fn fees_are_exact_decimals_rounded_once_per_vm() {
        let usage = [
            rec(0, EventKind::UsageStarted, "a", "bob", 1, 0),
            rec(1500, EventKind::UsageFinished, "a", "bob", 1, 0),
            rec(0, EventKind::UsageStarted, "b", "bob", 1, 0),
            rec(1_000_000, EventKind::UsageFinished, "b", "bob", 1, 0),
        ];
        let prices = Prices::new(&[price("gold", 0, "3.6", "0")]).unwrap();
        let plans = HashMap::from([("bob".to_string(), "gold".to_string())]);
        let bills = bill(&usage, &prices, &plans, 0, 10 * H);
        let b = &bills[0];
        assert_eq!(b.plan, "gold");
        assert_eq!(b.vms[0].seconds, d("1.5"));
        assert_eq!(b.vms[0].fee.to_string(), "0.00");
        assert_eq!(b.vms[1].fee, d("1.00"));
        assert_eq!(b.total, d("1.00"));
    }

    /// Before a plan has any price nothing is charged, and the period says it was unpriced;
    /// consumers are billed apart.
    #[test]
    fn unpriced_time_is_free_and_consumers_are_apart() {
        let usage = [
            rec(0, EventKind::UsageStarted, "a", "carol", 1, 1024),
            rec(0, EventKind::UsageStarted, "b", "dave", 1, 1024),
        ];
        let prices = Prices::new(&[price("default", H, "1", "1")]).unwrap();
        let bills = bill(&usage, &prices, &HashMap::new(), 0, 2 * H);
        assert_eq!(bills.len(), 2);
        for b in &bills {
            let p = &b.vms[0].periods;
            assert_eq!(p[0].vcpu_hour, None);
            assert_eq!(p[0].fee, Decimal::ZERO);
            assert_eq!(p[1].fee, d("2.00"));
            assert_eq!(b.total, d("2.00"));
        }
    }

    #[test]
    fn amounts_currencies_and_plans_are_checked() {
        assert_eq!(parse_amount("x", "0.0125").unwrap(), d("0.0125"));
        assert!(parse_amount("x", "-1").is_err());
        assert!(parse_amount("x", ".").is_err());
        assert!(parse_amount("x", "1.2.3").is_err());
        assert!(parse_amount("x", "1e3").is_err());
        assert!(parse_amount("x", "NaN").is_err());
        assert!(parse_amount("x", "0.00000000001").is_err());
        assert!(parse_amount("x", "2000000").is_err());
        assert!(check_currency("EUR").is_ok());
        assert!(check_currency("eur").is_err());
        assert!(check_currency("EURO").is_err());
        assert!(check_plan("gold-2").is_ok());
        assert!(check_plan("").is_err());
        assert!(check_plan("a b").is_err());
    }
}
