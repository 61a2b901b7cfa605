//! Configuration and the offline commands against the contract (sections 1 and 2): the
//! `check-config` and `keygen` commands of the real binary, environment overrides, and the
//! defaults of an empty file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tollgate::config::{self, LimitMode, OnStoreError, StoreSettings};
use tollgate::credential::{self, Kind};

/// Runs the `tollgate` binary from the crate root, without any `TOLLGATE__*` override from the
/// test's own environment.
fn tollgate(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    command.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    for (name, _) in std::env::vars() {
        if name.starts_with("TOLLGATE") {
            command.env_remove(name);
        }
    }
    command.output().expect("run the tollgate binary")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// Every section at the contract's defaults and one route, spelled out, so that the override tests do not
/// depend on how the loader treats a section left out (`empty_file_loads_…` covers that).
const FULL_CONFIG: &str = r#"
[proxy]
listen = "0.0.0.0:8080"
trusted_proxies = []
max_body_bytes = 10485760
request_header_timeout = "10s"

[admin]
listen = "127.0.0.1:9090"

[store]
backend = "embedded"
path = "data/tollgate.db"

[cache]
ttl = "30s"
negative_ttl = "5s"
max_entries = 1000000

[limits]
mode = "local"
on_store_error = "fail_open"
default = { per_minute = 60, per_hour = 1000, per_day = 10000 }
headers = ["ietf", "legacy", "per_window"]

[metering]
flush_interval = "1s"

[identity]
header_prefix = "X-Tollgate-"

[[routes]]
name = "api"
path_prefix = "/"
upstreams = ["http://127.0.0.1:8000"]
"#;

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Whether `err` names `field` among its problems.
fn names(err: &config::ConfigError, field: &str) -> bool {
    err.problems.iter().any(|p| p.field == field)
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

// === the binary ===

#[test]
fn check_config_accepts_the_shipped_config() {
    let output = tollgate(&["check-config", "--config", "config/tollgate.toml"]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
}

/// An unknown field does not hide its section's other problems: the bad `proxy.listen` beside
/// `proxy.bogus` is reported too, with every other section's.
#[test]
fn check_config_names_every_problem_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bad.toml",
        r#"
[proxy]
listen = "not-an-address"
bogus = 1

[cache]
ttl = "soon"

[nope]
x = 1

[[routes]]
name = "api"
path_prefix = "/"
"#,
    );

    let output = tollgate(&["check-config", "--config", path.to_str().unwrap()]);

    assert_eq!(output.status.code(), Some(2), "stderr: {}", stderr(&output));
    let text = stderr(&output);
    for field in [
        "proxy.listen",
        "bogus",
        "cache.ttl",
        "nope",
        "routes[0].upstreams",
    ] {
        assert!(
            text.contains(field),
            "stderr does not name {field}:\n{text}"
        );
    }
    assert!(
        text.contains("bad.toml"),
        "stderr does not name the file:\n{text}"
    );
}

#[test]
fn check_config_of_a_missing_file_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.toml");
    let output = tollgate(&["check-config", "--config", missing.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "stderr: {}", stderr(&output));
    assert!(
        stderr(&output).contains("absent.toml"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn keygen_prints_a_valid_secret_key() {
    let output = tollgate(&["keygen"]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    let key = String::from_utf8(output.stdout).unwrap();
    assert_eq!(credential::parse(key.trim()), Ok(Kind::Secret), "{key:?}");
}

#[test]
fn keygen_kind_master_prints_a_valid_master_key() {
    let output = tollgate(&["keygen", "--kind", "master"]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    let key = String::from_utf8(output.stdout).unwrap();
    assert_eq!(credential::parse(key.trim()), Ok(Kind::Master), "{key:?}");
}

#[test]
fn unknown_subcommand_exits_2() {
    let output = tollgate(&["frobnicate"]);
    assert_eq!(output.status.code(), Some(2), "stderr: {}", stderr(&output));
}

// === load_with_env ===

#[test]
fn environment_overrides_file_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "t.toml", FULL_CONFIG);
    let overrides = env(&[
        ("TOLLGATE__PROXY__MAX_BODY_BYTES", "1234"),
        ("TOLLGATE__CACHE__TTL", "5s"),
    ]);

    let settings = config::load_with_env(&path, overrides).expect("loads");

    assert_eq!(settings.proxy.max_body_bytes, 1234);
    assert_eq!(settings.cache.ttl, Duration::from_secs(5));
}

/// A type error from the environment names its field (`proxy.max_body_bytes`), not its section.
#[test]
fn bad_environment_override_is_reported_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "t.toml", FULL_CONFIG);
    config::load_with_env(&path, Vec::new()).expect("the file itself is valid");

    let err = config::load_with_env(&path, env(&[("TOLLGATE__CACHE__TTL", "soon")]))
        .expect_err("a bad ttl is refused");
    assert!(names(&err, "cache.ttl"), "{err}");

    let err = config::load_with_env(&path, env(&[("TOLLGATE__PROXY__MAX_BODY_BYTES", "lots")]))
        .expect_err("a non-number is refused");
    assert!(names(&err, "proxy.max_body_bytes"), "{err}");
}

/// Every section left out is its defaults.
#[test]
fn empty_file_loads_with_the_contract_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "empty.toml", "");

    let s = config::load_with_env(&path, Vec::new()).expect("an empty file is valid");

    assert_eq!(
        s.proxy.listen,
        "0.0.0.0:8080".parse::<SocketAddr>().unwrap()
    );
    assert!(s.proxy.trusted_proxies.is_empty());
    assert_eq!(s.proxy.max_body_bytes, 10_485_760);
    assert_eq!(s.proxy.request_header_timeout, Duration::from_secs(10));
    assert!(!s.proxy.expose_account_api);
    assert_eq!(
        s.admin.listen,
        "127.0.0.1:9090".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(s.admin.master_key_env, "TOLLGATE_MASTER_KEY");
    assert_eq!(
        s.store,
        StoreSettings::Embedded {
            path: PathBuf::from("data/tollgate.db")
        }
    );
    assert_eq!(s.cache.ttl, Duration::from_secs(30));
    assert_eq!(s.cache.negative_ttl, Duration::from_secs(5));
    assert_eq!(s.cache.max_entries, 1_000_000);
    assert_eq!(s.limits.mode, LimitMode::Local);
    assert_eq!(s.limits.on_store_error, OnStoreError::FailOpen);
    assert_eq!(s.limits.default.per_minute, Some(60));
    assert_eq!(s.limits.default.per_hour, Some(1000));
    assert_eq!(s.limits.default.per_day, Some(10_000));
    assert_eq!(s.metering.flush_interval, Duration::from_secs(1));
    assert_eq!(s.metering.retention_minute, Duration::from_secs(48 * 3600));
    assert_eq!(s.metering.retention_hour, Duration::from_secs(90 * 86_400));
    assert_eq!(s.metering.retention_day, Duration::from_secs(1100 * 86_400));
    assert_eq!(s.identity.header_prefix, "X-Tollgate-");
    assert!(s.routes.is_empty());
}

#[test]
fn the_redis_examples_pass_check_config() {
    for file in ["config/redis.toml", "config/redis-cluster.toml"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["check-config", "--config", file])
            .output()
            .expect("run tollgate");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn redis_needs_a_url_and_global_limits_need_redis() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.toml");
    let problems = |toml: &str| -> Vec<String> {
        std::fs::write(&path, toml).expect("write");
        match tollgate::config::load_with_env(&path, Vec::new()) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.into_iter().map(|p| p.field).collect(),
        }
    };
    assert_eq!(
        problems("[store]\nbackend = \"redis\"\n"),
        vec!["store.redis_url"]
    );
    assert_eq!(
        problems("[store]\nbackend = \"redis\"\nredis_url = \"http://x\"\n"),
        vec!["store.redis_url"]
    );
    assert_eq!(
        problems("[store]\nbackend = \"redis\"\nredis_url = \"redis+cluster://a:1,b\"\n"),
        vec!["store.redis_url"]
    );
    assert!(
        problems("[store]\nbackend = \"redis\"\nredis_url = \"redis+cluster://a:1,b:2\"\n")
            .is_empty()
    );
    assert_eq!(
        problems("[limits]\nmode = \"global\"\n"),
        vec!["limits.mode"]
    );
    assert!(problems("[store]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:1\"\n[limits]\nmode = \"global\"\n").is_empty());
}

