//! A request head the engine writes from fields another parser has already split: HTTP/2's.
//!
//! An HTTP/2 request arrives as a list of fields that the h2 crate has decoded and checked
//! (names are lower-case tokens, `HeaderName::from_lowercase`; values hold no control byte
//! but HTAB, `HeaderValue::from_bytes`). The engine writes it out as HTTP/1.1 lines for Qlik,
//! and it must then be judged by the same rules as a head that came as HTTP/1.1 bytes. Reading
//! the written bytes again with [`super::parse_request`] did that, at the price of finding
//! every line, name and value a second time (about 2,100 instructions a request,
//! `benches/cost.sh`). The writer records each line's ranges as it writes it, reads each field
//! with the same [`super::Fields::read`], and hands the whole to the same
//! [`super::judge_request`]: only the splitting is skipped, never a rule.
//!
//! What the types guarantee stands in for the byte checks of the one-pass reader: a
//! `HeaderName`, a `HeaderValue` and an `http::uri::Authority` (the Host line) each refuse
//! every byte that could end a line. The writer and the parser are held to the same answer:
//! in debug builds (every test) each written head is parsed again and must come out
//! identical, and the unit tests below compare the two over generated field lists.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use http::uri::Authority;
use http::{HeaderName, HeaderValue, Method};

use super::{
    judge_request, range_of, spare_fields, trim_ows, Field, Fields, Head, Known, Rejection,
    StartLine,
};

/// A request head being written, line by line: [`RequestWriter::new`] writes the request line,
/// [`RequestWriter::host`] and [`RequestWriter::fields`] the field lines, and
/// [`RequestWriter::finish`] the empty line, then judges the head.
pub struct RequestWriter {
    bytes: BytesMut,
    method: Range<usize>,
    target: Range<usize>,
    fields: Vec<Field>,
    f: Fields,
    /// The field line being written: where it starts, how long its name is, what it is.
    open: Option<(usize, usize, Known)>,
    /// What the lines broke that the judge does not see (see [`RequestWriter::finish`]).
    broken: Option<Rejection>,
}

impl RequestWriter {
    /// Starts the head with `method target HTTP/1.1`; `capacity` is a guess of its length.
    pub fn new(method: &Method, target: &str, capacity: usize) -> RequestWriter {
        let mut bytes = BytesMut::with_capacity(capacity);
        let method = method.as_str().as_bytes();
        bytes.put_slice(method);
        bytes.put_slice(b" ");
        bytes.put_slice(target.as_bytes());
        bytes.put_slice(b" HTTP/1.1\r\n");
        RequestWriter {
            bytes,
            method: 0..method.len(),
            target: method.len() + 1..method.len() + 1 + target.len(),
            fields: spare_fields(),
            f: Fields::default(),
            open: None,
            // `GET  HTTP/1.1` is no request line (the parser finds no target in it).
            broken: target.is_empty().then_some(Rejection::Malformed),
        }
    }

    /// One field line, `name: value`.
    fn field(&mut self, name: &HeaderName, value: &HeaderValue) {
        self.begin(name);
        self.value(value);
        self.end();
    }

