//! The hub's environment variables, read once: `HF_ENDPOINT`, `HF_TOKEN` (or the token file),
//! `HF_HUB_CACHE` / `HF_HOME`, `HF_HUB_OFFLINE`. Same meaning and precedence as Python
//! `huggingface_hub`, so one shell setup serves both.

use std::path::PathBuf;

/// Where and how to reach the hub, resolved from the environment (or built directly in tests).
#[derive(Debug, Clone)]
pub struct HubEnv {
    /// Base URL without a trailing `/` (`HF_ENDPOINT`, default `https://huggingface.co`).
    pub endpoint: String,
    /// Bearer token: `HF_TOKEN`, else the file `HF_TOKEN_PATH`, else `$HF_HOME/token`.
    pub token: Option<String>,
    /// Hub cache folder: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub cache_dir: PathBuf,
    /// `HF_HUB_OFFLINE=1`: no request at all, only the cache.
    pub offline: bool,
}

impl HubEnv {
    pub fn from_env() -> Self {
        Self::from_lookup(|key| std::env::var(key).ok().filter(|v| !v.is_empty()))
    }

    /// [`HubEnv::from_env`] over any lookup (tests pass a map instead of the process env).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Self {
        let endpoint = var("HF_ENDPOINT")
            .map(|e| e.trim_end_matches('/').to_owned())
            .unwrap_or_else(|| "https://huggingface.co".into());
        // huggingface_hub's default HF_HOME is ~/.cache/huggingface.
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(var("HOME").unwrap_or_else(|| ".".into())).join(".cache/huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| {
            let path = var("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
        });
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| is_true(&v));
        HubEnv {
            endpoint,
            token,
            cache_dir,
            offline,
        }
    }
}

/// huggingface_hub's `_is_true`: `1`, `ON`, `YES`, `TRUE` in any case.
fn is_true(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HubEnv {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubEnv::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn precedence_matches_huggingface_hub() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap();
        std::fs::write(dir.path().join("token"), "hf_file\n").unwrap();

        let e = env(&[("HF_HOME", home), ("HF_ENDPOINT", "http://127.0.0.1:9/")]);
        assert_eq!(e.endpoint, "http://127.0.0.1:9");
        assert_eq!(e.cache_dir, dir.path().join("hub"));
        assert_eq!(e.token.as_deref(), Some("hf_file"));
        assert!(!e.offline);

        let e = env(&[
            ("HF_HOME", home),
            ("HF_HUB_CACHE", "/elsewhere"),
            ("HF_TOKEN", "hf_env"),
            ("HF_HUB_OFFLINE", "true"),
        ]);
        assert_eq!(e.cache_dir, PathBuf::from("/elsewhere"));
        assert_eq!(e.token.as_deref(), Some("hf_env"));
        assert!(e.offline);
        assert_eq!(e.endpoint, "https://huggingface.co");

        assert!(!env(&[("HF_HOME", home), ("HF_HUB_OFFLINE", "0")]).offline);
    }
}
