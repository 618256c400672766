//! The worker side of the API: what one worker thread does with one job, read top to bottom.
//!
//! [`Handler::run`] takes the job, lets [`Handler::answer`] compute its [`Answer`] as a value
//! (a panic becomes a 500, so the thread lives on), releases the job's ticket, and hands the
//! answer to the job's one [`Responder`], which writes it. A message turn goes through four
//! stages, each a function from values to a value: [`Turn`] parses the request, `prior` reads
//! the chat (its history window, or the stored reply of a replayed key), `complete` asks the
//! LLM (passing a stream's pieces to the responder as they come), and `store` hands the
//! exchange to the writer thread.

use super::error::{log_detail, ApiError};
use super::openai;
use super::request::read_body;
use super::responder::{Answer, Responder, Timings, CLIENT_GONE};
use super::route::Route;
use super::turn::{ChatTurn, Prior, Reply, Turn};
use super::usage;
use super::{header, json_response, log_request, HttpResponse};
use crate::admission::Ticket;
use crate::config::Config;
use crate::llm::prompt;
use crate::llm::wire::{ChatMessage, Completion};
use crate::llm::{Cancel, LlmClient, Sink};
use crate::metrics::Metrics;
use crate::store::{Exchange, Readers, StoredReply, Writer};
use crate::tenants::Tenants;
use serde_json::json;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// One admitted API request on its way to a worker.
pub struct Job {
    /// The client's request, read whole by its connection.
    pub request: tiny_http::Request,
    /// Where it goes.
    pub route: Route,
    /// The tenant it acts for.
    pub tenant: String,
    /// Its id, the client's or a fresh one.
    pub request_id: String,
    /// When the acceptor received it.
    pub received: Instant,
    /// Its place in the pool, released when the answer is settled.
    pub ticket: Ticket,
}

/// What the stages read of a job's request; the responder owns the request itself.
pub(super) struct Asked {
    pub(super) route: Route,
    pub(super) tenant: String,
    pub(super) request_id: String,
    /// The `Idempotency-Key` header, unchecked.
    pub(super) key: Option<String>,
    pub(super) body: Vec<u8>,
    /// Set by the client's connection when the client hangs up, and by a stream's failed send.
    pub(super) hangup: Arc<AtomicBool>,
}

/// A worker's resources for serving API requests.
pub struct Handler {
    pub(super) readers: Readers,
    pub(super) writer: Writer,
    pub(super) llm: LlmClient,
    pub(super) config: Arc<Config>,
    metrics: Arc<Metrics>,
    tenants: Tenants,
}

impl Handler {
    /// A handler sharing the read connections and the writer, with its own LLM client.
    pub fn new(
        readers: Readers,
        writer: Writer,
        llm: LlmClient,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        tenants: Tenants,
    ) -> Handler {
        Handler {
            readers,
            writer,
            llm,
            tenants,
            config,
            metrics,
        }
    }

    /// Serves one job to the end: answer, release the ticket, write, count, log.
    pub fn run(&mut self, job: Job) {
        let Job {
            mut request,
            route,
            tenant,
            request_id,
            received,
            mut ticket,
        } = job;
        let (method, url, name) = (
            request.method().to_string(),
            request.url().to_string(),
            route.name(),
        );
        if request.client_gone() {
            log::info!("request_id={request_id} {method} {url}: the client left while it was queued; dropped");
            self.metrics.request(name, CLIENT_GONE);
            return;
        }
        self.metrics.workers_busy.inc();
        let mut timings = Timings::new(received);
        log::debug!(
            "request_id={request_id} queued: {:.3} ms before a worker took it",
            timings.queued.as_secs_f64() * 1e3
        );
        let asked = read_body(request.as_reader()).map(|body| Asked {
            key: header(&request, "Idempotency-Key").map(str::to_string),
            hangup: request.hangup(),
            route,
            tenant,
            request_id: request_id.clone(),
            body,
        });
        let mut responder = Responder::new(request, &request_id, self.llm.model());
        let answer = match asked {
            Ok(asked) => self.guarded(&asked, &mut ticket, &mut responder, &mut timings),
            Err(error) => Answer::Failed(error),
        };
        if let Some(detail) = failure_detail(&answer) {
            log::warn!("request_id={request_id} {name} failed: {detail}");
        }
        // Released before the answer is written, so a client that posts again the moment it
        // has its answer never finds its own chat still busy.
        drop(ticket);
        let status = responder.finish(answer, &timings);
        self.count(name, status, &timings);
        let total = timings.received.elapsed().as_secs_f64() * 1e3;
        log_request(&method, &url, status, total, &request_id);
        self.metrics.workers_busy.dec();
    }

