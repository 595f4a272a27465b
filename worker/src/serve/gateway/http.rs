//! OpenAI-compatible HTTP: completions and chat completions (plain and server-sent events),
//! models, health, readiness and Prometheus metrics. Every error is a JSON object whose
//! message names the field at fault.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{GenEvent, GenRequest, Shared};
use crate::error::Error;
use crate::sampling::SamplingParams;

pub fn router(shared: Arc<Shared>) -> Router {
    // The OpenAI routes and the deployment's statistics take the API key when one is set (the
    // operator reads /v1/stats with the key from the MoEDeployment's Secret); health and
    // Prometheus metrics do not.
    let openai = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/stats", get(stats))
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            require_api_key,
        ));
    Router::new()
        .merge(openai)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(8 << 20))
        .with_state(shared)
}

/// Rejects a request without `Authorization: Bearer <key>` when the gateway has an API key.
async fn require_api_key(
    State(sh): State<Arc<Shared>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(key) = &sh.api_key else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => next.run(req).await,
        Some(_) => unauthorized("Incorrect API key provided"),
        None => unauthorized("Missing API key: send `Authorization: Bearer <key>`"),
    }
}

fn unauthorized(message: &str) -> Response {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        kind: "invalid_request_error",
        message: message.to_string(),
        param: None,
        retry_after: None,
    }
    .into_response()
}

/// Compares without stopping at the first difference (the time taken does not tell how much
/// of a guessed key was right).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---------------------------------------------------------------------------------------------
// Errors.

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
    retry_after: Option<u32>,
}

impl ApiError {
    fn bad(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: format!("{param}: {}", message.into()),
            param: Some(param.to_string()),
            retry_after: None,
        }
    }

    fn from_engine(e: Error) -> Self {
        let (status, kind, retry, param) = match &e {
            Error::InvalidInput { field, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                Some(field.clone()),
            ),
            Error::Deadline(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout", None, None),
            Error::Peer { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                Some(1),
                None,
            ),
            Error::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded", Some(1), None),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                None,
                None,
            ),
        };
        Self {
            status,
            kind,
            message: e.to_string(),
            param,
            retry_after: retry,
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.status.as_u16(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "not_found",
        message: "no such endpoint".into(),
        param: None,
        retry_after: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Requests.

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// `logprobs`: `false`/`null` (chat) or a count (completions); only "none" is served.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a boolean or a number")]
enum Logprobs {
    Flag(bool),
    Count(u64),
}

/// `prompt`: a string, an array of token ids, or a one-element array of either. Several
/// prompts in one request are refused with a message saying so; a bad element is named by its
/// index (`prompt[3]`, `prompt[0][1]`).
#[derive(Debug)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// A token id: an integer in `0..=u32::MAX`.
struct TokenId(u32);

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PromptVisitor { top: false })
            .and_then(|p| match p {
                PromptElem::Id(t) => Ok(TokenId(t)),
                _ => Err(serde::de::Error::custom("must be a token id (an integer)")),
            })
    }
}

/// One element of `prompt` (or the whole of it, at the top).
enum PromptElem {
    Id(u32),
    Text(String),
    Ids(Vec<u32>),
}

struct PromptVisitor {
    /// At the top (the `prompt` field itself) or one element below it.
    top: bool,
}

