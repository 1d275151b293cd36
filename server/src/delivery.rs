//! Delivery of queued messages to their channels (webhook, ntfy, Gotify, Slack, Discord,
//! email), each on its own task with a time limit, retried with a doubling pause and kept
//! as a dead letter after the last attempt.

use crate::config::{NotifyConfig, SmtpConfig, SmtpSecurity};
use crate::db::notify::{self as store, ChannelRow, Outgoing};
use crate::db::{Db, DbError};
use crate::health::JobHealth;
use domain::notify::{Message, retry_after};
use domain::{ChannelKind, DeliveryState, NotifyKind, VmStatus};
use hmac::{Hmac, Mac};
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials as SmtpCredentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use sha2::Sha256;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// Messages taken per pass; the rest wait for the next.
const TAKE: i64 = 100;

/// Sends messages; shared by the background loop and the "send a test" button.
pub struct Deliverer {
    db: Db,
    health: JobHealth,
    http: reqwest::Client,
    smtp: Option<SmtpConfig>,
    cfg: NotifyConfig,
    slots: Arc<Semaphore>,
    /// Messages this process is sending now (a slow one is not taken twice).
    sending: Arc<Mutex<HashSet<i64>>>,
}

impl Deliverer {
    pub fn new(cfg: &NotifyConfig, db: Db, health: JobHealth) -> Self {
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            // A channel's URL is what the admin set: a redirect elsewhere is not followed.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("vm-healthcheck/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Self {
            db,
            health,
            http,
            smtp: cfg.smtp.clone(),
            cfg: cfg.clone(),
            slots: Arc::new(Semaphore::new(cfg.concurrency)),
            sending: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    /// Starts an attempt for each due message (as many as there are free slots); each
    /// runs on its own task and records how it ended.
    pub async fn deliver_due(self: &Arc<Self>, now_ms: i64) -> Result<(), DbError> {
        let due = {
            let mut conn = self.db.conn().await?;
            store::due(&mut conn, now_ms, TAKE).await?
        };
        for message in due {
            if self.is_sending(message.id) {
                continue;
            }
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                break;
            };
            // Long enough that no replica takes it again while this attempt may still run.
            let timeout_ms = i64::try_from(self.cfg.timeout.as_millis()).unwrap_or(i64::MAX);
            let lease = now_ms.saturating_add(timeout_ms.saturating_mul(2).saturating_add(30_000));
            let claimed = {
                let (mut conn, _turn) = self.db.write_conn().await?;
                store::claim(&mut conn, &message, lease).await?
            };
            if !claimed {
                continue;
            }
            self.mark_sending(message.id, true);
            let me = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let id = message.id;
                if let Err(err) = me.attempt(message).await {
                    tracing::warn!(notification = id, error = %err, "could not record a delivery");
                }
                me.mark_sending(id, false);
            });
        }
        Ok(())
    }

    fn is_sending(&self, id: i64) -> bool {
        self.sending.lock().is_ok_and(|s| s.contains(&id))
    }

    fn mark_sending(&self, id: i64, on: bool) {
        if let Ok(mut s) = self.sending.lock() {
            if on {
                s.insert(id);
            } else {
                s.remove(&id);
            }
        }
    }

    async fn attempt(&self, m: Outgoing) -> Result<(), DbError> {
        // The attempt `claim` counted: its outcome is recorded only while it still holds it.
        let claimed = m.attempts.saturating_add(1);
        let channel = {
            let mut conn = self.db.conn().await?;
            store::channel(&mut conn, m.channel_id).await?
        };
        let message: Option<Message> = serde_json::from_str(&m.message_json).ok();
        let outcome = match (&channel, &message) {
            (None, _) => Err("the channel was deleted".to_owned()),
            (_, None) => Err("unreadable message".to_owned()),
            (Some(channel), Some(message)) => {
                if m.kind == NotifyKind::WarningEntered && !self.still_in_warning(message).await? {
                    let (mut conn, _turn) = self.db.write_conn().await?;
                    let note = Some("the warning ended before its minimum");
                    let now_ms = crate::now_ms();
                    return store::settle(
                        &mut conn,
                        m.id,
                        claimed,
                        DeliveryState::Dropped,
                        note,
                        now_ms,
                        now_ms,
                    )
                    .await;
                }
                // lettre's timeout is per SMTP command: the whole send gets one limit.
                tokio::time::timeout(self.cfg.timeout, self.send(channel, message, m.id))
                    .await
                    .unwrap_or_else(|_| Err("timed out".to_owned()))
            }
        };
        let now_ms = crate::now_ms();
        let attempts = u32::try_from(m.attempts.saturating_add(1)).unwrap_or(u32::MAX);
        let (mut conn, _turn) = self.db.write_conn().await?;
        match outcome {
            Ok(()) => {
                self.health.record_notification(true);
                store::settle(
                    &mut conn,
                    m.id,
                    claimed,
                    DeliveryState::Sent,
                    None,
                    now_ms,
                    now_ms,
                )
                .await
            }
            Err(error) => {
                self.health.record_notification(false);
                match retry_after(attempts, self.cfg.retry_base_ms, self.cfg.max_attempts) {
                    Some(wait) => {
                        tracing::warn!(notification = m.id, channel = m.channel_id, attempts, %error, "delivery failed; will retry");
                        let next = now_ms.saturating_add(wait);
                        store::settle(
                            &mut conn,
                            m.id,
                            claimed,
                            DeliveryState::Pending,
                            Some(&error),
                            next,
                            now_ms,
                        )
                        .await
                    }
                    None => {
                        tracing::error!(notification = m.id, channel = m.channel_id, attempts, %error, "delivery failed for good; kept as a dead letter");
                        store::settle(
                            &mut conn,
                            m.id,
                            claimed,
                            DeliveryState::Dead,
                            Some(&error),
                            now_ms,
                            now_ms,
                        )
                        .await
                    }
                }
            }
        }
    }

    /// A warning is told only if the VM is still in the warning the message is about.
    async fn still_in_warning(&self, message: &Message) -> Result<bool, DbError> {
        let Some(vm) = &message.vm else {
            return Ok(false);
        };
        let mut conn = self.db.conn().await?;
        let briefs = store::vm_briefs(&mut conn, &[vm.id]).await?;
        Ok(briefs
            .get(&vm.id)
            .is_some_and(|b| b.status == VmStatus::Warning && b.status_since_ms <= message.at_ms))
    }

    /// Sends one message now. The error says what went wrong without the channel's URL
    /// or secret (both may hold a token).
    pub async fn send(
        &self,
        channel: &ChannelRow,
        message: &Message,
        id: i64,
    ) -> Result<(), String> {
        let secret = channel.secret.as_deref();
        match channel.kind.0 {
            ChannelKind::Webhook => self.webhook(&channel.target, secret, message, id).await,
            ChannelKind::Ntfy => {
                let mut req = self
                    .http
                    .post(&channel.target)
                    .header("Title", ascii(&message.title))
                    .header("Tags", ntfy_tag(message.kind))
                    .header(
                        "Priority",
                        if urgent(message.kind) {
                            "high"
                        } else {
                            "default"
                        },
                    )
                    .body(message.text.clone());
                if let Some(token) = secret {
                    req = req.bearer_auth(token);
                }
                answer(req.send().await)
            }
            ChannelKind::Gotify => {
                let url = format!("{}/message", channel.target.trim_end_matches('/'));
                let mut req = self.http.post(url).json(&serde_json::json!({
                    "title": message.title,
                    "message": message.text,
                    "priority": if urgent(message.kind) { 8 } else { 4 },
                }));
                if let Some(token) = secret {
                    req = req.header("X-Gotify-Key", token);
                }
                answer(req.send().await)
            }
            ChannelKind::Slack => {
                let text = format!("*{}*\n{}", message.title, message.text);
                let req = self
                    .http
                    .post(slack_url(channel))
                    .json(&serde_json::json!({ "text": text }));
                answer(req.send().await)
            }
            ChannelKind::Discord => {
                let content = format!("**{}**\n{}", message.title, message.text);
                let req = self
                    .http
                    .post(slack_url(channel))
                    .json(&serde_json::json!({ "content": content }));
                answer(req.send().await)
            }
            ChannelKind::Email => self.email(&channel.target, message).await,
        }
    }

    async fn webhook(
        &self,
        url: &str,
        secret: Option<&str>,
        message: &Message,
        id: i64,
    ) -> Result<(), String> {
        let body =
            serde_json::to_string(&WebhookBody { id, message }).map_err(|e| e.to_string())?;
        let timestamp = (crate::now_ms() / 1000).to_string();
        let mut req = self
            .http
            .post(url)
            .header("Content-Type", "application/json")
            .header("X-Vmhc-Event", message.kind.as_str())
            .header("X-Vmhc-Delivery", id.to_string())
            .header("X-Vmhc-Timestamp", &timestamp);
        if let Some(secret) = secret {
            let signed = signature(secret, &timestamp, &body).ok_or("cannot sign the body")?;
            req = req.header("X-Vmhc-Signature", signed);
        }
        answer(req.body(body).send().await)
    }

    async fn email(&self, to: &str, message: &Message) -> Result<(), String> {
        let smtp = self
            .smtp
            .as_ref()
            .ok_or("no mail server is configured (SMTP_HOST)")?;
        let mail = lettre::Message::builder()
            .from(
                smtp.from
                    .parse()
                    .map_err(|e| format!("SMTP_FROM is not an address: {e}"))?,
            )
            .to(to
                .parse()
                .map_err(|e| format!("the channel's address: {e}"))?)
            .subject(message.title.clone())
            .header(ContentType::TEXT_PLAIN)
            .body(format!("{}\n\n-- \nvm-healthcheck", message.text))
            .map_err(|e| format!("cannot build the mail: {e}"))?;
        let builder = match smtp.security {
            SmtpSecurity::Starttls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&smtp.host)
                    .map_err(|e| format!("mail server: {e}"))?
            }
            SmtpSecurity::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&smtp.host)
                .map_err(|e| format!("mail server: {e}"))?,
            SmtpSecurity::Off => {
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host)
            }
        };
        let mut builder = builder.port(smtp.port).timeout(Some(self.cfg.timeout));
        if let (Some(user), Some(password)) = (&smtp.username, &smtp.password) {
            builder = builder.credentials(SmtpCredentials::new(
                user.clone(),
                password.expose().to_owned(),
            ));
        }
        builder
            .build()
            .send(mail)
            .await
            .map(|_| ())
            .map_err(|e| format!("mail server: {e}"))
    }
}

