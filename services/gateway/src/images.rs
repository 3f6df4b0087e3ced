//! Images of `image_url` parts: `data:` URIs always; `http(s)` URLs only from hosts on the
//! allow-list, with a size and a time limit, since fetching any URL a client names would let it
//! reach whatever this server can reach (SSRF).

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::error::GatewayError;

/// An image's file and its content hash (the session tier's key for soft prompts too).
#[derive(Debug, Clone)]
pub struct Image {
    pub data: Arc<Vec<u8>>,
    pub sha256: String,
}

impl Image {
    pub fn new(data: Vec<u8>) -> Self {
        let sha256 = hex::encode(Sha256::digest(&data));
        Self {
            data: Arc::new(data),
            sha256,
        }
    }
}

/// How images are loaded.
#[derive(Debug, Clone)]
pub struct ImageLimits {
    /// Hosts whose http(s) URLs may be fetched: exact names, or `*.example.com` for its
    /// subdomains; empty: data: URIs only.
    pub allow_hosts: Vec<String>,
    /// Largest image, decoded.
    pub max_image_bytes: usize,
    /// Limit on fetching one remote image, connection included.
    pub fetch_timeout: Duration,
}

impl ImageLimits {
    fn host_allowed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.allow_hosts.iter().any(|allowed| {
            let allowed = allowed.to_ascii_lowercase();
            match allowed.strip_prefix("*.") {
                Some(domain) => host
                    .strip_suffix(domain)
                    .is_some_and(|sub| sub.ends_with('.')),
                None => host == allowed,
            }
        })
    }
}

/// Loads the image `url` names; `param` names the part in error messages.
pub async fn load(url: &str, param: &str, limits: &ImageLimits) -> Result<Image, GatewayError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let data = decode_data_uri(rest, param, limits.max_image_bytes)?;
        return tokio::task::spawn_blocking(move || Image::new(data))
            .await
            .map_err(|e| GatewayError::invalid(param, format!("hashing the image failed: {e}")));
    }
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return Err(GatewayError::invalid(
            param,
            format!("`{param}` must be a data: URI (data:image/png;base64,...) or an http(s) URL"),
        ));
    }
    let host = host_of(url).unwrap_or_default();
    if !limits.host_allowed(&host) {
        return Err(GatewayError::invalid(
            param,
            format!(
                "`{param}`: this server fetches no images from `{host}` (allowed hosts are set \
                 with --http-allow-host); send the image as a data: URI"
            ),
        ));
    }
    let (url, param_owned, limits_owned) = (url.to_string(), param.to_string(), limits.clone());
    tokio::task::spawn_blocking(move || fetch(&url, &param_owned, &limits_owned))
        .await
        .map_err(|e| GatewayError::invalid(param, format!("fetching the image failed: {e}")))?
}

/// The body of a `data:` URI (after `data:`): `[<mediatype>][;base64],<data>`.
fn decode_data_uri(rest: &str, param: &str, max_bytes: usize) -> Result<Vec<u8>, GatewayError> {
    let Some((meta, payload)) = rest.split_once(',') else {
        return Err(GatewayError::invalid(
            param,
            format!("`{param}` is a data: URI without a `,`"),
        ));
    };
    if !meta.ends_with(";base64") {
        return Err(GatewayError::invalid(
            param,
            format!("`{param}` must be a base64 data: URI (data:image/png;base64,...)"),
        ));
    }
    let media_type = meta.trim_end_matches(";base64");
    if !(media_type.is_empty() || media_type.starts_with("image/")) {
        return Err(GatewayError::invalid(
            param,
            format!("`{param}` has media type `{media_type}`; an image/* type is needed"),
        ));
    }
    // Checked before decoding, so an oversized payload costs no allocation.
    if payload.len() / 4 * 3 > max_bytes.saturating_add(3) {
        return Err(too_large(param, max_bytes));
    }
    let payload = payload.trim_end_matches('=');
    let data = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(payload)
        .map_err(|e| GatewayError::invalid(param, format!("`{param}` is not valid base64: {e}")))?;
    if data.is_empty() {
        return Err(GatewayError::invalid(param, format!("`{param}` is empty")));
    }
    if data.len() > max_bytes {
        return Err(too_large(param, max_bytes));
    }
    Ok(data)
}