    /// A line per field, in order, but the `cookie` fields that come one after another (as
    /// `HeaderMap` yields all the values of a name) are joined with `; ` into one line where
    /// the first stood (RFC 9113 8.2.3: HTTP/1.1 allows one `Cookie` line).
    pub fn fields<'a>(
        &mut self,
        fields: impl IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    ) {
        let mut cookie_open = false;
        for (name, value) in fields {
            if name == http::header::COOKIE {
                if cookie_open {
                    self.separator();
                } else {
                    self.begin(name);
                }
                self.value(value);
                cookie_open = true;
                continue;
            }
            if cookie_open {
                self.end();
                cookie_open = false;
            }
            self.field(name, value);
        }
        self.end();
    }

    /// A `host` line with the request's `:authority` (an `Authority` holds only the visible
    /// characters of a URI: `http` checks every byte as it makes one).
    pub fn host(&mut self, authority: &Authority) {
        let authority = authority.as_str();
        self.begin(&http::header::HOST);
        self.bytes.put_slice(authority.as_bytes());
        self.end();
    }

    /// Opens a field line; its value is written by [`RequestWriter::value`] (more than once for
    /// a value joined from several, with [`RequestWriter::separator`] between them).
    fn begin(&mut self, name: &HeaderName) {
        debug_assert!(self.open.is_none(), "a field line is already open");
        let name = name.as_str().as_bytes();
        let start = self.bytes.len();
        self.bytes.put_slice(name);
        self.bytes.put_slice(b": ");
        self.open = Some((start, name.len(), Known::of(name)));
    }

    /// Writes (a part of) the open field's value.
    fn value(&mut self, value: &HeaderValue) {
        self.bytes.put_slice(value.as_bytes());
    }

    /// `; ` between the parts of a value joined from several fields (`cookie`, RFC 9113
    /// 8.2.3).
    fn separator(&mut self) {
        self.bytes.put_slice(b"; ");
    }

    /// Ends the open field line, and reads it as the parser reads a field line: the value
    /// without the whitespace around it, the line plain when nothing was trimmed.
    fn end(&mut self) {
        let Some((start, name_len, known)) = self.open.take() else {
            return;
        };
        if self.fields.len() == super::MAX_HEADERS {
            // What httparse says of a head with more fields than it has room for.
            self.broken.get_or_insert(Rejection::HeadTooLarge);
        } else {
            let bytes = &self.bytes[..];
            let written = &bytes[start + name_len + 2..];
            let value = trim_ows(written);
            self.f
                .read(bytes, &bytes[start..start + name_len], value, known);
            self.fields.push(Field {
                known,
                plain: value.len() == written.len(),
                name: start..start + name_len,
                value: range_of(bytes, value),
            });
        }
        self.bytes.put_slice(b"\r\n");
    }

    /// Ends the head, and judges it as [`super::parse_request`] judges a head it read.
    pub fn finish(mut self) -> Result<Head, Rejection> {
        self.end_head();
        #[cfg(debug_assertions)]
        let written = self.bytes.clone().freeze();
        let judged = self.judge();
        #[cfg(debug_assertions)]
        same_as_parsed(&written, &judged);
        judged
    }

    fn end_head(&mut self) {
        self.end();
        self.bytes.put_slice(b"\r\n");
    }

    /// The judge's verdict on the whole head.
    fn judge(self) -> Result<Head, Rejection> {
        if let Some(r) = self.broken {
            return Err(r);
        }
        let line = StartLine {
            len: self.bytes.len(),
            method: self.method,
            target: self.target,
            reason: 0..0,
            minor: 1,
            status: 0,
        };
        let judged = judge_request(&self.bytes, line, self.fields, self.f)?;
        let (_, mut head) = judged.expect("the judge answers a whole head");
        head.bytes = self.bytes.freeze();
        Ok(head)
    }
}

