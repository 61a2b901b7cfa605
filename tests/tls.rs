//! TLS on the listeners (rustls): HTTP/1.1 and h2 chosen by ALPN, the handshake deadline, a
//! certificate swapped by a reload (and by `SIGHUP` on the real process) while a connection
//! stays open, and every certificate problem refused at start with the file named. The CA and
//! certificates are made at test time with rcgen.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tollgate::tls::TlsFiles;

use common::gateway::Gateway;
use common::upstream::Upstream;

/// A test CA that signs server certificates.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A server certificate and key as PEM.
struct Issued {
    cert_pem: String,
    key_pem: String,
    /// The certificate in DER, to compare with what a handshake presents.
    der: Vec<u8>,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
            .distinguished_name
            .push(DnType::CommonName, "tollgate test CA");
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca { cert, key }
    }

    /// A certificate for 127.0.0.1 and localhost, valid from `from` to `to` (years).
    fn issue_between(&self, name: &str, from: i32, to: i32) -> Issued {
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("server params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.not_before = date_time_ymd(from, 1, 1);
        params.not_after = date_time_ymd(to, 1, 1);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("server certificate");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    fn issue(&self, name: &str) -> Issued {
        self.issue_between(name, 2020, 2100)
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A rustls client that trusts this CA, offering `alpn`.
    fn connector(&self, alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).expect("CA root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }

    /// A reqwest client that trusts this CA.
    fn client(&self, http1_only: bool) -> reqwest::Client {
        let root = reqwest::Certificate::from_pem(self.pem().as_bytes()).expect("CA pem");
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(root);
        if http1_only {
            builder = builder.http1_only();
        }
        builder.build().expect("TLS client")
    }
}

/// Writes `issued` as `server.pem` and `server.key` in `dir`.
fn write(dir: &Path, issued: &Issued) -> TlsFiles {
    let files = TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    std::fs::write(&files.cert, &issued.cert_pem).expect("write cert");
    std::fs::write(&files.key, &issued.key_pem).expect("write key");
    files
}

/// A gateway whose proxy listener (and, with `admin`, admin listener) serves `files`.
async fn tls_gateway(upstream: &Upstream, files: &TlsFiles, admin: bool) -> Gateway {
    let files = files.clone();
    Gateway::builder(upstream)
        .tweak(move |s| {
            s.proxy.request_header_timeout = Duration::from_millis(400);
            s.proxy.tls = Some(files.clone());
            if admin {
                s.admin.tls = Some(files);
            }
        })
        .start()
        .await
}

/// Connects over TLS to `addr` and answers the stream and the certificate it presented.
async fn handshake(ca: &Ca, addr: std::net::SocketAddr) -> (TlsStream<TcpStream>, Vec<u8>) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("server name");
    let stream = ca
        .connector(&[b"http/1.1"])
        .connect(name, tcp)
        .await
        .expect("handshake");
    let presented = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("a certificate")
        .to_vec();
    (stream, presented)
}

/// One HTTP/1.1 request on an open connection; answers the status line.
async fn get(stream: &mut TlsStream<TcpStream>, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.expect("read");
        assert!(
            n > 0,
            "closed before the head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().expect("length"))
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.expect("body");
    head.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn keyed_requests_pass_over_tls_in_http1_and_h2_chosen_by_alpn() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().expect("dir");
    let files = write(dir.path(), &ca.issue("gateway"));
    let upstream = Upstream::start().await;
    let gw = tls_gateway(&upstream, &files, false).await;
    let (_, key) = gw.account_with_key().await;
    let url = format!("https://{}/things", gw.proxy_addr);
    for (client, version) in [
        (ca.client(true), reqwest::Version::HTTP_11),
        (ca.client(false), reqwest::Version::HTTP_2),
    ] {
        let r = client
            .get(&url)
            .bearer_auth(&key)
            .send()
            .await
            .expect("TLS request");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.version(), version);
        let echo: serde_json::Value = r.json().await.expect("echo");
        assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
        let refused = client.get(&url).send().await.expect("TLS request");
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    }
    // The admin listener serves TLS too, when asked.
    let gw = tls_gateway(&upstream, &files, true).await;
    let health = ca
        .client(false)
        .get(format!("https://{}/healthz", gw.admin_addr))
        .send()
        .await
        .expect("admin over TLS");
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test]
async fn cleartext_and_silence_on_a_tls_listener_get_no_http_answer() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().expect("dir");
    let files = write(dir.path(), &ca.issue("gateway"));
    let upstream = Upstream::start().await;
    let gw = tls_gateway(&upstream, &files, false).await;
    // Plain HTTP on the TLS port: a TLS alert at most, never an HTTP response.
    let mut plain = TcpStream::connect(gw.proxy_addr).await.expect("connect");
    plain
        .write_all(b"GET /public/x HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the connection is closed");
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
    // A client that connects and never starts its handshake is closed after the header
    // timeout (400 ms here).
    let mut silent = TcpStream::connect(gw.proxy_addr).await.expect("connect");
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn a_reload_serves_the_new_certificate_to_new_connections_and_keeps_open_ones() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().expect("dir");
    let first = ca.issue("first");
    let files = write(dir.path(), &first);
    let upstream = Upstream::start().await;
    let gw = tls_gateway(&upstream, &files, false).await;

    let (mut open, presented) = handshake(&ca, gw.proxy_addr).await;
    assert_eq!(presented, first.der);
    assert!(get(&mut open, "/public/a").await.contains("200"));

    let second = ca.issue("second");
    write(dir.path(), &second);
    assert!(gw.reload());
    let (_, presented) = handshake(&ca, gw.proxy_addr).await;
    assert_eq!(
        presented, second.der,
        "a new connection gets the new certificate"
    );
    assert!(
        get(&mut open, "/public/b").await.contains("200"),
        "the open connection keeps working"
    );

    // A broken pair is refused and the last good one keeps serving.
    std::fs::write(&files.key, ca.issue("third").key_pem).expect("write");
    assert!(!gw.reload());
    let (_, presented) = handshake(&ca, gw.proxy_addr).await;
    assert_eq!(presented, second.der);
}

/// A reload whose file names other certificate files serves them; one that names files that
/// fail their checks changes nothing, not even the rest of the config.
#[tokio::test]
async fn a_reload_to_other_certificate_files_serves_them_or_changes_nothing() {
    let ca = Ca::new();
    let (one, two) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let first = ca.issue("first");
    let files = write(one.path(), &first);
    let upstream = Upstream::start().await;
    let mut gw = tls_gateway(&upstream, &files, false).await;

    let second = ca.issue("second");
    let moved = write(two.path(), &second);
    gw.reload_with(|s| s.proxy.tls = Some(moved.clone()))
        .expect("applies");
    assert_eq!(handshake(&ca, gw.proxy_addr).await.1, second.der);

    let missing = TlsFiles {
        cert: two.path().join("nowhere.pem"),
        key: moved.key.clone(),
    };
    let refused = gw.reload_with(|s| {
        s.proxy.tls = Some(missing);
        s.routes.retain(|r| r.name != "public");
    });
    assert!(refused.is_err());
    assert_eq!(handshake(&ca, gw.proxy_addr).await.1, second.der);
    let (mut open, _) = handshake(&ca, gw.proxy_addr).await;
    // Without `public`, `/public/a` would be the keyed `api` route's (401).
    let answer = get(&mut open, "/public/a").await;
    assert!(
        answer.contains("200"),
        "the old routes still serve: {answer}"
    );
}

/// `tollgate check-config` on `config`, which must exit 2; its stderr.
fn refused_by_check_config(config: &Path) -> String {
    let out = common::tollgate_command()
        .args(["check-config", "--config"])
        .arg(config)
        .output()
        .expect("run check-config");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    stderr
}

/// Start-up and `check-config` refuse what cannot be served, naming the file and the reason.
#[test]
fn certificates_that_cannot_be_served_are_config_errors() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().expect("dir");
    let good = ca.issue("good");
    let write_pair = |name: &str, cert: &str, key: &str| -> TlsFiles {
        let files = TlsFiles {
            cert: dir.path().join(format!("{name}.pem")),
            key: dir.path().join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert).expect("write");
        std::fs::write(&files.key, key).expect("write");
        files
    };
    let expired = ca.issue_between("old", 2001, 2002);
    let future = ca.issue_between("new", 2090, 2100);
    let other_key = ca.issue("other").key_pem;
    let cases: Vec<(TlsFiles, &str)> = vec![
        (
            TlsFiles {
                cert: dir.path().join("missing.pem"),
                key: dir.path().join("missing.key"),
            },
            "cannot read",
        ),
        (
            write_pair("garbage", "not a certificate", &good.key_pem),
            "holds no PEM certificate",
        ),
        (
            write_pair("nokey", &good.cert_pem, "nothing here"),
            "holds no PEM private key",
        ),
        (
            write_pair("expired", &expired.cert_pem, &expired.key_pem),
            "is expired",
        ),
        (
            write_pair("future", &future.cert_pem, &future.key_pem),
            "is not yet valid",
        ),
        (
            write_pair("mismatch", &good.cert_pem, &other_key),
            "does not match",
        ),
    ];
    for (files, reason) in cases {
        let config = dir.path().join("t.toml");
        std::fs::write(
            &config,
            format!(
                "[proxy]\nlisten = \"127.0.0.1:0\"\ntls = {{ cert = '{}', key = '{}' }}\n\
                 [store]\npath = '{}'\n[[routes]]\nname = \"api\"\npath_prefix = \"/\"\n\
                 upstreams = [\"http://127.0.0.1:9\"]\n",
                files.cert.display(),
                files.key.display(),
                dir.path().join("t.db").display()
            ),
        )
        .expect("write config");
        let stderr = refused_by_check_config(&config);
        assert!(stderr.contains("proxy.tls"), "{reason}: {stderr}");
        assert!(stderr.contains(reason), "expected {reason:?} in {stderr}");
    }
    // And the good pair passes.
    let files = write_pair("fine", &good.cert_pem, &good.key_pem);
    assert!(tollgate::tls::load(&files, std::time::SystemTime::now()).is_ok());
}

