//! The Conversations API: a conversation is a chat named `conv_…`, and its items are that
//! chat's messages, so they are also seen (and sent to) through `/v1/chats/{id}/messages`.
//! Writes to a conversation hold its chat busy from the acceptor on, like a new message.

use super::input::{parse_new_conversation, parse_new_items, InputItem};
use super::route::Endpoint;
use super::{new_id, no_conversation, page, shape};
use crate::api::error::ApiError;
use crate::api::handler::{Asked, Handler};
use crate::api::json_response;
use crate::api::openai::now_secs;
use crate::api::responder::Answer;
use crate::store::{Conversation, NewItem};

/// Serves one request to the Conversations API.
pub(super) fn serve(
    handler: &mut Handler,
    endpoint: &Endpoint,
    asked: &Asked,
) -> Result<Answer, ApiError> {
    let tenant = asked.tenant.as_str();
    let body = match endpoint {
        Endpoint::CreateConversation => create(handler, tenant, &asked.body)?,
        Endpoint::GetConversation { id } => shape::conversation(&existing(handler, tenant, id)?),
        Endpoint::DeleteConversation { id } => {
            existing(handler, tenant, id)?;
            if !handler.writer.delete(tenant, id)? {
                return Err(no_conversation(id));
            }
            shape::deleted(id, "conversation.deleted")
        }
        Endpoint::CreateItems { conversation } => {
            let items = parse_new_items(&asked.body)?;
            let stored = handler
                .writer
                .append_items(tenant, conversation, to_store(items))?
                .ok_or_else(|| no_conversation(conversation))?;
            shape::list(&stored, false)
        }
        Endpoint::ListItems { conversation, list } => {
            existing(handler, tenant, conversation)?;
            let store = handler.readers.get()?;
            let page = page(&store, tenant, conversation, (0, i64::MAX), list)?;
            shape::list(&page.items, page.has_more)
        }
        Endpoint::GetItem { conversation, item } => {
            existing(handler, tenant, conversation)?;
            let found = handler.readers.get()?.item(tenant, conversation, item)?;
            shape::item(&found.ok_or_else(|| no_item(item))?)
        }
        Endpoint::DeleteItem { conversation, item } => {
            let found = existing(handler, tenant, conversation)?;
            if !handler.writer.delete_item(tenant, conversation, item)? {
                return Err(no_item(item));
            }
            shape::conversation(&found)
        }
        _ => {
            return Err(ApiError::Internal(format!(
                "{endpoint:?} is not a conversations endpoint"
            )))
        }
    };
    Ok(Answer::Response(json_response(200, &body)))
}

/// Creates a conversation with its first items; answers with the conversation.
fn create(handler: &Handler, tenant: &str, body: &[u8]) -> Result<serde_json::Value, ApiError> {
    let (items, metadata) = parse_new_conversation(body)?;
    let conversation = Conversation {
        id: new_id("conv_"),
        created_at: now_secs(),
        metadata: metadata.to_string(),
    };
    let object = shape::conversation(&conversation);
    handler
        .writer
        .create_conversation(tenant, conversation, to_store(items))?;
    Ok(object)
}

fn existing(handler: &Handler, tenant: &str, id: &str) -> Result<Conversation, ApiError> {
    handler
        .readers
        .get()?
        .conversation(tenant, id)?
        .ok_or_else(|| no_conversation(id))
}

fn no_item(id: &str) -> ApiError {
    ApiError::NotFound(format!("no item `{id}` in this conversation"))
}

fn to_store(items: Vec<InputItem>) -> Vec<NewItem> {
    items
        .into_iter()
        .map(|i| NewItem {
            id: new_id("msg_"),
            role: i.role,
            content: i.text,
        })
        .collect()
}
