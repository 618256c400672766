//! The paths of the Responses and Conversations APIs: which endpoint, with which validated ids
//! and list parameters. Pure string work, done by the acceptor like the rest of routing.

use crate::api::error::ApiError;
use crate::store::Order;
use tiny_http::Method;

/// An endpoint of the Responses or Conversations API, with its path and query values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/responses`
    CreateResponse,
    /// `GET /v1/responses/{id}`
    GetResponse {
        /// The `resp_…` id.
        id: String,
    },
    /// `DELETE /v1/responses/{id}`
    DeleteResponse {
        /// The `resp_…` id.
        id: String,
    },
    /// `GET /v1/responses/{id}/input_items`
    InputItems {
        /// The `resp_…` id.
        id: String,
        /// Which page.
        list: List,
    },
    /// `POST /v1/conversations`
    CreateConversation,
    /// `GET /v1/conversations/{id}`
    GetConversation {
        /// The `conv_…` id.
        id: String,
    },
    /// `DELETE /v1/conversations/{id}`
    DeleteConversation {
        /// The `conv_…` id.
        id: String,
    },
    /// `POST /v1/conversations/{id}/items`
    CreateItems {
        /// The `conv_…` id.
        conversation: String,
    },
    /// `GET /v1/conversations/{id}/items`
    ListItems {
        /// The `conv_…` id.
        conversation: String,
        /// Which page.
        list: List,
    },
    /// `GET /v1/conversations/{id}/items/{item_id}`
    GetItem {
        /// The `conv_…` id.
        conversation: String,
        /// The `msg_…` id.
        item: String,
    },
    /// `DELETE /v1/conversations/{id}/items/{item_id}`
    DeleteItem {
        /// The `conv_…` id.
        conversation: String,
        /// The `msg_…` id.
        item: String,
    },
}

/// A list's page, as OpenAI's list endpoints take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct List {
    /// The item id the page starts after.
    pub after: Option<String>,
    /// 1–100, default 20.
    pub limit: usize,
    /// Default newest first, as OpenAI's.
    pub order: Order,
}

impl Endpoint {
    /// The `route` label in metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Endpoint::CreateResponse => "create_response",
            Endpoint::GetResponse { .. } => "get_response",
            Endpoint::DeleteResponse { .. } => "delete_response",
            Endpoint::InputItems { .. } => "response_input_items",
            Endpoint::CreateConversation => "create_conversation",
            Endpoint::GetConversation { .. } => "get_conversation",
            Endpoint::DeleteConversation { .. } => "delete_conversation",
            Endpoint::CreateItems { .. } => "create_conversation_items",
            Endpoint::ListItems { .. } => "list_conversation_items",
            Endpoint::GetItem { .. } => "get_conversation_item",
            Endpoint::DeleteItem { .. } => "delete_conversation_item",
        }
    }

    /// The chat a write to a conversation holds busy, as a new message holds its chat. (A new
    /// response finds its chat in its body; the worker holds that one.)
    pub fn busy_chat(&self) -> Option<&str> {
        match self {
            Endpoint::DeleteConversation { id } => Some(id),
            Endpoint::CreateItems { conversation } | Endpoint::DeleteItem { conversation, .. } => {
                Some(conversation)
            }
            _ => None,
        }
    }
}

/// The endpoint for a path under `/v1/responses` or `/v1/conversations` (`segments` after
/// `v1`), or the 400/404/405 that answers it.
pub fn route(method: &Method, segments: &[&str], query: &str) -> Result<Endpoint, ApiError> {
    let allow = |allowed: &'static str| ApiError::MethodNotAllowed { allow: allowed };
    let endpoint = match (segments, method) {
        (["responses"], Method::Post) => Endpoint::CreateResponse,
        (["responses"], _) => return Err(allow("POST")),
        (["responses", id], Method::Get) => Endpoint::GetResponse {
            id: response_id(id)?,
        },
        (["responses", id], Method::Delete) => Endpoint::DeleteResponse {
            id: response_id(id)?,
        },
        (["responses", _], _) => return Err(allow("GET, DELETE")),
        (["responses", id, "input_items"], Method::Get) => Endpoint::InputItems {
            id: response_id(id)?,
            list: List::parse(query)?,
        },
        (["responses", _, "input_items"], _) => return Err(allow("GET")),
        (["conversations"], Method::Post) => Endpoint::CreateConversation,
        (["conversations"], _) => return Err(allow("POST")),
        (["conversations", id], Method::Get) => Endpoint::GetConversation {
            id: conversation_id(id)?,
        },
        (["conversations", id], Method::Delete) => Endpoint::DeleteConversation {
            id: conversation_id(id)?,
        },
        (["conversations", _], _) => return Err(allow("GET, DELETE")),
        (["conversations", id, "items"], Method::Post) => Endpoint::CreateItems {
            conversation: conversation_id(id)?,
        },
        (["conversations", id, "items"], Method::Get) => Endpoint::ListItems {
            conversation: conversation_id(id)?,
            list: List::parse(query)?,
        },
        (["conversations", _, "items"], _) => return Err(allow("GET, POST")),
        (["conversations", id, "items", item], Method::Get) => Endpoint::GetItem {
            conversation: conversation_id(id)?,
            item: item_id(item, "item_id")?,
        },
        (["conversations", id, "items", item], Method::Delete) => Endpoint::DeleteItem {
            conversation: conversation_id(id)?,
            item: item_id(item, "item_id")?,
        },
        (["conversations", _, "items", _], _) => return Err(allow("GET, DELETE")),
        _ => {
            return Err(ApiError::NotFound(format!(
                "no route for /v1/{}",
                segments.join("/")
            )))
        }
    };
    only_listed_queries(&endpoint, query)?;
    Ok(endpoint)
}

