//! Usage: the LLM calls each tenant made and the tokens they took, by UTC day and model.
//!
//! One row per (tenant, day, model) in the `usage` table, read by `GET /v1/usage`, by
//! `chatpool usage`, and at start-up for the day's token budgets. Rows outlive the chats they
//! came from: a deleted chat's tokens were still spent, and a stateless relay stores no chat
//! but spends all the same.
//!
//! A worker adds its call's spend to the [`Tally`], a map in memory, and goes on: nothing wakes
//! the writer for it. The [`Writer`] takes the whole tally and adds it to the rows in one
//! transaction before each batch of exchanges it commits (so an exchange's answer still means
//! its usage is stored), on its idle tick, when `GET /v1/usage` asks, and when it stops. Budgets
//! are enforced from counts in memory (see `crate::tenants`), so the rows are only for a
//! restart and for reports.
//!
//! [`Writer`]: super::Writer

use super::{Store, StoreError};
use crate::tenants::day::Day;
use rusqlite::{params, Connection, TransactionBehavior};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// One LLM call's usage, as the writer stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spend {
    /// The tenant the call was made for.
    pub tenant: String,
    /// The model that answered, as the LLM named it.
    pub model: String,
    /// The UTC day the call ended.
    pub day: Day,
    /// Tokens of the prompt, as the LLM counted them (0 when it gave no usage).
    pub prompt_tokens: u64,
    /// Tokens of the reply.
    pub completion_tokens: u64,
}

/// What calls of one tenant, day and model spent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// LLM calls.
    pub requests: u64,
    /// Their prompt tokens.
    pub prompt_tokens: u64,
    /// Their completion tokens.
    pub completion_tokens: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
    }
}

/// Calls' spends added up by (tenant, day, model): the rows they add to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Spends(HashMap<(String, Day, String), Counts>);

impl Spends {
    /// Adds one call's spend to its key's counts.
    pub fn add(&mut self, spend: Spend) {
        let counts = Counts {
            requests: 1,
            prompt_tokens: spend.prompt_tokens,
            completion_tokens: spend.completion_tokens,
        };
        let key = (spend.tenant, spend.day, spend.model);
        self.0.entry(key).or_default().add(counts);
    }

    /// Adds every key's counts of `other`.
    pub fn merge(&mut self, other: Spends) {
        for (key, counts) in other.0 {
            self.0.entry(key).or_default().add(counts);
        }
    }

    /// Whether nothing was spent.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The number of (tenant, day, model) keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The counts of one tenant, day and model, if any.
    #[cfg(test)]
    pub fn get(&self, tenant: &str, day: Day, model: &str) -> Option<Counts> {
        self.0.get(&(tenant.into(), day, model.into())).copied()
    }
}

/// The spends the workers have added and the writer has not yet taken, shared by both.
///
/// A std `Mutex`: uncontended it costs no system call, and held only for a map insert, a
/// waiter sleeps at once rather than yielding in a spin as parking_lot's would.
#[derive(Debug, Default)]
pub struct Tally(Mutex<Spends>);

impl Tally {
    /// Adds one call's spend, to be stored at the writer's next turn.
    pub fn add(&self, spend: Spend) {
        self.lock().add(spend);
    }

    /// Everything added since the last take, leaving the tally empty.
    pub fn take(&self) -> Spends {
        std::mem::take(&mut *self.lock())
    }

