//! Chunked bodies, followed strictly and framed anew.
//!
//! The engine never passes a chunked body's framing on as the sender wrote it: it reads each
//! chunk-size line, checks it (see the table in [`super::parse`]), and writes its own line with
//! the same size in plain lower-case hex. The data bytes pass unchanged; chunk extensions are
//! dropped; of the trailer section only the fields on [`TRAILER_ALLOWED`] are written. So the
//! receiver parses exactly the body the guard parsed, however lenient the receiver is.

use bytes::{BufMut, BytesMut};

use super::parse::{is_ctl, is_tchar, trim_ows, Invalid, TRAILER_ALLOWED};

/// A chunk-size line longer than this (extensions included) is not a real client.
const MAX_CHUNK_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    SizeStart,
    Size {
        size: u64,
        digits: u8,
    },
    Ext {
        size: u64,
        len: usize,
    },
    SizeLf {
        size: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer field line, or of the empty line that ends the body.
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Follows one chunked body as its bytes pass, and writes it framed anew.
#[derive(Debug)]
pub struct Chunked {
    state: State,
    /// Most bytes of trailer section accepted.
    max_trailer: usize,
    trailer_total: usize,
    /// The trailer field line being read.
    line: Vec<u8>,
    /// Write the body framed anew (chunk lines, allowed trailers); else only the data bytes
    /// (for a client that frames the body itself: HTTP/2).
    reframe: bool,
}

impl Chunked {
    pub fn new(max_trailer: usize) -> Chunked {
        Chunked {
            state: State::SizeStart,
            max_trailer,
            trailer_total: 0,
            line: Vec::new(),
            reframe: true,
        }
    }

    /// Follows the body the same way, but writes only its data bytes.
    pub fn data_only(max_trailer: usize) -> Chunked {
        Chunked {
            reframe: false,
            ..Chunked::new(max_trailer)
        }
    }

    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes what belongs to the body from the front of `input`, appending the body framed
    /// anew to `out`; returns how many bytes of `input` it consumed (less than all of them only
    /// when the body ends inside `input`).
    pub fn feed(&mut self, input: &[u8], out: &mut BytesMut) -> Result<usize, Invalid> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                State::Done => return Ok(i),
                State::SizeStart => match hex(b) {
                    Some(d) => State::Size {
                        size: d as u64,
                        digits: 1,
                    },
                    None => {
                        return Err(Invalid("a chunk-size line does not start with a hex digit"))
                    }
                },
                State::Size { size, digits } => match (hex(b), b) {
                    (Some(d), _) if digits < 16 => State::Size {
                        size: size << 4 | d as u64,
                        digits: digits + 1,
                    },
                    (Some(_), _) => return Err(Invalid("a chunk size of more than 16 hex digits")),
                    (None, b';') => State::Ext {
                        size,
                        len: digits as usize + 1,
                    },
                    (None, b'\r') => State::SizeLf { size },
                    _ => {
                        return Err(Invalid(
                            "a chunk size followed by something else than ';' or CRLF",
                        ))
                    }
                },
                State::Ext { size, len } => match b {
                    b'\r' => State::SizeLf { size },
                    _ if is_ctl(b) && b != b'\t' => {
                        return Err(Invalid("a control byte in a chunk extension"))
                    }
                    _ if len >= MAX_CHUNK_LINE => {
                        return Err(Invalid("a chunk-size line too long"))
                    }
                    _ => State::Ext { size, len: len + 1 },
                },
                State::SizeLf { size } => match b {
                    b'\n' if size == 0 => {
                        if self.reframe {
                            out.put_slice(b"0\r\n");
                        }
                        State::TrailerStart
                    }
                    b'\n' => {
                        if self.reframe {
                            put_hex(out, size);
                            out.put_slice(b"\r\n");
                        }
                        State::Data(size)
                    }
                    _ => return Err(Invalid("a chunk-size line without CRLF")),
                },
                State::Data(left) => {
                    let take = ((input.len() - i) as u64).min(left) as usize;
                    out.put_slice(&input[i..i + take]);
                    i += take;
                    self.state = if take as u64 == left {
                        State::DataCr
                    } else {
                        State::Data(left - take as u64)
                    };
                    continue;
                }
                State::DataCr => match b {
                    b'\r' => State::DataLf,
                    _ => return Err(Invalid("chunk data longer than its size")),
                },
                State::DataLf => match b {
                    b'\n' => {
                        if self.reframe {
                            out.put_slice(b"\r\n");
                        }
                        State::SizeStart
                    }
                    _ => return Err(Invalid("chunk data not followed by CRLF")),
                },
                State::TrailerStart => match b {
                    b'\r' => State::EndLf,
                    _ => {
                        self.line.clear();
                        self.trailer_byte(b)?;
                        State::TrailerLine
                    }
                },
                State::TrailerLine => match b {
                    b'\r' => State::TrailerLf,
                    _ => {
                        self.trailer_byte(b)?;
                        State::TrailerLine
                    }
                },
                State::TrailerLf => match b {
                    b'\n' => {
                        self.trailer_line(out)?;
                        State::TrailerStart
                    }
                    _ => return Err(Invalid("a bare CR in the trailer section")),
                },
                State::EndLf => match b {
                    b'\n' => {
                        if self.reframe {
                            out.put_slice(b"\r\n");
                        }
                        self.line = Vec::new();
                        self.state = State::Done;
                        return Ok(i + 1);
                    }
                    _ => return Err(Invalid("the chunked body does not end in CRLF")),
                },
            };
            i += 1;
        }
        Ok(i)
    }

    fn trailer_byte(&mut self, b: u8) -> Result<(), Invalid> {
        if is_ctl(b) && b != b'\t' {
            return Err(Invalid("a control byte in the trailer section"));
        }
        self.trailer_total += 1;
        if self.trailer_total > self.max_trailer {
            return Err(Invalid("the trailer section is too large"));
        }
        self.line.push(b);
        Ok(())
    }

    /// Checks one trailer field line, and writes it when it is on the allow-list.
    fn trailer_line(&mut self, out: &mut BytesMut) -> Result<(), Invalid> {
        let line = &self.line;
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(Invalid("a trailer line without a colon"))?;
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(Invalid("a trailer field name that is not a token"));
        }
        if self.reframe && TRAILER_ALLOWED.iter().any(|a| a.eq_ignore_ascii_case(name)) {
            out.put_slice(name);
            out.put_slice(b": ");
            out.put_slice(trim_ows(&line[colon + 1..]));
            out.put_slice(b"\r\n");
        }
        Ok(())
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `n` in lower-case hex, without leading zeros.
pub(crate) fn put_hex(out: &mut BytesMut, n: u64) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` in pieces of `step`; returns (consumed, written) once the body ends.
    fn run(body: &[u8], step: usize) -> Result<Option<(usize, Vec<u8>)>, Invalid> {
        let mut c = Chunked::new(4096);
        let mut out = BytesMut::new();
        let mut total = 0;
        for piece in body.chunks(step) {
            total += c.feed(piece, &mut out)?;
            if c.done() {
                return Ok(Some((total, out.to_vec())));
            }
        }
        Ok(None)
    }

    #[test]
    fn bodies_end_exactly_where_they_end_and_are_framed_anew() {
        let body = b"5;ext=1\r\nhello\r\n006\r\n world\r\nA\r\n0123456789\r\n0\r\nServer-Timing: a;dur=1 \r\nContent-Length: 5\r\nX-Other: y\r\n\r\nGET /next HTTP/1.1";
        let end = body.len() - b"GET /next HTTP/1.1".len();
        let want =
            b"5\r\nhello\r\n6\r\n world\r\na\r\n0123456789\r\n0\r\nServer-Timing: a;dur=1\r\n\r\n";
        for step in [1, 2, 7, 100] {
            let (n, out) = run(body, step).unwrap().unwrap();
            assert_eq!(n, end, "step {step}");
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(want),
                "step {step}"
            );
        }
    }

    #[test]
    fn every_leniency_is_refused() {
        for bad in [
            &b"zz\r\n"[..],
            b"5\nhello\r\n",
            b"5 6\r\nhello\r\n",
            b"5\tx\r\nhello\r\n",
            b"5 ;a=b\r\nhello\r\n",
            b"5;a\x00b\r\nhello\r\n",
            b"5;a\nb\r\nhello\r\n",
            b"5;a\x7fb\r\nhello\r\n",
            b"5\r\nhelloXX",
            b"5\r\nhello\n",
            b"5\r\nhello\r\r",
            b"11111111111111111\r\n",
            b"-5\r\n",
            b"0x5\r\n",
            b"0\r\n\n",
            b"0\r\nX: a\nY: b\r\n\r\n",
            b"0\r\nX a\r\n\r\n",
            b": a\r\n\r\n",
            b"0\r\n: a\r\n\r\n",
            b"0\r\nX: a\x01\r\n\r\n",
            b"0\r\nX: a\rb\r\n\r\n",
            b"0\r\n\rx",
        ] {
            assert!(run(bad, 3).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_trailer_section_is_bounded() {
        let mut body = b"0\r\nX: ".to_vec();
        body.extend(std::iter::repeat_n(b'a', 5000));
        body.extend_from_slice(b"\r\n\r\n");
        assert!(run(&body, 100).is_err());
    }

    #[test]
    fn hex_sizes() {
        let mut out = BytesMut::new();
        for n in [0u64, 1, 15, 16, 255, u64::MAX] {
            out.clear();
            put_hex(&mut out, n);
            assert_eq!(&out[..], format!("{n:x}").as_bytes());
        }
    }
}
