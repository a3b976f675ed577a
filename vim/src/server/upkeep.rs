//! Background upkeep: the outbox reconciler (jobs published again, commands sent again) and
//! housekeeping (login summaries, expiry of old events and audit entries, the SLA watch).

use std::sync::Arc;
use std::time::Duration;

use super::Vimd;
use crate::db::{self, JobState};
use crate::outbox;

/// The outbox reconciler: jobs committed but not confirmed published (vimd died between the two,
/// or NATS was down) are published again; so are jobs published but not taken within
/// `job_resend` (a message NATS lost), under a fresh message id; and a running job with no
/// answer from its host within `job_resend` has its host command sent again. Handlers are
/// idempotent by job id, so a second copy costs nothing.
pub async fn run_reconciler(v: Arc<Vimd>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let age = v.job_resend.as_millis() as i64;
        loop {
            tick.tick().await;
            if let Some(n) = &v.embedded {
                n.supervise();
            }
            if !v.is_leader() {
                continue;
            }
            match v.db.unpublished_jobs(2000).await {
                Ok(jobs) => republish(&v, jobs, false, "republishing unconfirmed jobs").await,
                Err(e) => tracing::warn!(error = %e, "reconciler"),
            }
            if let Ok(jobs) = v.db.stale_jobs(JobState::Pending, age).await {
                republish(
                    &v,
                    jobs,
                    true,
                    "jobs published but not taken; publishing again",
                )
                .await;
            }
            if let Ok(jobs) = v.db.stale_jobs(JobState::Running, age).await {
                for j in jobs {
                    tracing::warn!(
                        job = j.id,
                        "no answer from the host; sending the command again"
                    );
                    if let Err(e) = v.resend(&j).await {
                        tracing::warn!(job = j.id, error = %e, "resend failed");
                    }
                }
            }
        }
    });
}

/// Housekeeping: failed logins not audited one by one become summary rows (every 10 s), and
/// events and audit entries past their retention are dropped (hourly, and once at start).
pub fn run_housekeeping(v: Arc<Vimd>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        let mut n = 0u64;
        loop {
            tick.tick().await;
            crate::api::audit_login_summary(&v).await;
            if !v.is_leader() {
                continue;
            }
            if let Err(e) = watch_sla(&v).await {
                tracing::warn!(error = %e, "cannot check availability against SLA targets");
            }
            if n.is_multiple_of(360) {
                let now = db::now_ms();
                let before = |d: Duration| now - d.as_millis() as i64;
                match v
                    .db
                    .expire(before(v.retention.events), before(v.retention.audit))
                    .await
                {
                    Ok(0) => {}
                    Ok(gone) => tracing::info!(rows = gone, "expired old events and audit entries"),
                    Err(e) => tracing::warn!(error = %e, "cannot expire old events"),
                }
            }
            n += 1;
        }
    });
}

/// Says `SLA_Violated` (once a month per VM) for each VM whose availability since the month
/// began is below its target. Only VMs with an event this month that can cost availability
/// are looked at: the rest are at 100 %.
async fn watch_sla(v: &Vimd) -> anyhow::Result<()> {
    let now = db::now_ms();
    let (month_start, month) = crate::sla::month_of(now);
    for id in v.db.vms_with_outages_since(month_start).await? {
        let r = crate::sla::report(&v.db, None, Some(&id), month_start, now, None).await?;
        for line in r.vms.iter().filter(|l| !l.met) {
            let detail = format!(
                "{month}: {:.3} % up against a target of {} % ({} outages, {:.1} s down)",
                line.uptime_pct,
                line.target,
                line.outages.len(),
                line.down_s
            );
            let e = db::Event::new(db::EventKind::SlaViolated, "", &line.vm_id, "", &detail);
            if v.db.record_sla_violation(&month, &e).await? {
                tracing::warn!(vm_id = line.vm_id, detail, "event SLA_Violated");
                let _ = v.events.send(e);
            }
        }
    }
    Ok(())
}

/// Publishes `jobs` again through the outbox's path. `fresh` gives each a new message id, for a
/// message JetStream stored and then lost (the duplicate window would drop the same id).
async fn republish(v: &Vimd, jobs: Vec<db::Job>, fresh: bool, why: &str) {
    if jobs.is_empty() {
        return;
    }
    tracing::warn!(jobs = jobs.len(), "{why}");
    let now = db::now_ms();
    let ids: Vec<_> = jobs
        .into_iter()
        .map(|j| {
            let msg_id = if fresh {
                format!("{}-{now}", j.id)
            } else {
                j.id.clone()
            };
            (j.id, msg_id)
        })
        .collect();
    if let Err(e) = outbox::publish(&v.js, &v.db, &ids).await {
        tracing::warn!(error = %e, "republish failed");
    }
}