    /// Counts an answered request and the time each of its stages took.
    fn count(&self, route: &'static str, status: u16, timings: &Timings) {
        self.metrics.request(route, status);
        for (index, stage) in timings.stages().into_iter().enumerate() {
            if let Some(d) = stage {
                self.metrics.observe_stage(index, d.as_secs_f64());
            }
        }
    }

    /// [`Handler::answer`], with a panic caught as a 500: it costs one request, not the worker.
    fn guarded(
        &mut self,
        asked: &Asked,
        ticket: &mut Ticket,
        responder: &mut Responder,
        timings: &mut Timings,
    ) -> Answer {
        let answer = catch_unwind(AssertUnwindSafe(|| {
            self.answer(asked, ticket, responder, timings)
        }));
        answer.unwrap_or_else(|_| {
            log::error!(
                "request_id={} {} panicked; answered 500",
                asked.request_id,
                asked.route.name()
            );
            Answer::Failed(ApiError::Internal("handler panicked".into()))
        })
    }

    /// What the request is answered with: a turn's reply, a response computed whole, or the
    /// error that refuses it. A request that finds its chat in its body holds it busy through
    /// `ticket`.
    fn answer(
        &mut self,
        asked: &Asked,
        ticket: &mut Ticket,
        responder: &mut Responder,
        timings: &mut Timings,
    ) -> Answer {
        let (key, tenant) = (asked.key.as_deref(), asked.tenant.as_str());
        let answer = match &asked.route {
            Route::PostMessage { chat_id } => Turn::native(chat_id, &asked.body, key)
                .and_then(|turn| self.take_turn(turn, asked, responder, timings)),
            Route::ChatCompletions { chat_id } => {
                Turn::openai(chat_id.as_deref(), &asked.body, key)
                    .and_then(|turn| self.take_turn(turn, asked, responder, timings))
            }
            Route::GetMessages {
                chat_id,
                limit,
                before,
            } => self
                .page(tenant, chat_id, *limit, *before)
                .map(Answer::Response),
            Route::ListChats { limit } => self.chat_list(tenant, *limit).map(Answer::Response),
            Route::DeleteChat { chat_id } => self.delete(tenant, chat_id).map(Answer::Response),
            Route::ListModels => Ok(Answer::Response(json_response(
                200,
                &openai::models(self.llm.model()),
            ))),
            Route::Usage(query) => {
                usage::report(&self.readers, &self.writer, tenant, query).map(Answer::Response)
            }
            Route::Responses(endpoint) => {
                super::responses::serve(self, endpoint, asked, ticket, responder, timings)
            }
        };
        answer.unwrap_or_else(Answer::Failed)
    }

    /// A turn through its stages: the chat's prior state, the LLM, the store.
    fn take_turn(
        &mut self,
        mut turn: Turn,
        asked: &Asked,
        responder: &mut Responder,
        timings: &mut Timings,
    ) -> Result<Answer, ApiError> {
        let window = match &turn.chat {
            Some(chat) => {
                let started = Instant::now();
                let prior = self.prior(&asked.tenant, chat)?;
                timings.history = Some(started.elapsed());
                match prior {
                    Prior::Replay(stored) => {
                        let reply = Reply::stored(&chat.chat_id, stored, None);
                        return Ok(Answer::Reply(reply, turn.shape));
                    }
                    Prior::Window(window) => window,
                }
            }
            None => Vec::new(),
        };
        log::debug!(
            "request_id={} history: {} earlier messages in the window",
            asked.request_id,
            window.len()
        );
        let messages = turn.prompt(&self.config.history.system_prompt, &window);
        let completion = self.complete(&turn, &messages, asked, responder, timings);
        if let Ok(completion) = &completion {
            self.count_usage(asked, completion);
        }
        if asked.hangup.load(Ordering::SeqCst) {
            let when = if turn.shape.stream {
                "mid-stream"
            } else {
                "during the LLM call"
            };
            log::info!(
                "request_id={}: the client went away {when}; nothing stored",
                asked.request_id
            );
            return Ok(Answer::Abandoned);
        }
        let reply = match &turn.chat {
            Some(chat) => self.store(&asked.tenant, chat, completion?, timings)?,
            None => Reply::relayed(completion?),
        };
        Ok(Answer::Reply(reply, turn.shape))
    }

