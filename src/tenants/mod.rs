//! Tenants: each one's limits (`[limits]`, `[tenants.NAME]`) and what it has used of them.
//!
//! The acceptor asks [`Tenants::admit`] before a request queues, so a tenant over a limit is
//! answered 429 at once while the others are still admitted. The counts live in memory behind
//! one short lock that no thread holds across I/O: the acceptor never touches the disk for a
//! request. Workers add the tokens of each LLM call ([`Tenants::spend`]) and hand the same
//! counts to the writer, which stores them in the `usage` table; at start-up the day's tokens
//! are read back from there, so a restart keeps the budget.
//!
//! - `max_concurrent`: requests queued or running. A [`Pass`] holds one place, and is released
//!   with the admission ticket that carries it.
//! - `requests_per_minute`: requests that may call the LLM, in fixed windows of a minute that
//!   begin with the first request after the last window ended; kept in memory only, so a
//!   restart opens a fresh window.
//! - `tokens_per_day`: prompt plus completion tokens, as the LLM reported them, in a UTC day.
//!   A request is refused once the day's count has reached the budget; one admitted below it
//!   runs to the end, so a day can end a few calls' tokens over.
//!
//! Time comes in as a [`Clock`] value, so the windows are tested without waiting for them.

pub mod day;

use crate::config::{Config, TenantLimits};
use crate::metrics::Metrics;
use day::Day;
use parking_lot::Mutex;
use prometheus::{IntCounter, IntCounterVec, Opts};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The length of a `requests_per_minute` window.
const MINUTE: Duration = Duration::from_secs(60);

/// When a request is admitted past `max_concurrent`, it can retry as soon as one of the
/// tenant's requests ends, which is not known in advance.
const CONCURRENT_RETRY: Duration = Duration::from_secs(1);

/// The moment a decision is made: a monotonic instant for the minute windows, and the wall
/// clock for the UTC day.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// For windows measured in elapsed time.
    pub instant: Instant,
    /// For the calendar day.
    pub wall: SystemTime,
}

impl Clock {
    /// Now.
    pub fn now() -> Clock {
        Clock {
            instant: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

/// The limit a refused request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `max_concurrent`.
    Concurrent(u64),
    /// `requests_per_minute`.
    RequestsPerMinute(u64),
    /// `tokens_per_day`.
    TokensPerDay(u64),
}

/// Why a tenant's request was refused, and when it may try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// The limit reached.
    pub limit: Limit,
    /// When a request would be admitted again (at the earliest, for `max_concurrent`).
    pub retry_after: Duration,
}

impl fmt::Display for Limited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.retry_after.as_secs();
        match self.limit {
            Limit::Concurrent(n) => write!(
                f,
                "this tenant already has {n} requests queued or running, its max_concurrent; \
                 retry when one has been answered"
            ),
            Limit::RequestsPerMinute(n) => write!(
                f,
                "this tenant has sent its {n} requests_per_minute; the window reopens in {secs} s"
            ),
            Limit::TokensPerDay(n) => write!(
                f,
                "this tenant has used its {n} tokens_per_day; the budget renews at 00:00 UTC, \
                 in {secs} s"
            ),
        }
    }
}

/// Every tenant's limits and counts, shared by the acceptor, the workers and their tickets.
#[derive(Clone)]
pub struct Tenants {
    shared: Arc<Shared>,
}

struct Shared {
    config: Arc<Config>,
    counters: Option<TenantCounters>,
    states: Mutex<HashMap<String, State>>,
}

/// What one tenant is using now.
struct State {
    limits: TenantLimits,
    in_flight: u64,
    /// The current `requests_per_minute` window: when it began, and its requests so far.
    window: Option<(Instant, u64)>,
    /// Tokens used on a day (only today's matter).
    tokens: (Day, u64),
    counters: Option<Counters>,
}

/// Proof that a tenant's request holds one of its `max_concurrent` places; releases it when
/// dropped.
pub struct Pass {
    shared: Arc<Shared>,
    tenant: String,
}

