//! Placement: which host gets a new VM. Hosts that are reachable and have room, with CPU and
//! memory overcommit ratios (OpenStack's defaults since 2023: 4.0 CPU, 1.0 memory) and memory
//! reserved for the host itself; the host with the most free memory wins. With more reachable
//! hosts than [`crate::db::PLACEMENT_SAMPLE`], the roomiest of a random sample of that many
//! wins, and every host is weighed only when none of the sample has room (docs/scale.md).

use serde::Serialize;

use crate::db::{Db, DbError};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Policy {
    pub cpu_ratio: f64,
    pub memory_ratio: f64,
    pub reserved_memory_mib: i64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            cpu_ratio: 4.0,
            memory_ratio: 1.0,
            reserved_memory_mib: 512,
        }
    }
}

/// Which hosts a placement may choose from: all reachable ones, one named host, or all but
/// one (a migration's source); with `group` (owner, group), only hosts that run no VM of that
/// owner's anti-affinity group.
#[derive(Debug, Clone, Copy, Default)]
pub struct Among<'a> {
    pub only: Option<&'a str>,
    pub except: Option<&'a str>,
    pub group: Option<(&'a str, &'a str)>,
}

impl<'a> Among<'a> {
    /// Anywhere but `except`, away from the other members of `vm`'s group.
    pub fn for_vm(vm: &'a crate::db::Vm, only: Option<&'a str>, except: Option<&'a str>) -> Self {
        Among {
            only,
            except,
            group: (!vm.group.is_empty()).then_some((vm.owner.as_str(), vm.group.as_str())),
        }
    }
}