/// `SIGHUP` on the real process re-reads the certificate (and no longer kills it): a new
/// connection gets the new one, a connection made before keeps working.
#[test]
fn sighup_swaps_the_certificate_of_the_running_process() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let ca = Ca::new();
    let dir = tempfile::tempdir().expect("dir");
    let first = ca.issue("first");
    let files = write(dir.path(), &first);
    let port = free_port();
    let config = dir.path().join("t.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{port}\"\ntls = {{ cert = '{}', key = '{}' }}\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[store]\npath = '{}'\n[[routes]]\nname = \"api\"\n\
             path_prefix = \"/\"\nupstreams = [\"http://127.0.0.1:9\"]\n",
            files.cert.display(),
            files.key.display(),
            dir.path().join("t.db").display()
        ),
    )
    .expect("write config");
    let mut command = common::tollgate_command();
    command
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("start tollgate");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let serving = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("tollgate is serving"));
    assert!(serving, "tollgate did not start");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (mut open, presented) = runtime.block_on(handshake(&ca, addr));
    assert_eq!(presented, first.der);
    // The route wants a key: 401, an answer all the same.
    let status = runtime.block_on(get(&mut open, "/x"));
    assert!(status.contains("401"), "{status}");

    let second = ca.issue("second");
    write(dir.path(), &second);
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    let reloaded = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("reloaded the TLS certificate"));
    assert!(reloaded, "no reload logged");
    let presented = runtime.block_on(async { handshake(&ca, addr).await.1 });
    assert_eq!(presented, second.der);
    let status = runtime.block_on(get(&mut open, "/x"));
    assert!(
        status.contains("401"),
        "the connection made before the reload still answers: {status}"
    );
    common::expect_running_then_stop(&mut child);
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