impl<'de> serde::de::Visitor<'de> for PromptVisitor {
    type Value = PromptElem;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(if self.top {
            "a string, an array of token ids, or a one-element array of either"
        } else {
            "a token id, a string or an array of token ids"
        })
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PromptElem, E> {
        u32::try_from(v)
            .ok()
            .filter(|_| !self.top)
            .map(PromptElem::Id)
            .ok_or_else(|| E::custom(format!("{v} is not a token id (0..=4294967295)")))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PromptElem, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(format!("{v} is not a token id (0..=4294967295)"))),
        }
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<PromptElem, E> {
        Err(E::custom(format!("{v} is not a token id (an integer)")))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PromptElem, E> {
        Ok(PromptElem::Text(v.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<PromptElem, E> {
        Ok(PromptElem::Text(v))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<PromptElem, A::Error> {
        use serde::de::Error as _;
        let mut ids = Vec::new();
        if !self.top {
            while let Some(TokenId(t)) = seq.next_element()? {
                ids.push(t);
            }
            return Ok(PromptElem::Ids(ids));
        }
        // The first element decides: a token id starts a list of ids; a string or an array is
        // one prompt of a batch, and a batch of one is all this endpoint serves.
        match seq.next_element_seed(ElemSeed)? {
            None => Ok(PromptElem::Ids(ids)),
            Some(PromptElem::Id(t)) => {
                ids.push(t);
                while let Some(TokenId(t)) = seq.next_element()? {
                    ids.push(t);
                }
                Ok(PromptElem::Ids(ids))
            }
            Some(one) => match seq.next_element::<serde::de::IgnoredAny>()? {
                None => Ok(one),
                Some(_) => Err(A::Error::custom(
                    "one prompt per request (send several requests; they are batched together)",
                )),
            },
        }
    }
}

/// Deserializes one element below the top of `prompt`.
struct ElemSeed;

impl<'de> serde::de::DeserializeSeed<'de> for ElemSeed {
    type Value = PromptElem;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<PromptElem, D::Error> {
        d.deserialize_any(PromptVisitor { top: false })
    }
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match d.deserialize_any(PromptVisitor { top: true })? {
            PromptElem::Text(s) => Prompt::Text(s),
            PromptElem::Ids(ids) => Prompt::Ids(ids),
            PromptElem::Id(t) => {
                return Err(serde::de::Error::custom(format!(
                    "{t}: a prompt of token ids is an array"
                )));
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::Developer => "developer",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

/// One content part; only text is served.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Part {
    Text { text: String },
}

#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a string or an array of text parts ({\"type\": \"text\", \"text\": ...}); other parts are not supported"
)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One chat message (fields other than these, such as `name`, are accepted and ignored).
#[derive(Debug, Deserialize)]
struct Message {
    role: Role,
    #[serde(default)]
    content: Option<Content>,
}

/// A completion or chat completion request: every field either endpoint reads, typed. Each
/// endpoint requires its own input (`prompt` or `messages`); unknown fields are ignored, as
/// OpenAI's API does.
#[derive(Debug, Deserialize)]
struct Request {
    prompt: Option<Prompt>,
    messages: Option<Vec<Message>>,
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<i64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
    stop: Option<Stop>,
    #[serde(default)]
    ignore_eos: bool,
    #[serde(default)]
    echo: bool,
    logprobs: Option<Logprobs>,
    best_of: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<std::collections::HashMap<String, f32>>,
    /// Functions the model may call, given to the chat template as transformers does.
    tools: Option<Vec<Tool>>,
    /// Chat: open an assistant turn after the messages (vLLM's extension; default true).
    add_generation_prompt: Option<bool>,
}

/// A tool of a chat request (`{"type": "function", "function": {...}}`): the function's
/// schema stays as sent, for the template to show the model.
#[derive(Debug, Deserialize, serde::Serialize)]
struct Tool {
    #[serde(rename = "type")]
    kind: ToolKind,
    function: ToolFunction,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum ToolKind {
    Function,
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct ToolFunction {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    /// Keys in the order sent (the template's `tojson` writes them so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parameters: Option<moe_engine::chat::OrderedJson>,
}

struct Prepared {
    prompt: Vec<u32>,
    params: SamplingParams,
    stream: bool,
    include_usage: bool,
    stop: Vec<String>,
}

fn parse_body(body: &Bytes) -> Result<Request, ApiError> {
    // serde would also read a struct from an array of its fields in order: only an object is a
    // request.
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        Some(b'[' | b'"' | b't' | b'f' | b'n' | b'-' | b'0'..=b'9') => {
            return Err(ApiError::bad("body", "must be a JSON object"));
        }
        _ => {
            let e = serde_json::from_slice::<serde::de::IgnoredAny>(body)
                .err()
                .map_or_else(|| "must be a JSON object".to_string(), |e| e.to_string());
            return Err(ApiError::bad("body", format!("not valid JSON: {e}")));
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let req: Request = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad("body", format!("not valid JSON: {inner}"))
        } else {
            ApiError::bad(&path, inner.to_string())
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad("body", format!("not valid JSON: {e}")))?;
    Ok(req)
}

fn prepare(sh: &Shared, c: &Request, prompt: Vec<u32>, chat: bool) -> Result<Prepared, ApiError> {
    if let Some(m) = &c.model
        && m != &sh.model_name
    {
        {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "model_not_found",
                message: format!(
                    "model: `{m}` is not served here (this gateway serves `{}`)",
                    sh.model_name
                ),
                param: Some("model".into()),
                retry_after: None,
            });
        }
    }
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("n", "only 1 choice per request is supported"));
    }
    if c.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("best_of", "only 1 is supported"));
    }
    if c.echo {
        return Err(ApiError::bad("echo", "is not supported"));
    }
    match c.logprobs {
        None | Some(Logprobs::Flag(false)) => {}
        Some(Logprobs::Flag(true)) => return Err(ApiError::bad("logprobs", "is not supported")),
        Some(Logprobs::Count(n)) => {
            return Err(ApiError::bad(
                "logprobs",
                format!("{n} is not supported (log probabilities are not returned)"),
            ));
        }
    }
    for (name, v) in [
        ("presence_penalty", c.presence_penalty),
        ("frequency_penalty", c.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::bad(name, "is not supported (only 0)"));
        }
    }
    if c.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::bad("logit_bias", "is not supported"));
    }
    let context = sh.cfg.max_position_embeddings;
    let room = context.saturating_sub(prompt.len());
    let (field, asked) = match (c.max_completion_tokens, c.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    let max_new = match asked {
        Some(m) if m < 1 => return Err(ApiError::bad(field, format!("{m} must be at least 1"))),
        Some(m) if m as u64 > room as u64 => {
            return Err(ApiError::bad(
                field,
                format!(
                    "{m} plus the prompt's {} tokens exceeds the context length {context}",
                    prompt.len()
                ),
            ));
        }
        Some(m) => m as usize,
        None if chat => room,
        None => 16.min(room),
    };
    let top_k = match c.top_k {
        None | Some(-1) => 0,
        Some(k) if k < 0 => {
            return Err(ApiError::bad(
                "top_k",
                format!("{k} must be >= 0 (or -1 for all)"),
            ));
        }
        Some(k) => k as usize,
    };
    let seed = match c.seed {
        Some(s) if s < 0 => return Err(ApiError::bad("seed", format!("{s} must be >= 0"))),
        s => s.map(|s| s as u64),
    };
    let params = SamplingParams {
        max_new_tokens: max_new.max(1),
        temperature: c.temperature.unwrap_or(1.0),
        top_p: c.top_p.unwrap_or(1.0),
        top_k,
        seed,
        ignore_eos: c.ignore_eos,
    };
    sh.check(&prompt, &params).map_err(|e| match e {
        Error::InvalidInput { field, message } => {
            let param = match field.as_str() {
                "token id" | "prompt" if chat => "messages".to_string(),
                "token id" => "prompt".to_string(),
                "max_new_tokens" => field_name(field.as_str()),
                f => f.to_string(),
            };
            ApiError::bad(&param, message)
        }
        other => ApiError::from_engine(other),
    })?;
    let stop = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::bad("stop", "at most 4 non-empty strings"));
    }
    if !stop.is_empty() && sh.tokenizer.is_none() {
        return Err(ApiError::bad(
            "stop",
            "needs a tokenizer, and this model has none",
        ));
    }
    Ok(Prepared {
        prompt,
        params,
        stream: c.stream,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        stop,
    })
}

