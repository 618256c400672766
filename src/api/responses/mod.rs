//! OpenAI's stateful APIs, Responses and Conversations, in front of a chat-completions LLM,
//! kept in chatpool's chats.
//!
//! A new response is a turn like any other: its chat's history (the chain of earlier
//! responses, or the conversation's items) becomes the messages, the LLM is called through
//! the worker's own client, and the exchange is committed before the answer, in the chat of
//! the response it continues, in its conversation, or in a new chat named after it. The
//! worker holds that chat busy from the moment it knows it, as a new message does. With
//! `store: false` nothing is written at all. Streaming follows the event sequence OpenAI's
//! SDK checks, opened at the first piece of the reply, so a failure before it is an ordinary
//! JSON error, as on the other doors.

mod conversations;
mod input;
mod route;
mod shape;

pub use route::{route, Endpoint, List};

use super::error::{log_detail, ApiError};
use super::handler::{Asked, Handler};
use super::json_response;
use super::request::idempotency_key;
use super::responder::{Answer, Responder, Timings};
use crate::admission::Ticket;
use crate::config::HistoryConfig;
use crate::llm::prompt;
use crate::llm::wire::{ChatMessage, Completion};
use crate::llm::{Cancel, Sink, UpstreamError};
use crate::store::{ItemPage, Message, NewItem, NewResponse, Order, Reader, StoredResponse};
use input::{CreateResponse, Truncation};
use serde_json::Value;
use sha2::{Digest, Sha256};
use shape::{Events, View};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Serves one request to the Responses or Conversations API. A new response that continues a
/// chain or a conversation holds that chat busy through `ticket`.
pub(super) fn serve(
    handler: &mut Handler,
    endpoint: &Endpoint,
    asked: &Asked,
    ticket: &mut Ticket,
    responder: &mut Responder,
    timings: &mut Timings,
) -> Result<Answer, ApiError> {
    let tenant = asked.tenant.as_str();
    let found = |stored: Option<StoredResponse>, id: &str| stored.ok_or_else(|| no_response(id));
    if asked.key.is_some() && !matches!(endpoint, Endpoint::CreateResponse) {
        // Honoured where a stored answer can be replayed; elsewhere a retry would not be safe.
        return Err(ApiError::invalid(
            "Idempotency-Key is honoured on POST /v1/responses only; send it there, or not at all",
        ));
    }
    let body = match endpoint {
        Endpoint::CreateResponse => return create(handler, asked, ticket, responder, timings),
        Endpoint::GetResponse { id } => {
            stored_object(&found(handler.readers.get()?.response(tenant, id)?, id)?)
        }
        Endpoint::DeleteResponse { id } => {
            let stored = found(handler.readers.get()?.response(tenant, id)?, id)?;
            hold(ticket, tenant, &stored.chat_id)?;
            if !handler.writer.delete_response(tenant, id)? {
                return Err(no_response(id));
            }
            shape::deleted(id, "response")
        }
        Endpoint::InputItems { id, list } => {
            let store = handler.readers.get()?;
            let stored = found(store.response(tenant, id)?, id)?;
            let inputs = (stored.first_message_id, stored.reply_message_id - 1);
            let page = page(&store, tenant, &stored.chat_id, inputs, list)?;
            shape::list(&page.items, page.has_more)
        }
        _ => return conversations::serve(handler, endpoint, asked),
    };
    Ok(Answer::Response(json_response(200, &body)))
}

fn no_response(id: &str) -> ApiError {
    ApiError::NotFound(format!("no response `{id}`"))
}

/// Holds a chat busy for the rest of the request, as the acceptor holds a new message's.
fn hold(ticket: &mut Ticket, tenant: &str, chat_id: &str) -> Result<(), ApiError> {
    ticket
        .hold_chat(&format!("{tenant}/{chat_id}"))
        .map_err(|_| ApiError::ChatBusy)
}

/// A page of a chat's items within `range` of message ids, after `list.after` if given.
fn page(
    store: &Reader,
    tenant: &str,
    chat_id: &str,
    mut range: (i64, i64),
    list: &List,
) -> Result<ItemPage, ApiError> {
    if let Some(after) = &list.after {
        let at = store
            .item(tenant, chat_id, after)?
            .filter(|item| (range.0..=range.1).contains(&item.message_id))
            .ok_or_else(|| ApiError::InvalidParam {
                param: "after".into(),
                code: Some("invalid_value"),
                message: format!("after: no item `{after}` in this list"),
            })?;
        match list.order {
            Order::Asc => range.0 = at.message_id + 1,
            Order::Desc => range.1 = at.message_id - 1,
        }
    }
    Ok(store.items(tenant, chat_id, range, list.order, list.limit)?)
}

