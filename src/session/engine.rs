//! Listening in on the engine WebSocket, cheaply: only upstream-to-client text frames, only the
//! first bytes of each, for the QPS notifications that end a session or refuse one at the limit.
//!
//! The tunnel hands every chunk it copies from Qlik to [`Watcher::feed`]; the watcher follows
//! the frame boundaries (RFC 6455 5.2) without buffering payloads, and keeps at most
//! [`PEEK`] bytes of a text frame to look for `"method":"On...`.

use std::sync::LazyLock;

use memchr::memmem;

/// What the engine told the browser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    LoggedOut,
    TimedOut,
    Closed,
    MaxParallelSessionsExceeded,
}

/// Bytes of a text frame's payload looked at: JSON-RPC notifications name their method early.
const PEEK: usize = 160;

#[derive(Debug)]
enum State {
    Header { buf: [u8; 14], have: usize },
    Payload { left: u64, text: bool },
}

/// Follows the server-to-client frames of one tunnel.
#[derive(Debug)]
pub struct Watcher {
    state: State,
    peek: Vec<u8>,
}

impl Default for Watcher {
    fn default() -> Self {
        Watcher {
            state: State::Header {
                buf: [0; 14],
                have: 0,
            },
            peek: Vec::new(),
        }
    }
}

impl Watcher {
    /// Feeds bytes as they pass; calls `on` for each notification found.
    pub fn feed(&mut self, mut bytes: &[u8], on: &mut impl FnMut(Notice)) {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Header { buf, have } => {
                    buf[*have] = bytes[0];
                    *have += 1;
                    bytes = &bytes[1..];
                    if let Some((opcode, len)) = header_complete(&buf[..*have]) {
                        let text = opcode == 1;
                        self.peek.clear();
                        self.state = State::Payload { left: len, text };
                        if len == 0 {
                            self.end_frame(on);
                        }
                    }
                }
                State::Payload { left, text } => {
                    let take = (*left).min(bytes.len() as u64) as usize;
                    if *text && self.peek.len() < PEEK {
                        let room = PEEK - self.peek.len();
                        self.peek.extend_from_slice(&bytes[..take.min(room)]);
                    }
                    *left -= take as u64;
                    bytes = &bytes[take..];
                    if *left == 0 {
                        self.end_frame(on);
                    }
                }
            }
        }
    }

    fn end_frame(&mut self, on: &mut impl FnMut(Notice)) {
        if let State::Payload { text: true, .. } = self.state {
            if let Some(n) = notice(&self.peek) {
                on(n);
            }
        }
        self.peek.clear();
        if self.peek.capacity() > PEEK {
            self.peek.shrink_to(PEEK);
        }
        self.state = State::Header {
            buf: [0; 14],
            have: 0,
        };
    }
}

/// The opcode and payload length, once the header bytes are all there.
fn header_complete(h: &[u8]) -> Option<(u8, u64)> {
    if h.len() < 2 {
        return None;
    }
    let opcode = h[0] & 0x0f;
    let masked = h[1] & 0x80 != 0;
    let mask_len = if masked { 4 } else { 0 };
    let (len, ext) = match h[1] & 0x7f {
        126 => (None, 2),
        127 => (None, 8),
        n => (Some(n as u64), 0),
    };
    if h.len() < 2 + ext + mask_len {
        return None;
    }
    let len = len.unwrap_or_else(|| {
        h[2..2 + ext]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | b as u64)
    });
    Some((opcode, len))
}

/// The notification a text frame's first bytes carry, if any: the value of its `"method"` member
/// (JSON-RPC puts it first or close to it), compared byte for byte. Only the method's own value
/// counts: a result that quotes a method name in its data is not a notice.
fn notice(peek: &[u8]) -> Option<Notice> {
    static METHOD: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(b"\"method\""));
    let i = METHOD.find(peek)?;
    let rest = skip_json_space(&peek[i + b"\"method\"".len()..]);
    let rest = skip_json_space(rest.strip_prefix(b":")?);
    let value = rest.strip_prefix(b"\"")?;
    const NAMES: [(&[u8], Notice); 4] = [
        (b"OnSessionLoggedOut", Notice::LoggedOut),
        (b"OnSessionTimedOut", Notice::TimedOut),
        (b"OnSessionClosed", Notice::Closed),
        (
            b"OnMaxParallelSessionsExceeded",
            Notice::MaxParallelSessionsExceeded,
        ),
    ];
    NAMES.iter().find_map(|&(name, n)| {
        let after = value.strip_prefix(name)?;
        // The closing quote, or the end of what was kept of the frame.
        matches!(after.first(), None | Some(b'"')).then_some(n)
    })
}

/// JSON's insignificant whitespace (RFC 8259 section 2).
fn skip_json_space(b: &[u8]) -> &[u8] {
    let n = b
        .iter()
        .take_while(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        .count();
    &b[n..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n if n < 65536 => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    fn notices(stream: &[u8], step: usize) -> Vec<Notice> {
        let mut w = Watcher::default();
        let mut got = Vec::new();
        for piece in stream.chunks(step) {
            w.feed(piece, &mut |n| got.push(n));
        }
        got
    }

    #[test]
    fn finds_notifications_across_any_split() {
        let mut s = frame(
            1,
            br#"{"jsonrpc":"2.0","method":"OnConnected","params":{}}"#,
        );
        s.extend(frame(
            2,
            br#"{"method":"OnSessionClosed"} as binary: ignored"#,
        ));
        s.extend(frame(1, &vec![b'x'; 70_000]));
        s.extend(frame(9, b""));
        s.extend(frame(
            1,
            br#"{"jsonrpc":"2.0","method":"OnSessionLoggedOut","params":{}}"#,
        ));
        s.extend(frame(
            1,
            br#"{"jsonrpc":"2.0","method":"OnMaxParallelSessionsExceeded","params":{}}"#,
        ));
        for step in [1, 2, 7, 100, 100_000] {
            assert_eq!(
                notices(&s, step),
                vec![Notice::LoggedOut, Notice::MaxParallelSessionsExceeded],
                "step {step}"
            );
        }
    }

    #[test]
    fn only_the_method_value_names_the_notice() {
        let frame_of = |json: &str| frame(1, json.as_bytes());
        for (json, want) in [
            (
                r#"{"method" : "OnSessionTimedOut" ,"params":{}}"#,
                vec![Notice::TimedOut],
            ),
            (r#"{"method":"OnSessionClosed"}"#, vec![Notice::Closed]),
            (
                r#"{"method":"OnConnected","params":{"x":"OnSessionClosed"}}"#,
                vec![],
            ),
            (r#"{"method":"OnSessionClosedSoon"}"#, vec![]),
            (r#"{"method":OnSessionClosed}"#, vec![]),
        ] {
            assert_eq!(notices(&frame_of(json), 5), want, "{json}");
        }
        // A name that the kept bytes cut after its last letter still counts.
        let mut cut = vec![b' '; PEEK - r#""method":"OnSessionClosed"#.len()];
        cut.extend_from_slice(br#""method":"OnSessionClosed"}"#);
        assert_eq!(notices(&frame(1, &cut), 64), vec![Notice::Closed]);
    }

    #[test]
    fn data_that_mentions_a_method_name_late_is_not_a_notice() {
        let mut payload = br#"{"jsonrpc":"2.0","id":3,"result":{"qLayout":""#.to_vec();
        payload.extend(vec![b'a'; 500]);
        payload.extend_from_slice(br#""method":"OnSessionClosed"}}"#);
        assert!(notices(&frame(1, &payload), 13).is_empty());
    }
}