/// Refuses a query on an endpoint that is not a list, except `include`, which asks for extra
/// output data that chatpool's text items never carry.
fn only_listed_queries(endpoint: &Endpoint, query: &str) -> Result<(), ApiError> {
    let lists = matches!(
        endpoint,
        Endpoint::InputItems { .. } | Endpoint::ListItems { .. }
    );
    if !lists
        && query
            .split('&')
            .any(|p| !p.is_empty() && !p.starts_with("include"))
    {
        return Err(ApiError::InvalidRequest(
            "this endpoint takes no query parameters".into(),
        ));
    }
    Ok(())
}

fn shaped(id: &str, prefix: &str, name: &str) -> Result<String, ApiError> {
    crate::validate::openai_id(id, prefix, name)
        .map(|()| id.to_string())
        .map_err(|why| ApiError::InvalidParam {
            param: name.to_string(),
            code: Some("invalid_value"),
            message: why.0,
        })
}

/// A `resp_…` id, or the 400 naming `param`.
pub fn checked_response_id(id: &str, param: &str) -> Result<String, ApiError> {
    shaped(id, "resp_", param)
}

/// A `conv_…` id, or the 400 naming `param`.
pub fn checked_conversation_id(id: &str, param: &str) -> Result<String, ApiError> {
    shaped(id, "conv_", param)
}

fn response_id(id: &str) -> Result<String, ApiError> {
    checked_response_id(id, "response_id")
}

fn conversation_id(id: &str) -> Result<String, ApiError> {
    checked_conversation_id(id, "conversation_id")
}

fn item_id(id: &str, param: &str) -> Result<String, ApiError> {
    shaped(id, "msg_", param)
}

const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 100;

impl List {
    fn parse(query: &str) -> Result<List, ApiError> {
        let mut list = List {
            after: None,
            limit: DEFAULT_LIMIT,
            order: Order::Desc,
        };
        let invalid = |param: &str, message: String| ApiError::InvalidParam {
            param: param.into(),
            code: Some("invalid_value"),
            message,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "after" => list.after = Some(item_id(value, "after")?),
                "limit" => {
                    list.limit = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            invalid(
                                "limit",
                                format!("limit must be a whole number from 1 to {MAX_LIMIT}"),
                            )
                        })?
                }
                "order" => {
                    list.order = match value {
                        "asc" => Order::Asc,
                        "desc" => Order::Desc,
                        _ => return Err(invalid("order", "order must be asc or desc".into())),
                    }
                }
                // `include` (or `include[]`) asks for extra output data that text items never
                // carry; there is nothing to add.
                k if k.starts_with("include") => {}
                other => {
                    return Err(invalid(
                        other,
                        format!(
                            "unknown query parameter `{other}`; expected after, limit or order"
                        ),
                    ))
                }
            }
        }
        Ok(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(method: Method, path: &str) -> Result<Endpoint, ApiError> {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let segments: Vec<&str> = path.split('/').collect();
        route(&method, &segments, query)
    }

    #[test]
    fn routes_every_endpoint_with_its_ids() {
        assert_eq!(
            at(Method::Post, "responses").unwrap(),
            Endpoint::CreateResponse
        );
        assert_eq!(
            at(
                Method::Get,
                "responses/resp_1/input_items?limit=2&order=asc&after=msg_9"
            )
            .unwrap(),
            Endpoint::InputItems {
                id: "resp_1".into(),
                list: List {
                    after: Some("msg_9".into()),
                    limit: 2,
                    order: Order::Asc
                }
            }
        );
        assert_eq!(
            at(Method::Delete, "conversations/conv_a/items/msg_b").unwrap(),
            Endpoint::DeleteItem {
                conversation: "conv_a".into(),
                item: "msg_b".into()
            }
        );
        let listed = at(Method::Get, "conversations/conv_a/items?include=x").unwrap();
        assert_eq!(
            listed,
            Endpoint::ListItems {
                conversation: "conv_a".into(),
                list: List {
                    after: None,
                    limit: 20,
                    order: Order::Desc
                }
            }
        );
        assert_eq!(listed.busy_chat(), None);
        assert_eq!(
            at(Method::Post, "conversations/conv_a/items")
                .unwrap()
                .busy_chat(),
            Some("conv_a")
        );
    }

    #[test]
    fn ids_of_the_wrong_shape_are_400_naming_the_field() {
        for (path, field) in [
            ("responses/chat-1", "response_id"),
            ("responses/resp_", "response_id"),
            ("conversations/resp_1", "conversation_id"),
            ("conversations/conv_1/items/42", "item_id"),
            ("conversations/conv_1/items?after=x", "after"),
            ("conversations/conv_1/items?limit=101", "limit"),
            ("conversations/conv_1/items?order=up", "order"),
            ("conversations/conv_1/items?page=2", "page"),
        ] {
            match at(Method::Get, path) {
                Err(ApiError::InvalidParam { param, .. }) => assert_eq!(param, field, "{path}"),
                other => panic!("{path}: {other:?}"),
            }
        }
        assert!(matches!(
            at(Method::Put, "responses/resp_1"),
            Err(ApiError::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            at(Method::Get, "responses/resp_1/x"),
            Err(ApiError::NotFound(_))
        ));
    }
}