#[test]
fn list_fields_take_comma_separated_environment_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "t.toml",
        &FULL_CONFIG.replace(
            "trusted_proxies = []",
            "trusted_proxies = [\"10.1.0.0/16\"]",
        ),
    );
    let trusted = |value: &str| {
        config::load_with_env(&path, env(&[("TOLLGATE__PROXY__TRUSTED_PROXIES", value)]))
            .map(|s| s.proxy.trusted_proxies)
    };
    let nets =
        |list: &[&str]| -> Vec<ipnet::IpNet> { list.iter().map(|s| s.parse().unwrap()).collect() };

    assert_eq!(
        trusted("10.0.0.0/8,192.168.0.0/16").expect("two CIDRs"),
        nets(&["10.0.0.0/8", "192.168.0.0/16"])
    );
    assert_eq!(
        trusted("10.0.0.0/8, 2001:db8::/32").expect("spaces after commas"),
        nets(&["10.0.0.0/8", "2001:db8::/32"])
    );
    assert_eq!(
        trusted("172.16.0.0/12").expect("one CIDR"),
        nets(&["172.16.0.0/12"])
    );
    assert_eq!(trusted("").expect("empty"), nets(&[]), "empty is no list");
    let err = trusted("10.0.0.0/8,nope").expect_err("a bad entry");
    assert!(names(&err, "proxy.trusted_proxies[1]"), "{err}");
}