fn field_name(f: &str) -> String {
    if f == "max_new_tokens" {
        "max_tokens".into()
    } else {
        f.into()
    }
}

/// The completion's prompt as token ids.
fn read_prompt(sh: &Shared, prompt: Option<Prompt>) -> Result<Vec<u32>, ApiError> {
    match prompt.ok_or_else(|| ApiError::bad("prompt", "is required"))? {
        Prompt::Text(s) => encode(sh, &s, "prompt"),
        Prompt::Ids(ids) => Ok(ids),
    }
}

fn encode(sh: &Shared, text: &str, field: &str) -> Result<Vec<u32>, ApiError> {
    let tok = sh
        .tokenizer
        .as_ref()
        .ok_or_else(|| ApiError::bad(field, "this model has no tokenizer: send token ids"))?;
    tok.encode_text(text, sh.cfg.bos_token_id)
        .map_err(|e| ApiError::bad(field, e.to_string()))
}

/// Renders chat messages with the checkpoint's template as transformers would (its markers
/// are special tokens, as `apply_chat_template` tokenizes them), or else with the built-in
/// one: a `<|role|>` header per message, then an open assistant turn, tokenized as plain text.
fn read_messages(
    sh: &Shared,
    messages: Option<Vec<Message>>,
    tools: Option<Vec<Tool>>,
    add_generation_prompt: bool,
) -> Result<Vec<u32>, ApiError> {
    let msgs = messages.ok_or_else(|| ApiError::bad("messages", "is required"))?;
    if msgs.is_empty() {
        return Err(ApiError::bad(
            "messages",
            "must contain at least one message",
        ));
    }
    let mut turns = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.into_iter().enumerate() {
        let content = match m.content {
            Some(Content::Text(s)) => s,
            Some(Content::Parts(parts)) => parts
                .into_iter()
                .map(|Part::Text { text }| text)
                .collect::<String>(),
            None if m.role == Role::Assistant => String::new(),
            None => {
                return Err(ApiError::bad(
                    &format!("messages[{i}].content"),
                    "is required (only an assistant message may omit it)",
                ));
            }
        };
        turns.push((m.role, content));
    }
    if let Some(template) = &sh.chat_template {
        #[derive(serde::Serialize)]
        struct Turn<'a> {
            role: &'static str,
            content: &'a str,
        }
        let messages: Vec<Turn> = turns
            .iter()
            .map(|(role, content)| Turn {
                role: role.as_str(),
                content,
            })
            .collect();
        let text = template
            .render(&messages, tools.as_ref(), add_generation_prompt)
            .map_err(ApiError::from_engine)?;
        let tok = sh.tokenizer.as_ref().ok_or_else(|| {
            ApiError::bad("messages", "this model has no tokenizer: send token ids")
        })?;
        return tok
            .encode(&text, None)
            .map_err(|e| ApiError::bad("messages", e.to_string()));
    }
    if tools.is_some() {
        return Err(ApiError::bad(
            "tools",
            "this model has no chat template that can show tools to it",
        ));
    }
    let mut text = String::new();
    for (role, content) in turns {
        text.push_str(&format!("<|{}|>\n{content}\n", role.as_str()));
    }
    if add_generation_prompt {
        text.push_str("<|assistant|>\n");
    }
    encode(sh, &text, "messages")
}

