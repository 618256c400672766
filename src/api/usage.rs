//! The worker's side of tenants' accounting: `GET /v1/usage`, and what each LLM call spent.
//!
//! A call's tokens count against its tenant's budget the moment the LLM has answered (the
//! upstream has charged for them whether or not the client is still there), and go to the
//! writer's tally to be stored in the `usage` table, a chat's exchange or not.

use super::error::ApiError;
use super::{json_response, HttpResponse};
use crate::llm::wire::Completion;
use crate::store::usage::{Spend, UsageQuery, UsageRow};
use crate::store::{Readers, Writer};
use crate::tenants::day::Day;
use crate::tenants::Tenants;
use serde_json::json;
use std::time::SystemTime;

/// The calling tenant's usage as `query` asks: `{"object": "list", "data": [...]}`, with one
/// total row when not grouped. The writer first stores its tally, so the report counts every
/// call answered before it.
pub fn report(
    readers: &Readers,
    writer: &Writer,
    tenant: &str,
    query: &UsageQuery,
) -> Result<HttpResponse, ApiError> {
    writer.flush_usage()?;
    let mut rows = readers.get()?.usage(Some(tenant), query)?;
    if rows.is_empty() && query.group_by.is_none() {
        rows.push(UsageRow::zero(tenant));
    }
    let data: Vec<_> = rows
        .iter()
        .map(|row| row.to_json(query.group_by, false))
        .collect();
    Ok(json_response(200, &json!({"object": "list", "data": data})))
}

/// Counts what one answered LLM call spent against `tenant`'s budget, and returns it for the
/// writer to store. A call whose LLM gave no usage counts as a request of no tokens.
pub fn spend(tenants: &Tenants, tenant: &str, completion: &Completion) -> Spend {
    let day = Day::of(SystemTime::now());
    let (prompt_tokens, completion_tokens) = completion
        .usage
        .map_or((0, 0), |u| (u.prompt_tokens, u.completion_tokens));
    tenants.spend(tenant, day, prompt_tokens, completion_tokens);
    Spend {
        tenant: tenant.to_string(),
        model: completion.model.clone(),
        day,
        prompt_tokens,
        completion_tokens,
    }
}
