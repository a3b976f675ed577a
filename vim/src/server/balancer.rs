//! The balancer (docs/balance.md): off by default; when on, every `interval_s` it weighs the
//! hosts (`balance::Cluster`), and once the imbalance has stayed above the threshold for
//! `rounds` rounds in a row, or two VMs of one anti-affinity group share a host, it live-migrates
//! the VMs whose moves help most: one move per host at a time, never a VM that moved within
//! `settle_s`, never onto a draining host, never between hosts a VM moved to or from within two
//! intervals (at least 5 s: their figures have not settled). Each move is a migrate job (reason `rebalance`) and a
//! `Rebalance_Planned` event.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use super::migrations::{MigrateParams, DEFAULT_DOWNTIME_MS};
use super::Vimd;
use crate::balance::{Cluster, Context, Move, Settings};
use crate::db::{self, EventKind, JobKind};

/// Where the settings are kept (`cluster_settings`).
const SETTING: &str = "balance";
/// The owner of the balancer's jobs.
pub const OWNER: &str = "balancer";
/// How long, at least, a host takes part in no move after a VM moved to or from it.
const FIGURES_SETTLE_MS: u64 = 5_000;
/// How many moves a dry run lists at most.
pub const PLAN_MAX: usize = 32;

pub fn run_balancer(v: Arc<Vimd>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_round = None::<tokio::time::Instant>;
        let mut above = 0u32;
        loop {
            tick.tick().await;
            if !v.is_leader() {
                above = 0;
                last_round = None;
                continue;
            }
            let s = match v.balance_settings().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "balancer: cannot read its settings");
                    continue;
                }
            };
            if !s.on {
                above = 0;
                last_round = None;
                continue;
            }
            let due = last_round.is_none_or(|t| t.elapsed().as_secs() >= s.interval_s);
            if !due {
                continue;
            }
            last_round = Some(tokio::time::Instant::now());
            if let Err(e) = v.balance_round(&s, &mut above).await {
                tracing::warn!(error = %e, "balancer");
            }
        }
    });
}

impl Vimd {
    pub async fn balance_settings(&self) -> Result<Settings> {
        Ok(match self.db.setting(SETTING).await? {
            // Written by `set_balance_settings` only, so unreadable means a newer vimd's format.
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("the balance settings are unreadable: {e}"))?,
            None => Settings::default(),
        })
    }

    pub async fn set_balance_settings(&self, s: &Settings) -> Result<()> {
        self.db
            .set_setting(SETTING, &serde_json::to_string(s)?)
            .await?;
        Ok(())
    }

    /// The hosts and VMs as the balancer weighs them now: VMs with a job under way, and hosts a
    /// migration is under way from or to, take part in no move.
    pub async fn balance_model(&self, s: &Settings) -> Result<Cluster> {
        let hosts = self.db.hosts().await?;
        let vms = self.db.live_vms().await?;
        let mut busy_vms = HashSet::new();
        let mut busy_hosts = HashSet::new();
        for job in self.db.unfinished_jobs().await? {
            if job.kind == JobKind::Migrate {
                let p = MigrateParams::of(&job);
                busy_hosts.extend([p.source, p.target, p.to.unwrap_or_default()]);
                if let Some(vm) = vms.iter().find(|vm| vm.id == job.vm_id) {
                    busy_hosts.insert(vm.host_id.clone());
                }
            }
            busy_vms.insert(job.vm_id);
        }
        let cx = Context {
            now_ms: db::now_ms(),
            settle_s: s.settle_s,
            fresh_ms: (2 * s.interval_s * 1000).max(FIGURES_SETTLE_MS) as i64,
            busy_vms: &busy_vms,
            busy_hosts: &busy_hosts,
        };
        Ok(Cluster::new(&hosts, &vms, &self.policy, &cx))
    }

    async fn balance_round(&self, s: &Settings, above: &mut u32) -> Result<()> {
        let mut model = self.balance_model(s).await?;
        let imbalance = model.imbalance();
        if imbalance <= s.threshold && !model.group_shares_a_host() {
            *above = 0;
            return Ok(());
        }
        *above += 1;
        tracing::debug!(imbalance, rounds = *above, "balancer: imbalanced");
        if *above < s.rounds {
            return Ok(());
        }
        let moves = model.plan(s, model.hosts().len() / 2, true);
        if moves.is_empty() {
            return Ok(());
        }
        // The next moves wait for fresh figures from where these VMs went.
        *above = 0;
        for m in moves {
            self.queue_rebalance(&m).await?;
        }
        Ok(())
    }

    async fn queue_rebalance(&self, m: &Move) -> Result<()> {
        let params = MigrateParams {
            to: Some(m.to.clone()),
            downtime_ms: DEFAULT_DOWNTIME_MS,
            reason: Some("rebalance".into()),
            ..Default::default()
        };
        let job = self
            .queue_job(JobKind::Migrate, OWNER, &m.vm_id, &params)
            .await?;
        self.event(
            EventKind::RebalancePlanned,
            &m.from,
            &m.vm_id,
            &job.id,
            &m.describe(),
        )
        .await;
        Ok(())
    }
}
