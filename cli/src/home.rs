//! Where microagent keeps its state: `$MICROAGENT_HOME`, else `$XDG_STATE_HOME/microagent`, else
//! `~/.local/state/microagent`; one directory per workspace under `workspaces/`.

use std::path::{Path, PathBuf};

use crate::exit::{Code, Failure};

pub fn state_root() -> Result<PathBuf, Failure> {
    if let Some(h) = std::env::var_os("MICROAGENT_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("microagent"));
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".local/state/microagent")),
        None => Err(Failure::new(
            Code::Error,
            "cannot find a state directory: set MICROAGENT_HOME",
        )),
    }
}

pub fn workspaces_dir(root: &Path) -> PathBuf {
    root.join("workspaces")
}

/// Workspace names: what a hostname label allows, so forks can take them as identities.
pub fn check_name(name: &str) -> Result<(), Failure> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Failure::new(
            Code::Usage,
            format!("invalid workspace name {name:?}: use 1-63 letters, digits, '-' or '_'"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "builder", "fork-1", "x_y9"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a/b", "..", "a b", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
