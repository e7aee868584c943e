//! The LLM as any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama,
//! llama.cpp server), through async-openai.
//!
//! async-openai's own retry layer is replaced by a plain transport plus our loop, because the
//! loop must also bound each call's time, retry malformed or empty answers, and name the
//! endpoint in every error.

use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    CreateChatCompletionRequest,
};
use async_openai::Client;
use rand::Rng;

use super::window::Window;
use super::{BoxFuture, Llm, LlmError, Message, Speaker};
use crate::config::Secret;

/// How the endpoint is reached and how hard to try.
#[derive(Clone, Debug)]
pub struct ApiOptions {
    /// Base URL up to and including `/v1`.
    pub url: String,
    pub model: String,
    pub api_key: Secret,
    /// Per call, from sending the request to the whole answer.
    pub timeout: Duration,
    /// Further attempts after the first on 429, 5xx, timeouts, connection errors and
    /// malformed or empty answers.
    pub retries: u32,
    /// First backoff; doubled per attempt, with jitter, capped at 30 s.
    pub backoff: Duration,
    /// Calls in flight at once, at most: fewer for a while after a rate-limit answer.
    pub concurrency: usize,
}

/// A 429 or 5xx answer, kept whole so the retry loop can honour Retry-After.
#[derive(Debug, thiserror::Error)]
#[error("HTTP {status}: {body}")]
struct Transient {
    status: u16,
    retry_after: Option<Duration>,
    body: String,
}

pub struct ApiLlm {
    client: Client<OpenAIConfig>,
    opts: ApiOptions,
    window: Window,
}

/// What one attempt came to.
enum Attempt {
    Retry {
        error: LlmError,
        after: Option<Duration>,
    },
    Fatal(LlmError),
}

impl ApiOptions {
    /// The endpoint the settings name, refused before anything loads when it cannot work.
    pub fn from_settings(s: &crate::config::Settings) -> crate::Result<Self> {
        if s.llm_url.contains("api.openai.com") && s.llm_api_key.expose().is_none() {
            return Err(crate::Error::Setting {
                key: "llm_api_key".into(),
                reason: format!(
                    "the LLM endpoint is {} but no API key is set.\n  fix: export OPENAI_API_KEY=..., set llm_api_key in {}, or point --llm-url at a local OpenAI-compatible server (vLLM, Ollama, llama.cpp), or use --llm local",
                    s.llm_url,
                    crate::config::default_config_path().display()
                ),
            });
        }
        if !(s.llm_timeout > 0.0 && s.llm_backoff >= 0.0) {
            return Err(crate::Error::Setting {
                key: "llm_timeout".into(),
                reason: "llm_timeout must be > 0 and llm_backoff >= 0 (seconds)".into(),
            });
        }
        Ok(Self {
            url: s.llm_url.clone(),
            model: s.llm_model.clone(),
            api_key: s.llm_api_key.clone(),
            timeout: Duration::from_secs_f64(s.llm_timeout),
            retries: s.llm_retries,
            backoff: Duration::from_secs_f64(s.llm_backoff),
            concurrency: s.llm_concurrency,
        })
    }
}

