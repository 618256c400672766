//! Routing: from a method and a URL to what should answer it. Pure string work, done by the
//! acceptor for every request before anything is queued.

use super::error::ApiError;
use super::responses::Endpoint;
use crate::store::usage::{GroupBy, UsageQuery};
use crate::tenants::day::Day;
use crate::validate;
use tiny_http::Method;

/// Whoever answers a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An operations endpoint, answered by the acceptor itself.
    Ops(Ops),
    /// An API call, answered by a worker.
    Api(Route),
}

/// Operations endpoints: never queued, never authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ops {
    /// `GET /healthz`
    Healthz,
    /// `GET /readyz`
    Readyz,
    /// `GET /status`
    Status,
    /// `GET /metrics`
    Metrics,
}

/// API calls, with their validated path and query values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `POST /v1/chats/{chat_id}/messages`
    PostMessage {
        /// The chat.
        chat_id: String,
    },
    /// `GET /v1/chats/{chat_id}/messages?limit=&before=`
    GetMessages {
        /// The chat.
        chat_id: String,
        /// 1–500, default 50.
        limit: usize,
        /// Only messages with a smaller id.
        before: Option<i64>,
    },
    /// `GET /v1/chats?limit=`
    ListChats {
        /// 1–500, default 50.
        limit: usize,
    },
    /// `DELETE /v1/chats/{chat_id}`
    DeleteChat {
        /// The chat.
        chat_id: String,
    },
    /// `POST /v1/chat/completions`, OpenAI's API; history-backed with `X-Chat-Id`.
    ChatCompletions {
        /// The `X-Chat-Id` chat, if any.
        chat_id: Option<String>,
    },
    /// `GET /v1/models`
    ListModels,
    /// `GET /v1/usage?from=&to=&group_by=`
    Usage(UsageQuery),
    /// OpenAI's Responses and Conversations APIs.
    Responses(Endpoint),
}

impl Route {
    /// The `route` label in metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Route::PostMessage { .. } => "post_message",
            Route::GetMessages { .. } => "get_messages",
            Route::ListChats { .. } => "list_chats",
            Route::DeleteChat { .. } => "delete_chat",
            Route::ChatCompletions { .. } => "chat_completions",
            Route::ListModels => "list_models",
            Route::Usage(_) => "usage",
            Route::Responses(endpoint) => endpoint.name(),
        }
    }

    /// Whether the request may call the LLM, so that a tenant's `requests_per_minute` and
    /// `tokens_per_day` apply to it (reads of what is stored do not spend either).
    pub fn calls_llm(&self) -> bool {
        matches!(
            self,
            Route::PostMessage { .. }
                | Route::ChatCompletions { .. }
                | Route::Responses(Endpoint::CreateResponse)
        )
    }

    /// The chat this request holds busy while it is in flight: a new message, and a delete, so
    /// that a reply still in flight cannot bring back a chat deleted under it.
    pub fn busy_chat(&self) -> Option<&str> {
        match self {
            Route::PostMessage { chat_id } | Route::DeleteChat { chat_id } => Some(chat_id),
            Route::ChatCompletions { chat_id } => chat_id.as_deref(),
            Route::Responses(endpoint) => endpoint.busy_chat(),
            _ => None,
        }
    }
}

impl Ops {
    /// The `route` label in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Ops::Healthz => "healthz",
            Ops::Readyz => "readyz",
            Ops::Status => "status",
            Ops::Metrics => "metrics",
        }
    }
}

const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 500;

/// Finds the target of a request, or the 400/404/405 that answers it. `chat_headers` are the
/// request's `X-Chat-Id` values: one makes an OpenAI-style completion history-backed.
///
/// A chat's requests must all reach the instance that owns it, and a proxy in front (see
/// `deploy/haproxy.cfg`) routes on the same key as this: the path's chat id on
/// `/v1/chats/{chat_id}/…`, else `X-Chat-Id`. An API request with two `X-Chat-Id` headers, or
/// one with a comma (which proxies read as a list), is refused, since a proxy and chatpool
/// could each take a different one.
pub fn route(method: &Method, url: &str, chat_headers: &[&str]) -> Result<Target, ApiError> {
    let mut target = route_path(method, url)?;
    if let Target::Api(route) = &mut target {
        let header = single_chat_header(chat_headers)?;
        if let Route::ChatCompletions { chat_id } = route {
            *chat_id = header.map(chat_id_from_header).transpose()?;
        }
    }
    Ok(target)
}