#[test]
fn only_list_fields_are_split_at_commas() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "t.toml", FULL_CONFIG);
    let s = config::load_with_env(&path, env(&[("TOLLGATE__STORE__PATH", "data/a,b.db")]))
        .expect("loads");
    assert_eq!(
        s.store,
        StoreSettings::Embedded {
            path: PathBuf::from("data/a,b.db")
        }
    );
}

/// `routes` is an array of tables; the environment cannot address one of its entries, so an
/// attempt is refused by name rather than mangling the routes.
#[test]
fn routes_cannot_be_overridden_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "t.toml", FULL_CONFIG);
    let err = config::load_with_env(
        &path,
        env(&[("TOLLGATE__ROUTES__0__UPSTREAMS", "http://127.0.0.1:9")]),
    )
    .expect_err("refused");
    assert!(
        err.problems
            .iter()
            .any(|p| p.field == "routes" && p.message.contains("TOLLGATE__ROUTES__0__UPSTREAMS")),
        "{err}"
    );
}

/// Durations take the contract's units; an unknown field inside a route, and a route that
/// leaves fields out, get the route defaults (`auth = "required"`, `strip_prefix = false`,
/// `timeout = "30s"`) or a problem naming `routes[i].field`.
#[test]
fn durations_route_defaults_and_unknown_route_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = "[cache]\nttl = \"5m\"\nnegative_ttl = \"250ms\"\n\
                [metering]\nflush_interval = \"2s\"\nretention = { minute = \"1h\", hour = \"7d\", day = \"30d\" }\n\
                [[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstreams = [\"http://127.0.0.1:8000\"]\n";
    let path = write(dir.path(), "ok.toml", toml);
    let s = config::load_with_env(&path, Vec::new()).expect("loads");
    assert_eq!(s.cache.ttl, Duration::from_secs(300));
    assert_eq!(s.cache.negative_ttl, Duration::from_millis(250));
    assert_eq!(s.metering.flush_interval, Duration::from_secs(2));
    assert_eq!(s.metering.retention_minute, Duration::from_secs(3600));
    assert_eq!(s.metering.retention_day, Duration::from_secs(30 * 86_400));
    let route = &s.routes[0];
    assert_eq!(route.auth, tollgate::config::RouteAuth::Required);
    assert!(!route.strip_prefix);
    assert_eq!(route.timeout, Duration::from_secs(30));
    assert_eq!((route.cost, route.shadow), (1, false));

    let priced = "[[routes]]\nname = \"a\"\npath_prefix = \"/\"\nupstreams = [\"http://127.0.0.1:8000\"]\n\
                  cost = 0\nshadow = true\n\
                  [[routes]]\nname = \"b\"\npath_prefix = \"/b\"\nupstreams = [\"http://127.0.0.1:8000\"]\ncost = 25\n";
    let s = config::load_with_env(&write(dir.path(), "priced.toml", priced), Vec::new())
        .expect("loads");
    assert_eq!((s.routes[0].cost, s.routes[0].shadow), (0, true));
    assert_eq!(s.routes[1].cost, 25);
    for cost in ["-1", "1000001", "\"many\""] {
        let bad = format!(
            "[[routes]]\nname = \"a\"\npath_prefix = \"/\"\nupstreams = [\"http://127.0.0.1:8000\"]\ncost = {cost}\n"
        );
        let err = config::load_with_env(&write(dir.path(), "cost.toml", &bad), Vec::new())
            .expect_err("a bad cost");
        assert!(
            err.problems
                .iter()
                .any(|p| p.field.starts_with("routes[0]")),
            "{cost}: {err}"
        );
    }

    let bad = "[[routes]]\nname = \"a\"\npath_prefix = \"/\"\nupstreams = [\"http://127.0.0.1:8000\"]\n\
               [[routes]]\nname = \"b\"\npath_prefix = \"/b\"\nupstreams = [\"http://127.0.0.1:8000\"]\nretries = 3\n";
    let path = write(dir.path(), "bad.toml", bad);
    let err = config::load_with_env(&path, Vec::new()).expect_err("unknown route field");
    assert!(
        err.problems.iter().any(|p| p.field.starts_with("routes[1]")
            && format!("{} {}", p.field, p.message).contains("retries")),
        "{err}"
    );
}

