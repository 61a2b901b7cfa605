//! The operators' kit under `deploy/` (issue 25): every YAML and JSON file there parses, every
//! alert of `deploy/prometheus/rules.yml` has a severity, a summary and a runbook, and every
//! metric that the rules and the Grafana dashboard query is one a running gateway exports.
//!
//! promtool checks the PromQL itself (`deploy/prometheus/check.sh`); this test checks the names
//! against `src/metrics.rs` as it runs, so a renamed metric breaks the build, not a dashboard.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value as Json};
use serde_norway::Value as Yaml;

use common::client;
use common::gateway::Gateway;
use common::upstream::Upstream;

/// Raw metrics the queries may read that tollgate does not export: Prometheus's own.
const PROMETHEUS_METRICS: [&str; 1] = ["up"];

/// PromQL words that look like metric names: aggregations, operators and literals.
const KEYWORDS: [&str; 20] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
];

/// PromQL words followed by a list of label names, which are not metrics.
const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Where a query came from, and its PromQL.
struct Query {
    source: String,
    expr: String,
}

#[test]
fn every_yaml_and_json_file_under_deploy_parses() {
    let mut problems = Vec::new();
    let mut parsed = 0;
    for path in files_under(&repo().join("deploy")) {
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let result = match extension {
            "yml" | "yaml" => yaml_documents(&path).map(|_| ()),
            "json" => json_file(&path).map(|_| ()),
            _ => continue,
        };
        match result {
            Ok(()) => parsed += 1,
            Err(e) => problems.push(format!("{}: {e}", relative(&path))),
        }
    }
    assert!(
        problems.is_empty(),
        "files that do not parse:\n{}",
        problems.join("\n")
    );
    // prometheus.yml, rules.yml, rules_test.yml, two provisioning files, the dashboard.
    assert!(
        parsed >= 6,
        "only {parsed} YAML and JSON files under deploy/"
    );
}

#[test]
fn prometheus_loads_the_rules_beside_its_config() {
    let dir = repo().join("deploy/prometheus");
    let config = single_yaml(&dir.join("prometheus.yml"));
    let rule_files = config["rule_files"]
        .as_sequence()
        .expect("prometheus.yml has rule_files");
    assert!(!rule_files.is_empty(), "prometheus.yml names no rule file");
    for file in rule_files {
        let name = file.as_str().expect("a rule file is a path");
        assert!(
            dir.join(name).is_file(),
            "prometheus.yml names {name}, not beside it"
        );
    }
}