// ---------------------------------------------------------------------------------------------
// Generation.

/// Holds back text that could still become a stop string.
struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// Returns the text safe to emit, and whether a stop string was reached.
    fn push(&mut self, delta: &str) -> (String, bool) {
        self.held.push_str(delta);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in self.held.char_indices() {
                let tail = &self.held[i..];
                if s.starts_with(tail) {
                    keep = keep.max(tail.len());
                    break;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

struct Generation {
    rx: mpsc::UnboundedReceiver<GenEvent>,
    prompt_tokens: usize,
}

fn start(sh: &Shared, p: &Prepared, endpoint: &'static str) -> Result<Generation, ApiError> {
    if !sh.ready.load(Ordering::SeqCst) {
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "unavailable",
            message: "the pipeline is not ready yet".into(),
            param: None,
            retry_after: Some(1),
        });
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let span = tracing::info_span!("gateway.request", endpoint, prompt_tokens = p.prompt.len());
    let req = GenRequest {
        prompt: p.prompt.clone(),
        params: p.params.clone(),
        events: tx,
        span,
    };
    if sh.submit(req).is_err() {
        return Err(ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "rate_limit_exceeded",
            message: format!(
                "the request queue is full ({} waiting); retry later",
                sh.queued()
            ),
            param: None,
            retry_after: Some(1),
        });
    }
    Ok(Generation {
        rx,
        prompt_tokens: p.prompt.len(),
    })
}

struct Output {
    ids: Vec<u32>,
    text: String,
    finish: &'static str,
}

/// Runs a generation to the end (non-streaming).
async fn collect(sh: &Shared, p: &Prepared, mut g: Generation) -> Result<Output, ApiError> {
    let mut ids = Vec::new();
    let mut stops = StopMatcher {
        stops: p.stop.clone(),
        held: String::new(),
    };
    let mut text = String::new();
    let mut decoder = sh.tokenizer.as_ref().map(|t| t.stream());
    loop {
        match g.rx.recv().await {
            Some(GenEvent::Token(t)) => {
                ids.push(t);
                if let Some(piece) = decoder.as_mut().and_then(|d| d.push(t)) {
                    let (out, stopped) = stops.push(&piece);
                    text.push_str(&out);
                    if stopped {
                        return Ok(Output {
                            ids,
                            text,
                            finish: "stop",
                        });
                    }
                }
            }
            Some(GenEvent::Done(f)) => {
                if let Some(rest) = decoder.as_mut().and_then(|d| d.finish()) {
                    let (out, stopped) = stops.push(&rest);
                    text.push_str(&out);
                    if stopped {
                        return Ok(Output {
                            ids,
                            text,
                            finish: "stop",
                        });
                    }
                }
                text.push_str(&stops.finish());
                return Ok(Output {
                    ids,
                    text,
                    finish: f.as_str(),
                });
            }
            Some(GenEvent::Failed(e)) => return Err(ApiError::from_engine(e)),
            None => {
                return Err(ApiError::from_engine(Error::peer(
                    "gateway",
                    "generation ended unexpectedly",
                )));
            }
        }
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn now_secs() -> u64 {
    crate::serve::now_unix_ms() / 1000
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Text,
    Chat,
}

/// Streams a generation as server-sent events in the OpenAI chunk format.
fn stream(sh: Arc<Shared>, p: Prepared, mut g: Generation, kind: Kind) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        uuid_like()
    );
    let created = now_secs();
    let model = sh.model_name.clone();
    tokio::spawn(async move {
        let object = if kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let chunk = |text: &str, ids: &[u32], finish: Option<&str>, first: bool| -> Event {
            let choice = match kind {
                Kind::Text => {
                    json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish, "token_ids": ids})
                }
                Kind::Chat => {
                    let mut delta = json!({"content": text});
                    if first {
                        delta["role"] = json!("assistant");
                    }
                    if finish.is_some() && text.is_empty() {
                        delta = json!({});
                    }
                    json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish, "token_ids": ids})
                }
            };
            let body = json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]});
            Event::default().data(body.to_string())
        };
        let mut decoder = sh.tokenizer.as_ref().map(|t| t.stream());
        let mut stops = StopMatcher {
            stops: p.stop.clone(),
            held: String::new(),
        };
        let mut generated = 0usize;
        let mut first = true;
        let finish: &str = loop {
            match g.rx.recv().await {
                Some(GenEvent::Token(t)) => {
                    generated += 1;
                    let piece = decoder.as_mut().and_then(|d| d.push(t)).unwrap_or_default();
                    let (out, stopped) = stops.push(&piece);
                    if tx.send(Ok(chunk(&out, &[t], None, first))).await.is_err() {
                        return; // client gone; dropping the receiver cancels the sequence
                    }
                    first = false;
                    if stopped {
                        break "stop";
                    }
                }
                Some(GenEvent::Done(f)) => {
                    let rest = decoder
                        .as_mut()
                        .and_then(|d| d.finish())
                        .unwrap_or_default();
                    let (mut out, stopped) = stops.push(&rest);
                    if !stopped {
                        out.push_str(&stops.finish());
                    }
                    if !out.is_empty() {
                        let _ = tx.send(Ok(chunk(&out, &[], None, first))).await;
                    }
                    break if stopped { "stop" } else { f.as_str() };
                }
                Some(GenEvent::Failed(e)) => {
                    let err = ApiError::from_engine(e);
                    let _ = tx
                        .send(Ok(Event::default().data(err.body().to_string())))
                        .await;
                    return;
                }
                None => {
                    let err = ApiError::from_engine(Error::peer(
                        "gateway",
                        "generation ended unexpectedly",
                    ));
                    let _ = tx
                        .send(Ok(Event::default().data(err.body().to_string())))
                        .await;
                    return;
                }
            }
        };
        drop(g.rx);
        let _ = tx.send(Ok(chunk("", &[], Some(finish), false))).await;
        if p.include_usage {
            let body = json!({"id": id, "object": object, "created": created, "model": model,
                "choices": [], "usage": usage(g.prompt_tokens, generated)});
            let _ = tx.send(Ok(Event::default().data(body.to_string()))).await;
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn uuid_like() -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{:x}{:04x}", crate::serve::now_unix_ms(), n & 0xffff)
}

