//! What ops teams see: cookie events ([`events`]), Prometheus metrics ([`metrics`]), and the
//! cookie self-test page ([`cookie_check`]) that finds the box on the way that eats cookies.

pub mod cookie_check;
pub mod events;
pub mod metrics;

use std::sync::Arc;

use crate::config::Config;

/// The diagnostics of one guard, shared by the proxy, the session guard and the admin API.
pub struct Diagnostics {
    pub events: Arc<events::Events>,
    pub metrics: metrics::Metrics,
    pub cookie_check: Option<cookie_check::CookieCheck>,
}

impl Diagnostics {
    pub fn new(config: &Config) -> Diagnostics {
        let d = &config.diagnostics;
        Diagnostics {
            events: Arc::new(events::Events::new(d.events_kept)),
            metrics: metrics::Metrics::new(),
            cookie_check: d
                .cookie_check
                .then(|| cookie_check::CookieCheck::new(&d.cookie_check_path)),
        }
    }
}
