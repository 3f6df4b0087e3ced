//! API keys: a client sends `authorization: Bearer KEY` metadata; the tier holds only the keys'
//! sha256 (lowercase hex) and compares hashes. The hash of the key that created a session or
//! uploaded an image is its owner: every other key is told the id does not exist. A tier with
//! no keys configured is open: every request is let in, and all share the owner "".

use std::collections::HashSet;
use std::path::Path;

use tonic::metadata::MetadataMap;

use crate::error::SessionError;

/// sha256 of `key`, lowercase hex: what a keys file holds.
pub fn hash_key(key: &str) -> String {
    blip2_common::soft_prompt::sha256_hex(key.as_bytes())
}

/// The key hashes of a keys file: one sha256 (64 hex characters) per line; blank lines and
/// lines starting with `#` are skipped.
pub fn read_keys_file(path: &Path) -> Result<Vec<String>, SessionError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        SessionError::Config(format!("reading the API keys file {}: {e}", path.display()))
    })?;
    parse_key_hashes(&text)
        .map_err(|message| SessionError::Config(format!("{}: {message}", path.display())))
}

/// The hashes of `text` (the keys file format; see [`read_keys_file`]).
pub fn parse_key_hashes(text: &str) -> Result<Vec<String>, String> {
    let mut hashes = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        hashes.push(check_hash(line).map_err(|m| format!("line {}: {m}", number + 1))?);
    }
    Ok(hashes)
}

fn check_hash(hash: &str) -> Result<String, String> {
    if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(
            "not a sha256 in hex (64 characters); `blip2 keys hash` makes one from a key".into(),
        );
    }
    Ok(hash.to_ascii_lowercase())
}

/// The API keys a tier accepts, by hash; empty: the tier is open.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    hashes: HashSet<String>,
}

impl ApiKeys {
    /// Keys from their sha256 hashes (hex); an empty list makes an open tier.
    pub fn from_hashes(hashes: &[String]) -> Result<Self, SessionError> {
        let hashes = hashes
            .iter()
            .map(|hash| check_hash(hash.trim()))
            .collect::<Result<HashSet<_>, _>>()
            .map_err(|message| SessionError::Config(format!("API key hash: {message}")))?;
        Ok(Self { hashes })
    }

    /// Whether requests need a key.
    pub fn required(&self) -> bool {
        !self.hashes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// The owner a request acts as: the hash of its bearer key, or "" on an open tier;
    /// UNAUTHENTICATED without a known key. Nothing of the key is logged or put in a message.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<String, SessionError> {
        if !self.required() {
            return Ok(String::new());
        }
        let Some(value) = metadata.get("authorization") else {
            return Err(SessionError::Unauthenticated(
                "this tier needs an API key: send `authorization: Bearer <key>` metadata".into(),
            ));
        };
        let key = value
            .to_str()
            .ok()
            .and_then(|value| {
                let (scheme, key) = value.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
            })
            .filter(|key| !key.is_empty())
            .ok_or_else(|| {
                SessionError::Unauthenticated(
                    "the `authorization` metadata must be `Bearer <key>`".into(),
                )
            })?;
        let hash = hash_key(key);
        if self.hashes.contains(&hash) {
            Ok(hash)
        } else {
            Err(SessionError::Unauthenticated("unknown API key".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: Option<&str>) -> MetadataMap {
        let mut map = MetadataMap::new();
        if let Some(value) = value {
            map.insert("authorization", value.parse().unwrap());
        }
        map
    }

    #[test]
    fn open_tier_lets_everyone_in_as_one_owner() {
        let keys = ApiKeys::default();
        assert!(!keys.required());
        assert_eq!(keys.authenticate(&metadata(None)).unwrap(), "");
        assert_eq!(keys.authenticate(&metadata(Some("Bearer x"))).unwrap(), "");
    }

    #[test]
    fn keys_are_compared_by_hash() {
        let keys = ApiKeys::from_hashes(&[hash_key("secret-a"), hash_key("secret-b")]).unwrap();
        assert_eq!(
            keys.authenticate(&metadata(Some("Bearer secret-a")))
                .unwrap(),
            hash_key("secret-a")
        );
        assert_eq!(
            keys.authenticate(&metadata(Some("bearer  secret-b ")))
                .unwrap(),
            hash_key("secret-b")
        );
        for bad in [
            None,
            Some("Bearer nope"),
            Some("secret-a"),
            Some("Basic secret-a"),
        ] {
            let error = keys.authenticate(&metadata(bad)).unwrap_err();
            assert!(matches!(error, SessionError::Unauthenticated(_)), "{bad:?}");
            assert!(!error.to_string().contains("secret"));
        }
    }

    #[test]
    fn keys_file_takes_hashes_and_comments() {
        let hash = hash_key("k");
        let text = format!("# ops team\n\n{}\n", hash.to_uppercase());
        assert_eq!(parse_key_hashes(&text).unwrap(), vec![hash]);
        let error = parse_key_hashes("# x\nplain-key\n").unwrap_err();
        assert!(error.starts_with("line 2:"), "{error}");
    }
}
