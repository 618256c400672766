//! The configuration: `config.toml`, its defaults, and the checks that refuse a bad one.
//!
//! Parsing is kept apart from reading the file so that every rule is tested on plain strings.
//! Every key is optional; an unknown section or key is an error, because a misspelt key that
//! is silently ignored is a setting the operator believes in and does not have.

use crate::validate;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

/// The whole configuration, with the contract's defaults for every missing key.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[server]`: listening, pool size, limits, shutdown.
    pub server: ServerConfig,
    /// `[storage]`: the SQLite file.
    pub storage: StorageConfig,
    /// `[history]`: which earlier messages go to the LLM.
    pub history: HistoryConfig,
    /// `[llm]`: the upstream model.
    pub llm: LlmConfig,
    /// `[auth]`: bearer tokens (off while empty).
    pub auth: AuthConfig,
    /// `[limits]`: every tenant's limits, unless it has a `[tenants.NAME]` of its own.
    pub limits: TenantLimits,
    /// `[tenants.NAME]`: one tenant's own limits, by tenant name.
    pub tenants: BTreeMap<String, TenantOverrides>,
    /// `[metrics]`: what `/metrics` exports beyond the fixed families.
    pub metrics: MetricsConfig,
}

/// `[limits]` and each `[tenants.NAME]`: what one tenant may use; 0 is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantLimits {
    /// The tenant's requests queued or running at once; default 0.
    pub max_concurrent: u64,
    /// The tenant's requests that may call the LLM in a minute; default 0.
    pub requests_per_minute: u64,
    /// Prompt plus completion tokens in a UTC day; default 0.
    pub tokens_per_day: u64,
}

/// One `[tenants.NAME]`: the limits it sets itself; the others come from `[limits]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantOverrides {
    /// Overrides `[limits] max_concurrent`.
    pub max_concurrent: Option<u64>,
    /// Overrides `[limits] requests_per_minute`.
    pub requests_per_minute: Option<u64>,
    /// Overrides `[limits] tokens_per_day`.
    pub tokens_per_day: Option<u64>,
}

impl TenantOverrides {
    /// These overrides applied to `defaults`.
    pub fn over(&self, defaults: TenantLimits) -> TenantLimits {
        TenantLimits {
            max_concurrent: self.max_concurrent.unwrap_or(defaults.max_concurrent),
            requests_per_minute: self
                .requests_per_minute
                .unwrap_or(defaults.requests_per_minute),
            tokens_per_day: self.tokens_per_day.unwrap_or(defaults.tokens_per_day),
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Per-tenant request and token counters, labelled by tenant name; default false.
    pub per_tenant: bool,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on; default `127.0.0.1:8080`.
    pub listen: String,
    /// Worker threads; default 16.
    pub max_concurrent_requests: usize,
    /// Requests that may wait for a worker; default 64.
    pub queue_capacity: usize,
    /// Largest accepted request body; default 65536.
    pub max_body_bytes: usize,
    /// How long admitted work may run on after SIGTERM/SIGINT; default 30.
    pub shutdown_grace_secs: u64,
    /// How long a client may stay silent in the middle of a request, idle between requests,
    /// or not take the bytes of a response; default 30.
    pub client_timeout_secs: u64,
    /// Client connections open at once (each holds a thread); default 4096.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            max_concurrent_requests: 16,
            queue_capacity: 64,
            max_body_bytes: 65536,
            shutdown_grace_secs: 30,
            client_timeout_secs: 30,
            max_connections: 4096,
        }
    }
}

/// `[storage]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// The SQLite database file; default `chatpool.db`.
    pub path: PathBuf,
    /// SQLite's `synchronous` setting; default normal.
    pub synchronous: Synchronous,
    /// How often chatpool copies the WAL into the database file; 0 leaves checkpoints to an
    /// external replicator such as Litestream. Default 500.
    pub checkpoint_interval_ms: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from("chatpool.db"),
            synchronous: Synchronous::Normal,
            checkpoint_interval_ms: 500,
        }
    }
}