impl Tenants {
    /// The limits of `config`, with the tokens each tenant has already used on `day` (read
    /// from the database at start-up). With `[metrics] per_tenant`, its counters are
    /// registered in `metrics`.
    pub fn new(
        config: Arc<Config>,
        day: Day,
        spent: HashMap<String, u64>,
        metrics: &Metrics,
    ) -> Tenants {
        for name in unreachable_tenants(&config) {
            log::warn!("[tenants.{name}] limits no one: no token in [auth] acts for tenant {name}");
        }
        let counters = config
            .metrics
            .per_tenant
            .then(|| TenantCounters::register(metrics));
        let states = spent
            .into_iter()
            .map(|(tenant, tokens)| {
                let state = State::new(&config, &tenant, counters.as_ref(), (day, tokens));
                (tenant, state)
            })
            .collect();
        Tenants {
            shared: Arc::new(Shared {
                config,
                counters,
                states: Mutex::new(states),
            }),
        }
    }

    /// Admits one request of `tenant` if it is within its limits, counting it; `calls_llm`
    /// says whether it is a request that may call the LLM (its minute window and token budget
    /// apply). Only the acceptor calls this, so a check and its count cannot race with another
    /// admission.
    pub fn admit(&self, tenant: &str, calls_llm: bool, now: Clock) -> Result<Pass, Limited> {
        let decision = self.with_state(tenant, |state| {
            let decision = state.admit(calls_llm, now);
            if let Some(counters) = &state.counters {
                match decision {
                    Ok(()) => counters.admitted.inc(),
                    Err(_) => counters.limited.inc(),
                }
            }
            decision
        });
        decision.map(|()| Pass {
            shared: Arc::clone(&self.shared),
            tenant: tenant.to_string(),
        })
    }

    /// Adds the tokens of one LLM call to `tenant`'s count for `day`.
    pub fn spend(&self, tenant: &str, day: Day, prompt_tokens: u64, completion_tokens: u64) {
        self.with_state(tenant, |state| {
            if state.tokens.0 != day {
                state.tokens = (day, 0);
            }
            let tokens = prompt_tokens.saturating_add(completion_tokens);
            state.tokens.1 = state.tokens.1.saturating_add(tokens);
            if let Some(counters) = &state.counters {
                counters.prompt_tokens.inc_by(prompt_tokens);
                counters.completion_tokens.inc_by(completion_tokens);
            }
        })
    }

    /// Runs `f` on the tenant's state under the lock, making the state on first sight.
    fn with_state<R>(&self, tenant: &str, f: impl FnOnce(&mut State) -> R) -> R {
        let shared = &self.shared;
        let mut states = shared.states.lock();
        // Looked up by &str first: a tenant's key is allocated once, not per request.
        if let Some(state) = states.get_mut(tenant) {
            return f(state);
        }
        let none_yet = (Day::of(SystemTime::UNIX_EPOCH), 0);
        let counters = shared.counters.as_ref();
        let mut state = State::new(&shared.config, tenant, counters, none_yet);
        let result = f(&mut state);
        states.insert(tenant.to_string(), state);
        result
    }
}

/// The `[tenants.NAME]` tables that no request can act for (a misspelt name, or a tenant
/// whose token was removed): with auth off every request is the default tenant.
fn unreachable_tenants(config: &Config) -> Vec<&str> {
    let tokens = &config.auth.tokens;
    config
        .tenants
        .keys()
        .map(String::as_str)
        .filter(|name| {
            if tokens.is_empty() {
                *name != crate::store::DEFAULT_TENANT
            } else {
                !tokens.iter().any(|t| t.tenant == *name)
            }
        })
        .collect()
}

impl State {
    fn new(
        config: &Config,
        tenant: &str,
        counters: Option<&TenantCounters>,
        tokens: (Day, u64),
    ) -> State {
        State {
            limits: config.limits_for(tenant),
            in_flight: 0,
            window: None,
            tokens,
            counters: counters.map(|c| c.for_tenant(tenant)),
        }
    }