/// The parser's reading of the written bytes must be the writer's (debug builds only: the
/// test suite's every HTTP/2 request checks it).
#[cfg(any(debug_assertions, test))]
fn same_as_parsed(bytes: &Bytes, written: &Result<Head, Rejection>) {
    let parsed = super::parse_request(bytes, usize::MAX).map(|h| {
        let (len, mut head) = h.expect("a written head is whole");
        assert_eq!(len, bytes.len());
        head.bytes = bytes.clone();
        head
    });
    if format!("{parsed:?}") != format!("{written:?}") {
        // The verdicts and where the parts lie, never the bytes: the head holds the client's
        // cookies.
        let verdict = |v: &Result<Head, Rejection>| match v {
            Ok(h) => format!(
                "Ok({:?}, fields (name, value, plain) {:?})",
                h.framing,
                h.fields
                    .iter()
                    .map(|f| (f.name.clone(), f.value.clone(), f.plain))
                    .collect::<Vec<_>>()
            ),
            Err(r) => format!("Err({r:?})"),
        };
        panic!(
            "a written head is judged differently by the parser: {} (parser) vs {} (writer)",
            verdict(&parsed),
            verdict(written)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Writes a head as `proxy::h2` does: `host` from the authority when no `host` field
    /// came, then the fields.
    fn written(
        method: &Method,
        target: &str,
        authority: Option<&str>,
        fields: &[(HeaderName, HeaderValue)],
    ) -> (Bytes, Result<Head, Rejection>) {
        let mut w = RequestWriter::new(method, target, 64);
        if let Some(a) = authority.filter(|_| !fields.iter().any(|(n, _)| n == http::header::HOST))
        {
            // (What `http` refuses as an authority, h2 refuses as a request.)
            if let Ok(a) = a.parse::<Authority>() {
                w.host(&a);
            }
        }
        w.fields(fields.iter().map(|(n, v)| (n, v)));
        w.end_head();
        let bytes = w.bytes.clone().freeze();
        (bytes, w.judge())
    }

    fn write(
        method: &Method,
        target: &str,
        authority: Option<&str>,
        fields: &[(HeaderName, HeaderValue)],
    ) -> Result<Head, Rejection> {
        written(method, target, authority, fields).1
    }

    fn field(name: &str, value: &[u8]) -> (HeaderName, HeaderValue) {
        (
            HeaderName::from_lowercase(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(value).unwrap(),
        )
    }

    #[test]
    fn a_usual_request_is_written_and_judged() {
        let h = write(
            &Method::GET,
            "/hub/?a=1",
            Some("qlik.example:443"),
            &[
                field("user-agent", b"Mozilla/5.0"),
                field("cookie", b"X-Qlik-Session=abc"),
                field("cookie", b"qsguard-device=d"),
                field("accept", b"*/*"),
            ],
        )
        .unwrap();
        assert_eq!(
            &h.bytes[..],
            b"GET /hub/?a=1 HTTP/1.1\r\nhost: qlik.example:443\r\nuser-agent: Mozilla/5.0\r\n\
              cookie: X-Qlik-Session=abc; qsguard-device=d\r\naccept: */*\r\n\r\n"
        );
        assert_eq!(h.path(), "/hub/");
        assert_eq!(h.len(), 4);
        assert_eq!(h.known(2), Known::Cookie);
        assert_eq!(h.field(2).1, b"X-Qlik-Session=abc; qsguard-device=d");
        assert!(h.line(2).is_some(), "a plain line is copied whole");
    }

    #[test]
    fn values_are_trimmed_as_the_parser_trims_them() {
        let h = write(
            &Method::GET,
            "/",
            Some("q"),
            &[field("a", b"  one\t"), field("b", b" "), field("c", b"")],
        )
        .unwrap();
        assert_eq!(h.field(1), (&b"a"[..], &b"one"[..]));
        assert!(
            h.line(1).is_none(),
            "a trimmed line is not copied as it stands"
        );
        assert_eq!(h.field(2).1, b"");
        assert!(h.line(2).is_none());
        assert_eq!(h.field(3).1, b"");
        assert!(h.line(3).is_some());
    }

    #[test]
    fn the_judges_rules_apply_to_written_heads() {
        let cases: &[(&[(HeaderName, HeaderValue)], Rejection)] = &[
            (
                &[field("host", b"a"), field("host", b"b")],
                Rejection::BadHost,
            ),
            (&[field("host", b"a b")], Rejection::BadHost),
            (
                &[field("host", b"a"), field("content-length", b"1,1")],
                Rejection::BadContentLength,
            ),
            (
                &[field("host", b"a"), field("content_length", b"1")],
                Rejection::LookalikeFramingField,
            ),
        ];
        for (fields, want) in cases {
            let got = write(&Method::POST, "/", None, fields).err();
            assert_eq!(got, Some(*want), "{fields:?}");
        }
        let no_host = write(&Method::GET, "/", None, &[]).err();
        assert_eq!(no_host, Some(Rejection::BadHost));
        let connect = write(&Method::CONNECT, "/", Some("q"), &[]).err();
        assert_eq!(connect, Some(Rejection::Connect));
        let no_target = write(&Method::GET, "", Some("q"), &[]).err();
        assert_eq!(no_target, Some(Rejection::Malformed));
        let bad_target = write(&Method::GET, "/caf\u{e9}", Some("q"), &[]).err();
        assert_eq!(bad_target, Some(Rejection::BadTarget));
    }

    #[test]
    fn more_fields_than_the_parser_takes_are_431() {
        let many: Vec<_> = (0..=super::super::MAX_HEADERS)
            .map(|i| field(&format!("x-{i}"), b"v"))
            .collect();
        let got = write(&Method::GET, "/", Some("q"), &many[..many.len() - 2]);
        assert!(got.is_ok(), "{} fields with host", many.len() - 1);
        let got = write(&Method::GET, "/", Some("q"), &many).err();
        assert_eq!(got, Some(Rejection::HeadTooLarge));
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(vec![
                "host",
                "cookie",
                "content-length",
                "transfer-encoding",
                "content_length",
                "transfer_encoding",
                "host_",
                "expect",
                "te",
                "user-agent",
                "authorization",
                "x-forwarded-for",
                "accept",
            ])
            .prop_map(str::to_string),
            "[a-z0-9!#$%&'*+.^_`|~-]{1,20}",
        ]
    }

    fn value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::sample::select(vec![
                &b"0"[..],
                b"12",
                b"012",
                b"1, 1",
                b"-1",
                b"chunked",
                b"100-continue",
                b"q.example",
                b"q.example:443",
                b"[::1]:8443",
                b"a b",
                b"",
                b" ",
                b" x ",
                b"\tx",
                b"X-Qlik-Session=s1",
            ])
            .prop_map(<[u8]>::to_vec),
            proptest::collection::vec(prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff], 0..24),
        ]
    }

    proptest! {
        /// The writer's judgement is the parser's over the bytes it wrote: the same head, or
        /// the same rejection.
        #[test]
        fn the_writer_agrees_with_the_parser(
            method in proptest::sample::select(vec!["GET", "POST", "HEAD", "CONNECT", "X-M"]),
            target in "(/[a-zA-Z0-9%?=&._~/-]{0,20})?",
            authority in proptest::option::of("[a-z0-9.-]{1,12}(:[0-9]{1,6})?"),
            fields in proptest::collection::vec((name(), value()), 0..12),
        ) {
            let fields: Vec<_> = fields.iter().map(|(n, v)| field(n, v)).collect();
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let (bytes, judged) = written(&method, &target, authority.as_deref(), &fields);
            same_as_parsed(&bytes, &judged);
        }
    }
}