    /// Gives back spends that could not be stored, to be stored with the next take.
    pub fn put_back(&self, spends: Spends) {
        self.lock().merge(spends);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Spends> {
        // A panic cannot leave the map half-changed in a way that matters: at worst one call's
        // counts are missing.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How usage rows are grouped beyond the tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// A row per UTC day.
    Day,
    /// A row per model.
    Model,
}

impl GroupBy {
    /// Parses `day` or `model`.
    pub fn parse(text: &str) -> Option<GroupBy> {
        match text {
            "day" => Some(GroupBy::Day),
            "model" => Some(GroupBy::Model),
            _ => None,
        }
    }

    /// The column, and the key of each JSON row.
    fn column(self) -> &'static str {
        match self {
            GroupBy::Day => "day",
            GroupBy::Model => "model",
        }
    }
}

/// Which usage to report: the days from `from` to `to`, both included (each open-ended when
/// absent), grouped by day or model, or one total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsageQuery {
    /// The first day; the earliest on record when `None`.
    pub from: Option<Day>,
    /// The last day; the latest on record when `None`.
    pub to: Option<Day>,
    /// `None` for one total row per tenant.
    pub group_by: Option<GroupBy>,
}

/// One row of a usage report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// The tenant.
    pub tenant: String,
    /// The day or model of the row, with [`UsageQuery::group_by`].
    pub key: Option<String>,
    /// LLM calls.
    pub requests: u64,
    /// Their prompt tokens.
    pub prompt_tokens: u64,
    /// Their completion tokens.
    pub completion_tokens: u64,
}

impl UsageRow {
    /// A row with nothing used, for a total over days with no calls.
    pub fn zero(tenant: &str) -> UsageRow {
        UsageRow {
            tenant: tenant.to_string(),
            key: None,
            requests: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
        }
    }

    /// The row as the API and `chatpool usage --json` give it: the group's key (`day` or
    /// `model`), the tenant's when `with_tenant`, then the counts.
    pub fn to_json(&self, group_by: Option<GroupBy>, with_tenant: bool) -> Value {
        let mut row = serde_json::Map::new();
        if with_tenant {
            row.insert("tenant".into(), json!(self.tenant));
        }
        if let (Some(group_by), Some(key)) = (group_by, &self.key) {
            row.insert(group_by.column().into(), json!(key));
        }
        row.insert("requests".into(), json!(self.requests));
        row.insert("prompt_tokens".into(), json!(self.prompt_tokens));
        row.insert("completion_tokens".into(), json!(self.completion_tokens));
        let total = self.prompt_tokens.saturating_add(self.completion_tokens);
        row.insert("total_tokens".into(), json!(total));
        Value::Object(row)
    }
}

