//! Telling a Hugging Face repo id (`owner/name`) from a checkpoint path. Always compiled, so
//! that a build without the `hub` feature can still say why `--model owner/name` fails.

use std::path::Path;

/// True when `s` looks like a repo id ("owner/name") rather than a path that exists.
pub fn looks_like_repo_id(s: &str) -> bool {
    is_repo_id(s) && !Path::new(s).exists()
}

/// `owner/name` with the hub's naming rules: ASCII letters, digits, `-`, `_`, `.`; no leading
/// or trailing `-` / `.`, no `--` or `..`; at most 96 characters each.
pub(crate) fn is_repo_id(s: &str) -> bool {
    fn part(p: &str) -> bool {
        !p.is_empty()
            && p.len() <= 96
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
    }
    match s.split_once('/') {
        Some((owner, name)) => part(owner) && part(name),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        for id in [
            "Salesforce/blip2-opt-2.7b",
            "Salesforce/blip2-flan-t5-xl",
            "owner/name",
            "a/b",
            "user_1/model.v2",
        ] {
            assert!(is_repo_id(id), "{id}");
            assert!(looks_like_repo_id(id), "{id}");
        }
        for not in [
            "",
            "blip2",
            "/models/blip2",
            "./blip2/opt",
            "../x/y",
            "a/b/c",
            "owner/",
            "/name",
            "owner//name",
            "owner/na me",
            "owner/.hidden",
            "owner/name-",
            "-owner/name",
            "owner/a..b",
            "owner/a--b",
            "C:\\models\\blip2",
            "owner/ñame",
        ] {
            assert!(!is_repo_id(not), "{not}");
            assert!(!looks_like_repo_id(not), "{not}");
        }
        let long = format!("owner/{}", "x".repeat(97));
        assert!(!is_repo_id(&long));
    }

    #[test]
    fn an_existing_path_is_not_a_repo_id() {
        // Tests run in the package directory, where `src/error.rs` exists: it has the owner/name
        // shape but is a path.
        assert!(Path::new("src/error.rs").exists());
        assert!(is_repo_id("src/error.rs"));
        assert!(!looks_like_repo_id("src/error.rs"));
    }
}