#[test]
fn every_alert_has_a_severity_a_summary_and_a_runbook_heading() {
    let rules = single_yaml(&repo().join("deploy/prometheus/rules.yml"));
    let operations =
        std::fs::read_to_string(repo().join("docs/OPERATIONS.md")).expect("docs/OPERATIONS.md");
    let headings = headings(&operations);
    let mut problems = Vec::new();
    let mut alerts = 0;
    for rule in all_rules(&rules) {
        let Some(alert) = rule["alert"].as_str() else {
            continue;
        };
        alerts += 1;
        let text = |v: &Yaml| v.as_str().is_some_and(|s| !s.trim().is_empty());
        if !text(&rule["labels"]["severity"]) {
            problems.push(format!("{alert}: no severity label"));
        }
        for annotation in ["summary", "description", "runbook"] {
            if !text(&rule["annotations"][annotation]) {
                problems.push(format!("{alert}: no {annotation} annotation"));
            }
        }
        let anchor = alert.to_lowercase();
        let runbook = rule["annotations"]["runbook"].as_str().unwrap_or("");
        if runbook != format!("docs/OPERATIONS.md#{anchor}") {
            problems.push(format!(
                "{alert}: runbook {runbook:?}, not docs/OPERATIONS.md#{anchor}"
            ));
        }
        if !headings.contains(&anchor) {
            problems.push(format!(
                "{alert}: no heading #{anchor} in docs/OPERATIONS.md"
            ));
        }
    }
    assert!(alerts > 0, "rules.yml has no alert");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_dashboard_reads_the_provisioned_data_source() {
    let provisioned =
        single_yaml(&repo().join("deploy/grafana/provisioning/datasources/prometheus.yml"));
    let uid = provisioned["datasources"][0]["uid"]
        .as_str()
        .expect("the provisioned data source has a uid");
    let dashboard =
        json_file(&repo().join("deploy/grafana/dashboards/tollgate.json")).expect("dashboard");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("dashboard variables");
    let variable = |name: &str| variables.iter().find(|v| v["name"] == name);
    let datasource = variable("datasource").expect("a datasource variable");
    assert_eq!(datasource["current"]["value"], uid);
    for name in ["instance", "route"] {
        assert!(variable(name).is_some(), "no {name} variable");
    }
    let mut ids = BTreeSet::new();
    for panel in panels(&dashboard["panels"]) {
        let id = panel["id"].as_u64().expect("a panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        for target in panel["targets"].as_array().into_iter().flatten() {
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "a query of {} on another data source",
                panel["title"]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_the_dashboard_query_is_exported() {
    let queries = queries();
    let recorded = recorded_names();
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for query in &queries {
        for name in metric_names(&query.expr) {
            used.entry(name).or_default().insert(query.source.clone());
        }
    }
    assert!(
        used.keys().any(|n| n.starts_with("tollgate_")),
        "no tollgate metric found in {} queries",
        queries.len()
    );

    let exported = exported_names(&scrape_after_traffic().await);
    let mut missing = Vec::new();
    let mut foreign = Vec::new();
    for (name, sources) in &used {
        let sources = sources.iter().cloned().collect::<Vec<_>>().join(", ");
        if name.contains(':') {
            if !recorded.contains(name) {
                foreign.push(format!(
                    "{name} (a recording rule nobody records; {sources})"
                ));
            }
        } else if name.starts_with("tollgate_") {
            if !exported.contains(name) {
                missing.push(format!("{name} ({sources})"));
            }
        } else if !PROMETHEUS_METRICS.contains(&name.as_str()) {
            foreign.push(format!("{name} (not tollgate's; {sources})"));
        }
    }
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!(
            "queried but not in /metrics:\n  {}",
            missing.join("\n  ")
        ));
    }
    if !foreign.is_empty() {
        problems.push(format!("other names queried:\n  {}", foreign.join("\n  ")));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn metric_names_skips_functions_labels_numbers_and_variables() {
    let expr = r#"histogram_quantile(0.99, sum by (le, instance) (rate(tollgate_upstream_duration_seconds_bucket{instance=~"$instance", route="a{b}"}[$__rate_interval])))
        / on (job) group_left max without (op) (up offset 5m) > bool 1e3 and tollgate:requests:rate5m
        - time() + ${__range_s}"#;
    assert_eq!(
        metric_names(expr),
        [
            "tollgate_upstream_duration_seconds_bucket",
            "up",
            "tollgate:requests:rate5m"
        ]
    );
}

// === traffic and scrape ===

/// `/metrics` of a gateway that has passed, refused, limited and failed a request.
async fn scrape_after_traffic() -> String {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw
        .create_account(json!({ "name": "ops", "rate_limit": { "per_minute": 3 } }))
        .await;
    let (_, key) = gw.create_key(&account, json!({ "name": "k" })).await;
    let client = client();
    let mut statuses = Vec::new();
    // /dead: an upstream where nothing listens (502); then two passes and one over the limit.
    for path in ["/dead/x", "/things", "/things", "/things"] {
        let r = gw.get_with_key(&client, path, &key).await;
        statuses.push(r.status());
    }
    for (path, key) in [
        ("/things", None),
        ("/things", Some("tg_wrong")),
        ("/public/x", None),
    ] {
        let mut request = client.get(gw.proxy_url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        statuses.push(request.send().await.expect("send").status());
    }
    assert_eq!(
        statuses,
        [
            StatusCode::BAD_GATEWAY,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::OK,
        ]
    );
    gw.metrics().await
}

/// Every family (`# TYPE`) and sample name (`_bucket`, `_sum`, `_count` of a histogram) in
/// Prometheus text.
fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        })
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

// === the queries ===

/// Every `expr` of rules.yml and every query of the dashboards, rows' panels included.
fn queries() -> Vec<Query> {
    let mut queries = Vec::new();
    let rules = single_yaml(&repo().join("deploy/prometheus/rules.yml"));
    for rule in all_rules(&rules) {
        let name = rule["alert"].as_str().or(rule["record"].as_str());
        queries.push(Query {
            source: format!("rules.yml {}", name.unwrap_or("?")),
            expr: rule["expr"]
                .as_str()
                .expect("a rule has an expr")
                .to_owned(),
        });
    }
    let dashboards = files_under(&repo().join("deploy/grafana/dashboards"));
    for path in dashboards
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
    {
        let dashboard = json_file(path).expect("dashboard");
        for panel in panels(&dashboard["panels"]) {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    queries.push(Query {
                        source: format!(
                            "dashboard panel {:?}",
                            panel["title"].as_str().unwrap_or("?")
                        ),
                        expr: expr.to_owned(),
                    });
                }
            }
        }
    }
    queries
}

/// The names rules.yml records.
fn recorded_names() -> BTreeSet<String> {
    let rules = single_yaml(&repo().join("deploy/prometheus/rules.yml"));
    all_rules(&rules)
        .filter_map(|rule| rule["record"].as_str().map(str::to_owned))
        .collect()
}

/// The rules of every group.
fn all_rules(rules: &Yaml) -> impl Iterator<Item = &Yaml> {
    rules["groups"]
        .as_sequence()
        .expect("rules.yml has groups")
        .iter()
        .flat_map(|group| group["rules"].as_sequence().into_iter().flatten())
}

/// The panels of a dashboard, each row followed by the panels nested in it.
fn panels(list: &Json) -> Vec<&Json> {
    let mut all = Vec::new();
    for panel in list.as_array().into_iter().flatten() {
        all.push(panel);
        all.extend(panels(&panel["panels"]));
    }
    all
}

/// The metric names a PromQL expression reads, in order: the identifiers that are not
/// functions, aggregations, keywords, label names, numbers, durations or Grafana variables.
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = after_string(&chars, i);
        } else if c == '{' || c == '[' {
            i = after_group(&chars, i);
        } else if c == '$' {
            // $var, ${var}, $__rate_interval
            i += 1;
            if chars.get(i) == Some(&'{') {
                i = after_group(&chars, i);
            }
            while i < chars.len() && is_name(chars[i]) {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if is_name(c) {
            let start = i;
            while i < chars.len() && is_name(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let call = chars.get(next) == Some(&'(');
            if GROUPING.contains(&word.as_str()) {
                if call {
                    i = after_group(&chars, next);
                }
            } else if !call
                && !KEYWORDS.contains(&word.as_str())
                && !["inf", "nan"].contains(&word.to_lowercase().as_str())
            {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The index after the quoted string that starts at `start`.
fn after_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != quote {
        if chars[i] == '\\' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

/// The index after the bracketed group (`(…)`, `{…}`, `[…]`) that opens at `start`; strings
/// inside may hold any bracket.
fn after_group(chars: &[char], start: usize) -> usize {
    let mut depth = 0;
    let mut i = start;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => {
                i = after_string(chars, i);
                continue;
            }
            '(' | '{' | '[' => depth += 1,
            ')' | '}' | ']' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

// === files ===

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn relative(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Every document of a YAML file (Kubernetes files may hold several, split by `---`).
fn yaml_documents(path: &Path) -> Result<Vec<Yaml>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    serde_norway::Deserializer::from_str(&text)
        .map(|document| Yaml::deserialize(document).map_err(|e| e.to_string()))
        .collect()
}

/// A YAML file of one document.
fn single_yaml(path: &Path) -> Yaml {
    let mut documents = yaml_documents(path).unwrap_or_else(|e| panic!("{}: {e}", relative(path)));
    assert_eq!(documents.len(), 1, "{}: one document", relative(path));
    documents.remove(0)
}

fn json_file(path: &Path) -> Result<Json, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

/// The GitHub anchors of a Markdown file's headings: lower case, spaces as `-`, other
/// punctuation dropped.
fn headings(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter(|line| line.starts_with('#'))
        .map(|line| {
            line.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}
