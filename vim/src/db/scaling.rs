//! Scaling policies (docs/scaling.md): a consumer's, for all its VMs, or one VM's, which wins.

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{now_ms, Db, DbError, Vm};

/// What the VIM does with a VM's CPU use: the thresholds its agent watches, the ladder's floor
/// and ceiling, and the cool-down after each change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScalingPolicy {
    /// `consumer:NAME` or `vm:ID`.
    pub scope: String,
    pub enabled: bool,
    pub up_pct: i64,
    pub up_window_s: i64,
    pub down_pct: i64,
    pub down_window_s: i64,
    pub min_vcpus: i64,
    pub min_memory_mib: i64,
    pub max_vcpus: i64,
    pub max_memory_mib: i64,
    pub cooldown_s: i64,
}

impl Default for ScalingPolicy {
    /// The defaults: up at 80 % for 60 s, down at 15 % for 60 s, from 1 vCPU / 4 GiB to
    /// 128 vCPUs / 512 GiB, 120 s between changes.
    fn default() -> Self {
        ScalingPolicy {
            scope: String::new(),
            enabled: true,
            up_pct: 80,
            up_window_s: 60,
            down_pct: 15,
            down_window_s: 60,
            min_vcpus: 1,
            min_memory_mib: 4096,
            max_vcpus: 128,
            max_memory_mib: 512 * 1024,
            cooldown_s: 120,
        }
    }
}

impl ScalingPolicy {
    pub fn consumer_scope(name: &str) -> String {
        format!("consumer:{name}")
    }

    pub fn vm_scope(id: &str) -> String {
        format!("vm:{id}")
    }

    /// What the VM's agent watches (none when the policy is off).
    pub fn watch(&self) -> Option<vim_proto::ScalingWatch> {
        self.enabled.then_some(vim_proto::ScalingWatch {
            up_pct: self.up_pct as u32,
            up_window_s: self.up_window_s as u32,
            down_pct: self.down_pct as u32,
            down_window_s: self.down_window_s as u32,
            min_vcpus: self.min_vcpus as u32,
        })
    }
}

fn policy(r: &AnyRow) -> Result<ScalingPolicy, sqlx::Error> {
    Ok(ScalingPolicy {
        scope: r.try_get("scope")?,
        enabled: r.try_get::<i64, _>("enabled")? != 0,
        up_pct: r.try_get("up_pct")?,
        up_window_s: r.try_get("up_window_s")?,
        down_pct: r.try_get("down_pct")?,
        down_window_s: r.try_get("down_window_s")?,
        min_vcpus: r.try_get("min_vcpus")?,
        min_memory_mib: r.try_get("min_memory_mib")?,
        max_vcpus: r.try_get("max_vcpus")?,
        max_memory_mib: r.try_get("max_memory_mib")?,
        cooldown_s: r.try_get("cooldown_s")?,
    })
}

impl Db {
    /// Writes (or replaces) a policy.
    pub async fn set_scaling_policy(&self, p: &ScalingPolicy) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO scaling_policies (scope, enabled, up_pct, up_window_s, down_pct,
                 down_window_s, min_vcpus, min_memory_mib, max_vcpus, max_memory_mib, cooldown_s,
                 updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (scope) DO UPDATE SET enabled = $2, up_pct = $3, up_window_s = $4,
                 down_pct = $5, down_window_s = $6, min_vcpus = $7, min_memory_mib = $8,
                 max_vcpus = $9, max_memory_mib = $10, cooldown_s = $11, updated_at = $12",
        )
        .bind(&p.scope)
        .bind(i64::from(p.enabled))
        .bind(p.up_pct)
        .bind(p.up_window_s)
        .bind(p.down_pct)
        .bind(p.down_window_s)
        .bind(p.min_vcpus)
        .bind(p.min_memory_mib)
        .bind(p.max_vcpus)
        .bind(p.max_memory_mib)
        .bind(p.cooldown_s)
        .bind(now_ms())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn scaling_policies(&self) -> Result<Vec<ScalingPolicy>, DbError> {
        let rows = sqlx::query("SELECT * FROM scaling_policies ORDER BY scope")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(policy).collect::<Result<_, _>>()?)
    }

    pub async fn scaling_policy(&self, scope: &str) -> Result<Option<ScalingPolicy>, DbError> {
        let r = sqlx::query("SELECT * FROM scaling_policies WHERE scope = $1")
            .bind(scope)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.as_ref().map(policy).transpose()?)
    }

    /// The policy that applies to `vm`: its own, else its owner's; none without either.
    pub async fn scaling_policy_for(&self, vm: &Vm) -> Result<Option<ScalingPolicy>, DbError> {
        let rows = sqlx::query("SELECT * FROM scaling_policies WHERE scope = $1 OR scope = $2")
            .bind(ScalingPolicy::vm_scope(&vm.id))
            .bind(ScalingPolicy::consumer_scope(&vm.owner))
            .fetch_all(&self.pool)
            .await?;
        let mut found: Vec<ScalingPolicy> = rows.iter().map(policy).collect::<Result<_, _>>()?;
        found.sort_by_key(|p| !p.scope.starts_with("vm:"));
        Ok(found.into_iter().next())
    }

    /// Records that the VIM resized the VM on its own now (the cool-down runs from here).
    pub async fn set_scaled_at(&self, id: &str, at: i64) -> Result<(), DbError> {
        sqlx::query("UPDATE vms SET scaled_at = $1 WHERE id = $2")
            .bind(at)
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }
}
