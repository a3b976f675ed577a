//! The job outbox. A job is committed to the database before anything else happens, and the API
//! answers as soon as it is; publishing it to `VIM_JOBS` and marking it published follow here,
//! in batches, so a burst of calls costs one publish round and one database write, not one each
//! per call. If vimd dies in between, the reconciler finds the job unpublished and publishes it
//! again under the same message id, which JetStream's duplicate window drops if the first copy
//! did arrive (and handlers are idempotent by job id if it is older than that).

use anyhow::Result;
use async_nats::jetstream;
use prost::Message;
use tokio::sync::mpsc;
use vim_proto::{subjects as s, PROTOCOL_VERSION};

use crate::db::Db;

/// Jobs published in one round at most.
const MAX_BATCH: usize = 256;

#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<String>,
}

impl Outbox {
    /// Starts the publishing task.
    pub fn start(js: jetstream::Context, db: Db) -> Outbox {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![(first.clone(), first)];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(id) => batch.push((id.clone(), id)),
                        Err(_) => break,
                    }
                }
                if let Err(e) = publish(&js, &db, &batch).await {
                    tracing::warn!(jobs = batch.len(), error = %e, "jobs not published yet; the reconciler retries");
                }
            }
        });
        Outbox { tx }
    }

    /// Queues a committed job for publishing.
    pub fn push(&self, job_id: &str) {
        if self.tx.send(job_id.to_string()).is_err() {
            tracing::warn!(job_id, "outbox stopped; the reconciler publishes the job");
        }
    }
}

/// Publishes jobs as `(job id, message id)` — a stale job is sent again under a fresh message id
/// so the duplicate window does not drop it — all at once, then marks the ones JetStream
/// acknowledged as published. Returns how many were.
pub async fn publish(js: &jetstream::Context, db: &Db, jobs: &[(String, String)]) -> Result<usize> {
    let mut pending = Vec::with_capacity(jobs.len());
    for (job_id, msg_id) in jobs {
        let msg = vim_proto::Job {
            version: PROTOCOL_VERSION,
            job_id: job_id.clone(),
        };
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", msg_id.as_str());
        match js
            .publish_with_headers(s::JOBS, h, msg.encode_to_vec().into())
            .await
        {
            Ok(ack) => pending.push((job_id, ack)),
            Err(e) => tracing::warn!(job_id, error = %e, "job not published"),
        }
    }
    let mut done = Vec::with_capacity(pending.len());
    for (job_id, ack) in pending {
        match ack.await {
            Ok(_) => done.push(job_id.clone()),
            Err(e) => tracing::warn!(job_id, error = %e, "job publish not acknowledged"),
        }
    }
    db.mark_published(&done).await?;
    Ok(done.len())
}