    /// The chat before this turn: the reply stored under its idempotency key, or else its
    /// history window (from memory when it is kept there). A read connection goes back before
    /// the LLM call: it is never held across the network.
    fn prior(&self, tenant: &str, chat: &ChatTurn) -> Result<Prior, ApiError> {
        if let Some(key) = &chat.key {
            let store = self.readers.get()?;
            if let Some(stored) = store.find_reply(tenant, &chat.chat_id, key)? {
                // A key stands for one message: reused for another, the stored reply would
                // answer a question that was not asked.
                let asked = store.message_before(tenant, &chat.chat_id, stored.message_id)?;
                if asked.is_some_and(|asked| asked != chat.user) {
                    return Err(ApiError::IdempotencyKeyReused);
                }
                return Ok(Prior::Replay(stored));
            }
        }
        let history = &self.config.history;
        let newest = self.readers.history_window(
            tenant,
            &chat.chat_id,
            history.max_messages,
            history.max_chars,
        )?;
        Ok(Prior::Window(prompt::window(newest, history.max_chars)))
    }

    /// Asks the LLM, passing a streamed reply's pieces to the responder as they come. The call
    /// is abandoned once the client hangs up or a piece finds it gone.
    fn complete(
        &self,
        turn: &Turn,
        messages: &[ChatMessage],
        asked: &Asked,
        responder: &mut Responder,
        timings: &mut Timings,
    ) -> Result<Completion, ApiError> {
        let started = Instant::now();
        let cancel = Cancel::new(Arc::clone(&asked.hangup));
        let format = turn.shape.format;
        let mut deltas = |piece: &str| {
            if !responder.delta(format, piece) {
                asked.hangup.store(true, Ordering::SeqCst);
            }
        };
        let sink: Option<&mut Sink<'_>> = turn.shape.stream.then_some(&mut deltas);
        let completion = self
            .llm
            .complete(messages, turn.sampling.clone(), sink, &cancel);
        timings.llm = Some(started.elapsed());
        log::debug!(
            "request_id={} llm: {} after {:.1} ms",
            asked.request_id,
            if completion.is_ok() {
                "answered"
            } else {
                "failed"
            },
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(completion?)
    }

    /// Counts an answered LLM call's tokens against the tenant's budget and adds them to the
    /// writer's tally, whether or not the client is still there. A chat's exchange, handed over
    /// next, waits for the commit that stores both; a relay waits for nothing, and its usage is
    /// stored at the writer's next commit or idle tick.
    pub(super) fn count_usage(&self, asked: &Asked, completion: &Completion) {
        self.writer
            .add_usage(usage::spend(&self.tenants, &asked.tenant, completion));
    }

    /// Hands the exchange to the writer thread and waits until it is committed.
    fn store(
        &self,
        tenant: &str,
        chat: &ChatTurn,
        completion: Completion,
        timings: &mut Timings,
    ) -> Result<Reply, ApiError> {
        let started = Instant::now();
        let usage = completion
            .usage
            .map(|u| (u.prompt_tokens, u.completion_tokens));
        let message_id = self.writer.append(Exchange {
            tenant: tenant.to_string(),
            chat_id: chat.chat_id.clone(),
            user: chat.user.clone(),
            reply: completion.content.clone(),
            model: completion.model.clone(),
            usage,
            idempotency_key: chat.key.clone(),
        });
        timings.store = Some(started.elapsed());
        let stored = StoredReply {
            message_id: message_id?,
            content: completion.content,
            model: completion.model,
            usage,
        };
        Ok(Reply::stored(
            &chat.chat_id,
            stored,
            Some(completion.finish_reason),
        ))
    }

    /// A page of a chat's messages.
    fn page(
        &self,
        tenant: &str,
        chat_id: &str,
        limit: usize,
        before: Option<i64>,
    ) -> Result<HttpResponse, ApiError> {
        let page = self.readers.get()?.page(tenant, chat_id, limit, before)?;
        let page = page.ok_or_else(|| no_such_chat(chat_id))?;
        let messages: Vec<_> = page
            .messages
            .iter()
            .map(|m| json!({"id": m.id, "role": m.role, "content": m.content, "created_at": m.created_at}))
            .collect();
        let body = json!({"chat_id": chat_id, "messages": messages, "has_more": page.has_more});
        Ok(json_response(200, &body))
    }

    /// The tenant's most recently updated chats.
    fn chat_list(&self, tenant: &str, limit: usize) -> Result<HttpResponse, ApiError> {
        let chats: Vec<_> = self
            .readers
            .get()?
            .list_chats(tenant, limit)?
            .into_iter()
            .map(|c| {
                json!({"chat_id": c.chat_id, "message_count": c.message_count,
                       "created_at": c.created_at, "updated_at": c.updated_at})
            })
            .collect();
        Ok(json_response(200, &json!({ "chats": chats })))
    }

    /// Deletes a chat, through the writer thread like every write.
    fn delete(&self, tenant: &str, chat_id: &str) -> Result<HttpResponse, ApiError> {
        if !self.writer.delete(tenant, chat_id)? {
            return Err(no_such_chat(chat_id));
        }
        Ok(tiny_http::Response::from_data(Vec::new()).with_status_code(204))
    }
}

/// What the log should say about a failed answer, when the fault is the server's.
fn failure_detail(answer: &Answer) -> Option<String> {
    match answer {
        Answer::Failed(error) => log_detail(error),
        _ => None,
    }
}

fn no_such_chat(chat_id: &str) -> ApiError {
    ApiError::NotFound(format!("no chat `{chat_id}`"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;
    use crate::store::{Recent, Store, DEFAULT_TENANT};

    /// A handler on a fresh database with the built-in mock LLM; the writer's thread is
    /// detached and ends with the test's process.
    fn handler(dir: &tempfile::TempDir) -> Handler {
        let path = dir.path().join("h.db");
        Store::open_and_migrate(&path, Synchronous::Normal).unwrap();
        let recent = Arc::new(Recent::new(40, 32_000));
        let (writer, _thread) =
            Writer::start(&path, Synchronous::Normal, None, Arc::clone(&recent)).unwrap();
        let readers = Readers::open(&path, Synchronous::Normal, 1, recent).unwrap();
        let config = Arc::new(Config::default());
        let metrics = Arc::new(Metrics::new(1, 1));
        let llm = LlmClient::new(&config.llm, Arc::clone(&metrics));
        let today = crate::tenants::day::Day::of(std::time::SystemTime::now());
        let tenants = Tenants::new(Arc::clone(&config), today, Default::default(), &metrics);
        Handler::new(readers, writer, llm, config, metrics, tenants)
    }

    fn chat(user: &str, key: Option<&str>) -> ChatTurn {
        ChatTurn {
            chat_id: "c".into(),
            user: user.into(),
            key: key.map(str::to_string),
        }
    }

    fn completion(content: &str) -> Completion {
        Completion {
            content: content.into(),
            model: "m".into(),
            usage: None,
            finish_reason: "length".into(),
        }
    }

    #[test]
    fn the_store_stage_commits_and_the_prior_stage_reads_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let handler = handler(&dir);
        let mut timings = Timings::new(Instant::now());
        let first = chat("q1", Some("k1"));
        let reply = handler
            .store(DEFAULT_TENANT, &first, completion("a1"), &mut timings)
            .unwrap();
        assert_eq!(
            (reply.content.as_str(), reply.finish_reason.as_str()),
            ("a1", "length")
        );
        assert!(!reply.replayed && timings.store.is_some());
        match handler.prior(DEFAULT_TENANT, &chat("q2", None)).unwrap() {
            Prior::Window(window) => {
                let texts: Vec<_> = window.iter().map(|m| m.content.as_str()).collect();
                assert_eq!(texts, ["q1", "a1"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_prior_stage_replays_a_key_and_refuses_it_for_another_message() {
        let dir = tempfile::tempdir().unwrap();
        let handler = handler(&dir);
        let mut timings = Timings::new(Instant::now());
        let stored = handler
            .store(
                DEFAULT_TENANT,
                &chat("q", Some("k")),
                completion("a"),
                &mut timings,
            )
            .unwrap();
        match handler
            .prior(DEFAULT_TENANT, &chat("q", Some("k")))
            .unwrap()
        {
            Prior::Replay(reply) => {
                assert_eq!(Some(("c".to_string(), reply.message_id)), stored.stored)
            }
            other => panic!("{other:?}"),
        }
        let reused = handler.prior(DEFAULT_TENANT, &chat("other", Some("k")));
        assert!(matches!(reused, Err(ApiError::IdempotencyKeyReused)));
    }
}