async fn generate(sh: Arc<Shared>, body: Bytes, kind: Kind) -> Result<Response, ApiError> {
    // Parsing up to 8 MiB of JSON and tokenizing it is CPU work: it runs on the blocking pool,
    // not on the threads that serve connections.
    let parsing = sh.clone();
    let (request, prompt) = tokio::task::spawn_blocking(move || {
        let mut request = parse_body(&body)?;
        let prompt = match kind {
            Kind::Text => read_prompt(&parsing, request.prompt.take())?,
            Kind::Chat => {
                let open_turn = request.add_generation_prompt.unwrap_or(true);
                read_messages(
                    &parsing,
                    request.messages.take(),
                    request.tools.take(),
                    open_turn,
                )?
            }
        };
        Ok::<_, ApiError>((request, prompt))
    })
    .await
    .map_err(|e| ApiError::from_engine(Error::Internal(format!("request parsing task: {e}"))))??;
    let p = prepare(&sh, &request, prompt, kind == Kind::Chat)?;
    let endpoint = if kind == Kind::Chat {
        "chat"
    } else {
        "completions"
    };
    let g = start(&sh, &p, endpoint)?;
    if p.stream {
        return Ok(stream(sh, p, g, kind));
    }
    let prompt_tokens = g.prompt_tokens;
    let out = collect(&sh, &p, g).await?;
    let created = now_secs();
    let u = usage(prompt_tokens, out.ids.len());
    let body = match kind {
        Kind::Text => json!({
            "id": format!("cmpl-{}", uuid_like()), "object": "text_completion", "created": created,
            "model": sh.model_name,
            "choices": [{"index": 0, "text": out.text, "logprobs": null, "finish_reason": out.finish, "token_ids": out.ids}],
            "usage": u,
        }),
        Kind::Chat => json!({
            "id": format!("chatcmpl-{}", uuid_like()), "object": "chat.completion", "created": created,
            "model": sh.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "logprobs": null, "finish_reason": out.finish, "token_ids": out.ids}],
            "usage": u,
        }),
    };
    Ok(axum::Json(body).into_response())
}