fn too_large(param: &str, max_bytes: usize) -> GatewayError {
    GatewayError::invalid(
        param,
        format!("`{param}`: the image is larger than {max_bytes} bytes"),
    )
}

/// The host of an http(s) URL, without user info or port.
fn host_of(url: &str) -> Option<String> {
    let after_scheme = url.split_once("://")?.1;
    let authority = after_scheme.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit('@').next()?;
    let host = if let Some(bracketed) = host_port.strip_prefix('[') {
        bracketed.split(']').next()?
    } else {
        host_port.split(':').next()?
    };
    Some(host.to_string())
}

/// Fetches an allowed URL on a blocking thread. Redirects are not followed: they could lead off
/// the allow-list.
fn fetch(url: &str, param: &str, limits: &ImageLimits) -> Result<Image, GatewayError> {
    let agent = ureq::AgentBuilder::new()
        .timeout(limits.fetch_timeout)
        .redirects(0)
        .build();
    let response = agent.get(url).call().map_err(|error| {
        let reason = match error {
            ureq::Error::Status(code, _) => format!("the server answered HTTP {code}"),
            ureq::Error::Transport(transport) => transport.to_string(),
        };
        GatewayError::invalid(
            param,
            format!("`{param}`: fetching the image failed: {reason}"),
        )
    })?;
    let max = limits.max_image_bytes;
    let mut data = Vec::new();
    response
        .into_reader()
        .take(max as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| {
            GatewayError::invalid(param, format!("`{param}`: reading the image failed: {e}"))
        })?;
    if data.len() > max {
        return Err(too_large(param, max));
    }
    if data.is_empty() {
        return Err(GatewayError::invalid(
            param,
            format!("`{param}`: the URL returned no bytes"),
        ));
    }
    Ok(Image::new(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(hosts: &[&str]) -> ImageLimits {
        ImageLimits {
            allow_hosts: hosts.iter().map(|h| h.to_string()).collect(),
            max_image_bytes: 16,
            fetch_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn data_uris_decode_with_or_without_padding() {
        assert_eq!(
            decode_data_uri("image/png;base64,aGVsbG8=", "p", 16).ok(),
            Some(b"hello".to_vec())
        );
        assert_eq!(
            decode_data_uri("image/png;base64,aGVsbG8", "p", 16).ok(),
            Some(b"hello".to_vec())
        );
    }

    #[test]
    fn bad_data_uris_are_refused() {
        for uri in [
            "image/png,hello",
            "text/plain;base64,aGVsbG8=",
            "image/png;base64,@@@",
            "image/png;base64",
            "image/png;base64,",
        ] {
            assert!(decode_data_uri(uri, "p", 16).is_err(), "{uri}");
        }
        let big = base64::engine::general_purpose::STANDARD.encode([0u8; 17]);
        assert!(decode_data_uri(&format!("image/png;base64,{big}"), "p", 16).is_err());
    }

    #[test]
    fn hosts_match_the_allow_list() {
        let l = limits(&["images.example.com", "*.cdn.test"]);
        assert!(l.host_allowed("images.example.com"));
        assert!(l.host_allowed("IMAGES.example.com"));
        assert!(l.host_allowed("a.cdn.test"));
        assert!(!l.host_allowed("cdn.test"));
        assert!(!l.host_allowed("evilcdn.test"));
        assert!(!l.host_allowed("example.com"));
        assert_eq!(
            host_of("https://u:p@Images.example.com:8443/x.png?q").as_deref(),
            Some("Images.example.com")
        );
        assert_eq!(host_of("http://[::1]:80/").as_deref(), Some("::1"));
    }

    #[tokio::test]
    async fn urls_off_the_allow_list_are_refused_without_fetching() {
        let error = load("http://127.0.0.1:9/x.png", "p", &limits(&[]))
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("--http-allow-host"), "{error}");
        let error = load("ftp://x/y.png", "p", &limits(&["x"])).await;
        assert!(error.is_err());
    }
}