impl ApiLlm {
    pub fn new(opts: ApiOptions) -> Result<Self, LlmError> {
        // reqwest is built without a bundled crypto provider; ring is the one hf-hub's TLS
        // already compiles. An error only means a provider is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| LlmError::Unreachable {
                url: opts.url.clone(),
                attempts: 0,
                reason: format!("cannot build an HTTP client: {e}"),
            })?;
        let transport = tower::service_fn(move |req: HttpRequestFactory| {
            let http = http.clone();
            async move {
                let response = http
                    .execute(req.build().await?)
                    .await
                    .map_err(OpenAIError::Reqwest)?;
                let status = response.status();
                if status.as_u16() == 429 || status.is_server_error() {
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .map(|s| Duration::from_secs_f64(s.min(120.0)));
                    let body = response.text().await.unwrap_or_default();
                    return Err(OpenAIError::Boxed(Box::new(Transient {
                        status: status.as_u16(),
                        retry_after,
                        body: first_line(&body, 200),
                    })));
                }
                Ok(response)
            }
        });
        let mut config = OpenAIConfig::new().with_api_base(opts.url.trim_end_matches('/'));
        config = config.with_api_key(opts.api_key.expose().unwrap_or(""));
        Ok(Self {
            client: Client::with_config(config).with_http_service(transport),
            window: Window::new(opts.concurrency),
            opts,
        })
    }

    fn request(&self, messages: &[Message], temperature: f32) -> CreateChatCompletionRequest {
        let messages = messages
            .iter()
            .map(|m| match m.role {
                Speaker::System => ChatCompletionRequestMessage::from(
                    ChatCompletionRequestSystemMessage::from(m.content.as_str()),
                ),
                Speaker::User => ChatCompletionRequestMessage::from(
                    ChatCompletionRequestUserMessage::from(m.content.as_str()),
                ),
                Speaker::Assistant => ChatCompletionRequestMessage::from(
                    ChatCompletionRequestAssistantMessage::from(m.content.as_str()),
                ),
            })
            .collect();
        CreateChatCompletionRequest {
            model: self.opts.model.clone(),
            messages,
            temperature: Some(temperature),
            ..Default::default()
        }
    }

    async fn attempt(&self, req: &CreateChatCompletionRequest) -> Result<String, Attempt> {
        let url = &self.opts.url;
        let slot = self
            .window
            .enter()
            .await
            .map_err(|_| Attempt::Fatal(LlmError::Cancelled))?;
        let chat = self.client.chat();
        let call = chat.create(req.clone());
        let response = match tokio::time::timeout(self.opts.timeout, call).await {
            Err(_) => {
                return Err(Attempt::Retry {
                    error: LlmError::Timeout {
                        url: url.clone(),
                        seconds: self.opts.timeout.as_secs_f64(),
                        attempts: 0,
                    },
                    after: None,
                })
            }
            Ok(r) => r,
        };
        let error = match response {
            Ok(r) => {
                let text = r
                    .choices
                    .into_iter()
                    .next()
                    .and_then(|c| c.message.content)
                    .unwrap_or_default();
                if text.trim().is_empty() {
                    return Err(Attempt::Retry {
                        error: self.malformed("the answer had no text".into()),
                        after: None,
                    });
                }
                slot.answered();
                return Ok(text);
            }
            Err(e) => e,
        };
        Err(match error {
            OpenAIError::Boxed(b) => match b.downcast::<Transient>() {
                Ok(t) => {
                    if t.status == 429 {
                        if let Some(size) = slot.rate_limited() {
                            tracing::warn!(
                                "the LLM endpoint {url} is rate-limiting: at most {size} calls in flight for now (of --llm-concurrency {})",
                                self.opts.concurrency
                            );
                        }
                    }
                    Attempt::Retry {
                        after: t.retry_after,
                        error: LlmError::Busy {
                            url: url.clone(),
                            status: t.status,
                            attempts: 0,
                            message: t.body,
                        },
                    }
                }
                Err(other) => Attempt::Retry {
                    error: self.unreachable(other.to_string()),
                    after: None,
                },
            },
            OpenAIError::Reqwest(e) if e.is_timeout() => Attempt::Retry {
                error: LlmError::Timeout {
                    url: url.clone(),
                    seconds: self.opts.timeout.as_secs_f64(),
                    attempts: 0,
                },
                after: None,
            },
            OpenAIError::Reqwest(e) if e.is_decode() || e.is_body() => Attempt::Retry {
                error: self.malformed(format!("the answer could not be read: {e}")),
                after: None,
            },
            OpenAIError::Reqwest(e) => Attempt::Retry {
                error: self.unreachable(error_chain(&e)),
                after: None,
            },
            OpenAIError::JSONDeserialize(e, body) => Attempt::Retry {
                error: self.malformed(format!(
                    "not a chat completion ({e}): {}",
                    first_line(&body, 120)
                )),
                after: None,
            },
            OpenAIError::ApiError(api) => {
                let status = api.status_code.as_u16();
                let fix = match status {
                    401 | 403 => "set a valid API key in OPENAI_API_KEY or llm_api_key in the settings file",
                    404 => "check --llm-url (it must end in /v1 for most servers) and --llm-model (the server must serve that model)",
                    _ => "check --llm-url and --llm-model",
                };
                Attempt::Fatal(LlmError::Refused {
                    url: url.clone(),
                    status,
                    message: first_line(&api.api_error.message, 200),
                    fix: fix.into(),
                })
            }
            other => Attempt::Fatal(LlmError::Refused {
                url: url.clone(),
                status: 0,
                message: other.to_string(),
                fix: "check --llm-url and --llm-model".into(),
            }),
        })
    }

    fn malformed(&self, reason: String) -> LlmError {
        LlmError::Malformed {
            url: self.opts.url.clone(),
            attempts: 0,
            reason,
        }
    }

    fn unreachable(&self, reason: String) -> LlmError {
        LlmError::Unreachable {
            url: self.opts.url.clone(),
            attempts: 0,
            reason,
        }
    }

    /// Exponential backoff with ±50 % jitter, so many neurons retrying do not stampede.
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.opts.backoff.as_secs_f64() * 2f64.powi(attempt.min(16) as i32);
        let jitter = rand::rng().random_range(0.5..1.5);
        Duration::from_secs_f64((base * jitter).min(30.0))
    }
}

/// `e` with the number of attempts it took filled in.
fn with_attempts(mut e: LlmError, n: u32) -> LlmError {
    if let LlmError::Unreachable { attempts, .. }
    | LlmError::Timeout { attempts, .. }
    | LlmError::Busy { attempts, .. }
    | LlmError::Malformed { attempts, .. } = &mut e
    {
        *attempts = n;
    }
    e
}

impl Llm for ApiLlm {
    fn model(&self) -> &str {
        &self.opts.model
    }

    fn chat<'a>(
        &'a self,
        messages: &'a [Message],
        temperature: f32,
        on_text: &'a (dyn Fn(&str) + Send + Sync),
    ) -> BoxFuture<'a, Result<String, LlmError>> {
        Box::pin(async move {
            let req = self.request(messages, temperature);
            let mut attempt = 0;
            loop {
                match self.attempt(&req).await {
                    Ok(text) => {
                        on_text(&text);
                        return Ok(text);
                    }
                    Err(Attempt::Fatal(e)) => return Err(e),
                    Err(Attempt::Retry { error, after }) => {
                        if attempt >= self.opts.retries {
                            return Err(with_attempts(error, attempt + 1));
                        }
                        let wait = after.unwrap_or_else(|| self.backoff(attempt));
                        tracing::warn!(
                            "LLM call failed ({}), retrying in {:.1}s",
                            first_line(&error.to_string(), 160),
                            wait.as_secs_f64()
                        );
                        tokio::time::sleep(wait).await;
                        attempt += 1;
                    }
                }
            }
        })
    }
}

/// The first line of `s`, at most `max` characters.
fn first_line(s: &str, max: usize) -> String {
    let line = super::one_line(s.lines().next().unwrap_or(""));
    match line.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

/// An error and its causes on one line (reqwest's top message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
