//! `tollgate usage KEY_ID`: a key's usage buckets (`GET …/keys/{id}/usage`) as a table, or as a
//! small text chart with `--chart`, or as the API's JSON.

use serde_json::Value;

use super::admin_client::AdminClient;
use super::keys::KeysPath;
use super::table::{self, Table};
use super::{print_json, Failure, UsageArgs};

/// Widest bar of the chart, in characters.
const BAR_WIDTH: usize = 40;

/// Fetches and prints one key's usage.
pub(super) async fn run(
    client: &AdminClient,
    account: Option<&str>,
    args: UsageArgs,
    json: bool,
) -> Result<(), Failure> {
    let keys = KeysPath::resolve(client, account).await?;
    let mut query: Vec<(&str, &str)> = vec![("interval", args.interval.as_str())];
    if let Some(from) = &args.from {
        query.push(("from", from));
    }
    if let Some(to) = &args.to {
        query.push(("to", to));
    }
    let answer = client
        .get_query(&keys.at(&[&args.key_id, "usage"]), &query)
        .await?;
    if json {
        print_json(&answer);
        return Ok(());
    }
    let buckets = answer["buckets"].as_array().map_or(&[][..], Vec::as_slice);
    if args.chart {
        print!("{}", chart(buckets));
    } else {
        print!("{}", usage_table(buckets));
    }
    Ok(())
}

fn count(bucket: &Value, field: &str) -> u64 {
    bucket[field].as_u64().unwrap_or(0)
}

fn usage_table(buckets: &[Value]) -> Table {
    let mut t = Table::new(&[
        "BUCKET",
        "REQUESTS",
        "SUCCESS",
        "ERRORS",
        "RATE_LIMITED",
        "BYTES_IN",
        "BYTES_OUT",
    ]);
    for b in buckets {
        t.row(vec![
            table::text(&b["bucket"]),
            count(b, "request_count").to_string(),
            count(b, "success_count").to_string(),
            count(b, "error_count").to_string(),
            count(b, "rate_limited_count").to_string(),
            count(b, "bytes_in").to_string(),
            count(b, "bytes_out").to_string(),
        ]);
    }
    t
}

/// One line per bucket: its start, a bar scaled to the busiest bucket, and the count.
fn chart(buckets: &[Value]) -> String {
    let max = buckets
        .iter()
        .map(|b| count(b, "request_count"))
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for b in buckets {
        let n = count(b, "request_count");
        let width = if max == 0 {
            0
        } else {
            ((n * BAR_WIDTH as u64).div_ceil(max)) as usize
        };
        out.push_str(&format!(
            "{}  {:<BAR_WIDTH$}  {n}\n",
            table::text(&b["bucket"]),
            "█".repeat(width)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_chart_scales_bars_to_the_busiest_bucket() {
        let buckets = vec![
            json!({ "bucket": "2026-01-01T00:00:00Z", "request_count": 10 }),
            json!({ "bucket": "2026-01-02T00:00:00Z", "request_count": 0 }),
            json!({ "bucket": "2026-01-03T00:00:00Z", "request_count": 5 }),
        ];
        let lines: Vec<String> = chart(&buckets).lines().map(str::to_owned).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].matches('█').count(), 40);
        assert_eq!(lines[1].matches('█').count(), 0);
        assert_eq!(lines[2].matches('█').count(), 20);
        assert!(lines[2].ends_with(" 5"));
    }
}
