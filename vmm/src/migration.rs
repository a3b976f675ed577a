//! The traits that make a VM movable: every device and every vCPU can pause, resume, and save and
//! restore its state. Snapshot and live migration (see `docs/`) are built only from these, so a new
//! device that implements them is migratable with no change elsewhere.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("{id}: cannot pause: {reason}")]
    Pause { id: String, reason: String },
    #[error("{id}: cannot save state: {reason}")]
    Save { id: String, reason: String },
    #[error("{id}: cannot restore state: {reason}")]
    Restore { id: String, reason: String },
    #[error("{id}: state version {found} is not readable by this build (reads {supported})")]
    Version {
        id: String,
        found: u32,
        supported: u32,
    },
}

/// A component that can stop and restart its activity. Pausing must be idempotent.
pub trait Pausable {
    fn pause(&mut self) -> Result<(), MigrationError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), MigrationError> {
        Ok(())
    }
}

/// One component's saved state, tagged with its id and state version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ComponentState {
    pub id: String,
    pub version: u32,
    pub state: serde_json::Value,
}

/// Tags a saved state with its component id and version.
pub fn tag<S: Serialize>(
    id: &str,
    version: u32,
    state: S,
) -> Result<ComponentState, MigrationError> {
    let state = serde_json::to_value(state).map_err(|e| MigrationError::Save {
        id: id.into(),
        reason: e.to_string(),
    })?;
    Ok(ComponentState {
        id: id.into(),
        version,
        state,
    })
}

/// A component whose state can be saved while paused and restored into a fresh instance.
pub trait Snapshottable: Pausable {
    /// The saved form of this component.
    type State: Serialize + DeserializeOwned;
    /// Bumped whenever `State` changes incompatibly.
    const STATE_VERSION: u32;

    fn id(&self) -> String;
    fn save(&mut self) -> Result<Self::State, MigrationError>;
    fn restore(&mut self, state: Self::State) -> Result<(), MigrationError>;

    /// Saves into the tagged, versioned form.
    fn snapshot(&mut self) -> Result<ComponentState, MigrationError> {
        let state = self.save()?;
        tag(&self.id(), Self::STATE_VERSION, state)
    }

    /// Restores from the tagged form, refusing other versions.
    fn restore_snapshot(&mut self, s: &ComponentState) -> Result<(), MigrationError> {
        if s.version != Self::STATE_VERSION {
            return Err(MigrationError::Version {
                id: self.id(),
                found: s.version,
                supported: Self::STATE_VERSION,
            });
        }
        let state =
            serde_json::from_value(s.state.clone()).map_err(|e| MigrationError::Restore {
                id: self.id(),
                reason: e.to_string(),
            })?;
        self.restore(state)
    }
}
