//! Reading the health checkers' event stream (`GET /events`): a minimal Server-Sent Events
//! reader, bytes in (split anywhere), messages out, as the checkers send them (`id:`, `event:`,
//! `data:` lines, a blank line ends a message, `:` starts a comment such as a keep-alive), and
//! [`interpret`], what one message says. Used by `loadtest bench heal` and the cell's tests.

use crate::control::CellEvent;

/// One dispatched SSE message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseMessage {
    /// The `event:` field; `message` when absent.
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The `id:` field, if the message had one.
    pub id: Option<String>,
}

/// Incremental parser; feed it the body's chunks in order.
#[derive(Debug, Default)]
pub struct SseParser {
    /// The current line's bytes so far.
    line: Vec<u8>,
    /// The previous chunk ended with `\r`: a `\n` starting the next one belongs to it.
    after_cr: bool,
    event: Option<String>,
    data: Option<String>,
    id: Option<String>,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// The messages completed by `chunk`.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseMessage> {
        let mut out = Vec::new();
        for &b in chunk {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    let line = String::from_utf8_lossy(&line);
                    if let Some(msg) = self.take_line(&line) {
                        out.push(msg);
                    }
                }
                _ => self.line.push(b),
            }
        }
        out
    }

    fn take_line(&mut self, line: &str) -> Option<SseMessage> {
        if line.is_empty() {
            let event = self.event.take();
            let id = self.id.take();
            // A message without data is not dispatched (the SSE rules).
            let data = self.data.take()?;
            return Some(SseMessage {
                event: event.unwrap_or_else(|| "message".into()),
                data,
                id,
            });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_string()),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            "id" => self.id = Some(value.to_string()),
            _ => {}
        }
        None
    }
}

/// What one message of the health checker's event stream says.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    Cell(CellEvent),
    /// The reader fell behind the checker's ring: this many events were dropped.
    Lagged(u64),
    /// Anything else (an unknown event, data that is not a cell event): ignored, counted.
    Unknown,
}

/// Interpret one message of `GET /events`.
pub fn interpret(msg: &SseMessage) -> StreamItem {
    if msg.event == "lagged" {
        let missed = serde_json::from_str::<serde_json::Value>(&msg.data)
            .ok()
            .and_then(|v| v["missed"].as_u64())
            .unwrap_or(0);
        return StreamItem::Lagged(missed);
    }
    match serde_json::from_str::<CellEvent>(&msg.data) {
        Ok(event) => StreamItem::Cell(event),
        Err(_) => StreamItem::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::EventKind;

    const BORN: &str = r#"{"kind":"born","cell_id":"api-1-3","role":"api","at_ms":1700000000123,"reason":"first heartbeat","parent":"api-1-1"}"#;

    #[test]
    fn messages_survive_any_chunking() {
        let body = format!(
            ": keep-alive\n\nid: 7\nevent: born\ndata: {BORN}\n\nid: 8\r\nevent: lagged\r\ndata: {{\"missed\":3}}\r\n\r\n"
        );
        let whole = SseParser::new().feed(body.as_bytes());
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[0].event, "born");
        assert_eq!(whole[0].id.as_deref(), Some("7"));
        assert_eq!(whole[0].data, BORN);
        assert_eq!(whole[1].event, "lagged");
        // Byte by byte, and split at every position in two: the same messages.
        let mut p = SseParser::new();
        let bytes: Vec<SseMessage> = body.bytes().flat_map(|b| p.feed(&[b])).collect();
        assert_eq!(bytes, whole);
        for cut in 0..body.len() {
            let mut p = SseParser::new();
            let mut got = p.feed(&body.as_bytes()[..cut]);
            got.extend(p.feed(&body.as_bytes()[cut..]));
            assert_eq!(got, whole, "cut at {cut}");
        }
    }

    #[test]
    fn fields_follow_the_sse_rules() {
        let mut p = SseParser::new();
        // Multi-line data joins with \n; no space after the colon is fine; an unknown field and
        // a message without data are ignored; a message without `event:` is a `message`.
        let got = p.feed(b"data:a\ndata: b\nretry: 10\n\nevent: x\n\ndata\n\n");
        assert_eq!(
            got,
            vec![
                SseMessage {
                    event: "message".into(),
                    data: "a\nb".into(),
                    id: None
                },
                SseMessage {
                    event: "message".into(),
                    data: String::new(),
                    id: None
                }
            ]
        );
        // A line not yet ended is not a message yet.
        assert!(p.feed(b"data: pending").is_empty());
        assert_eq!(p.feed(b"\n\n")[0].data, "pending");
    }

    #[test]
    fn interpreting_the_checker_stream() {
        let msg = |event: &str, data: &str| SseMessage {
            event: event.into(),
            data: data.into(),
            id: None,
        };
        match interpret(&msg("born", BORN)) {
            StreamItem::Cell(e) => {
                assert_eq!(e.kind, EventKind::Born);
                assert_eq!(e.cell_id, "api-1-3");
                assert_eq!(e.parent.as_deref(), Some("api-1-1"));
                assert_eq!(e.at_ms, 1_700_000_000_123);
            }
            other => panic!("not a cell event: {other:?}"),
        }
        assert_eq!(
            interpret(&msg("lagged", r#"{"missed":12}"#)),
            StreamItem::Lagged(12)
        );
        assert_eq!(interpret(&msg("born", "{not json")), StreamItem::Unknown);
    }
}