/// How hard SQLite works to keep a commit: through a process crash, or through power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// WAL with `synchronous = NORMAL`: a commit survives the process, not the machine.
    Normal,
    /// `synchronous = FULL`: a commit survives power loss.
    Full,
}

/// `[history]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// At most this many earlier messages go to the LLM; default 40.
    pub max_messages: usize,
    /// At most this many characters of them; default 32000.
    pub max_chars: usize,
    /// Sent first when non-empty; default "You are a helpful assistant.".
    pub system_prompt: String,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            max_messages: 40,
            max_chars: 32000,
            system_prompt: "You are a helpful assistant.".into(),
        }
    }
}

/// Which LLM answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Built in: answers in-process after `mock_latency_ms`, no network.
    Mock,
    /// Any OpenAI-compatible `POST {base_url}/chat/completions`.
    Openai,
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Provider::Mock => "mock",
            Provider::Openai => "openai",
        })
    }
}

/// `[llm]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlmConfig {
    /// Default mock.
    pub provider: Provider,
    /// Default `https://api.openai.com/v1`.
    pub base_url: String,
    /// Default `gpt-4o-mini`.
    pub model: String,
    /// Name of the environment variable holding the key; default `OPENAI_API_KEY`.
    pub api_key_env: String,
    /// Default 3000.
    pub connect_timeout_ms: u64,
    /// The whole upstream exchange, retries included; default 120000.
    pub request_timeout_ms: u64,
    /// Retries after the first attempt; default 2.
    pub max_retries: u32,
    /// Provider mock only; default 0.
    pub mock_latency_ms: u64,
    /// Consecutive failed calls that pause calling the LLM (0: never pause); default 5.
    pub breaker_failures: u32,
    /// How long calls stay paused before one probe is let through; default 10000.
    pub breaker_cooldown_ms: u64,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            provider: Provider::Mock,
            base_url: "https://api.openai.com/v1".into(),
            model: "gpt-4o-mini".into(),
            api_key_env: "OPENAI_API_KEY".into(),
            connect_timeout_ms: 3000,
            request_timeout_ms: 120_000,
            max_retries: 2,
            mock_latency_ms: 0,
            breaker_failures: 5,
            breaker_cooldown_ms: 10_000,
        }
    }
}

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Tenants and the SHA-256 of their tokens; auth is off while this is empty.
    pub tokens: Vec<TokenEntry>,
}

/// One `[auth] tokens` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// The tenant the token acts for.
    pub tenant: String,
    /// Lowercase hex of the token's SHA-256.
    pub sha256: String,
}