async fn completions(State(sh): State<Arc<Shared>>, body: Bytes) -> Response {
    let r = generate(sh.clone(), body, Kind::Text).await;
    respond(&sh, "completions", r)
}

async fn chat_completions(State(sh): State<Arc<Shared>>, body: Bytes) -> Response {
    let r = generate(sh.clone(), body, Kind::Chat).await;
    respond(&sh, "chat_completions", r)
}

fn respond(sh: &Shared, endpoint: &str, r: Result<Response, ApiError>) -> Response {
    let resp = r.unwrap_or_else(IntoResponse::into_response);
    sh.metrics.request(endpoint, resp.status().as_u16());
    resp
}

async fn models(State(sh): State<Arc<Shared>>) -> Response {
    axum::Json(json!({"object": "list", "data": [{
        "id": sh.model_name, "object": "model", "created": 0, "owned_by": "moe-serve",
        "max_model_len": sh.cfg.max_position_embeddings,
    }]}))
    .into_response()
}

/// moe-serve extension: load statistics of the deployment (routed tokens per (layer, expert),
/// where time goes) and this gateway's serving counters (tokens generated, time to first token
/// and per output token as counts and sums of seconds). Read-only: every counter only grows
/// while the gateway process lives, readers take differences.
async fn stats(
    State(sh): State<Arc<Shared>>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    if let Some(k) = q.keys().next() {
        return ApiError::bad(
            k,
            "/v1/stats takes no parameters (its counters are never reset: take differences)",
        )
        .into_response();
    }
    let mut experts: std::collections::BTreeMap<(u32, u32), u64> = Default::default();
    let mut stages = Vec::new();
    for (i, r) in sh.stage_stats().await.into_iter().enumerate() {
        match r {
            Ok(s) => {
                for e in &s.experts {
                    *experts.entry((e.layer, e.expert)).or_default() += e.tokens;
                }
                stages.push(json!({
                    "index": i, "batches": s.batches, "rows": s.rows,
                    "busySeconds": s.busy_seconds, "expertWaitSeconds": s.expert_wait_seconds,
                    "activeSequences": s.active_sequences,
                }));
            }
            Err(e) => stages.push(json!({"index": i, "error": e.to_string()})),
        }
    }
    let load: Vec<Value> = experts
        .iter()
        .map(|(&(layer, expert), &tokens)| json!({"layer": layer, "expert": expert, "tokens": tokens}))
        .collect();
    let m = &sh.metrics;
    // The serving counters of this gateway process (the same as its `/metrics`): a reader
    // measures throughput and latency over a window from two readings of the same `instance`.
    let latency =
        |t: &super::metrics::Totals| json!({"count": t.count(), "sumSeconds": t.sum_seconds()});
    axum::Json(json!({
        "gateway": {
            "instance": sh.instance,
            "steps": sh.steps.load(Ordering::Relaxed),
            "pipelineSeconds": sh.pipeline_us.load(Ordering::Relaxed) as f64 / 1e6,
            "headSeconds": sh.head_us.load(Ordering::Relaxed) as f64 / 1e6,
            "sequencesAdmitted": m.admitted.get(),
            "promptTokens": m.prompt_tokens.get(),
            "generatedTokens": m.generated_tokens.get(),
            "timeToFirstToken": latency(&m.first_token_totals),
            "timePerOutputToken": latency(&m.output_token_totals),
        },
        "stages": stages,
        "experts": load,
    }))
    .into_response()
}

