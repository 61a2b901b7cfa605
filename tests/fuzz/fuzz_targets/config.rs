//! The config loader on arbitrary TOML text (no disk): never a panic; a refused config names
//! at least one problem, each with a field and a message; an accepted one has durations that
//! the gateway can add to a clock reading.

#![no_main]

use std::path::Path;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use tollgate::config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::load_from_str(text, Path::new("fuzz.toml"), Vec::new()) {
        Ok(settings) => {
            let now = Instant::now();
            let durations = [
                settings.proxy.request_header_timeout,
                settings.cache.ttl,
                settings.cache.negative_ttl,
                settings.metering.flush_interval,
                settings.metering.retention_minute,
                settings.metering.retention_hour,
                settings.metering.retention_day,
            ];
            let routes = settings
                .routes
                .iter()
                .flat_map(|r| [r.timeout, r.idle_timeout]);
            for d in durations.into_iter().chain(routes) {
                assert!(
                    now.checked_add(d).is_some(),
                    "{d:?} overflows a clock reading"
                );
            }
        }
        Err(e) => {
            assert!(!e.problems.is_empty(), "refused without a problem: {e}");
            for p in &e.problems {
                assert!(!p.field.is_empty() && !p.message.is_empty(), "{p:?}");
            }
            let _ = e.to_string();
        }
    }
});
