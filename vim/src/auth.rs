//! API tokens and roles. A token is 32 random bytes in hex; only its SHA-256 is stored. `admin`
//! sees and does everything; `consumer` sees and changes only the VMs and jobs it owns.

use sha2::{Digest, Sha256};

/// bcrypt's cost for NATS passwords: nats-server checks it once per connection (an agent
/// connects once), and 2^10 rounds take tens of milliseconds; the passwords are 256 random bits,
/// so the hash guards against reading, not guessing.
const NATS_BCRYPT_COST: u32 = 10;

/// The hash nats-server accepts in place of a password (`$2b$…`).
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    Ok(bcrypt::hash(password, NATS_BCRYPT_COST)?)
}

/// Whether a stored NATS password is a hash already (an older vimd stored plaintext).
pub fn is_password_hash(stored: &str) -> bool {
    stored.starts_with("$2")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Consumer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Consumer => "consumer",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "consumer" => Some(Role::Consumer),
            _ => None,
        }
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
}

impl Identity {
    /// What this caller may see: `None` = everything, else only what `owner` names.
    pub fn owner_filter(&self) -> Option<&str> {
        match self.role {
            Role::Admin => None,
            Role::Consumer => Some(&self.name),
        }
    }
    pub fn may_touch(&self, owner: &str) -> bool {
        self.role == Role::Admin || self.name == owner
    }
}

/// Tokens seen lately, by hash, so an API call does not ask the database who its caller is each
/// time (that lookup was half the database round trips of a `GET`). Only known tokens are kept,
/// and only for `TTL`: an unknown one always asks the database (a token minted by another vimd
/// works at once), and a token removed from the database stops working within `TTL`.
#[derive(Default)]
pub struct TokenCache {
    known: std::sync::Mutex<std::collections::HashMap<String, (Identity, std::time::Instant)>>,
}

impl TokenCache {
    pub const TTL: std::time::Duration = std::time::Duration::from_secs(30);
    /// More than this many tokens in use at once: the cache starts over rather than grow.
    const MAX: usize = 10_000;

    pub fn get(&self, hash: &str) -> Option<Identity> {
        let known = crate::lock(&self.known);
        let (who, at) = known.get(hash)?;
        (at.elapsed() < Self::TTL).then(|| who.clone())
    }

    pub fn put(&self, hash: &str, who: &Identity) {
        let mut known = crate::lock(&self.known);
        if known.len() >= Self::MAX {
            known.clear();
        }
        known.insert(hash.to_string(), (who.clone(), std::time::Instant::now()));
    }
}

/// Failed logins, counted per source address and in all, a minute at a time. Each failure
/// used to write its own audit row (20,000 rows in 3 s from one client); now a source's first
/// `per_source` failures in a minute (`PER_SOURCE` by default, `vimd --failed-logins-per-minute`)
/// are audited one by one and the rest are refused with 429 unaudited, and past `IN_ALL` failures a minute from everyone together the rest are counted
/// only. What was counted but not written becomes one summary row per source (`take_summary`).
pub struct LoginLimiter {
    per_source: u32,
    inner: std::sync::Mutex<LimiterState>,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        LoginLimiter::new(Self::PER_SOURCE)
    }
}

#[derive(Default)]
struct LimiterState {
    window_start: Option<std::time::Instant>,
    in_all: u32,
    per_source: std::collections::HashMap<std::net::IpAddr, u32>,
    /// Failures counted but not audited, by source ("?" when unknown).
    unaudited: std::collections::BTreeMap<String, u64>,
}

/// What to do with one failed login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Write its audit row and answer 401.
    Audit,
    /// Counted; answer 401 without a row of its own.
    Count,
    /// Counted; this source has failed too often: answer 429.
    Refuse,
}

impl LoginLimiter {
    pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
    pub const PER_SOURCE: u32 = 20;
    pub const IN_ALL: u32 = 200;
    /// Sources remembered in one window at most (more: the window starts over).
    const MAX_SOURCES: usize = 100_000;

    /// A limiter that refuses a source past `per_source` failures a minute.
    pub fn new(per_source: u32) -> LoginLimiter {
        LoginLimiter {
            per_source: per_source.max(1),
            inner: Default::default(),
        }
    }