/// The one `X-Chat-Id` value, if any; refuses more than one, or one holding a comma.
fn single_chat_header<'a>(values: &[&'a str]) -> Result<Option<&'a str>, ApiError> {
    if values.len() > 1 {
        return Err(ApiError::InvalidRequest(format!(
            "send at most one X-Chat-Id header, not {}",
            values.len()
        )));
    }
    if values.iter().any(|v| v.contains(',')) {
        return Err(ApiError::InvalidRequest(
            "X-Chat-Id holds one chat id, without commas".into(),
        ));
    }
    Ok(values.first().copied())
}

/// The target by method and URL alone; an OpenAI-style completion is stateless until
/// [`route`] gives it its `X-Chat-Id`.
fn route_path(method: &Method, url: &str) -> Result<Target, ApiError> {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let only = |allowed: &'static str, ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(ApiError::MethodNotAllowed { allow: allowed })
        }
    };
    let get = *method == Method::Get;
    let target = match segments.as_slice() {
        ["healthz"] => only("GET", get).map(|_| Target::Ops(Ops::Healthz))?,
        ["readyz"] => only("GET", get).map(|_| Target::Ops(Ops::Readyz))?,
        ["status"] => only("GET", get).map(|_| Target::Ops(Ops::Status))?,
        ["metrics"] => only("GET", get).map(|_| Target::Ops(Ops::Metrics))?,
        ["v1", "chats"] => {
            only("GET", get)?;
            let q = Query::parse(query, false)?;
            Target::Api(Route::ListChats { limit: q.limit })
        }
        ["v1", "chat", "completions"] => {
            only("POST", *method == Method::Post)?;
            Target::Api(Route::ChatCompletions { chat_id: None })
        }
        ["v1", "models"] => only("GET", get).map(|_| Target::Api(Route::ListModels))?,
        ["v1", "usage"] => {
            only("GET", get)?;
            Target::Api(Route::Usage(usage_query(query)?))
        }
        ["v1", "responses" | "conversations", ..] => Target::Api(Route::Responses(
            super::responses::route(method, &segments[1..], query)?,
        )),
        ["v1", "chats", id] => {
            only("DELETE", *method == Method::Delete)?;
            Target::Api(Route::DeleteChat {
                chat_id: chat_id(id)?,
            })
        }
        ["v1", "chats", id, "messages"] => match method {
            Method::Post => Target::Api(Route::PostMessage {
                chat_id: chat_id(id)?,
            }),
            Method::Get => {
                let chat_id = chat_id(id)?;
                let q = Query::parse(query, true)?;
                Target::Api(Route::GetMessages {
                    chat_id,
                    limit: q.limit,
                    before: q.before,
                })
            }
            _ => return Err(ApiError::MethodNotAllowed { allow: "GET, POST" }),
        },
        _ => return Err(ApiError::NotFound(format!("no route for {path}"))),
    };
    Ok(target)
}

fn chat_id(id: &str) -> Result<String, ApiError> {
    validate::chat_id(id, "chat_id")?;
    Ok(id.to_string())
}

fn chat_id_from_header(id: &str) -> Result<String, ApiError> {
    validate::chat_id(id, "X-Chat-Id")?;
    Ok(id.to_string())
}