/// A fresh id: `prefix` and 32 hex digits.
fn new_id(prefix: &str) -> String {
    format!("{prefix}{:032x}", fastrand::u128(..))
}

/// Where a new response goes and what it continues.
struct Place {
    chat_id: String,
    conversation_id: Option<String>,
}

/// A new response on its way to the LLM.
struct Turn {
    id: String,
    /// Seconds since the epoch, for `created_at`: the same in every event.
    created: u64,
    item_id: String,
    place: Place,
    asked: CreateResponse,
    messages: Vec<ChatMessage>,
    key: Option<String>,
    fingerprint: Option<String>,
}

fn create(
    handler: &mut Handler,
    asked: &Asked,
    ticket: &mut Ticket,
    responder: &mut Responder,
    timings: &mut Timings,
) -> Result<Answer, ApiError> {
    let tenant = asked.tenant.as_str();
    let key = idempotency_key(asked.key.as_deref())?;
    let wanted = input::parse_create(&asked.body)?;
    if key.is_some() && !wanted.store {
        return Err(ApiError::InvalidParam {
            param: "store".into(),
            code: None,
            message: "Idempotency-Key needs store: true; a response not stored cannot be \
                      replayed"
                .into(),
        });
    }
    let fingerprint = key
        .as_ref()
        .map(|_| format!("{:x}", Sha256::digest(&asked.body)));
    let started = Instant::now();
    let id = new_id("resp_");
    let (place, history) = {
        // Given back before the LLM call: a read connection never waits on the network.
        let store = handler.readers.get()?;
        if let Some(key) = &key {
            if let Some(stored) = replayable(&store, tenant, key, &fingerprint)? {
                timings.history = Some(started.elapsed());
                return replay(&wanted, &stored);
            }
        }
        let place = place(&store, tenant, &wanted, &id)?;
        if wanted.store {
            hold(ticket, tenant, &place.chat_id)?;
        }
        let history = history(&store, tenant, &wanted, &place, &handler.config.history)?;
        (place, history)
    };
    timings.history = Some(started.elapsed());
    let messages = prompt_for(&handler.config.history.system_prompt, &wanted, &history);
    let turn = Turn {
        id,
        created: crate::api::openai::now_secs(),
        item_id: new_id("msg_"),
        place,
        asked: wanted,
        messages,
        key,
        fingerprint,
    };
    take(handler, asked, turn, responder, timings)
}

/// The response stored earlier under `key`, unless the key was used for another request.
fn replayable(
    store: &Reader,
    tenant: &str,
    key: &str,
    fingerprint: &Option<String>,
) -> Result<Option<StoredResponse>, ApiError> {
    let Some(id) = store.response_by_key(tenant, key)? else {
        return Ok(None);
    };
    let stored = store.response(tenant, &id)?;
    if stored
        .as_ref()
        .is_some_and(|s| &s.fingerprint != fingerprint)
    {
        return Err(ApiError::IdempotencyKeyReused);
    }
    Ok(stored)
}

/// The chat a new response goes to: the previous response's, the conversation, or a new one
/// named after the response.
fn place(
    store: &Reader,
    tenant: &str,
    asked: &CreateResponse,
    id: &str,
) -> Result<Place, ApiError> {
    if let Some(previous) = &asked.previous_response_id {
        let stored = store
            .response(tenant, previous)?
            .ok_or_else(|| ApiError::InvalidParam {
                param: "previous_response_id".into(),
                code: Some("previous_response_not_found"),
                message: format!("Previous response with id '{previous}' not found."),
            })?;
        return Ok(Place {
            chat_id: stored.chat_id,
            conversation_id: None,
        });
    }
    if let Some(conversation) = &asked.conversation {
        store
            .conversation(tenant, conversation)?
            .ok_or_else(|| no_conversation(conversation))?;
        return Ok(Place {
            chat_id: conversation.clone(),
            conversation_id: Some(conversation.clone()),
        });
    }
    Ok(Place {
        chat_id: id.to_string(),
        conversation_id: None,
    })
}

fn no_conversation(id: &str) -> ApiError {
    ApiError::NotFound(format!("no conversation `{id}`"))
}

/// As many as SQLite counts: no bound at all.
const UNBOUNDED: usize = i64::MAX as usize;

