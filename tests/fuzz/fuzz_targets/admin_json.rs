//! The admin API's JSON bodies, through the real router in-process: arbitrary bytes as the body
//! of `POST /v1/accounts`, `PATCH /v1/accounts/{id}`, `POST …/keys`, `PATCH …/keys/{id}`,
//! `POST …/sites` and `POST …/keys/import`. Never a panic, never a 5xx; every answer a 2xx or a 4xx with a JSON body
//! (`{"error":{"code",…}}` for a 4xx).

#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;
use tollgate_fuzz::app;

fuzz_target!(|data: &[u8]| {
    let Some((which, body)) = data.split_first() else {
        return;
    };
    let app = app();
    let account = format!("/v1/accounts/{}", app.account);
    let (method, path) = match which % 6 {
        0 => (Method::POST, "/v1/accounts".to_owned()),
        1 => (Method::PATCH, account),
        2 => (Method::POST, format!("{account}/keys")),
        3 => (Method::PATCH, format!("{account}/keys/{}", app.key)),
        4 => (Method::POST, format!("{account}/sites")),
        _ => (Method::POST, format!("{account}/keys/import")),
    };
    let what = format!("{method} {path}");
    app.call(method, &path, body.to_vec())
        .assert_well_formed(&what);
});