    /// Checks every limit first and counts only when all allow the request, so a refused
    /// request uses up nothing.
    fn admit(&mut self, calls_llm: bool, now: Clock) -> Result<(), Limited> {
        let limits = self.limits;
        if limits.max_concurrent > 0 && self.in_flight >= limits.max_concurrent {
            return Err(Limited {
                limit: Limit::Concurrent(limits.max_concurrent),
                retry_after: CONCURRENT_RETRY,
            });
        }
        if calls_llm {
            let today = Day::of(now.wall);
            let used = if self.tokens.0 == today {
                self.tokens.1
            } else {
                0
            };
            if limits.tokens_per_day > 0 && used >= limits.tokens_per_day {
                return Err(Limited {
                    limit: Limit::TokensPerDay(limits.tokens_per_day),
                    retry_after: Day::rest_after(now.wall),
                });
            }
            if limits.requests_per_minute > 0 {
                let window = match self.window {
                    Some((start, count)) if now.instant < start + MINUTE => (start, count),
                    _ => (now.instant, 0),
                };
                if window.1 >= limits.requests_per_minute {
                    let rest = (window.0 + MINUTE).saturating_duration_since(now.instant);
                    return Err(Limited {
                        limit: Limit::RequestsPerMinute(limits.requests_per_minute),
                        retry_after: rest.max(Duration::from_secs(1)),
                    });
                }
                self.window = Some((window.0, window.1 + 1));
            }
        }
        self.in_flight += 1;
        Ok(())
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        if let Some(state) = self.shared.states.lock().get_mut(&self.tenant) {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
    }
}

/// The per-tenant counter families of `[metrics] per_tenant`.
struct TenantCounters {
    requests: IntCounterVec,
    tokens: IntCounterVec,
}

/// One tenant's handles on them, resolved once so that counting takes no lock in prometheus.
struct Counters {
    admitted: IntCounter,
    limited: IntCounter,
    prompt_tokens: IntCounter,
    completion_tokens: IntCounter,
}

impl TenantCounters {
    fn register(metrics: &Metrics) -> TenantCounters {
        let requests = IntCounterVec::new(
            Opts::new(
                "chatpool_tenant_requests_total",
                "API requests by tenant: admitted, or refused as rate_limited.",
            ),
            &["tenant", "outcome"],
        )
        .expect("valid metric");
        let tokens = IntCounterVec::new(
            Opts::new(
                "chatpool_tenant_tokens_total",
                "Tokens the LLM reported, by tenant and kind (prompt, completion).",
            ),
            &["tenant", "kind"],
        )
        .expect("valid metric");
        metrics.register(Box::new(requests.clone()));
        metrics.register(Box::new(tokens.clone()));
        TenantCounters { requests, tokens }
    }