/// The earlier messages, oldest first: the chain's or the conversation's, within the history
/// window unless truncation is disabled.
fn history(
    store: &Reader,
    tenant: &str,
    asked: &CreateResponse,
    place: &Place,
    window: &HistoryConfig,
) -> Result<Vec<Message>, ApiError> {
    let (max_messages, max_chars) = match asked.truncation {
        Truncation::Auto => (window.max_messages, window.max_chars),
        Truncation::Disabled => (UNBOUNDED, UNBOUNDED),
    };
    let newest = if let Some(previous) = &asked.previous_response_id {
        // Every response holds two messages at least, so as many links as messages suffice.
        store.chain_messages(tenant, previous, max_messages, max_messages)?
    } else if let Some(conversation) = &place.conversation_id {
        store.history_window(tenant, conversation, max_messages, max_chars)?
    } else {
        Vec::new()
    };
    Ok(prompt::window(newest, max_chars))
}

/// The messages for the LLM: the instructions (or the configured system prompt), the history,
/// the new input. Instructions belong to one response and are never carried along a chain.
fn prompt_for(
    system_prompt: &str,
    asked: &CreateResponse,
    history: &[Message],
) -> Vec<ChatMessage> {
    // Every upstream knows `system`; OpenAI's `developer` is the same thing.
    let upstream = |role: &str| if role == "developer" { "system" } else { role }.to_string();
    let system = asked.instructions.as_deref().unwrap_or(system_prompt);
    let mut messages = Vec::with_capacity(history.len() + asked.input.len() + 1);
    if !system.is_empty() {
        messages.push(ChatMessage::new("system", system));
    }
    messages.extend(
        history
            .iter()
            .map(|m| ChatMessage::new(&upstream(&m.role), &m.content)),
    );
    messages.extend(
        asked
            .input
            .iter()
            .map(|i| ChatMessage::new(&upstream(&i.role), &i.text)),
    );
    messages
}

