//! Webhooks (issue 16; docs/webhooks.md): vimd POSTs each event of the kinds a webhook lists to
//! its URL, as the JSON of the event, signed. Deliveries run beside vimd's work and never hold
//! it up: each is tried up to five times with back-off, and past a bound of deliveries in flight
//! new ones are dropped (and logged) rather than queued without end.
//!
//! The signature: `X-Vim-Signature: t=TS,v1=HEX`, HEX the HMAC-SHA256, keyed with the webhook's
//! secret, of `TS.BODY` (TS the sending time in ms since the epoch, BODY the request body as
//! sent). A receiver checks it and refuses an old TS, so a delivery cannot be replayed later.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::db::{self, Event, Webhook};
use crate::server::Vimd;

/// Tries per delivery, and the wait before the second (doubling after).
pub const ATTEMPTS: u32 = 5;
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// How long a receiver has to answer one try.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Deliveries in flight at most; past it new ones are dropped.
const IN_FLIGHT: usize = 256;
/// How often the webhooks are read again from the database.
const REFRESH: Duration = Duration::from_secs(2);

/// The signature header's value for `body` sent at `ts_ms`.
pub fn sign(secret: &str, ts_ms: i64, body: &str) -> String {
    // HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{ts_ms}.{body}").as_bytes());
    format!("t={ts_ms},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// What is wrong with a webhook's URL, if anything: http or https, a host, at most 2 KiB.
pub fn check_url(url: &str) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("url {url:?}: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() || url.len() > 2048 {
        return Err(format!(
            "url {url:?}: an http or https URL with a host, at most 2048 bytes"
        ));
    }
    Ok(())
}

/// What is wrong with a webhook's event kinds, if anything: known names, 1 to 64 of them.
pub fn check_events(events: &[String]) -> Result<(), String> {
    if events.is_empty() || events.len() > 64 {
        return Err("events: 1 to 64 event kinds".into());
    }
    for e in events {
        e.parse::<db::EventKind>()
            .map_err(|_| format!("events: {e:?} is not an event kind (say VM_Restarted)"))?;
    }
    Ok(())
}

/// The delivery task: every event vimd records goes to the webhooks that want it.
pub fn run(v: Arc<Vimd>) {
    let mut events = v.events.subscribe();
    tokio::spawn(async move {
        let client = match http_client() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "webhooks: no HTTP client; none will be delivered");
                return;
            }
        };
        let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        let mut hooks: Vec<Webhook> = Vec::new();
        let mut refresh = tokio::time::interval(REFRESH);
        // Owners of VMs looked up lately (a consumer's webhook gets only its own VMs' events).
        let mut owners: HashMap<String, String> = HashMap::new();
        loop {
            let ev = tokio::select! {
                _ = refresh.tick() => {
                    match v.db.webhooks(None).await {
                        Ok(h) => hooks = h,
                        Err(e) => tracing::warn!(error = %e, "webhooks: cannot read them"),
                    }
                    owners.clear();
                    continue;
                }
                ev = events.recv() => ev,
            };
            let ev = match ev {
                Ok(ev) => ev,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "webhooks: events went by undelivered");
                    continue;
                }
                Err(_) => return,
            };
            let kind = ev.kind.as_str();
            for h in hooks.iter().filter(|h| h.events.iter().any(|e| e == kind)) {
                if !h.all_vms && !owned_by(&v, &mut owners, &ev, &h.owner).await {
                    continue;
                }
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(
                        webhook = h.id,
                        event = ev.id,
                        "webhooks: too many deliveries in flight; dropped"
                    );
                    continue;
                };
                let (client, h, ev) = (client.clone(), h.clone(), ev.clone());
                tokio::spawn(async move {
                    deliver(&client, &h, &ev).await;
                    drop(permit);
                });
            }
        }
    });
}

/// Whether event `ev` is about a VM `owner` owns.
async fn owned_by(v: &Vimd, owners: &mut HashMap<String, String>, ev: &Event, owner: &str) -> bool {
    if ev.vm_id.is_empty() {
        return false;
    }
    if !owners.contains_key(&ev.vm_id) {
        let Ok(Some(vm)) = v.db.vm(&ev.vm_id).await else {
            return false;
        };
        owners.insert(ev.vm_id.clone(), vm.owner);
    }
    owners.get(&ev.vm_id).is_some_and(|o| o == owner)
}

async fn deliver(client: &reqwest::Client, h: &Webhook, ev: &Event) {
    let body = match serde_json::to_string(ev) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "webhooks: cannot write the event");
            return;
        }
    };
    let mut wait = FIRST_RETRY;
    for attempt in 1..=ATTEMPTS {
        let ts = db::now_ms();
        let r = client
            .post(&h.url)
            .header("content-type", "application/json")
            .header("x-vim-event", ev.kind.as_str())
            .header("x-vim-delivery", &ev.id)
            .header("x-vim-signature", sign(&h.secret, ts, &body))
            .body(body.clone())
            .send()
            .await;
        let why = match r {
            Ok(resp) if resp.status().is_success() => return,
            Ok(resp) => format!("answered {}", resp.status()),
            Err(e) => e.to_string(),
        };
        tracing::warn!(
            webhook = h.id,
            url = h.url,
            event = ev.id,
            attempt,
            error = why,
            "webhook delivery failed"
        );
        if attempt < ATTEMPTS {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
}

fn http_client() -> reqwest::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .redirect(reqwest::redirect::Policy::none());
    for c in crate::tls::system_roots() {
        b = b.add_root_certificate(c);
    }
    b.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_covers_time_and_body() {
        let s = sign("key", 1000, "{}");
        assert!(s.starts_with("t=1000,v1="), "{s}");
        assert_eq!(s.len(), "t=1000,v1=".len() + 64);
        assert_ne!(s, sign("key", 1001, "{}"));
        assert_ne!(s, sign("key", 1000, "{ }"));
        assert_ne!(s, sign("other", 1000, "{}"));
        assert_eq!(s, sign("key", 1000, "{}"));
    }

    #[test]
    fn urls_and_event_kinds_are_checked() {
        assert!(check_url("https://hooks.example/x").is_ok());
        assert!(check_url("http://127.0.0.1:8080/h").is_ok());
        for bad in ["ftp://x/y", "not a url", "file:///etc/passwd"] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        assert!(check_events(&["VM_Restarted".into(), "SLA_Violated".into()]).is_ok());
        assert!(check_events(&["VM_Restarted".into(), "SLA_Missed".into()]).is_err());
        assert!(check_events(&["VM_Restarted".into(), "Scaling_Refused".into()]).is_ok());
        assert!(check_events(&[]).is_err());
    }
}
