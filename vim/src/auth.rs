//! API tokens and roles. A token is 32 random bytes in hex; only its SHA-256 is stored. `admin`
//! sees and does everything; `consumer` sees and changes only the VMs and jobs it owns.

use sha2::{Digest, Sha256};

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
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let (who, at) = known.get(hash)?;
        (at.elapsed() < Self::TTL).then(|| who.clone())
    }

    pub fn put(&self, hash: &str, who: &Identity) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= Self::MAX {
            known.clear();
        }
        known.insert(hash.to_string(), (who.clone(), std::time::Instant::now()));
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
