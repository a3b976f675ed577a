//! Heartbeats in, and the clock that notices the missing ones.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use vim_proto::{subjects as s, Versioned};

use super::Vimd;
use crate::db::{self, Event, EventKind, HostState};
use crate::monitor::Beat;

/// Heartbeats in, and the clock that notices missing ones: `PS_Timeout` for each missed interval,
/// `PS_Unreachable` at the configured count (the host and its VMs are marked), `PS_Reachable`
/// when it beats again. Liveness lives in memory (`monitor.rs`). One task takes heartbeats in and
/// runs the clock without ever waiting for the database; a second writes what it saw, in order
/// and in batches, so 10,000 hosts cost a few transactions a second and a slow database delays
/// the records, not the liveness.
pub async fn run_monitor(v: Arc<Vimd>) -> Result<()> {
    v.liveness.load(&v.db.hosts().await?);
    let mut sub = v.nats.subscribe(s::ALL_HEARTBEATS).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Seen>();
    let v2 = v.clone();
    tokio::spawn(async move {
        let every = v2.monitoring.interval;
        let mut flush = tokio::time::interval(HEARTBEAT_BATCH.min(every));
        let mut clock = tokio::time::interval(every);
        let mut seen = Seen::default();
        // A vimd that becomes the leader starts from the database, as a vimd starting does: what
        // it heard as a standby is not what the old leader recorded.
        let mut leading = v2.is_leader();
        loop {
            let lead = v2.is_leader();
            if lead && !leading {
                match v2.db.hosts().await {
                    Ok(hosts) => v2.liveness.load(&hosts),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot load hosts on taking the lead");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
                seen = Seen::default();
            }
            leading = lead;
            tokio::select! {
                m = sub.next() => {
                    let Some(m) = m else { break };
                    if !lead {
                        continue; // the leader records heartbeats
                    }
                    // The subject names the sender (its permissions allow only its own); what
                    // a host sends wrong goes to its own share of the dead letters.
                    let Some(sender) = s::sender(&m.subject, s::HEARTBEATS_PREFIX) else {
                        continue;
                    };
                    let dead = s::host_dead_letter(sender);
                    let mut hb = match vim_proto::Heartbeat::decode_checked(&m.payload) {
                        Ok(hb) => hb,
                        Err(e) => {
                            vim_proto::dead_letter(&v2.js, &dead, &m.subject, &m.payload, &e.to_string()).await;
                            continue;
                        }
                    };
                    if hb.host_id != sender {
                        vim_proto::dead_letter(&v2.js, &dead, &m.subject, &m.payload, "host id does not match subject")
                            .await;
                        continue;
                    }
                    crate::monitor::bound_report(&mut hb);
                    match v2.liveness.beat(hb, db::now_ms()) {
                        Beat::Steady | Beat::Unknown => {}
                        Beat::Returned { before, hb } => seen.returned.push((before, hb)),
                    }
                }
                _ = flush.tick() => {
                    if !lead {
                        continue;
                    }
                    if tx.send(std::mem::take(&mut seen)).is_err() {
                        break;
                    }
                }
                _ = clock.tick() => {
                    if !lead {
                        continue;
                    }
                    let misses = v2.liveness.tick(db::now_ms(), every, v2.monitoring.misses_for_unreachable);
                    if !misses.is_empty() && tx.send(Seen { misses, ..Default::default() }).is_err() {
                        break;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some(seen) = rx.recv().await {
            v.record_seen(seen).await;
        }
    });
    Ok(())
}

/// What the monitor saw since it last handed over.
#[derive(Default)]
struct Seen {
    /// Hosts reachable again (or for the first time), with the state they were in.
    returned: Vec<(HostState, vim_proto::Heartbeat)>,
    misses: Vec<crate::monitor::Miss>,
}

impl Vimd {
    /// Writes what the monitor saw: heartbeat reports (the facts placement needs) before the
    /// states that make a host count, then the events.
    async fn record_seen(self: &Arc<Self>, mut seen: Seen) {
        // Hosts registered since this vimd loaded them (perhaps through another vimd), looked up
        // together.
        let asked = self.liveness.pending();
        if !asked.is_empty() {
            match self.db.hosts_among(&asked).await {
                Ok(found) => seen.returned.extend(self.liveness.adopt(&found, &asked)),
                Err(e) => tracing::error!(error = %e, "cannot look up hosts that heartbeat"),
            }
        }
        let beats = self.liveness.to_flush(db::now_ms());
        if let Err(e) = self.db.record_heartbeats(&beats).await {
            tracing::error!(error = %e, hosts = beats.len(), "cannot record heartbeats");
        }
        let mut states = Vec::new();
        let mut events = Vec::new();
        for (before, hb) in &seen.returned {
            if *before == HostState::Unreachable {
                self.evict_moved(hb).await;
            }
        }
        for (before, hb) in seen.returned {
            states.push(db::HostChange {
                host: hb.host_id.clone(),
                state: HostState::Reachable,
                missed: 0,
            });
            events.push(if before == HostState::Unreachable {
                Event::new(
                    EventKind::PsReachable,
                    &hb.host_id,
                    "",
                    "",
                    "heartbeats again",
                )
            } else {
                Event::new(EventKind::HostRegistered, &hb.host_id, "", "", &hb.hostname)
            });
        }
        for m in seen.misses {
            let detail = format!("no heartbeat for {} ms ({} missed)", m.silent_ms, m.missed);
            events.push(Event::new(EventKind::PsTimeout, &m.host, "", "", &detail));
            if m.unreachable_now {
                let detail = format!("{} heartbeats missed in a row", m.missed);
                events.push(Event::new(
                    EventKind::PsUnreachable,
                    &m.host,
                    "",
                    "",
                    &detail,
                ));
            }
            states.push(db::HostChange {
                state: if m.unreachable_now {
                    HostState::Unreachable
                } else {
                    HostState::Reachable
                },
                host: m.host,
                missed: m.missed,
            });
        }
        if let Err(e) = self.db.set_host_states(&states).await {
            tracing::error!(error = %e, hosts = states.len(), "cannot record host states");
        }
        self.record_events(events).await;
        for h in states.iter().filter(|c| c.state == HostState::Unreachable) {
            if let Err(e) = self.target_went_silent(&h.host).await {
                tracing::error!(host = h.host, error = %e, "cannot end the migrations into a silent host");
            }
        }
    }
}

/// How often heartbeat reports are written (one batch each time).
const HEARTBEAT_BATCH: Duration = Duration::from_secs(1);