/// A configuration that cannot be used, with a one-line reason naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        Config::parse(&text).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    /// Parses and checks config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
            let message = e.message().replace('\n', " ");
            match line {
                Some(line) => ConfigError(format!("line {line}: {message}")),
                None => ConfigError(message),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense; also run after command-line overrides.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        self.listen_addr()?;
        for number in self.numbers() {
            number.check()?;
        }
        for (name, overrides) in &self.tenants {
            if let Err(e) = validate::tenant(name, &format!("tenants.{name}:")) {
                return Err(ConfigError(e.0));
            }
            for number in limit_numbers(&overrides.over(self.limits), TENANT_KEYS) {
                number
                    .check()
                    .map_err(|e| ConfigError(format!("tenants.{name}.{}", e.0)))?;
            }
        }
        if self.storage.path.as_os_str().is_empty() {
            return bad("storage.path", "must not be empty");
        }
        let l = &self.llm;
        if l.model.trim().is_empty() {
            return bad("llm.model", "must not be empty");
        }
        if l.provider == Provider::Openai
            && !(l.base_url.starts_with("http://") || l.base_url.starts_with("https://"))
        {
            return bad("llm.base_url", "must start with http:// or https://");
        }
        for (i, entry) in self.auth.tokens.iter().enumerate() {
            let hex =
                entry.sha256.len() == 64 && entry.sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !hex {
                return bad(&format!("auth.tokens[{i}].sha256"), "must be 64 hex digits");
            }
            // The key then a colon, as every other refusal here names its key.
            let key = format!("auth.tokens[{i}].tenant:");
            if let Err(e) = validate::tenant(&entry.tenant, &key) {
                return Err(ConfigError(e.0));
            }
            let earlier = &self.auth.tokens[..i];
            if earlier
                .iter()
                .any(|e| e.sha256.eq_ignore_ascii_case(&entry.sha256))
            {
                return bad(
                    &format!("auth.tokens[{i}].sha256"),
                    "the same token is listed twice",
                );
            }
        }
        Ok(())
    }

    /// Every number in the configuration, with its range (a `[tenants.NAME]` has the same
    /// ones as `[limits]`).
    fn numbers(&self) -> Vec<Number> {
        let mut numbers = self.fixed_numbers().to_vec();
        numbers.extend(limit_numbers(&self.limits, LIMITS_KEYS));
        numbers
    }

    fn fixed_numbers(&self) -> [Number; 15] {
        let (s, l) = (&self.server, &self.llm);
        let n = |key, value: u64, range| Number { key, value, range };
        [
            n(
                "server.max_concurrent_requests",
                s.max_concurrent_requests as u64,
                1..=MAX_WORKERS as u64,
            ),
            n(
                "server.queue_capacity",
                s.queue_capacity as u64,
                0..=MAX_QUEUE as u64,
            ),
            n(
                "server.max_body_bytes",
                s.max_body_bytes as u64,
                1..=MAX_BODY_BYTES,
            ),
            n(
                "server.shutdown_grace_secs",
                s.shutdown_grace_secs,
                0..=DAY_SECS,
            ),
            n(
                "server.client_timeout_secs",
                s.client_timeout_secs,
                1..=DAY_SECS,
            ),
            n(
                "server.max_connections",
                s.max_connections as u64,
                1..=MAX_CONNECTIONS,
            ),
            n(
                "storage.checkpoint_interval_ms",
                self.storage.checkpoint_interval_ms,
                0..=HOUR_MS,
            ),
            n(
                "history.max_messages",
                self.history.max_messages as u64,
                0..=10_000,
            ),
            n(
                "history.max_chars",
                self.history.max_chars as u64,
                0..=10_000_000,
            ),
            n("llm.connect_timeout_ms", l.connect_timeout_ms, 1..=HOUR_MS),
            n("llm.request_timeout_ms", l.request_timeout_ms, 1..=DAY_MS),
            n("llm.max_retries", l.max_retries.into(), 0..=10),
            n("llm.mock_latency_ms", l.mock_latency_ms, 0..=HOUR_MS),
            n(
                "llm.breaker_failures",
                l.breaker_failures.into(),
                0..=10_000,
            ),
            n("llm.breaker_cooldown_ms", l.breaker_cooldown_ms, 0..=DAY_MS),
        ]
    }

    /// The limits of `tenant`: what its `[tenants.NAME]` sets, the rest from `[limits]`.
    pub fn limits_for(&self, tenant: &str) -> TenantLimits {
        match self.tenants.get(tenant) {
            Some(overrides) => overrides.over(self.limits),
            None => self.limits,
        }
    }

    /// The listen address, resolved.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        let listen = &self.server.listen;
        listen
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| {
                ConfigError(format!(
                    "server.listen: `{listen}` is not a host:port address"
                ))
            })
    }
}

/// The keys of `[limits]`, as errors name them.
const LIMITS_KEYS: [&str; 3] = [
    "limits.max_concurrent",
    "limits.requests_per_minute",
    "limits.tokens_per_day",
];
/// The same keys within a `[tenants.NAME]`, whose error adds the section's name.
const TENANT_KEYS: [&str; 3] = ["max_concurrent", "requests_per_minute", "tokens_per_day"];