// === https upstreams ===

/// A TLS server config for an upstream with `issued`, asking for client certificates signed by
/// `clients` when given.
fn upstream_config(issued: &Issued, clients: Option<&Ca>) -> Arc<rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject as _;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.cert.der().clone()).expect("client CA");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let chain = vec![rustls_pki_types::CertificateDer::from(issued.der.clone())];
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())
        .expect("upstream key");
    Arc::new(
        builder
            .with_single_cert(chain, key)
            .expect("upstream config"),
    )
}

/// One public route to `url` with extra route fields.
fn route_to(url: &str, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"secure\"\npath_prefix = \"/\"\nauth = \"public\"\n\
         upstreams = [\"{url}\"]\n{extra}\n"
    )
}

#[tokio::test]
async fn https_upstreams_are_verified_against_the_routes_ca_and_get_a_client_certificate() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().expect("dir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write CA");
    let trust = |file: &Path| format!("tls_ca = '{}'", file.display());
    let upstream = Upstream::start_tls(upstream_config(&ca.issue("upstream"), None)).await;
    assert!(upstream.url().starts_with("https://"));

    // Trusted through the route's CA file: forwarded (SNI and Host: its own authority).
    let (status, echo) = through(&upstream, &trust(&ca_file)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echo["headers"]["x-upstream-client-cert"], "no");

    // A CA that did not sign the upstream's certificate: the upstream is not trusted.
    let stranger_file = dir.path().join("stranger.pem");
    std::fs::write(&stranger_file, Ca::new().pem()).expect("write CA");
    let (status, _) = through(&upstream, &trust(&stranger_file)).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);

    // An upstream that asks for a client certificate gets the route's (mutual TLS) …
    let mtls = Upstream::start_tls(upstream_config(&ca.issue("upstream"), Some(&ca))).await;
    let client = write(dir.path(), &ca.issue("gateway-client"));
    let with_client = format!(
        "{}\ntls_client_cert = '{}'\ntls_client_key = '{}'",
        trust(&ca_file),
        client.cert.display(),
        client.key.display()
    );
    let (status, echo) = through(&mtls, &with_client).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echo["headers"]["x-upstream-client-cert"], "yes");
    // … and refuses a route without one.
    let (status, _) = through(&mtls, &trust(&ca_file)).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
}