/// The chosen host, or why none fits (`Ok(Err(why))`). The database does the choosing
/// ([`Db::roomiest_host`]), so placing a VM costs one query however many hosts there are.
pub async fn choose(
    db: &Db,
    policy: &Policy,
    vcpus: i64,
    memory_mib: i64,
    among: Among<'_>,
) -> Result<Result<String, String>, DbError> {
    if let Some(h) = db.roomiest_host(policy, vcpus, memory_mib, among).await? {
        return Ok(Ok(h));
    }
    if let Some(only) = among.only {
        let member = among
            .group
            .map(|(_, g)| format!(", or runs a VM of group {g}"))
            .unwrap_or_default();
        return Ok(Err(format!(
            "host {only} is not reachable or has no room for {vcpus} vCPUs and {memory_mib} MiB{member}"
        )));
    }
    let apart = among
        .group
        .map(|(_, g)| format!(" and no VM of group {g}"))
        .unwrap_or_default();
    let reachable = db.count_hosts(crate::db::HostState::Reachable).await?;
    Ok(Err(format!(
        "no host has room for {vcpus} vCPUs and {memory_mib} MiB{apart} ({reachable} reachable \
         host(s); overcommit cpu {} memory {}, {} MiB reserved per host)",
        policy.cpu_ratio, policy.memory_ratio, policy.reserved_memory_mib
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::tests::databases;
    use crate::db::{HostChange, HostState, Job, JobKind, Vm, VmState};

    /// Hosts a (1000 MiB used), b (empty), c (unreachable), each 2 cores and 4096 MiB.
    async fn fleet(db: &Db) {
        hosts(db, &["a", "b", "c"]).await;
        place(db, "v", 0, 1000, "a").await;
    }

    /// A running VM of owner o placed on `host`.
    async fn place(db: &Db, id: &str, vcpus: i64, memory_mib: i64, host: &str) {
        let vm = Vm {
            id: id.into(),
            owner: "o".into(),
            vcpus,
            memory_mib,
            state: VmState::Running,
            ..Vm::default()
        };
        db.add_job(&Job::new(JobKind::Create, "o", id), Some(&vm))
            .await
            .unwrap();
        db.place_vm(id, host, "").await.unwrap();
    }

    /// Hosts of 2 cores and 4096 MiB, reachable but for one named "c".
    async fn hosts(db: &Db, ids: &[&str]) {
        for &id in ids {
            db.add_host(id, "u", "p").await.unwrap();
            let hb = vim_proto::Heartbeat {
                host_id: id.into(),
                cpu_cores: 2,
                memory_mib: 4096,
                ..Default::default()
            };
            db.record_heartbeats(&[crate::db::HostReport::new(hb, 1)])
                .await
                .unwrap();
            let state = if id == "c" {
                HostState::Unreachable
            } else {
                HostState::Reachable
            };
            db.set_host_states(&[HostChange {
                host: id.into(),
                state,
                missed: 0,
            }])
            .await
            .unwrap();
        }
    }

    /// More reachable hosts than a placement samples, all full but one: that one is found
    /// wherever it lies in the sample order (placement then weighs every host), a migration
    /// away from it is refused, and with room everywhere the pick is a host with room.
    #[tokio::test]
    async fn the_one_host_with_room_among_many_is_found() {
        let n = crate::db::PLACEMENT_SAMPLE as usize * 2 + 5;
        let names: Vec<String> = (0..n).map(|i| format!("h{i:03}")).collect();
        let ids: Vec<&str> = names.iter().map(String::as_str).collect();
        for (db, _dir) in databases().await {
            hosts(&db, &ids).await;
            let p = Policy::default();
            let any = Among::default();
            assert!(ids.contains(
                &choose(&db, &p, 1, 3000, any)
                    .await
                    .unwrap()
                    .unwrap()
                    .as_str()
            ));
            for (i, id) in ids.iter().enumerate().filter(|(i, _)| *i != 17) {
                place(&db, &format!("v{i}"), 1, 3000, id).await;
            }
            for _ in 0..5 {
                assert_eq!(choose(&db, &p, 1, 600, any).await.unwrap().unwrap(), "h017");
            }
            let except = Among {
                except: Some("h017"),
                ..any
            };
            let e = choose(&db, &p, 1, 600, except).await.unwrap().unwrap_err();
            assert!(e.contains("no host has room"), "{e}");
            // Full on CPU too: 8 vCPUs fit h017's 2 cores at 4.0, 9 do not, anywhere.
            assert!(choose(&db, &p, 9, 64, any).await.unwrap().is_err());
        }
    }

    #[tokio::test]
    async fn picks_the_roomiest_reachable_host_and_refuses_clearly() {
        for (db, _dir) in databases().await {
            fleet(&db).await;
            let p = Policy::default();
            let pick = |c, m| {
                let (db, p) = (db.clone(), p);
                async move { choose(&db, &p, c, m, Among::default()).await.unwrap() }
            };
            assert_eq!(pick(1, 512).await.unwrap(), "b");
            // 8 vCPUs fit 2 cores at 4.0, 9 do not.
            assert!(pick(8, 64).await.is_ok());
            let e = pick(9, 64).await.unwrap_err();
            assert!(
                e.contains("no host has room") && e.contains("2 reachable"),
                "{e}"
            );
            // Memory: 4096 - 512 reserved = 3584 at ratio 1.0 (b is empty; a has 1000 used).
            assert_eq!(pick(1, 3584).await.unwrap(), "b");
            assert!(pick(1, 3585).await.is_err());
            // Overcommit: memory ratio 2.0 lets a fit 2 * 3584 - 1000 = 6168.
            let roomy = Policy {
                memory_ratio: 2.0,
                ..p
            };
            let any = Among::default();
            assert_eq!(
                choose(&db, &roomy, 1, 7168, any).await.unwrap().unwrap(),
                "b"
            );
            assert!(choose(&db, &roomy, 1, 7169, any).await.unwrap().is_err());
            // A migration away from b lands on a; one to the unreachable c is refused by name.
            let except_b = Among {
                except: Some("b"),
                ..any
            };
            assert_eq!(
                choose(&db, &p, 1, 64, except_b).await.unwrap().unwrap(),
                "a"
            );
            let only_c = Among {
                only: Some("c"),
                ..any
            };
            let e = choose(&db, &p, 1, 64, only_c).await.unwrap().unwrap_err();
            assert!(e.contains("host c is not reachable"), "{e}");
        }
    }

    /// A VM of group g runs on a: the next member goes to b even though a is chosen otherwise,
    /// is refused when only a is asked for, and another owner's g does not count.
    #[tokio::test]
    async fn members_of_a_group_are_placed_apart() {
        for (db, _dir) in databases().await {
            fleet(&db).await;
            let member = Vm {
                id: "g1".into(),
                owner: "o".into(),
                vcpus: 1,
                memory_mib: 64,
                state: VmState::Running,
                group: "g".into(),
                ..Vm::default()
            };
            db.add_job(&Job::new(JobKind::Create, "o", "g1"), Some(&member))
                .await
                .unwrap();
            db.place_vm("g1", "b", "").await.unwrap();
            let p = Policy::default();
            let next = Vm {
                id: "g2".into(),
                ..member.clone()
            };
            // b is the roomiest, but runs g1.
            let among = Among::for_vm(&next, None, None);
            assert_eq!(choose(&db, &p, 1, 64, among).await.unwrap().unwrap(), "a");
            let only_b = Among::for_vm(&next, Some("b"), None);
            let e = choose(&db, &p, 1, 64, only_b).await.unwrap().unwrap_err();
            assert!(e.contains("runs a VM of group g"), "{e}");
            let except_a = Among::for_vm(&next, None, Some("a"));
            let e = choose(&db, &p, 1, 64, except_a).await.unwrap().unwrap_err();
            assert!(e.contains("and no VM of group g"), "{e}");
            let stranger = Vm {
                owner: "p".into(),
                ..next.clone()
            };
            let among = Among::for_vm(&stranger, None, None);
            assert_eq!(choose(&db, &p, 1, 64, among).await.unwrap().unwrap(), "b");
        }
    }
}