/// The query of `GET /v1/usage`: `from` and `to` days (both included) and `group_by`.
fn usage_query(query: &str) -> Result<UsageQuery, ApiError> {
    let mut q = UsageQuery::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let day = |name: &str| {
            Day::parse(value).ok_or_else(|| {
                ApiError::InvalidRequest(format!("{name} must be a UTC day as YYYY-MM-DD"))
            })
        };
        match key {
            "from" => q.from = Some(day("from")?),
            "to" => q.to = Some(day("to")?),
            "group_by" => {
                q.group_by = Some(GroupBy::parse(value).ok_or_else(|| {
                    ApiError::InvalidRequest("group_by must be `day` or `model`".into())
                })?)
            }
            other => {
                return Err(ApiError::InvalidRequest(format!(
                    "unknown query parameter `{other}`; expected from, to or group_by"
                )))
            }
        }
    }
    if let (Some(from), Some(to)) = (q.from, q.to) {
        if from > to {
            return Err(ApiError::InvalidRequest(format!(
                "from ({from}) is after to ({to})"
            )));
        }
    }
    Ok(q)
}

struct Query {
    limit: usize,
    before: Option<i64>,
}

impl Query {
    /// `before` pages a chat's messages; the chat list has no such cursor, so there it is
    /// refused rather than silently ignored.
    fn parse(query: &str, takes_before: bool) -> Result<Query, ApiError> {
        let mut q = Query {
            limit: DEFAULT_LIMIT,
            before: None,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "limit" => {
                    q.limit = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            ApiError::InvalidRequest(format!(
                                "limit must be a whole number from 1 to {MAX_LIMIT}"
                            ))
                        })?;
                }
                "before" if takes_before => {
                    q.before =
                        Some(value.parse().ok().filter(|n: &i64| *n > 0).ok_or_else(|| {
                            ApiError::InvalidRequest(
                                "before must be a message id (a positive whole number)".into(),
                            )
                        })?);
                }
                other => {
                    let expected = if takes_before {
                        "limit or before"
                    } else {
                        "limit"
                    };
                    return Err(ApiError::InvalidRequest(format!(
                        "unknown query parameter `{other}`; expected {expected}"
                    )));
                }
            }
        }
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(method: Method, url: &str) -> Route {
        match route(&method, url, &[]) {
            Ok(Target::Api(r)) => r,
            other => panic!("{url}: {other:?}"),
        }
    }

    fn err(method: Method, url: &str) -> (u16, &'static str) {
        route(&method, url, &[]).unwrap_err().status_and_type()
    }

    #[test]
    fn routes_every_endpoint() {
        assert_eq!(
            route(&Method::Get, "/healthz", &[]).unwrap(),
            Target::Ops(Ops::Healthz)
        );
        assert_eq!(
            route(&Method::Get, "/metrics", &[]).unwrap(),
            Target::Ops(Ops::Metrics)
        );
        assert_eq!(
            api(Method::Post, "/v1/chats/c-1.x_y/messages"),
            Route::PostMessage {
                chat_id: "c-1.x_y".into()
            }
        );
        assert_eq!(
            api(Method::Get, "/v1/chats/c1/messages?limit=2&before=9"),
            Route::GetMessages {
                chat_id: "c1".into(),
                limit: 2,
                before: Some(9)
            }
        );
        assert_eq!(
            api(Method::Get, "/v1/chats"),
            Route::ListChats { limit: 50 }
        );
        assert_eq!(
            api(Method::Delete, "/v1/chats/c1"),
            Route::DeleteChat {
                chat_id: "c1".into()
            }
        );
    }

    #[test]
    fn the_openai_front_door_takes_its_chat_from_the_header() {
        let chat = route(&Method::Post, "/v1/chat/completions", &["c-7"]).unwrap();
        assert_eq!(
            chat,
            Target::Api(Route::ChatCompletions {
                chat_id: Some("c-7".into())
            })
        );
        let stateless = route(&Method::Post, "/v1/chat/completions", &[]).unwrap();
        assert_eq!(
            stateless,
            Target::Api(Route::ChatCompletions { chat_id: None })
        );
        let bad = route(&Method::Post, "/v1/chat/completions", &["no spaces"]).unwrap_err();
        assert_eq!(bad.status_and_type(), (400, "invalid_request"));
        assert_eq!(
            route(&Method::Get, "/v1/models", &[]).unwrap(),
            Target::Api(Route::ListModels)
        );
    }

    #[test]
    fn wrong_method_is_405_and_unknown_path_404() {
        assert_eq!(
            err(Method::Put, "/v1/chats/c1/messages"),
            (405, "method_not_allowed")
        );
        assert_eq!(err(Method::Post, "/healthz"), (405, "method_not_allowed"));
        assert_eq!(
            err(Method::Get, "/v1/chats/c1"),
            (405, "method_not_allowed")
        );
        assert_eq!(err(Method::Get, "/v2/chats"), (404, "not_found"));
        assert_eq!(
            err(Method::Get, "/v1/chats/c1/messages/"),
            (404, "not_found")
        );
        assert_eq!(err(Method::Get, "/"), (404, "not_found"));
    }

    #[test]
    fn bad_chat_ids_and_queries_are_400() {
        let long = format!("/v1/chats/{}/messages", "a".repeat(129));
        for url in [
            "/v1/chats/a%20b/messages",
            "/v1/chats/a:b/messages",
            long.as_str(),
        ] {
            assert_eq!(err(Method::Post, url), (400, "invalid_request"), "{url}");
        }
        for q in [
            "limit=0",
            "limit=501",
            "limit=x",
            "before=-1",
            "before=",
            "page=2",
        ] {
            assert_eq!(
                err(Method::Get, &format!("/v1/chats/c/messages?{q}")),
                (400, "invalid_request"),
                "{q}"
            );
        }
    }

    #[test]
    fn a_new_message_and_a_delete_hold_their_chat_busy() {
        assert_eq!(
            api(Method::Post, "/v1/chats/c/messages").busy_chat(),
            Some("c")
        );
        assert_eq!(api(Method::Delete, "/v1/chats/c").busy_chat(), Some("c"));
        assert_eq!(api(Method::Get, "/v1/chats/c/messages").busy_chat(), None);
    }

    #[test]
    fn usage_takes_days_and_a_grouping() {
        let q = match api(
            Method::Get,
            "/v1/usage?from=2026-11-01&to=2026-11-30&group_by=model",
        ) {
            Route::Usage(q) => q,
            other => panic!("{other:?}"),
        };
        assert_eq!(q.from, Day::parse("2026-11-01"));
        assert_eq!(q.group_by, Some(GroupBy::Model));
        assert_eq!(
            api(Method::Get, "/v1/usage"),
            Route::Usage(UsageQuery::default())
        );
        for q in [
            "from=2026-11-31",
            "to=yesterday",
            "group_by=week",
            "from=2026-11-02&to=2026-11-01",
            "tenant=b",
        ] {
            assert_eq!(
                err(Method::Get, &format!("/v1/usage?{q}")),
                (400, "invalid_request"),
                "{q}"
            );
        }
        assert_eq!(err(Method::Post, "/v1/usage"), (405, "method_not_allowed"));
        assert!(!api(Method::Get, "/v1/usage").calls_llm());
        assert!(api(Method::Post, "/v1/chats/c/messages").calls_llm());
    }

    #[test]
    fn before_on_the_chat_list_is_refused_by_name() {
        let error = route(&Method::Get, "/v1/chats?limit=5&before=9", &[]).unwrap_err();
        assert_eq!(error.status_and_type(), (400, "invalid_request"));
        assert!(error.to_string().contains("`before`"), "{error}");
    }

    #[test]
    fn an_api_request_carries_at_most_one_chat_header_without_commas() {
        let completions = |headers: &[&str]| route(&Method::Post, "/v1/chat/completions", headers);
        let path = |headers: &[&str]| route(&Method::Post, "/v1/chats/c1/messages", headers);
        for refused in [
            completions(&["a", "b"]),
            completions(&["a,b"]),
            path(&["a", "a"]),
            path(&["c1,c2"]),
        ] {
            let error = refused.unwrap_err();
            assert_eq!(error.status_and_type(), (400, "invalid_request"));
            assert!(error.to_string().contains("X-Chat-Id"), "{error}");
        }
        // On a path route the path names the chat; a single header does not change it.
        assert_eq!(
            path(&["other"]).unwrap(),
            Target::Api(Route::PostMessage {
                chat_id: "c1".into()
            })
        );
        // Operations endpoints do not route by chat.
        assert!(route(&Method::Get, "/healthz", &["a", "b"]).is_ok());
    }
}
