//! The traits that make a VM movable: every component — the VM, the vCPUs, each device — pauses,
//! resumes, and saves and restores its state. Snapshot and live migration (see `docs/`) are built
//! only from these (`persist::Components` walks them as one tree), so a new device that implements
//! them is migratable with no change elsewhere.
//!
//! Each component's saved state is a typed struct with a version ([`State`]); in a snapshot it is
//! written as `{"version": N, "state": …}` ([`Versioned`]), and a version this build does not read
//! is refused by name when the snapshot is read, before anything is built from it.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("{id}: cannot pause: {reason}")]
    Pause { id: String, reason: String },
    #[error("{id}: cannot save state: {reason}")]
    Save { id: String, reason: String },
    #[error("{id}: cannot restore state: {reason}")]
    Restore { id: String, reason: String },
}

/// A component that can stop and restart its activity. Pausing must be idempotent. Every
/// component says what pausing means for it, even when it is nothing (a register file has no
/// activity of its own): there are no defaults to forget.
pub trait Pausable {
    fn pause(&self) -> Result<(), MigrationError>;
    fn resume(&self) -> Result<(), MigrationError>;
}

/// A component's saved form: which component kind it is and which layout version this build
/// writes and reads. Bump `VERSION` on any incompatible change to the struct.
pub trait State: Serialize + DeserializeOwned {
    const NAME: &'static str;
    const VERSION: u32;
}

/// A component whose state can be saved while paused and restored into a fresh instance.
pub trait Snapshottable {
    type State: State;

    /// Exact only while paused.
    fn save(&self) -> Result<Self::State, MigrationError>;
    fn restore(&mut self, state: Self::State) -> Result<(), MigrationError>;

    fn snapshot(&self) -> Result<Versioned<Self::State>, MigrationError> {
        Ok(Versioned(self.save()?))
    }

    fn restore_snapshot(&mut self, s: Versioned<Self::State>) -> Result<(), MigrationError> {
        self.restore(s.0)
    }
}

/// A saved state with its version, as snapshots hold it. Reading one of another version fails
/// with both versions named.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T>(pub T);

#[derive(Serialize)]
struct VersionedRef<'a, T> {
    version: u32,
    state: &'a T,
}

#[derive(Deserialize)]
struct VersionedRaw {
    version: u32,
    state: serde_json::Value,
}

impl<T: State> Serialize for Versioned<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        VersionedRef {
            version: T::VERSION,
            state: &self.0,
        }
        .serialize(s)
    }
}

impl<'de, T: State> Deserialize<'de> for Versioned<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let raw = VersionedRaw::deserialize(d)?;
        if raw.version != T::VERSION {
            return Err(D::Error::custom(format!(
                "{} state version {} is not readable by this build (reads {})",
                T::NAME,
                raw.version,
                T::VERSION
            )));
        }
        T::deserialize(raw.state)
            .map(Versioned)
            .map_err(|e| D::Error::custom(format!("{} state: {e}", T::NAME)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Thing {
        n: u32,
    }

    impl State for Thing {
        const NAME: &'static str = "thing";
        const VERSION: u32 = 3;
    }

    #[test]
    fn versions_are_written_and_checked() {
        let json = serde_json::to_string(&Versioned(Thing { n: 7 })).unwrap();
        assert_eq!(json, r#"{"version":3,"state":{"n":7}}"#);
        let back: Versioned<Thing> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.0, Thing { n: 7 });
        let e = serde_json::from_str::<Versioned<Thing>>(r#"{"version":4,"state":{"m":1}}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("thing state version 4 is not readable by this build (reads 3)"),
            "{e}"
        );
        let e = serde_json::from_str::<Versioned<Thing>>(r#"{"version":3,"state":{"m":1}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("thing state: missing field `n`"), "{e}");
    }
}
