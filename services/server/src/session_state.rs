//! The session tier's state and access flags (`blip2 serve session|all`): where sessions are
//! kept, when idle ones expire, which API keys are accepted; and `blip2 keys`.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

#[derive(Args, Debug, Clone)]
pub struct SessionStateArgs {
    /// Keep sessions on disk in DIR (DIR/sessions.redb, created if missing): every committed
    /// turn survives a crash or restart. Default: in memory (lost on exit).
    #[arg(long, env = "BLIP2_DATA_DIR", conflicts_with = "redis_url")]
    data_dir: Option<PathBuf>,
    /// Keep sessions in Redis (redis://host:port[/db]), shared by several session replicas.
    #[arg(long, env = "BLIP2_REDIS_URL")]
    redis_url: Option<String>,
    /// Remove sessions unused this long: e.g. 90s, 30m, 24h, 7d, or seconds; "off" (or 0):
    /// never.
    #[arg(long, env = "BLIP2_SESSION_TTL", default_value = "24h", value_parser = parse_ttl)]
    session_ttl: Ttl,
    /// File of the accepted API keys' sha256 (hex), one per line, `#` comments (`blip2 keys
    /// new` makes a key and its hash). Clients send `authorization: Bearer KEY`. Without keys
    /// (this flag and --api-key-hash) the tier is open to every client.
    #[arg(long, env = "BLIP2_API_KEYS_FILE")]
    api_keys_file: Option<PathBuf>,
    /// sha256 (hex) of an accepted API key; repeat, or comma-separate in the environment
    /// variable. Adds to --api-keys-file.
    #[arg(
        long = "api-key-hash",
        env = "BLIP2_API_KEY_HASHES",
        value_delimiter = ','
    )]
    api_key_hashes: Vec<String>,
    /// Sessions one API key may hold at once (RESOURCE_EXHAUSTED beyond); 0: no limit but the
    /// tier's.
    #[arg(long, env = "BLIP2_MAX_SESSIONS_PER_KEY", default_value_t = 0)]
    max_sessions_per_key: usize,
}

/// A session TTL; `None`: sessions never expire.
#[derive(Debug, Clone, Copy)]
pub struct Ttl(Option<Duration>);

/// "90s", "30m", "24h", "7d", "3600" (seconds), "off" or "0".
fn parse_ttl(text: &str) -> std::result::Result<Ttl, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") || text == "0" {
        return Ok(Ttl(None));
    }
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}`: expected e.g. 90s, 30m, 24h, 7d or off"))?;
    let seconds = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(format!("`{text}`: the unit must be s, m, h or d")),
    };
    match Duration::try_from_secs_f64(number * seconds) {
        Ok(ttl) if !ttl.is_zero() => Ok(Ttl(Some(ttl))),
        Ok(_) => Ok(Ttl(None)),
        Err(_) => Err(format!("`{text}`: out of range")),
    }
}

impl SessionStateArgs {
    /// Sets the store, TTL, keys and per-key limit of `config`.
    pub fn apply(&self, config: &mut blip2_session::SessionConfig) -> Result<()> {
        config.store = match (&self.data_dir, &self.redis_url) {
            (Some(dir), _) => blip2_session::StoreConfig::Disk(dir.clone()),
            (None, Some(url)) => blip2_session::StoreConfig::Redis(url.clone()),
            (None, None) => blip2_session::StoreConfig::Memory,
        };
        config.session_ttl = self.session_ttl.0;
        if let Some(ttl) = self.session_ttl.0 {
            // Sweep often enough for short TTLs, at most once a minute.
            config.sweep_interval =
                (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
        }
        let mut hashes = self.api_key_hashes.clone();
        if let Some(file) = &self.api_keys_file {
            let from_file = blip2_session::auth::read_keys_file(file)?;
            if from_file.is_empty() {
                bail!(
                    "{} holds no key hashes; remove --api-keys-file to run an open tier",
                    file.display()
                );
            }
            hashes.extend(from_file);
        }
        config.api_key_hashes = hashes;
        config.max_sessions_per_key = self.max_sessions_per_key;
        Ok(())
    }
}

/// `blip2 keys`: API keys for `--api-keys-file`.
#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Make a new random key: prints the key (for the client, shown once) and its sha256 (a
    /// line for --api-keys-file).
    New,
    /// Print the sha256 of each key read from stdin (one per line), for --api-keys-file.
    Hash,
}

pub fn run_keys(command: KeysCommand) -> Result<()> {
    match command {
        KeysCommand::New => {
            let key = format!(
                "b2k_{}{}",
                blip2_session::store::random_id(),
                blip2_session::store::random_id()
            );
            println!("key:    {key}");
            println!("sha256: {}", blip2_session::auth::hash_key(&key));
        }
        KeysCommand::Hash => {
            let mut any = false;
            for line in std::io::stdin().lock().lines() {
                let line = line.context("reading keys from stdin")?;
                let key = line.trim();
                if key.is_empty() {
                    continue;
                }
                println!("{}", blip2_session::auth::hash_key(key));
                any = true;
            }
            if !any {
                bail!("no key on stdin: `echo -n KEY | blip2 keys hash`");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse() {
        let ttl = |t: &str| parse_ttl(t).map(|t| t.0);
        assert_eq!(ttl("24h"), Ok(Some(Duration::from_secs(86400))));
        assert_eq!(ttl("90"), Ok(Some(Duration::from_secs(90))));
        assert_eq!(ttl("1.5m"), Ok(Some(Duration::from_secs(90))));
        assert_eq!(ttl("7d"), Ok(Some(Duration::from_secs(7 * 86400))));
        assert_eq!(ttl("off"), Ok(None));
        assert_eq!(ttl("0"), Ok(None));
        assert!(ttl("3w").is_err());
        assert!(ttl("soon").is_err());
    }
}
