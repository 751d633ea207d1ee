//! Templates: a runtime plus build steps, booted once, made ready and snapshotted, so that
//! every sandbox created from one is a restore (`POST /templates`, `GET /templates`,
//! `POST /sandboxes {"template": NAME}`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /templates`: build (or rebuild) template `name`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateBody {
    /// Letters, digits, `-`, `_` and `.`; at most 64 characters.
    pub name: String,
    /// The runtime it builds on (default: the service's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// What is done to the fresh sandbox, in order. Each step's result is kept: a rebuild
    /// whose first steps are unchanged starts after them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<TemplateStep>,
    /// Run until it succeeds before the snapshot is taken (say, a server answering).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<ReadyCheck>,
}

/// One build step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TemplateStep {
    /// Debian packages (`apt-get install`, as root).
    Apt(Vec<String>),
    /// Python packages (`pip install --user`, as the runtime's user).
    Pip(Vec<String>),
    /// npm packages (`npm install` in the working directory, as the runtime's user).
    Npm(Vec<String>),
    /// A shell command (`sh -c`, as the runtime's user in its working directory).
    Run(String),
    /// A file written into the sandbox (the runtime's user's inside its working directory,
    /// root's elsewhere).
    Copy(CopyFile),
}

/// A file a template step writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CopyFile {
    /// Absolute path in the guest.
    pub path: String,
    /// Its bytes, base64.
    pub content_base64: String,
    /// Permission bits, octal text (default `644`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// The command that says a template's sandbox is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadyCheck {
    /// Run with `sh -c` once a second until it exits 0.
    pub cmd: String,
    /// Give up after this long (default 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
}

/// A built template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TemplateInfo {
    pub name: String,
    pub runtime: String,
    pub steps: Vec<TemplateStep>,
    pub ready: Option<ReadyCheck>,
    /// The snapshot every sandbox of this template is restored from.
    pub snapshot: String,
    pub built_unix_ms: u64,
    /// How long the build took.
    pub build_ms: f64,
    /// How many of its steps an earlier build had done already.
    pub steps_cached: usize,
}

/// `GET /templates`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TemplateList {
    pub templates: Vec<TemplateInfo>,
}

/// Whether `name` may name a template.
pub fn valid_template_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_one_key_objects_in_order() {
        let text = r#"{"name": "web", "runtime": "node22", "steps": [
            {"apt": ["jq"]}, {"npm": ["express@4"]}, {"run": "echo hi > /tmp/x"},
            {"copy": {"path": "/home/user/app.js", "content_base64": "MQ=="}}],
            "ready": {"cmd": "true"}}"#;
        let body: TemplateBody = serde_json::from_str(text).unwrap();
        assert_eq!(body.steps.len(), 4);
        assert_eq!(body.steps[0], TemplateStep::Apt(vec!["jq".into()]));
        assert!(matches!(&body.steps[3], TemplateStep::Copy(c) if c.mode.is_none()));
        let again: TemplateBody =
            serde_json::from_str(&serde_json::to_string(&body).unwrap()).unwrap();
        assert_eq!(again, body);
        for bad in [
            r#"{"name": "x", "steps": [{"apt": ["a"], "pip": ["b"]}]}"#,
            r#"{"name": "x", "steps": [{"brew": ["a"]}]}"#,
        ] {
            assert!(serde_json::from_str::<TemplateBody>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn template_names_are_plain() {
        for good in ["web", "py-3.13_data", "a"] {
            assert!(valid_template_name(good), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_template_name(bad), "{bad}");
        }
    }
}
