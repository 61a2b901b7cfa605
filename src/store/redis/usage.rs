//! [`Usage`] on Redis: one `ADD_USAGE` script per slot applies a batch exactly once (the
//! writer markers of [`super`]), reads are an index range then one pipeline of `HMGET`s, and
//! pruning walks the owners indexes in chunks.

use std::collections::{BTreeMap, HashSet};

use super::conn::{decode, Batch};
use super::keys::{self, COUNTERS, USAGE};
use super::scripts::{self, eval};
use super::{take, RedisStore, PRUNE_CHUNK};
use crate::store::{
    BatchId, Granularity, StoreError, Usage, UsageCounts, UsageDelta, BATCH_MEMORY,
};

#[async_trait::async_trait]
impl Usage for RedisStore {
    async fn add_usage(&self, id: BatchId, batch: &[UsageDelta]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let (buckets, last_used) = merge_batch(batch);
        let cluster = self.conn.is_cluster();
        // Per slot (one, on a single server): the script's keys and arguments, opened by the
        // writer's marker of that slot and the batch's number.
        let mut slots: BTreeMap<u16, (Vec<String>, Vec<String>)> = BTreeMap::new();
        // Per granularity: bucket index key → its lowest index in this batch.
        let mut owners: [BTreeMap<&str, i64>; 3] = Default::default();
        for ((index_key, index), (tag, g, counts)) in &buckets {
            let slot = if cluster { keys::slot_of(tag) } else { 0 };
            let (script_keys, args) = slots.entry(slot).or_insert_with(|| {
                let marker = keys::usage_writer(script_tag(cluster, slot), id.writer);
                let ttl = BATCH_MEMORY.as_secs();
                (vec![marker], vec![id.seq.to_string(), ttl.to_string()])
            });
            script_keys.push(keys::bucket(index_key, *index));
            script_keys.push(index_key.clone());
            args.push(index.to_string());
            args.push(self.bucket_ttl(*g).unwrap_or(0).to_string());
            args.extend(counter_values(counts).iter().map(i64::to_string));
            let lowest = owners[granularity_slot(*g)]
                .entry(index_key.as_str())
                .or_insert(*index);
            *lowest = (*lowest).min(*index);
        }

        let mut writes = Batch::atomic();
        for (slot, (script_keys, args)) in &slots {
            writes.add(
                script_tag(cluster, *slot),
                eval(scripts::ADD_USAGE, script_keys, args),
            );
        }
        // The usage indexes keep a minimum and a maximum: applying them twice changes nothing,
        // so they need no marker.
        for g in Granularity::ALL {
            let lowest = &owners[granularity_slot(g)];
            if lowest.is_empty() {
                continue;
            }
            let mut zadd = cmd!("ZADD", keys::owners(g), "LT");
            for (owner, index) in lowest {
                zadd.arg(*index).arg(*owner);
            }
            writes.add(USAGE, zadd);
        }
        let mut zadd = cmd!("ZADD", keys::last_used(), "GT");
        for (key_id, ms) in &last_used {
            zadd.arg(*ms).arg(*key_id);
        }
        writes.add(USAGE, zadd);
        self.conn.run(writes).await?;
        Ok(())
    }

    async fn key_usage(
        &self,
        key_id: &str,
        granularity: Granularity,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, UsageCounts)>, StoreError> {
        self.read_buckets(key_id, &keys::key_usage(key_id, granularity), from, to)
            .await
    }

    async fn account_usage(
        &self,
        account_id: &str,
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<(i64, UsageCounts)>, StoreError> {
        self.read_buckets(
            account_id,
            &keys::account_usage(account_id),
            from_day,
            to_day,
        )
        .await
    }

    async fn last_used(&self, key_ids: &[String]) -> Result<Vec<Option<i64>>, StoreError> {
        if key_ids.is_empty() {
            return Ok(Vec::new());
        }
        let scores: Vec<Option<f64>> = self
            .conn
            .query(&cmd!("ZMSCORE", keys::last_used(), key_ids))
            .await?;
        // Milliseconds since the epoch are far below 2^53: exact as doubles.
        Ok(scores.into_iter().map(|s| s.map(|ms| ms as i64)).collect())
    }

    /// Buckets expire twice the retention after their last write, a backstop for pruning.
    fn set_retention(&self, retention: &[(Granularity, std::time::Duration)]) {
        for (granularity, kept) in retention {
            self.set_bucket_ttl(*granularity, Some(*kept * 2));
        }
    }

    async fn prune_usage(&self, granularity: Granularity, before: i64) -> Result<u64, StoreError> {
        let mut done = HashSet::new();
        let mut removed = 0;
        while let Some(n) = self.prune_round(granularity, before, &mut done).await? {
            removed += n;
        }
        Ok(removed)
    }
}

impl RedisStore {
    /// The buckets of one bucket index with `from <= index < to`, ascending.
    async fn read_buckets(
        &self,
        tag: &str,
        index_key: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, UsageCounts)>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let members: Vec<String> = self
            .conn
            .query(&cmd!("ZRANGEBYSCORE", index_key, from, format!("({to}")))
            .await?;
        let mut indexes = Vec::with_capacity(members.len());
        for member in &members {
            let index: i64 = member.parse().map_err(|_| {
                StoreError::Corrupt(format!("bucket index {member:?} in {index_key}"))
            })?;
            // Scores are doubles: keep the exact bounds here.
            if (from..to).contains(&index) {
                indexes.push(index);
            }
        }
        let mut batch = Batch::read();
        for index in &indexes {
            batch.add(
                tag,
                cmd!("HMGET", keys::bucket(index_key, *index), &COUNTERS[..]),
            );
        }
        let values = self.conn.run(batch).await?;
        let mut out = Vec::with_capacity(indexes.len());
        for (index, value) in indexes.into_iter().zip(values) {
            let fields: Vec<Option<u64>> = decode(value)?;
            // A bucket whose TTL ran out before pruning left its index entry behind.
            if fields.iter().all(Option::is_none) {
                continue;
            }
            out.push((index, counts_from(&fields)?));
        }
        out.sort_by_key(|(index, _)| *index);
        Ok(out)
    }