/// A request through a fresh gateway whose one public route to `upstream` has `extra` fields:
/// its status and JSON body (`null` when not JSON).
async fn through(upstream: &Upstream, extra: &str) -> (StatusCode, serde_json::Value) {
    let gw = Gateway::builder(upstream)
        .routes(route_to(&upstream.url(), extra))
        .start()
        .await;
    let r = common::client()
        .get(gw.proxy_url("/things"))
        .send()
        .await
        .expect("request");
    let status = r.status();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

#[test]
fn upstream_tls_fields_are_checked_by_check_config() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().expect("dir");
    let files = write(dir.path(), &ca.issue("client"));
    let cases = [
        (
            route_to(
                "https://127.0.0.1:9",
                &format!("tls_client_cert = '{}'", files.cert.display()),
            ),
            "routes[0].tls_client_key: is required with tls_client_cert",
        ),
        (
            route_to(
                "http://127.0.0.1:9",
                &format!("tls_ca = '{}'", files.cert.display()),
            ),
            "routes[0].tls_ca: tls_* fields are only used with https:// upstreams",
        ),
        (
            route_to("https://127.0.0.1:9", "tls_ca = '/nonexistent/ca.pem'"),
            "cannot read /nonexistent/ca.pem",
        ),
        (
            route_to("ftp://127.0.0.1:9", ""),
            "must start with http:// or https://",
        ),
    ];
    // Without a CA file the system's roots are used (.ci/run installs ca-certificates).
    let system = tollgate::tls::upstream_client_config(
        &tollgate::tls::UpstreamTlsFiles::default(),
        std::time::SystemTime::now(),
    );
    assert!(system.is_ok(), "{:?}", system.err());
    for (routes, expected) in cases {
        let config = dir.path().join("t.toml");
        std::fs::write(
            &config,
            format!(
                "[store]\npath = '{}'\n{routes}",
                dir.path().join("t.db").display()
            ),
        )
        .expect("write config");
        let stderr = refused_by_check_config(&config);
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in {stderr}"
        );
    }
}