impl Turn {
    fn view<'a>(
        &'a self,
        created_at: u64,
        status: &'a str,
        model: &'a str,
        reply: Option<&'a Completion>,
    ) -> View<'a> {
        View {
            id: &self.id,
            created_at,
            status,
            model,
            output: reply.map(|c| (self.item_id.as_str(), c.content.as_str())),
            usage: reply
                .and_then(|c| c.usage)
                .map(|u| (u.prompt_tokens, u.completion_tokens)),
            previous_response_id: self.asked.previous_response_id.as_deref(),
            conversation: self.place.conversation_id.as_deref(),
            store: self.asked.store,
            echo: &self.asked.echo,
            error: None,
        }
    }

    fn to_store(&self, tenant: &str, reply: &Completion) -> NewResponse {
        NewResponse {
            tenant: tenant.to_string(),
            id: self.id.clone(),
            chat_id: self.place.chat_id.clone(),
            conversation_id: self.place.conversation_id.clone(),
            previous_response_id: self.asked.previous_response_id.clone(),
            inputs: self
                .asked
                .input
                .iter()
                .map(|i| NewItem {
                    id: new_id("msg_"),
                    role: i.role.clone(),
                    content: i.text.clone(),
                })
                .collect(),
            reply: NewItem {
                id: self.item_id.clone(),
                role: "assistant".into(),
                content: reply.content.clone(),
            },
            model: reply.model.clone(),
            usage: reply.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
            created_at: self.created,
            echo: self.asked.echo.to_string(),
            idempotency_key: self.key.clone(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

/// Calls the LLM (streaming events if asked), stores the response if asked, and answers.
fn take(
    handler: &mut Handler,
    asked: &Asked,
    turn: Turn,
    responder: &mut Responder,
    timings: &mut Timings,
) -> Result<Answer, ApiError> {
    let model = handler.llm.model().to_string();
    let opening = shape::response(&turn.view(turn.created, "in_progress", &model, None));
    let mut events = Events::new(&turn.item_id);
    let completion = complete(
        handler,
        asked,
        &turn,
        &opening,
        &mut events,
        responder,
        timings,
    );
    if let Ok(completion) = &completion {
        // Counted whether or not it is stored, as every answered call is.
        handler.count_usage(asked, completion);
    }
    if asked.hangup.load(Ordering::SeqCst) {
        log::info!(
            "request_id={}: the client went away before its response; nothing stored",
            asked.request_id
        );
        return Ok(Answer::Abandoned);
    }
    let stored = completion
        .map_err(|e| upstream_error(e, turn.asked.truncation))
        .and_then(|completion| store(handler, &asked.tenant, &turn, completion, timings));
    let completion = match stored {
        Ok(completion) => completion,
        Err(error) if events.opened() => return Ok(failed(asked, &mut events, &error, &opening)),
        Err(error) => return Err(error),
    };
    let body = shape::response(&turn.view(
        turn.created,
        "completed",
        &completion.model,
        Some(&completion),
    ));
    if !turn.asked.stream {
        return Ok(Answer::Response(json_response(200, &body)));
    }
    let mut last = Vec::new();
    if !events.opened() {
        last.extend(events.opening(&opening));
    }
    last.extend(events.closing(&completion.content, &body));
    Ok(Answer::Events(last))
}

/// Asks the LLM, sending a streamed reply's events as its pieces come. The call is abandoned
/// once the client hangs up or an event finds it gone.
fn complete(
    handler: &Handler,
    asked: &Asked,
    turn: &Turn,
    opening: &Value,
    events: &mut Events,
    responder: &mut Responder,
    timings: &mut Timings,
) -> Result<Completion, UpstreamError> {
    let started = Instant::now();
    let cancel = Cancel::new(Arc::clone(&asked.hangup));
    let mut deltas = |piece: &str| {
        let mut sent = events.opened() || {
            let first = events.opening(opening);
            first.iter().all(|(name, data)| responder.event(name, data))
        };
        if sent {
            let (name, data) = events.delta(piece);
            sent = responder.event(name, &data);
        }
        if !sent {
            asked.hangup.store(true, Ordering::SeqCst);
        }
    };
    let sink: Option<&mut Sink<'_>> = turn.asked.stream.then_some(&mut deltas);
    let sampling = turn.asked.sampling.clone();
    let completion = handler
        .llm
        .complete(&turn.messages, sampling, sink, &cancel);
    timings.llm = Some(started.elapsed());
    completion
}

/// Stores the response when it is to be kept; the completion comes back to be answered.
fn store(
    handler: &Handler,
    tenant: &str,
    turn: &Turn,
    completion: Completion,
    timings: &mut Timings,
) -> Result<Completion, ApiError> {
    if !turn.asked.store {
        return Ok(completion);
    }
    let started = Instant::now();
    let stored = handler
        .writer
        .store_response(turn.to_store(tenant, &completion));
    timings.store = Some(started.elapsed());
    match stored? {
        true => Ok(completion),
        // Deleted while the LLM answered: the reply has nowhere to go.
        false => Err(no_conversation(&turn.place.chat_id)),
    }
}

/// The end of a stream that failed after it began: `response.failed`; nothing was stored.
fn failed(asked: &Asked, events: &mut Events, error: &ApiError, opening: &Value) -> Answer {
    if let Some(detail) = log_detail(error) {
        log::warn!("request_id={} stream failed: {detail}", asked.request_id);
    }
    let mut failed = opening.clone();
    failed["status"] = "failed".into();
    failed["error"] = serde_json::json!({"code": "server_error", "message": error.to_string()});
    Answer::Events(vec![events.failed(&failed)])
}

/// An upstream refusal while every earlier turn was sent is the client's to fix: the
/// conversation did not fit the model, and `truncation: auto` would have kept it within the
/// history window.
fn upstream_error(error: UpstreamError, truncation: Truncation) -> ApiError {
    match (error, truncation) {
        (UpstreamError::Status { status, detail, .. }, Truncation::Disabled)
            if status == 400 || status == 413 =>
        {
            ApiError::InvalidParam {
                param: "input".into(),
                code: Some("context_length_exceeded"),
                message: format!(
                    "the LLM refused the conversation (HTTP {status}: {detail}); with truncation \
                     disabled every earlier turn is sent, and truncation auto keeps them within \
                     the history window"
                ),
            }
        }
        (error, _) => error.into(),
    }
}

/// A stored response as its object.
fn stored_object(stored: &StoredResponse) -> Value {
    let echo: Value = serde_json::from_str(&stored.echo).unwrap_or_default();
    shape::response(&View {
        id: &stored.id,
        created_at: stored.created_at,
        status: "completed",
        model: &stored.model,
        output: stored
            .reply
            .as_ref()
            .map(|r| (r.id.as_str(), r.content.as_str())),
        usage: stored.usage,
        previous_response_id: stored.previous_response_id.as_deref(),
        conversation: stored.conversation_id.as_deref(),
        store: true,
        echo: &echo,
        error: None,
    })
}

/// Answers a repeat of a stored request from the store, without calling the LLM; a stream
/// sends the stored reply as one piece.
fn replay(wanted: &CreateResponse, stored: &StoredResponse) -> Result<Answer, ApiError> {
    let body = stored_object(stored);
    if !wanted.stream {
        return Ok(Answer::Response(json_response(200, &body)));
    }
    let Some(reply) = &stored.reply else {
        return Err(no_response(&stored.id));
    };
    let mut opening = body.clone();
    opening["status"] = "in_progress".into();
    opening["output"] = Value::Array(Vec::new());
    let mut events = Events::new(&reply.id);
    let mut all = events.opening(&opening);
    all.push(events.delta(&reply.content));
    all.extend(events.closing(&reply.content, &body));
    Ok(Answer::Events(all))
}
