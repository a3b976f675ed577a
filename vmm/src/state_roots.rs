//! The directories API requests may name (a snapshot's, a live migration's), fixed at start with
//! `--state-root`: whoever reaches the API socket cannot make the VMM write the guest's memory
//! anywhere else, or read a migration from anywhere else. Without roots, any directory.

use std::path::{Component, Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateRootError {
    #[error("state root {0}: {1}")]
    BadRoot(PathBuf, String),
    #[error("{0} must be an absolute path without '..'")]
    NotPlain(PathBuf),
    #[error("cannot resolve {0}: {1}")]
    Resolve(PathBuf, String),
    #[error("{dir} is outside the directories this VMM may use for VM state ({roots})")]
    Outside { dir: PathBuf, roots: String },
}

/// The roots, resolved (symbolic links followed) at start.
#[derive(Debug, Clone, Default)]
pub struct StateRoots(Vec<PathBuf>);

impl StateRoots {
    /// Each root must be an existing directory.
    pub fn new(roots: &[PathBuf]) -> Result<StateRoots, StateRootError> {
        roots
            .iter()
            .map(|r| {
                let real = r
                    .canonicalize()
                    .map_err(|e| StateRootError::BadRoot(r.clone(), e.to_string()))?;
                if !real.is_dir() {
                    return Err(StateRootError::BadRoot(r.clone(), "not a directory".into()));
                }
                Ok(real)
            })
            .collect::<Result<_, _>>()
            .map(StateRoots)
    }

    /// `dir` as the VMM will use it: resolved through its existing part (a symbolic link that
    /// leads out of the roots is outside) and under one of the roots.
    pub fn check(&self, dir: &Path) -> Result<PathBuf, StateRootError> {
        if self.0.is_empty() {
            return Ok(dir.to_path_buf());
        }
        if !dir.is_absolute() || dir.components().any(|c| c == Component::ParentDir) {
            return Err(StateRootError::NotPlain(dir.into()));
        }
        // The directory may not exist yet (a snapshot creates it): resolve the part that does.
        let mut existing = dir;
        let mut rest = Vec::new();
        while !existing.exists() {
            match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name);
                    existing = parent;
                }
                _ => break,
            }
        }
        let mut real = existing
            .canonicalize()
            .map_err(|e| StateRootError::Resolve(dir.into(), e.to_string()))?;
        real.extend(rest.iter().rev());
        if self.0.iter().any(|root| real.starts_with(root)) {
            return Ok(real);
        }
        Err(StateRootError::Outside {
            dir: dir.into(),
            roots: self
                .0
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_directories_under_a_root_pass() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vm");
        let other = tmp.path().join("other");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        let roots = StateRoots::new(std::slice::from_ref(&root)).unwrap();
        let real_root = root.canonicalize().unwrap();
        // Existing, and not yet existing (created by the snapshot), nested.
        assert_eq!(roots.check(&root).unwrap(), real_root);
        assert_eq!(
            roots.check(&root.join("snap/1")).unwrap(),
            real_root.join("snap/1")
        );
        assert!(matches!(
            roots.check(&other.join("snap")),
            Err(StateRootError::Outside { .. })
        ));
        assert!(matches!(
            roots.check(&root.join("../other")),
            Err(StateRootError::NotPlain(_))
        ));
        assert!(matches!(
            roots.check(Path::new("snap")),
            Err(StateRootError::NotPlain(_))
        ));
        // A link inside the root that leads out of it.
        std::os::unix::fs::symlink(&other, root.join("escape")).unwrap();
        assert!(matches!(
            roots.check(&root.join("escape/snap")),
            Err(StateRootError::Outside { .. })
        ));
        // A sibling whose name starts like the root's is not under it.
        let sibling = tmp.path().join("vm2");
        std::fs::create_dir_all(&sibling).unwrap();
        assert!(roots.check(&sibling).is_err());
    }

    #[test]
    fn no_roots_means_anywhere_and_bad_roots_are_refused() {
        assert!(StateRoots::default().check(Path::new("/x/y")).is_ok());
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(StateRoots::new(&[file]).is_err());
        assert!(StateRoots::new(&[tmp.path().join("missing")]).is_err());
    }
}
