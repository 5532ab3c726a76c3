//! What the admin API answers about a dead letter: a list item (with a short
//! preview of the body) and the full detail (body and headers). Everything
//! here comes from the internet (bodies, headers, ids): it is data, shown by
//! the console with `textContent` only.

use base64::Engine;
use serde::Serialize;

use crate::dead_letters::DeadLetter;
use crate::message::header;

/// Bytes of the body a list item shows.
pub const PREVIEW_BYTES: usize = 200;

/// One dead letter in `GET /admin/dlq/pending`.
#[derive(Clone, Debug, Serialize)]
pub struct Item {
    pub id: String,
    pub source: String,
    pub key: String,
    /// The provider's delivery id beside the key (GitHub's `X-GitHub-Delivery`).
    pub delivery: Option<String>,
    /// `None` for a message that is not a hookq dead letter.
    pub reason: Option<String>,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub attempts: u32,
    pub dead_at: Option<String>,
    pub received_at: String,
    pub content_type: Option<String>,
    pub body_size: usize,
    /// The first [`PREVIEW_BYTES`] bytes as UTF-8, invalid bytes replaced.
    pub body_preview: String,
    /// False for a message put in `P.dead` by hand (never moved).
    pub hookq_message: bool,
}

impl Item {
    pub fn of(dl: &DeadLetter) -> Self {
        let row = dl.row();
        let env = &dl.envelope;
        Self {
            id: row.message_id,
            source: row.source,
            key: row.key,
            delivery: row.delivery,
            reason: row.reason,
            last_status: row.last_status,
            last_error: row.last_error,
            attempts: row.attempts,
            dead_at: row.dead_at,
            received_at: env.received_at.clone(),
            content_type: env.content_type.clone(),
            body_size: env.body.len(),
            body_preview: preview(&env.body),
            hookq_message: dl.unreadable.is_none(),
        }
    }
}

/// The start of a body as text: whole characters when it is UTF-8 (a cut
/// character is left out), replacement characters for bytes that are not.
pub fn preview(body: &[u8]) -> String {
    let head = &body[..body.len().min(PREVIEW_BYTES)];
    match std::str::from_utf8(head) {
        Ok(s) => s.to_string(),
        Err(e) if e.error_len().is_none() => {
            String::from_utf8_lossy(&head[..e.valid_up_to()]).into_owned()
        }
        Err(_) => String::from_utf8_lossy(head).into_owned(),
    }
}

/// A body as JSON: text when it is UTF-8, else base64.
#[derive(Clone, Debug, Serialize)]
pub struct Body {
    /// `utf8` or `base64`.
    pub encoding: &'static str,
    pub data: String,
}

impl Body {
    pub fn of(body: &[u8]) -> Self {
        match std::str::from_utf8(body) {
            Ok(s) => Self {
                encoding: "utf8",
                data: s.to_string(),
            },
            Err(_) => Self {
                encoding: "base64",
                data: base64::engine::general_purpose::STANDARD.encode(body),
            },
        }
    }
}

/// One header; a value that is not UTF-8 is shown lossily, flagged.
#[derive(Clone, Debug, Serialize)]
pub struct Header {
    pub name: String,
    pub value: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub lossy: bool,
}

/// `GET /admin/dlq/{id}`: the item, the full body and the headers.
#[derive(Clone, Debug, Serialize)]
pub struct Detail {
    #[serde(flatten)]
    pub item: Item,
    pub body: Body,
    /// hookq's own headers on the dead letter, as the broker carries them.
    pub hookq_headers: Vec<Header>,
    /// The webhook request's headers that hookq forwards to the target.
    pub request_headers: Vec<Header>,
    pub shovelled: u32,
    pub previous_dead_reason: Option<String>,
}

fn h(name: &str, value: impl ToString) -> Header {
    Header {
        name: name.to_string(),
        value: value.to_string(),
        lossy: false,
    }
}

impl Detail {
    pub fn of(dl: &DeadLetter) -> Self {
        let env = &dl.envelope;
        let mut hookq = vec![
            h(header::SOURCE, &env.source),
            h(header::KEY, &env.key),
            h(header::ATTEMPTS, env.attempts),
            h(header::RECEIVED_AT, &env.received_at),
        ];
        if let Some(d) = &env.dead {
            hookq.push(h(header::DEAD_REASON, d.reason));
            hookq.push(h(header::LAST_ERROR, &d.last_error));
            if let Some(s) = d.last_status {
                hookq.push(h(header::LAST_STATUS, s));
            }
            hookq.push(h(header::DEAD_AT, &d.dead_at));
        }
        if let Some(p) = &env.previous_dead_reason {
            hookq.push(h(header::PREVIOUS_DEAD_REASON, p));
        }
        if env.shovelled > 0 {
            hookq.push(h(header::SHOVELLED, env.shovelled));
        }
        let request_headers = env
            .headers
            .iter()
            .map(|(name, value)| {
                let text = std::str::from_utf8(value.as_bytes());
                Header {
                    name: name.as_str().to_string(),
                    value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    lossy: text.is_err(),
                }
            })
            .collect();
        Self {
            item: Item::of(dl),
            body: Body::of(&env.body),
            hookq_headers: hookq,
            request_headers,
            shovelled: env.shovelled,
            previous_dead_reason: env.previous_dead_reason.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preview_cuts_whole_characters_and_replaces_bad_bytes() {
        let long = "é".repeat(150); // 300 bytes
        let p = preview(long.as_bytes());
        assert_eq!(p, "é".repeat(100));
        assert_eq!(preview(b"ok"), "ok");
        assert_eq!(preview(b"a\xffb"), "a\u{fffd}b");
    }

    #[test]
    fn bodies_are_text_or_base64() {
        let t = Body::of(b"{\"a\":1}");
        assert_eq!((t.encoding, t.data.as_str()), ("utf8", "{\"a\":1}"));
        let b = Body::of(&[0xff, 0x00]);
        assert_eq!((b.encoding, b.data.as_str()), ("base64", "/wA="));
    }
}