    fn for_tenant(&self, tenant: &str) -> Counters {
        Counters {
            admitted: self.requests.with_label_values(&[tenant, "admitted"]),
            limited: self.requests.with_label_values(&[tenant, "rate_limited"]),
            prompt_tokens: self.tokens.with_label_values(&[tenant, "prompt"]),
            completion_tokens: self.tokens.with_label_values(&[tenant, "completion"]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenants(config: &str) -> Tenants {
        let config = Arc::new(Config::parse(config).unwrap());
        Tenants::new(
            config,
            Day::of(SystemTime::now()),
            HashMap::new(),
            &Metrics::new(1, 1),
        )
    }

    fn at(start: Clock, secs: u64) -> Clock {
        Clock {
            instant: start.instant + Duration::from_secs(secs),
            wall: start.wall + Duration::from_secs(secs),
        }
    }

    #[test]
    fn max_concurrent_holds_a_place_per_pass_for_that_tenant_only() {
        let t = tenants("[tenants.a]\nmax_concurrent = 2\n");
        let now = Clock::now();
        let first = t.admit("a", true, now).unwrap();
        let _second = t.admit("a", false, now).unwrap();
        let refused = t.admit("a", true, now).err().unwrap();
        assert_eq!(refused.limit, Limit::Concurrent(2));
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        let others: Vec<_> = (0..10).map(|_| t.admit("b", true, now).unwrap()).collect();
        assert_eq!(others.len(), 10);
        drop(first);
        assert!(t.admit("a", true, now).is_ok());
    }

    #[test]
    fn the_sixth_request_in_a_minute_waits_for_the_window_to_end() {
        let t = tenants("[limits]\nrequests_per_minute = 5\n");
        let start = Clock::now();
        for second in 0..5 {
            t.admit("a", true, at(start, second * 10)).unwrap();
        }
        let refused = t.admit("a", true, at(start, 45)).err().unwrap();
        assert_eq!(refused.limit, Limit::RequestsPerMinute(5));
        assert_eq!(refused.retry_after, Duration::from_secs(15));
        // Refusals use up nothing, and reads do not count.
        assert!(t.admit("a", true, at(start, 59)).is_err());
        assert!(t.admit("a", false, at(start, 59)).is_ok());
        assert!(t.admit("b", true, at(start, 59)).is_ok());
        // The window the refusal named ends; a new one begins with the next request.
        for _ in 0..5 {
            t.admit("a", true, at(start, 60)).unwrap();
        }
        let refused = t.admit("a", true, at(start, 61)).err().unwrap();
        assert_eq!(refused.retry_after, Duration::from_secs(59));
    }

    #[test]
    fn tokens_per_day_refuses_from_the_budget_until_midnight() {
        let t = tenants("[limits]\ntokens_per_day = 100\n");
        // 23:00 UTC.
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_083_200 - 3600);
        let evening = Clock {
            instant: Instant::now(),
            wall,
        };
        let today = Day::of(wall);
        t.admit("a", true, evening).unwrap();
        t.spend("a", today, 60, 39);
        t.admit("a", true, evening).unwrap();
        t.spend("a", today, 0, 1);
        let refused = t.admit("a", true, evening).err().unwrap();
        assert_eq!(refused.limit, Limit::TokensPerDay(100));
        assert_eq!(refused.retry_after, Duration::from_secs(3600));
        assert!(
            t.admit("a", false, evening).is_ok(),
            "a read is not refused"
        );
        assert!(t.admit("a", true, at(evening, 3600)).is_ok(), "a new day");
    }

    #[test]
    fn the_count_read_back_at_start_up_applies_on_its_day_only() {
        let config = Arc::new(Config::parse("[limits]\ntokens_per_day = 10\n").unwrap());
        let now = Clock::now();
        let today = Day::of(now.wall);
        let spent = HashMap::from([("a".to_string(), 10)]);
        let t = Tenants::new(config, today, spent, &Metrics::new(1, 1));
        assert!(t.admit("a", true, now).is_err());
        assert!(t.admit("a", true, at(now, 86_400)).is_ok());
    }

    #[test]
    fn a_tenants_table_no_request_can_reach_is_named() {
        let off = Config::parse("[tenants.default]\n[tenants.alice]\n").unwrap();
        assert_eq!(unreachable_tenants(&off), ["alice"]);
        let entry = |t: &str| format!("{{ tenant = \"{t}\", sha256 = \"{}\" }}", "a".repeat(64));
        let on = format!(
            "[tenants.alice]\n[tenants.alcie]\n[auth]\ntokens = [{}]\n",
            entry("alice")
        );
        assert_eq!(unreachable_tenants(&Config::parse(&on).unwrap()), ["alcie"]);
    }

    #[test]
    fn per_tenant_counters_appear_only_when_switched_on() {
        let config = "[metrics]\nper_tenant = true\n[tenants.a]\nmax_concurrent = 1\n";
        let config = Arc::new(Config::parse(config).unwrap());
        let metrics = Metrics::new(1, 1);
        let t = Tenants::new(config, Day::of(SystemTime::now()), HashMap::new(), &metrics);
        let now = Clock::now();
        let _pass = t.admit("a", true, now).unwrap();
        assert!(t.admit("a", true, now).is_err());
        t.spend("a", Day::of(now.wall), 7, 2);
        let text = String::from_utf8(metrics.render()).unwrap();
        for line in [
            "chatpool_tenant_requests_total{outcome=\"admitted\",tenant=\"a\"} 1",
            "chatpool_tenant_requests_total{outcome=\"rate_limited\",tenant=\"a\"} 1",
            "chatpool_tenant_tokens_total{kind=\"prompt\",tenant=\"a\"} 7",
            "chatpool_tenant_tokens_total{kind=\"completion\",tenant=\"a\"} 2",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        let metrics = Metrics::new(1, 1);
        let config = Arc::new(Config::default());
        let t = Tenants::new(config, Day::of(now.wall), HashMap::new(), &metrics);
        t.admit("a", true, now).unwrap();
        assert!(!String::from_utf8(metrics.render())
            .unwrap()
            .contains("tenant"));
    }
}