async fn readyz(State(sh): State<Arc<Shared>>) -> Response {
    if sh.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for every stage to serve\n",
        )
            .into_response()
    }
}

async fn metrics(State(sh): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        sh.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::{Content, Prompt, Role, StopMatcher, parse_body};
    use axum::body::Bytes;
    use axum::http::StatusCode;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    /// Any JSON scalar or small array.
    fn json_leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,12}".prop_map(Value::String),
            proptest::collection::vec(any::<i32>(), 0..4).prop_map(|v| json!(v)),
        ]
    }

    const FIELDS: &[&str] = &[
        "model",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stream",
        "stream_options",
        "n",
        "stop",
        "ignore_eos",
        "echo",
        "logprobs",
        "best_of",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_body_is_parsed_or_refused_with_400(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            if let Err(e) = parse_body(&Bytes::from(bytes)) {
                prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
            }
        }

        #[test]
        fn a_field_of_the_wrong_type_is_refused_naming_it(
            field in proptest::sample::select(FIELDS),
            value in json_leaf(),
        ) {
            let body = json!({ field: value }).to_string();
            match parse_body(&Bytes::from(body)) {
                Ok(_) => {}
                Err(e) => {
                    prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
                    let param = e.param.clone().unwrap_or_default();
                    prop_assert!(param.starts_with(field), "{} named for {}", param, field);
                }
            }
        }
    }

    /// The `param` a body is refused with, or None if it parses.
    fn refused(body: Value) -> Option<String> {
        parse_body(&Bytes::from(body.to_string()))
            .err()
            .map(|e| e.param.unwrap_or_default())
    }

    #[test]
    fn prompts_parse_into_ids_or_text_and_bad_elements_are_named_by_index() {
        let ok = |body: Value| match parse_body(&Bytes::from(body.to_string())) {
            Ok(r) => r.prompt.expect("prompt"),
            Err(e) => panic!("{body} refused: {}", e.message),
        };
        assert!(matches!(ok(json!({"prompt": [1, 2, 3]})), Prompt::Ids(v) if v == [1, 2, 3]));
        assert!(matches!(ok(json!({"prompt": [[4, 5]]})), Prompt::Ids(v) if v == [4, 5]));
        assert!(matches!(ok(json!({"prompt": ["hi"]})), Prompt::Text(t) if t == "hi"));
        assert!(matches!(ok(json!({"prompt": "hi"})), Prompt::Text(t) if t == "hi"));
        assert!(matches!(ok(json!({"prompt": []})), Prompt::Ids(v) if v.is_empty()));
        assert!(
            matches!(ok(json!({"prompt": [4294967295u64]})), Prompt::Ids(v) if v == [u32::MAX])
        );
        for (body, param) in [
            (json!({"prompt": [1, -2]}), "prompt[1]"),
            (json!({"prompt": [1, 4294967296u64]}), "prompt[1]"),
            (json!({"prompt": [1, 2.5]}), "prompt[1]"),
            (json!({"prompt": [1, "a"]}), "prompt[1]"),
            (json!({"prompt": [[1, "a"]]}), "prompt[0][1]"),
            (json!({"prompt": ["a", "b"]}), "prompt"),
            (json!({"prompt": [[1], [2]]}), "prompt"),
            (json!({"prompt": {"a": 1}}), "prompt"),
            (json!({"prompt": 5}), "prompt"),
            (json!({"prompt": null, "max_tokens": "x"}), "max_tokens"),
            (
                json!({"messages": [{"role": "wizard", "content": "x"}]}),
                "messages[0].role",
            ),
            (json!({"messages": [{"content": "x"}]}), "messages[0]"),
            (
                json!({"messages": [{"role": "user", "content": 5}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
                "messages[0].content",
            ),
            (json!({"messages": {"role": "user"}}), "messages"),
            (json!([1, 2]), "body"),
            (json!("text"), "body"),
            (
                json!({"logprobs": 5, "logit_bias": {"1": "x"}}),
                "logit_bias.1",
            ),
        ] {
            assert_eq!(refused(body.clone()).as_deref(), Some(param), "{body}");
        }
        for raw in ["{\"prompt\": \"a\"} trailing", "{\"prompt\": [1, 2", ""] {
            let e = parse_body(&Bytes::from(raw)).expect_err(raw);
            assert_eq!(e.param.as_deref(), Some("body"), "{raw}");
        }
    }

    #[test]
    fn chat_messages_are_typed_and_only_assistant_may_omit_content() {
        let r = parse_body(&Bytes::from(
            json!({"messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "name": "ann", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null},
            ]})
            .to_string(),
        ))
        .expect("parses");
        let m = r.messages.expect("messages");
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].role, Role::User);
        assert!(matches!(&m[1].content, Some(Content::Parts(p)) if p.len() == 2));
        assert!(m[2].content.is_none());
    }

    #[test]
    fn stop_strings_hold_back_partial_matches() {
        let mut m = StopMatcher {
            stops: vec!["END".into()],
            held: String::new(),
        };
        assert_eq!(m.push("abc E"), ("abc ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("Dx"), (String::new(), true));
        let mut m = StopMatcher {
            stops: vec!["END".into()],
            held: String::new(),
        };
        assert_eq!(m.push("E"), (String::new(), false));
        assert_eq!(m.push("x"), ("Ex".to_string(), false));
        assert_eq!(m.finish(), "");
    }
}