    pub fn failed(&self, source: Option<std::net::IpAddr>) -> Failure {
        let mut st = crate::lock(&self.inner);
        let now = std::time::Instant::now();
        let expired = st
            .window_start
            .is_none_or(|t| now.duration_since(t) >= Self::WINDOW);
        if expired || st.per_source.len() >= Self::MAX_SOURCES {
            st.window_start = Some(now);
            st.in_all = 0;
            st.per_source.clear();
        }
        st.in_all += 1;
        let mine = match source {
            Some(ip) => {
                let n = st.per_source.entry(ip).or_default();
                *n += 1;
                *n
            }
            None => 0,
        };
        let verdict = if mine > self.per_source {
            Failure::Refuse
        } else if st.in_all > Self::IN_ALL {
            Failure::Count
        } else {
            Failure::Audit
        };
        if verdict != Failure::Audit {
            let key = source.map_or_else(|| "?".to_string(), |ip| ip.to_string());
            *st.unaudited.entry(key).or_default() += 1;
        }
        verdict
    }

    /// The failures counted but not audited since the last call, by source.
    pub fn take_summary(&self) -> Vec<(String, u64)> {
        let mut st = crate::lock(&self.inner);
        std::mem::take(&mut st.unaudited).into_iter().collect()
    }
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// 32 random bytes from the kernel, hex-encoded.
pub fn random_secret() -> String {
    let mut b = [0u8; 32];
    let mut done = 0;
    while done < b.len() {
        // SAFETY: getrandom writes at most the given length into a buffer we own.
        let n = unsafe { libc::getrandom(b[done..].as_mut_ptr().cast(), b.len() - done, 0) };
        if n > 0 {
            done += n as usize;
        }
    }
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_logins_are_limited_per_source_and_in_all() {
        let l = LoginLimiter::default();
        let a: std::net::IpAddr = "127.0.0.2".parse().unwrap();
        for _ in 0..LoginLimiter::PER_SOURCE {
            assert_eq!(l.failed(Some(a)), Failure::Audit);
        }
        assert_eq!(l.failed(Some(a)), Failure::Refuse);
        assert_eq!(l.failed(Some(a)), Failure::Refuse);
        // Another source is not refused for the first one's failures, but past the overall
        // bound (counting those two) failures are only counted.
        let mut verdicts = Vec::new();
        for i in 0..20u8 {
            for _ in 0..10 {
                verdicts.push(l.failed(Some(std::net::IpAddr::from([127, 0, 1, i]))));
            }
        }
        assert!(!verdicts.contains(&Failure::Refuse));
        let audited = verdicts.iter().filter(|v| **v == Failure::Audit).count() as u32;
        assert_eq!(audited, LoginLimiter::IN_ALL - LoginLimiter::PER_SOURCE - 2);
        assert_eq!(l.failed(None), Failure::Count);
        let summary = l.take_summary();
        let total: u64 = summary.iter().map(|(_, n)| n).sum();
        // 2 refused, and everything past the overall bound.
        assert_eq!(
            total,
            2 + (LoginLimiter::PER_SOURCE as u64 + 2 + 200 + 1 - LoginLimiter::IN_ALL as u64)
        );
        assert!(summary.iter().any(|(s, n)| s == "127.0.0.2" && *n >= 2));
        assert!(l.take_summary().is_empty());
    }

    #[test]
    fn the_token_cache_forgets_after_its_ttl() {
        let c = TokenCache::default();
        let who = Identity {
            name: "alice".into(),
            role: Role::Consumer,
        };
        assert_eq!(c.get("h"), None);
        c.put("h", &who);
        assert_eq!(c.get("h"), Some(who.clone()));
        let long_ago = std::time::Instant::now()
            .checked_sub(TokenCache::TTL + std::time::Duration::from_secs(1))
            .unwrap();
        c.known.lock().unwrap().insert("h".into(), (who, long_ago));
        assert_eq!(c.get("h"), None, "an entry older than the TTL was used");
    }

    #[test]
    fn tokens_and_roles() {
        let t = random_secret();
        assert_eq!(t.len(), 64);
        assert_ne!(t, random_secret());
        assert_eq!(hash_token(&t), hash_token(&format!("{t}\n")));
        let c = Identity {
            name: "bob".into(),
            role: Role::Consumer,
        };
        assert!(c.may_touch("bob") && !c.may_touch("alice"));
        assert_eq!(c.owner_filter(), Some("bob"));
        assert_eq!(Role::parse("root"), None);
    }
}
