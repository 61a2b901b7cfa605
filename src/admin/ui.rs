//! `GET /ui`: the usage dashboard, a single-page app whose files are compiled into the binary
//! (`src/admin/ui/`; nothing is fetched from elsewhere, so it works offline). It talks only to
//! the `/v1` API of this listener, with the credential it was given at sign-in, so it can do
//! nothing its user could not do with curl.
//!
//! Every URL in the app is relative (`app.js`, `../v1/accounts`), so it works behind a path
//! prefix or under another host name; `/ui` itself redirects to `ui/` so that they resolve
//! below it. Every answer carries a strict Content-Security-Policy (scripts and styles from
//! these files only, no inline script, `connect-src 'self'`), `X-Frame-Options: DENY` and
//! `Referrer-Policy: no-referrer`.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::error::ApiError;
use super::AdminState;

/// One file of the app.
struct Asset {
    /// Its path below `/ui/`.
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// The app's files. uPlot (MIT, `vendor/uPlot.LICENSE`) draws the charts.
const ASSETS: &[Asset] = &[
    Asset {
        path: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("ui/index.html"),
    },
    Asset {
        path: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("ui/app.js"),
    },
    Asset {
        path: "api.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("ui/api.js"),
    },
    Asset {
        path: "dom.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("ui/dom.js"),
    },
    Asset {
        path: "dialog.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("ui/dialog.js"),
    },
    Asset {
        path: "accounts.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("ui/accounts.js"),
    },
    Asset {
        path: "account.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("ui/account.js"),
    },
    Asset {
        path: "keyactions.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("ui/keyactions.js"),
    },
    Asset {
        path: "keyusage.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("ui/keyusage.js"),
    },
    Asset {
        path: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("ui/app.css"),
    },
    Asset {
        path: "vendor/uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("ui/vendor/uPlot.iife.min.js"),
    },
    Asset {
        path: "vendor/uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("ui/vendor/uPlot.min.css"),
    },
    Asset {
        path: "vendor/uPlot.LICENSE",
        content_type: "text/plain; charset=utf-8",
        body: include_bytes!("ui/vendor/uPlot.LICENSE"),
    },
];

/// Scripts, styles, images and fonts from the app's own files; API calls to this origin only;
/// no plugins, frames, forms posted elsewhere or `<base>` changes. Styles set from script
/// (uPlot sizes its canvas that way) are CSSOM calls, which `style-src` does not restrict.
const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
                   font-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

/// `/ui` and the files below it.
pub(crate) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/ui", get(redirect))
        .route("/ui/", get(|| async { serve("index.html") }))
        .route(
            "/ui/{*path}",
            get(|Path(path): Path<String>| async move { serve(&path) }),
        )
}

/// `/ui` → `ui/`: relative, so that it stays below whatever prefix the listener is reached
/// through, and so that the app's relative URLs resolve below `/ui/`.
async fn redirect() -> Response {
    let mut response = StatusCode::PERMANENT_REDIRECT.into_response();
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("ui/"));
    secure(response)
}

fn serve(path: &str) -> Response {
    match ASSETS.iter().find(|a| a.path == path) {
        Some(asset) => {
            let mut response = asset.body.into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            );
            // Revalidated on each load: a new binary's files are picked up at once.
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            secure(response)
        }
        None => secure(ApiError::NotFound("path").into_response()),
    }
}

/// The headers every answer under `/ui` carries.
fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_has_a_body_and_a_unique_path() {
        for (i, a) in ASSETS.iter().enumerate() {
            assert!(!a.body.is_empty(), "{} is empty", a.path);
            assert!(ASSETS[..i].iter().all(|b| b.path != a.path), "{}", a.path);
        }
    }

    #[test]
    fn only_the_apps_files_are_served() {
        assert_eq!(serve("app.js").status(), StatusCode::OK);
        for path in ["../Cargo.toml", "ui.rs", "", "vendor/", "%2e%2e/admin.rs"] {
            assert_eq!(serve(path).status(), StatusCode::NOT_FOUND, "{path}");
        }
    }
}
