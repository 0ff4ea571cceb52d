//! Every way a request can fail inside the guard, mapped to a status code and a page in this one
//! place. The pages are written for two readers: the user in front of the browser (what
//! happened, what to do) and the admin who gets the screenshot (which part failed).

use std::fmt;

use http::{header, HeaderValue, StatusCode};

use crate::proxy::h1::parse::Rejection;

#[derive(Debug, Clone)]
pub enum ProxyError {
    /// The strict HTTP/1 parser refused the request; it never reached Qlik.
    Rejected(Rejection),
    /// The client closed the connection (or stopped sending) before the request was whole:
    /// there is nobody to answer. Logged as 499, as nginx does.
    ClientGone,
    /// A request the guard will not forward (no Host, CONNECT, ...).
    BadRequest(&'static str),
    MethodNotAllowed,
    /// The client sent its request (its body, or the end-session form) too slowly: it was
    /// cut off at a deadline (what it says).
    ClientTooSlow(&'static str),
    PayloadTooLarge {
        limit: u64,
    },
    /// No upstream could be asked at all.
    NoUpstream,
    /// The upstream node did not accept a connection.
    UpstreamUnreachable {
        upstream: String,
        detail: String,
    },
    /// The upstream did not answer in time.
    UpstreamTimeout {
        upstream: String,
    },
    /// The connection broke or the upstream sent something that is not HTTP.
    UpstreamFailed {
        upstream: String,
        detail: String,
    },
    /// The node that holds the request's session is down, and `sessions.on_node_down =
    /// "error"` keeps the session there rather than starting a new one elsewhere.
    SessionNodeDown {
        upstream: String,
    },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Rejected(r) => {
                StatusCode::from_u16(r.status()).unwrap_or(StatusCode::BAD_REQUEST)
            }
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::ClientGone => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::ClientTooSlow(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoUpstream => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnreachable { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::SessionNodeDown { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
    /// A short word for the metrics label.
    pub fn cause(&self) -> &'static str {
        match self {
            ProxyError::NoUpstream => "no_upstream",
            ProxyError::UpstreamUnreachable { .. } => "unreachable",
            ProxyError::UpstreamTimeout { .. } => "timeout",
            ProxyError::UpstreamFailed { .. } => "failed",
            ProxyError::SessionNodeDown { .. } => "session_node_down",
            _ => "client",
        }
    }

    /// Failures of the upstream (as opposed to of the client's request).
    pub fn is_upstream(&self) -> bool {
        matches!(
            self,
            ProxyError::NoUpstream
                | ProxyError::UpstreamUnreachable { .. }
                | ProxyError::UpstreamTimeout { .. }
                | ProxyError::UpstreamFailed { .. }
                | ProxyError::SessionNodeDown { .. }
        )
    }

    fn title(&self) -> &'static str {
        match self {
            ProxyError::Rejected(_) | ProxyError::BadRequest(_) | ProxyError::ClientGone => {
                "This request was refused"
            }
            ProxyError::MethodNotAllowed => "This kind of request is not allowed here",
            ProxyError::ClientTooSlow(_) => "The request came too slowly",
            ProxyError::PayloadTooLarge { .. } => "The upload is too large",
            ProxyError::NoUpstream
            | ProxyError::UpstreamUnreachable { .. }
            | ProxyError::UpstreamFailed { .. }
            | ProxyError::SessionNodeDown { .. } => "Qlik Sense is not reachable right now",
            ProxyError::UpstreamTimeout { .. } => "Qlik Sense did not answer in time",
        }
    }

    fn user_advice(&self) -> &'static str {
        match self {
            ProxyError::Rejected(_)
            | ProxyError::BadRequest(_)
            | ProxyError::MethodNotAllowed
            | ProxyError::ClientGone => {
                "Your browser or a device on the way sent a request that could not be passed on safely. \
                 Reload the page; if this keeps happening, send this page to your Qlik administrator."
            }
            ProxyError::PayloadTooLarge { .. } => {
                "The file is larger than this site accepts. Ask your Qlik administrator to raise the limit."
            }
            ProxyError::ClientTooSlow(_) => {
                "The connection from your browser was too slow, or stopped, while sending. \
                 Try again; on a very slow network, send smaller files."
            }
            ProxyError::NoUpstream
            | ProxyError::UpstreamUnreachable { .. }
            | ProxyError::UpstreamFailed { .. }
            | ProxyError::SessionNodeDown { .. } => {
                "Your work is not lost: Qlik keeps your session while it is away. Wait a minute and \
                 reload the page. If this stays, tell your Qlik administrator."
            }
            ProxyError::UpstreamTimeout { .. } => {
                "Qlik Sense may be busy (a large reload or export). Wait a minute and reload the page."
            }
        }
    }

    /// What an admin needs to know; never a cookie value.
    pub fn admin_detail(&self) -> String {
        match self {
            ProxyError::Rejected(r) => format!("{} ({})", r.describe(), r.id()),
            ProxyError::BadRequest(why) => (*why).to_string(),
            ProxyError::ClientGone => "the client went away before its request was complete".into(),
            ProxyError::MethodNotAllowed => "CONNECT and TRACE are not proxied".into(),
            ProxyError::ClientTooSlow(why) => (*why).to_string(),
            ProxyError::PayloadTooLarge { limit } => {
                format!("request body over server.max_body_size ({limit} bytes)")
            }
            ProxyError::NoUpstream => "no Qlik Sense proxy node is configured or available".into(),
            ProxyError::UpstreamUnreachable { upstream, detail } => {
                format!("cannot connect to Qlik Sense proxy node {upstream}: {detail}")
            }
            ProxyError::UpstreamTimeout { upstream } => {
                format!(
                    "Qlik Sense proxy node {upstream} did not answer within proxy.response_timeout"
                )
            }
            ProxyError::UpstreamFailed { upstream, detail } => {
                format!("the connection to Qlik Sense proxy node {upstream} failed: {detail}")
            }
            ProxyError::SessionNodeDown { upstream } => format!(
                "Qlik Sense proxy node {upstream}, which holds this session, is down \
                 (sessions.on_node_down = \"error\": the session waits for its node)"
            ),
        }
    }

    /// The page for this failure (the words are decided here, the HTML in [`crate::pages`]).
    pub fn to_response(&self) -> crate::pages::Page {
        let status = self.status();
        let mut resp = crate::pages::message(
            status,
            self.title(),
            self.user_advice(),
            &self.admin_detail(),
        );
        let h = resp.headers_mut();
        if self.is_upstream() {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
        }
        if matches!(
            self,
            ProxyError::Rejected(_) | ProxyError::BadRequest(_) | ProxyError::ClientTooSlow(_)
        ) {
            // After a framing error the rest of the connection cannot be trusted.
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.admin_detail())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let cases = [
            (ProxyError::Rejected(Rejection::TeAndCl), 400),
            (ProxyError::Rejected(Rejection::HeadTooLarge), 431),
            (ProxyError::Rejected(Rejection::UnknownTransferCoding), 501),
            (ProxyError::PayloadTooLarge { limit: 1 }, 413),
            (ProxyError::ClientTooSlow("slow"), 408),
            (ProxyError::NoUpstream, 503),
            (
                ProxyError::UpstreamUnreachable {
                    upstream: "n1".into(),
                    detail: "refused".into(),
                },
                502,
            ),
            (
                ProxyError::UpstreamTimeout {
                    upstream: "n1".into(),
                },
                504,
            ),
        ];
        for (e, code) in cases {
            let r = e.to_response();
            assert_eq!(r.status().as_u16(), code, "{e}");
            assert!(r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html"));
        }
    }
}