    /// One round of pruning: the owners in `owners_key` scored below `before`, minus those
    /// already done. Returns the buckets removed and whether there was anything to do.
    async fn prune_round(
        &self,
        granularity: Granularity,
        before: i64,
        done: &mut HashSet<String>,
    ) -> Result<Option<u64>, StoreError> {
        let owners_key = keys::owners(granularity);
        let candidates: Vec<String> = self
            .conn
            .query(&cmd!(
                "ZRANGEBYSCORE",
                &owners_key,
                "-inf",
                format!("({before}"),
                "LIMIT",
                0,
                2 * PRUNE_CHUNK
            ))
            .await?;
        let owners: Vec<(String, String)> = candidates
            .into_iter()
            .filter(|owner| !done.contains(owner))
            .take(PRUNE_CHUNK)
            .filter_map(|owner| keys::tag_of(&owner).map(str::to_owned).map(|t| (owner, t)))
            .collect();
        if owners.is_empty() {
            return Ok(None);
        }

        let mut batch = Batch::read();
        for (owner, tag) in &owners {
            batch.add(
                tag,
                cmd!("ZRANGEBYSCORE", owner, "-inf", format!("({before}")),
            );
        }
        let old_lists = self.conn.run(batch).await?;

        let mut batch = Batch::atomic();
        let mut removals = Vec::new();
        let mut firsts = Vec::with_capacity(owners.len());
        for ((owner, tag), old) in owners.iter().zip(old_lists) {
            let old: Vec<String> = decode(old)?;
            if !old.is_empty() {
                let buckets: Vec<String> = old.iter().map(|i| format!("{owner}:{i}")).collect();
                batch.add(tag, cmd!("DEL", buckets));
                removals.push(batch.add(tag, cmd!("ZREM", owner, &old)));
            }
            firsts.push(batch.add(tag, cmd!("ZRANGE", owner, 0, 0, "WITHSCORES")));
        }
        let mut values = self.conn.run(batch).await?;
        let mut removed = 0u64;
        for position in removals {
            removed += decode::<u64>(take(&mut values, position))?;
        }

        let mut batch = Batch::atomic();
        for ((owner, _), position) in owners.iter().zip(firsts) {
            let first: Vec<(String, f64)> = decode(take(&mut values, position))?;
            match first.first() {
                Some((_, lowest)) => batch.add(USAGE, cmd!("ZADD", &owners_key, *lowest, owner)),
                None => batch.add(USAGE, cmd!("ZREM", &owners_key, owner)),
            };
            done.insert(owner.clone());
        }
        self.conn.run(batch).await?;
        Ok(Some(removed))
    }
}

pub(super) fn granularity_slot(granularity: Granularity) -> usize {
    match granularity {
        Granularity::Minute => 0,
        Granularity::Hour => 1,
        Granularity::Day => 2,
    }
}

/// A batch's counts merged per bucket — (bucket index key, index) → (hash tag, granularity,
/// counts) — and each key's latest use.
type MergedBatch<'a> = (
    BTreeMap<(String, i64), (String, Granularity, UsageCounts)>,
    BTreeMap<&'a str, i64>,
);

/// Merges a batch: one script argument per counter per distinct bucket.
fn merge_batch(batch: &[UsageDelta]) -> MergedBatch<'_> {
    let mut buckets: BTreeMap<(String, i64), (String, Granularity, UsageCounts)> = BTreeMap::new();
    let mut last_used: BTreeMap<&str, i64> = BTreeMap::new();
    for delta in batch {
        for g in Granularity::ALL {
            let index = g.of_minute(delta.minute);
            let bucket = buckets
                .entry((keys::key_usage(&delta.key_id, g), index))
                .or_insert_with(|| (delta.key_id.to_string(), g, UsageCounts::default()));
            bucket.2.merge(&delta.counts);
        }
        let day = Granularity::Day.of_minute(delta.minute);
        let bucket = buckets
            .entry((keys::account_usage(&delta.account_id), day))
            .or_insert_with(|| {
                (
                    delta.account_id.to_string(),
                    Granularity::Day,
                    UsageCounts::default(),
                )
            });
        bucket.2.merge(&delta.counts);
        let seen = last_used.entry(&*delta.key_id).or_insert(i64::MIN);
        *seen = (*seen).max(delta.last_used_ms);
    }
    (buckets, last_used)
}

/// The tag of a usage script's slot: a tag of that very slot on a cluster; on a single server,
/// where one script takes the whole batch, the usage indexes' tag.
fn script_tag(cluster: bool, slot: u16) -> &'static str {
    if cluster {
        keys::slot_tag(slot)
    } else {
        USAGE
    }
}

/// Counters as Redis integers (signed 64-bit), saturating.
fn counter_values(counts: &UsageCounts) -> [i64; 6] {
    counts
        .to_array()
        .map(|n| i64::try_from(n).unwrap_or(i64::MAX))
}

fn counts_from(fields: &[Option<u64>]) -> Result<UsageCounts, StoreError> {
    let fields: &[Option<u64>; 6] = fields.try_into().map_err(|_| {
        StoreError::Corrupt(format!(
            "usage bucket: expected 6 counters, found {}",
            fields.len()
        ))
    })?;
    Ok(UsageCounts::from_array(fields.map(|f| f.unwrap_or(0))))
}