/// The numbers of one tenant's limits, named by `keys` (in [`LIMITS_KEYS`]' order).
fn limit_numbers(limits: &TenantLimits, keys: [&'static str; 3]) -> [Number; 3] {
    let n = |key, value: u64, range| Number { key, value, range };
    [
        n(
            keys[0],
            limits.max_concurrent,
            0..=(MAX_WORKERS + MAX_QUEUE) as u64,
        ),
        n(keys[1], limits.requests_per_minute, 0..=MAX_PER_MINUTE),
        n(keys[2], limits.tokens_per_day, 0..=MAX_TOKENS_PER_DAY),
    ]
}

/// More workers than this is a typo, not a plan: each one is a thread with its own stack.
pub const MAX_WORKERS: usize = 4096;
/// Waiting requests hold a client connection and a thread in tiny_http each.
pub const MAX_QUEUE: usize = 65536;
/// A request body is held in memory whole, once per request in flight.
const MAX_BODY_BYTES: u64 = 16 << 20;
/// Each connection holds a thread and two descriptors.
const MAX_CONNECTIONS: u64 = 262_144;

// Durations are capped far below what would overflow when added to an `Instant` (a grace of
// i64::MAX seconds made SIGTERM panic): no setting needs more than a day.
const DAY_SECS: u64 = 86_400;
const DAY_MS: u64 = DAY_SECS * 1000;
const HOUR_MS: u64 = 3_600_000;

/// More requests a minute than one instance could ever answer.
const MAX_PER_MINUTE: u64 = 100_000_000;
/// A trillion tokens a day: far past any real budget, far below overflowing a counter.
const MAX_TOKENS_PER_DAY: u64 = 1_000_000_000_000;

/// One number from the file and the range it must fall in.
#[derive(Clone)]
struct Number {
    key: &'static str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
}

impl Number {
    fn check(&self) -> Result<(), ConfigError> {
        if self.range.contains(&self.value) {
            return Ok(());
        }
        Err(ConfigError(format!(
            "{}: must be between {} and {} (is {})",
            self.key,
            self.range.start(),
            self.range.end(),
            self.value
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_gives_the_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert_eq!(c.server.max_concurrent_requests, 16);
        assert_eq!(c.server.queue_capacity, 64);
        assert_eq!(c.storage.synchronous, Synchronous::Normal);
        assert_eq!(c.history.max_messages, 40);
        assert_eq!(c.llm.provider, Provider::Mock);
        assert!(c.auth.tokens.is_empty());
    }

    #[test]
    fn the_shipped_config_is_the_defaults() {
        let shipped = Config::parse(include_str!("../config.toml")).unwrap();
        let defaults = Config::default();
        assert_eq!(format!("{shipped:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::parse("[server]\nlisten = \"127.0.0.1:1\"\nworkers = 3\n").unwrap_err();
        assert!(err.0.starts_with("line 3:"), "{err}");
        assert!(err.0.contains("unknown field `workers`"), "{err}");
        assert!(!err.0.contains('\n'));
    }

    #[test]
    fn unknown_section_is_refused() {
        let err = Config::parse("[serverr]\n").unwrap_err();
        assert!(err.0.contains("unknown field `serverr`"), "{err}");
    }

    #[test]
    fn wrong_type_and_bad_enum_are_refused() {
        let err = Config::parse("[server]\nmax_concurrent_requests = \"x\"\n").unwrap_err();
        assert!(err.0.contains("line 2"), "{err}");
        let err = Config::parse("[storage]\nsynchronous = \"fast\"\n").unwrap_err();
        assert!(err.0.contains("fast"), "{err}");
    }

    #[test]
    fn values_out_of_range_are_named() {
        let err = Config::parse("[server]\nmax_concurrent_requests = 0\n").unwrap_err();
        assert!(err.0.starts_with("server.max_concurrent_requests"), "{err}");
        let err = Config::parse("[server]\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(err.0.starts_with("server.listen"), "{err}");
        let err =
            Config::parse("[llm]\nprovider = \"openai\"\nbase_url = \"ftp://x\"\n").unwrap_err();
        assert!(err.0.starts_with("llm.base_url"), "{err}");
        let err =
            Config::parse("[auth]\ntokens = [{ tenant = \"a\", sha256 = \"zz\" }]\n").unwrap_err();
        assert!(err.0.starts_with("auth.tokens[0].sha256"), "{err}");
        let entry = format!("{{ tenant = \"a/b\", sha256 = \"{}\" }}", "a".repeat(64));
        let err = Config::parse(&format!("[auth]\ntokens = [{entry}]\n")).unwrap_err();
        assert!(err.0.starts_with("auth.tokens[0].tenant"), "{err}");
        let entry = format!("{{ tenant = \"a\", sha256 = \"{}\" }}", "a".repeat(64));
        let err = Config::parse(&format!("[auth]\ntokens = [{entry}, {entry}]\n")).unwrap_err();
        assert!(err.0.contains("twice"), "{err}");
    }

    #[test]
    fn a_tenant_has_its_own_limits_or_the_defaults() {
        let c = Config::parse(
            "[limits]\nrequests_per_minute = 60\n\n[tenants.alice]\nmax_concurrent = 4\n",
        )
        .unwrap();
        assert_eq!(c.limits_for("bob").requests_per_minute, 60);
        assert_eq!(c.limits_for("bob").max_concurrent, 0);
        // What a tenant's table leaves out comes from [limits].
        let alice = c.limits_for("alice");
        assert_eq!((alice.max_concurrent, alice.requests_per_minute), (4, 60));
        let c = Config::parse("[limits]\nmax_concurrent = 2\n[tenants.x]\nmax_concurrent = 0\n");
        assert_eq!(c.unwrap().limits_for("x").max_concurrent, 0);
        let err = Config::parse("[tenants.alice]\nmax_concurrent = -1\n").unwrap_err();
        assert!(err.0.starts_with("line 2"), "{err}");
        let err = Config::parse("[tenants.alice]\ntokens_per_day = 1000000000001\n").unwrap_err();
        assert!(err.0.starts_with("tenants.alice.tokens_per_day"), "{err}");
        let err = Config::parse("[tenants.\"a/b\"]\n").unwrap_err();
        assert!(err.0.starts_with("tenants.a/b"), "{err}");
        let err = Config::parse("[tenants.alice]\nmax_concurent = 1\n").unwrap_err();
        assert!(err.0.contains("unknown field `max_concurent`"), "{err}");
    }

    #[test]
    fn every_number_has_a_range_and_is_refused_by_name_outside_it() {
        let defaults = Config::default();
        for number in defaults.numbers() {
            assert!(number.check().is_ok(), "default {}", number.key);
            let (section, key) = number.key.split_once('.').unwrap();
            let mut outside = vec![number.range.end() + 1];
            if *number.range.start() > 0 {
                outside.push(number.range.start() - 1);
            }
            for value in outside {
                let err = Config::parse(&format!("[{section}]\n{key} = {value}\n")).unwrap_err();
                assert!(err.0.starts_with(number.key), "{err}");
                assert!(err.0.contains(&value.to_string()), "{err}");
            }
            let end = number.range.end();
            assert!(Config::parse(&format!("[{section}]\n{key} = {end}\n")).is_ok());
            let documented = format!("# [{}-{end}]", number.range.start());
            assert!(
                include_str!("../config.toml")
                    .lines()
                    .any(|l| l.starts_with(&format!("{key} =")) && l.contains(&documented)),
                "config.toml documents {} as {documented}",
                number.key
            );
        }
        // The shipped file lists every number, and each one has its range here.
        let shipped: toml::Table = toml::from_str(include_str!("../config.toml")).unwrap();
        let mut listed: Vec<String> = shipped
            .iter()
            .filter_map(|(section, keys)| Some((section, keys.as_table()?)))
            .flat_map(|(section, keys)| {
                keys.iter()
                    .filter(|(_, value)| value.is_integer())
                    .map(move |(key, _)| format!("{section}.{key}"))
            })
            .collect();
        let mut ranged: Vec<String> = defaults.numbers().iter().map(|n| n.key.into()).collect();
        listed.sort();
        ranged.sort();
        assert_eq!(listed, ranged);
        let err =
            Config::parse("[server]\nshutdown_grace_secs = 9223372036854775807\n").unwrap_err();
        assert!(err.0.starts_with("server.shutdown_grace_secs"), "{err}");
        let err = Config::parse("[llm]\nrequest_timeout_ms = 0\n").unwrap_err();
        assert!(err.0.starts_with("llm.request_timeout_ms"), "{err}");
    }
}
