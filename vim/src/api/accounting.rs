//! Accounting under the API: pricing plans, bills and availability reports (docs/billing.md,
//! docs/sla.md). Consumers see only their own bills and reports; prices and plans are set by
//! admins.

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use time::format_description::well_known::Rfc3339;

use super::{admin, bad, body, call, check_name, in_range, ok, query, ApiError, Body, Req, St};
use crate::auth::Identity;
use crate::billing::{self, PriceError, Prices};
use crate::db::{self, PriceRow};

impl From<PriceError> for ApiError {
    fn from(e: PriceError) -> Self {
        match e {
            PriceError::Stored { .. } => {
                ApiError(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
            e => bad(e.to_string()),
        }
    }
}

/// An RFC 3339 time (`2026-12-02T10:00:00Z`) as ms since the epoch.
pub fn parse_time(what: &str, s: &str) -> Result<i64, ApiError> {
    let t = time::OffsetDateTime::parse(s, &Rfc3339).map_err(|e| {
        bad(format!(
            "{what} {:?} is not an RFC 3339 time such as 2026-12-02T10:00:00Z: {e}",
            s.chars().take(64).collect::<String>()
        ))
    })?;
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    in_range(what, ms, 0, 253_402_300_799_999).map(|ms| ms as i64)
}

/// `from`..`to` (to: now when not given), in order, at most ~13 months long.
fn period(from: &str, to: Option<&str>) -> Result<(i64, i64), ApiError> {
    let from = parse_time("from", from)?;
    let to = match to {
        Some(t) => parse_time("to", t)?,
        None => db::now_ms(),
    };
    if to <= from {
        return Err(bad("to must be after from"));
    }
    if to - from > 400 * 86_400_000 {
        return Err(bad("a period is at most 400 days"));
    }
    Ok((from, to))
}

/// Which consumer a call is about: a consumer only ever itself.
fn consumer_scope(who: &Identity, asked: Option<String>) -> Result<Option<String>, ApiError> {
    match (who.owner_filter(), asked) {
        (None, asked) => {
            if let Some(c) = &asked {
                check_name("consumer", c)?;
            }
            Ok(asked)
        }
        (Some(me), Some(c)) if c != me => Err(ApiError(
            axum::http::StatusCode::FORBIDDEN,
            "a consumer sees only its own".into(),
        )),
        (Some(me), _) => Ok(Some(me.to_string())),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SetPrice {
    vcpu_hour: String,
    gib_hour: String,
    #[serde(default)]
    currency: Option<String>,
    /// From when (RFC 3339; default now). Earlier bills are recomputed with it.
    #[serde(default)]
    since: Option<String>,
}

pub(super) async fn set_price(
    State(v): St,
    h: Req,
    Path(plan): Path<String>,
    b: Result<Body<SetPrice>, ApiError>,
) -> Response {
    call(&v, &h, "prices.set", &plan.clone(), |v, who| async move {
        admin(&who)?;
        billing::check_plan(&plan)?;
        let req = body(b)?;
        let vcpu_hour = billing::parse_amount("vcpu_hour", &req.vcpu_hour)?;
        let gib_hour = billing::parse_amount("gib_hour", &req.gib_hour)?;
        let currency = req.currency.unwrap_or_else(|| "EUR".into());
        billing::check_currency(&currency)?;
        let since = match &req.since {
            Some(t) => parse_time("since", t)?,
            None => db::now_ms(),
        };
        let row = PriceRow {
            plan,
            since,
            vcpu_hour: vcpu_hour.to_string(),
            gib_hour: gib_hour.to_string(),
            currency,
        };
        v.db.set_price(&row).await?;
        ok(json!(row))
    })
    .await
}

pub(super) async fn list_prices(State(v): St, h: Req) -> Response {
    call(&v, &h, "prices.list", "", |v, who| async move {
        let plans: HashMap<String, String> = v.db.consumer_plans().await?.into_iter().collect();
        let mut prices = v.db.prices().await?;
        // A consumer sees the plan it pays by.
        if let Some(me) = who.owner_filter() {
            let mine = plans.get(me).map_or(billing::DEFAULT_PLAN, String::as_str);
            prices.retain(|p| p.plan == mine);
            return ok(json!({"prices": prices}));
        }
        ok(json!({"prices": prices, "consumers": plans}))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SetPlan {
    plan: String,
}

pub(super) async fn set_consumer_plan(
    State(v): St,
    h: Req,
    Path(name): Path<String>,
    b: Result<Body<SetPlan>, ApiError>,
) -> Response {
    call(
        &v,
        &h,
        "consumers.plan",
        &name.clone(),
        |v, who| async move {
            admin(&who)?;
            check_name("consumer", &name)?;
            let req = body(b)?;
            billing::check_plan(&req.plan)?;
            if !v.db.assign_plan(&name, &req.plan).await? {
                return Err(bad(format!(
                    "plan {} has no prices: set them first (PUT /prices/{})",
                    req.plan, req.plan
                )));
            }
            ok(json!({"consumer": name, "plan": req.plan}))
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BillQuery {
    from: String,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    consumer: Option<String>,
}

pub(super) async fn bill(
    State(v): St,
    h: Req,
    q: Result<Query<BillQuery>, QueryRejection>,
) -> Response {
    call(&v, &h, "bill", "", |v, who| async move {
        let q = query(q)?;
        let (from, to) = period(&q.from, q.to.as_deref())?;
        let consumer = consumer_scope(&who, q.consumer)?;
        let usage = v.db.usage(consumer.as_deref(), from, to).await?;
        let prices = Prices::new(&v.db.prices().await?)?;
        let plans = v.db.consumer_plans().await?.into_iter().collect();
        let bills = billing::bill(&usage, &prices, &plans, from, to);
        ok(json!({"from": from, "to": to, "consumers": bills}))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SlaQuery {
    from: String,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    vm: Option<String>,
    #[serde(default)]
    consumer: Option<String>,
    #[serde(default)]
    target: Option<f64>,
}

pub(super) async fn sla_report(
    State(v): St,
    h: Req,
    q: Result<Query<SlaQuery>, QueryRejection>,
) -> Response {
    call(&v, &h, "sla.report", "", |v, who| async move {
        let q = query(q)?;
        let (from, to) = period(&q.from, q.to.as_deref())?;
        let target = match q.target {
            Some(t) if t.is_finite() => Some(in_range("target", t, 0.0, 100.0)?),
            Some(_) => return Err(bad("target must be a number from 0 to 100")),
            None => None,
        };
        if q.vm.is_some() && q.consumer.is_some() {
            return Err(bad("give vm or consumer, not both"));
        }
        let consumer = consumer_scope(&who, q.consumer)?;
        if let Some(id) = &q.vm {
            // The VM must be the caller's (404 otherwise, as for every VM call).
            super::owned_vm(&v, &who, id).await?;
        }
        let r = crate::sla::report(
            &v.db,
            consumer.as_deref(),
            q.vm.as_deref(),
            from,
            to,
            target,
        )
        .await?;
        ok(json!(r))
    })
    .await
}
