//! Listening in on the engine WebSocket, cheaply: only upstream-to-client text frames, only the
//! first bytes of each, for the QPS notifications that end a session or refuse one at the limit.
//!
//! The tunnel hands every chunk it copies from Qlik to [`Watcher::feed`]; the watcher follows
//! the frame boundaries (RFC 6455 5.2) without buffering payloads, and keeps at most
//! [`PEEK`] bytes of a text frame to look for `"method":"On...`.

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

fn notice(peek: &[u8]) -> Option<Notice> {
    let text = std::str::from_utf8(peek).unwrap_or_else(|e| {
        // A cut in the middle of a character: look at the whole part before it.
        std::str::from_utf8(&peek[..e.valid_up_to()]).unwrap_or("")
    });
    let i = text.find("\"method\"")?;
    let rest = &text[i..];
    for (name, n) in [
        ("OnSessionLoggedOut", Notice::LoggedOut),
        ("OnSessionTimedOut", Notice::TimedOut),
        ("OnSessionClosed", Notice::Closed),
        (
            "OnMaxParallelSessionsExceeded",
            Notice::MaxParallelSessionsExceeded,
        ),
    ] {
        if rest.contains(name) {
            return Some(n);
        }
    }
    None
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
    fn data_that_mentions_a_method_name_late_is_not_a_notice() {
        let mut payload = br#"{"jsonrpc":"2.0","id":3,"result":{"qLayout":""#.to_vec();
        payload.extend(vec![b'a'; 500]);
        payload.extend_from_slice(br#""method":"OnSessionClosed"}}"#);
        assert!(notices(&frame(1, &payload), 13).is_empty());
    }
}