#[test]
fn idle_timeout_defaults_to_30s_and_route_prefixes_must_be_in_normal_form() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ok = "[[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstreams = [\"http://127.0.0.1:8000\"]\n\
              [[routes]]\nname = \"v2\"\npath_prefix = \"/v2\"\nidle_timeout = \"250ms\"\n\
              upstreams = [\"http://127.0.0.1:8000\"]\n";
    let s = config::load_with_env(&write(dir.path(), "ok.toml", ok), Vec::new()).expect("loads");
    assert_eq!(s.routes[0].idle_timeout, Duration::from_secs(30));
    assert_eq!(s.routes[1].idle_timeout, Duration::from_millis(250));

    let bad = "[[routes]]\nname = \"a\"\npath_prefix = \"/a/../b\"\nupstreams = [\"http://127.0.0.1:8000\"]\n\
               [[routes]]\nname = \"b\"\npath_prefix = \"/%2e%2e\"\nupstreams = [\"http://127.0.0.1:8000\"]\n";
    let err = config::load_with_env(&write(dir.path(), "bad.toml", bad), Vec::new())
        .expect_err("prefixes not in normal form");
    for (field, why) in [
        ("routes[0].path_prefix", "write `/b`"),
        ("routes[1].path_prefix", "above the root"),
    ] {
        assert!(
            err.problems
                .iter()
                .any(|p| p.field == field && p.message.contains(why)),
            "{field}: {err}"
        );
    }
}