/// The webhook's JSON: the message, and its id so a receiver can drop a retried duplicate.
#[derive(serde::Serialize)]
struct WebhookBody<'a> {
    id: i64,
    #[serde(flatten)]
    message: &'a Message,
}

/// `sha256=<hex>` of HMAC-SHA256 over `timestamp.body` with the channel's secret: a
/// receiver recomputes it, compares in constant time, and refuses old timestamps.
/// `None` only if HMAC refused the key, which it never does (any length is a key).
pub fn signature(secret: &str, timestamp: &str, body: &str) -> Option<String> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).ok()?;
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    Some(format!(
        "sha256={}",
        hex::encode(mac.finalize().into_bytes())
    ))
}

/// Slack and Discord channels keep their webhook URL (which is their secret) as the secret.
fn slack_url(channel: &ChannelRow) -> &str {
    channel.secret.as_deref().unwrap_or(&channel.target)
}

fn urgent(kind: NotifyKind) -> bool {
    matches!(
        kind,
        NotifyKind::VmDown
            | NotifyKind::NodeUnreachable
            | NotifyKind::PowerActionFailed
            | NotifyKind::LatchedManual
            | NotifyKind::BreakerTripped
    )
}

fn ntfy_tag(kind: NotifyKind) -> &'static str {
    match kind {
        NotifyKind::VmRecovered | NotifyKind::PowerActionSucceeded | NotifyKind::BreakerCleared => {
            "white_check_mark"
        }
        NotifyKind::WarningEntered | NotifyKind::WarningLeft => "warning",
        _ if urgent(kind) => "rotating_light",
        _ => "information_source",
    }
}

/// Header values must be visible ASCII: anything else becomes `?`.
fn ascii(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// A 2xx is delivered; anything else is an error naming the status or the failure kind.
fn answer(result: reqwest::Result<reqwest::Response>) -> Result<(), String> {
    match result {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(format!("answered {}", r.status())),
        Err(e) if e.is_timeout() => Err("timed out".into()),
        Err(e) if e.is_connect() => Err("could not connect".into()),
        Err(e) if e.is_redirect() => Err("answered with a redirect (not followed)".into()),
        Err(_) => Err("request failed".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Reference value: printf '%s' '1700000000.{"a":1}' | openssl dgst -sha256 -hmac key
        assert_eq!(
            signature("key", "1700000000", r#"{"a":1}"#).as_deref(),
            Some("sha256=a438e398bfafc57e4396bb7fc2304422f0f768e965d073ca313cb52e22e6ad03")
        );
    }

    #[test]
    fn header_text_is_ascii() {
        assert_eq!(ascii("сервер-1 is down"), "??????-1 is down");
    }
}