/// Rows as a table for a person: a header, then a line per row, numbers aligned right.
pub fn table(rows: &[UsageRow], group_by: Option<GroupBy>) -> String {
    let mut lines = vec![[
        "TENANT".to_string(),
        group_by.map_or("", GroupBy::column).to_uppercase(),
        "REQUESTS".into(),
        "PROMPT_TOKENS".into(),
        "COMPLETION_TOKENS".into(),
        "TOTAL_TOKENS".into(),
    ]];
    for row in rows {
        lines.push([
            row.tenant.clone(),
            row.key.clone().unwrap_or_default(),
            row.requests.to_string(),
            row.prompt_tokens.to_string(),
            row.completion_tokens.to_string(),
            row.prompt_tokens
                .saturating_add(row.completion_tokens)
                .to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in &lines {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .enumerate()
            .filter(|(i, _)| *i != 1 || group_by.is_some())
            .map(|(i, (cell, &w))| {
                if i < 2 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A count as SQLite stores it: its integers are signed, and only a broken upstream sends a
/// count past i64::MAX.
fn stored(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Adds each key's counts to its row, inside the caller's transaction.
pub(super) fn upsert_usage(conn: &Connection, spends: &Spends) -> Result<(), StoreError> {
    let mut upsert = conn.prepare_cached(
        "INSERT INTO usage (tenant, day, model, requests, prompt_tokens, completion_tokens)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (tenant, day, model) DO UPDATE SET
             requests = requests + excluded.requests,
             prompt_tokens = prompt_tokens + excluded.prompt_tokens,
             completion_tokens = completion_tokens + excluded.completion_tokens",
    )?;
    for ((tenant, day, model), counts) in &spends.0 {
        upsert.execute(params![
            tenant,
            day.to_string(),
            model,
            stored(counts.requests),
            stored(counts.prompt_tokens),
            stored(counts.completion_tokens)
        ])?;
    }
    Ok(())
}

impl Store {
    /// Adds each key's counts to its row, in one transaction. Only the writer adds.
    pub(super) fn add_usage(&mut self, spends: &Spends) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        upsert_usage(&tx, spends)?;
        tx.commit()?;
        Ok(())
    }

    /// The usage of `tenant` (every tenant when `None`) as `query` asks, ordered by tenant and
    /// then by day or model. Days without calls have no row.
    pub fn usage(
        &self,
        tenant: Option<&str>,
        query: &UsageQuery,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let key = query.group_by.map_or("NULL", GroupBy::column);
        let sql = format!(
            "SELECT tenant, {key}, sum(requests), sum(prompt_tokens), sum(completion_tokens)
             FROM usage
             WHERE (?1 IS NULL OR tenant = ?1) AND day >= ?2 AND day <= ?3
             GROUP BY tenant, {key} ORDER BY tenant, {key}"
        );
        // Days are stored as YYYY-MM-DD, which sorts as the days do.
        let from = query.from.map_or("0000-01-01".into(), |d| d.to_string());
        let to = query.to.map_or("9999-12-31".into(), |d| d.to_string());
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![tenant, from, to], |r| {
            Ok(UsageRow {
                tenant: r.get(0)?,
                key: r.get(1)?,
                requests: count(r.get(2)?),
                prompt_tokens: count(r.get(3)?),
                completion_tokens: count(r.get(4)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The tokens each tenant used on `day`, to start its budget from.
    pub fn tokens_on(&self, day: Day) -> Result<HashMap<String, u64>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT tenant, sum(prompt_tokens) + sum(completion_tokens) FROM usage
             WHERE day = ?1 GROUP BY tenant",
        )?;
        let rows = stmt.query_map([day.to_string()], |r| {
            Ok((r.get::<_, String>(0)?, count(r.get(1)?)))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;
    use crate::store::Exchange;

    fn spend(tenant: &str, day: &str, model: &str, prompt: u64, completion: u64) -> Spend {
        Spend {
            tenant: tenant.into(),
            model: model.into(),
            day: Day::parse(day).unwrap(),
            prompt_tokens: prompt,
            completion_tokens: completion,
        }
    }

    #[test]
    fn sums_by_day_or_model_within_the_days_asked() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open_and_migrate(&dir.path().join("u.db"), Synchronous::Normal).unwrap();
        let mut spends = Spends::default();
        for one in [
            spend("a", "2026-11-29", "m1", 10, 1),
            spend("a", "2026-11-30", "m1", 20, 2),
            spend("a", "2026-11-30", "m2", 30, 3),
        ] {
            spends.add(one);
        }
        s.add_usage(&spends).unwrap();
        let mut later = Spends::default();
        later.add(spend("a", "2026-12-01", "m2", 40, 4));
        later.add(spend("b", "2026-11-30", "m1", 1000, 1000));
        s.add_usage(&later).unwrap();
        let days = |from, to| UsageQuery {
            from: Day::parse(from),
            to: Day::parse(to),
            group_by: Some(GroupBy::Day),
        };
        let rows = s
            .usage(Some("a"), &days("2026-11-30", "2026-12-01"))
            .unwrap();
        let by_day: Vec<_> = rows
            .iter()
            .map(|r| (r.key.as_deref().unwrap(), r.requests, r.prompt_tokens))
            .collect();
        assert_eq!(by_day, [("2026-11-30", 2, 50), ("2026-12-01", 1, 40)]);
        let by_model = UsageQuery {
            group_by: Some(GroupBy::Model),
            ..UsageQuery::default()
        };
        let rows = s.usage(Some("a"), &by_model).unwrap();
        let models: Vec<_> = rows
            .iter()
            .map(|r| (r.key.as_deref().unwrap(), r.completion_tokens))
            .collect();
        assert_eq!(models, [("m1", 3), ("m2", 7)]);
        let totals = s.usage(None, &UsageQuery::default()).unwrap();
        assert_eq!(totals.len(), 2);
        assert_eq!((totals[0].requests, totals[0].prompt_tokens), (4, 100));
        assert_eq!(totals[1].tenant, "b");
        let today = s.tokens_on(Day::parse("2026-11-30").unwrap()).unwrap();
        assert_eq!(today, HashMap::from([("a".into(), 55), ("b".into(), 2000)]));
        assert_eq!(
            table(&totals, None),
            "TENANT  REQUESTS  PROMPT_TOKENS  COMPLETION_TOKENS  TOTAL_TOKENS\n\
             a              4            100                 10           110\n\
             b              1           1000               1000          2000\n"
        );
        let json = rows[0].to_json(Some(GroupBy::Model), false);
        assert_eq!(
            json.to_string(),
            r#"{"model":"m1","requests":2,"prompt_tokens":30,"completion_tokens":3,"total_tokens":33}"#
        );
    }

    #[test]
    fn the_tally_adds_up_by_tenant_day_and_model_and_a_take_empties_it() {
        let tally = Tally::default();
        tally.add(spend("a", "2026-11-30", "m1", 10, 1));
        tally.add(spend("a", "2026-11-30", "m1", 20, 2));
        tally.add(spend("a", "2026-11-30", "m2", 30, 3));
        tally.add(spend("a", "2026-12-01", "m1", 40, 4));
        tally.add(spend("b", "2026-11-30", "m1", u64::MAX, 5));
        tally.add(spend("b", "2026-11-30", "m1", 1, 5));
        let day = |d| Day::parse(d).unwrap();
        let counts = |requests, prompt_tokens, completion_tokens| Counts {
            requests,
            prompt_tokens,
            completion_tokens,
        };
        let taken = tally.take();
        assert_eq!(taken.len(), 4);
        assert_eq!(
            taken.get("a", day("2026-11-30"), "m1"),
            Some(counts(2, 30, 3))
        );
        assert_eq!(
            taken.get("a", day("2026-11-30"), "m2"),
            Some(counts(1, 30, 3))
        );
        assert_eq!(
            taken.get("a", day("2026-12-01"), "m1"),
            Some(counts(1, 40, 4))
        );
        assert_eq!(
            taken.get("b", day("2026-11-30"), "m1"),
            Some(counts(2, u64::MAX, 10))
        );
        assert!(tally.take().is_empty());

        // Given back after a failed store, the counts join what was added meanwhile.
        tally.add(spend("a", "2026-11-30", "m1", 5, 5));
        tally.put_back(taken);
        let again = tally.take();
        assert_eq!(again.len(), 4);
        assert_eq!(
            again.get("a", day("2026-11-30"), "m1"),
            Some(counts(3, 35, 8))
        );
    }

    #[test]
    fn the_migration_counts_the_replies_already_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        for sql in &super::super::MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
        }
        conn.execute_batch("PRAGMA user_version = 3").unwrap();
        drop(conn);
        let mut s = Store::open(&path, Synchronous::Normal).unwrap();
        for usage in [Some((3, 4)), None] {
            s.append_exchange(&Exchange {
                tenant: "a".into(),
                chat_id: "c".into(),
                user: "u".into(),
                reply: "r".into(),
                model: "m".into(),
                usage,
                idempotency_key: None,
            })
            .unwrap();
        }
        drop(s);
        let s = Store::open_and_migrate(&path, Synchronous::Normal).unwrap();
        let rows = s.usage(Some("a"), &UsageQuery::default()).unwrap();
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(
            (row.requests, row.prompt_tokens, row.completion_tokens),
            (2, 3, 4)
        );
    }
}