/// `metering.durability`: `interval` by default; `wal` with its directory beside the embedded
/// store's file and a 5 ms sync interval, both settable from the file or the environment; bad
/// values named by field, a sync interval above 50 ms refused, `wal_*` without `wal` refused.
#[test]
fn metering_durability_defaults_overrides_and_problems() {
    use tollgate::config::Durability;
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "t.toml", FULL_CONFIG);
    let s = config::load_with_env(&path, Vec::new()).expect("loads");
    assert_eq!(s.metering.durability, Durability::Interval);

    let s = config::load_with_env(&path, env(&[("TOLLGATE__METERING__DURABILITY", "wal")]))
        .expect("loads");
    assert_eq!(
        s.metering.durability,
        Durability::Wal {
            path: PathBuf::from("data/tollgate.usage-wal"),
            sync_interval: Duration::from_millis(5),
        }
    );
    let s = config::load_with_env(
        &path,
        env(&[
            ("TOLLGATE__METERING__DURABILITY", "wal"),
            ("TOLLGATE__METERING__WAL_PATH", "/var/lib/tollgate/wal"),
            ("TOLLGATE__METERING__WAL_SYNC_INTERVAL", "20ms"),
        ]),
    )
    .expect("loads");
    assert_eq!(
        s.metering.durability,
        Durability::Wal {
            path: PathBuf::from("/var/lib/tollgate/wal"),
            sync_interval: Duration::from_millis(20),
        }
    );

    let bad = |text: &str, field: &str| {
        let path = write(dir.path(), "bad.toml", text);
        let err = config::load_with_env(&path, Vec::new()).expect_err(text);
        assert!(names(&err, field), "{text}: {err}");
    };
    bad("[metering]\ndurability = \"fsync\"", "metering.durability");
    bad(
        "[metering]\ndurability = \"wal\"\nwal_sync_interval = \"100ms\"",
        "metering.wal_sync_interval",
    );
    bad(
        "[metering]\ndurability = \"wal\"\nwal_sync_interval = \"soon\"",
        "metering.wal_sync_interval",
    );
    bad(
        "[metering]\ndurability = \"wal\"\nwal_path = \"\"",
        "metering.wal_path",
    );
    bad("[metering]\nwal_path = \"x\"", "metering.wal_path");

    // Without an embedded store's file to sit beside, the log has a directory of its own.
    let path = write(
        dir.path(),
        "redis.toml",
        "[store]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\n\
         [metering]\ndurability = \"wal\"",
    );
    let s = config::load_with_env(&path, Vec::new()).expect("loads");
    assert!(
        matches!(&s.metering.durability, Durability::Wal { path, .. } if path == Path::new("data/usage-wal"))
    );
}

#[test]
fn limit_header_styles_are_chosen_from_three_and_default_to_all() {
    use tollgate::config::LimitHeaders;
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "t.toml", FULL_CONFIG);
    let styles = |value: &str| {
        config::load_with_env(&path, env(&[("TOLLGATE__LIMITS__HEADERS", value)]))
            .map(|s| s.limits.headers)
    };
    assert_eq!(
        config::load_with_env(&path, Vec::new())
            .expect("loads")
            .limits
            .headers,
        LimitHeaders::ALL
    );
    let without = write(
        dir.path(),
        "without.toml",
        &FULL_CONFIG.replace("headers = [\"ietf\", \"legacy\", \"per_window\"]\n", ""),
    );
    assert_eq!(
        config::load_with_env(&without, Vec::new())
            .expect("loads")
            .limits
            .headers,
        LimitHeaders::ALL,
        "all three when the field is absent"
    );
    assert_eq!(
        styles("ietf").expect("one style"),
        LimitHeaders {
            ietf: true,
            ..LimitHeaders::NONE
        }
    );
    assert_eq!(
        styles("legacy, per_window").expect("two"),
        LimitHeaders {
            ietf: false,
            ..LimitHeaders::ALL
        }
    );
    assert_eq!(styles("").expect("none"), LimitHeaders::NONE);
    let err = styles("ietf,draft7").expect_err("an unknown style");
    assert!(
        err.problems
            .iter()
            .any(|p| p.field == "limits.headers" && p.message.contains("draft7")),
        "{err}"
    );
}
