//! The Lua scripts: each is one atomic check-then-write on keys of one cluster slot (of one hash
//! tag, but for `ADD_USAGE`, which takes every usage key of its slot), with every key it touches
//! passed in `KEYS`. They are sent with `EVAL` (Redis caches the
//! compiled script by its digest), so that a script may sit inside a pipeline or a `MULTI` without
//! the `NOSCRIPT` failure an `EVALSHA` meets after a restart or failover.

use ::redis::{Cmd, ToRedisArgs};

/// Lua, run first by the scripts that check a key name: re-keys an account's names written
/// before names were unique ignoring ASCII case (under the name as given) by `string.lower`, once
/// per account; the field `""` (never a key name) records that it is done. Where two names
/// differed only in case, the first that `HGETALL` lists keeps the entry.
const FOLD_NAMES: &str = r#"
local function fold_names(names)
  if redis.call('HEXISTS', names, '') == 1 then return end
  local all = redis.call('HGETALL', names)
  for i = 1, #all, 2 do
    local folded = string.lower(all[i])
    if folded ~= all[i] then
      redis.call('HDEL', names, all[i])
      redis.call('HSETNX', names, folded, all[i + 1])
    end
  end
  redis.call('HSET', names, '', 'folded')
end
"#;

/// Creates a key if its name is free in the account (ignoring ASCII case: the account's names
/// are keyed by `string.lower`, as `store::key_name_index` does) and its id (and, when `KEYS[4]`
/// is given, its hash) is not taken.
///
/// `KEYS`: key record, the account's key ids, the account's names, [hash index].
/// `ARGV`: key id, name, key JSON, hash (hex), hash index value.
/// Returns `ok`, `name_taken` or `exists`.
pub(super) fn create_key() -> String {
    format!("{FOLD_NAMES}{CREATE_KEY}")
}

const CREATE_KEY: &str = r#"
fold_names(KEYS[3])
local folded = string.lower(ARGV[2])
if redis.call('HEXISTS', KEYS[3], folded) == 1 then return 'name_taken' end
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
if KEYS[4] and redis.call('EXISTS', KEYS[4]) == 1 then return 'exists' end
redis.call('HSET', KEYS[1], 'json', ARGV[3], 'name', ARGV[2], 'hash', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], folded, ARGV[1])
if KEYS[4] then redis.call('SET', KEYS[4], ARGV[5]) end
return 'ok'
"#;

/// Creates all of a batch of one account's keys or none: every entry's name (ignoring ASCII
/// case), id and (with stride 2) hash is checked, against the store and the entries before it,
/// before anything is written.
///
/// `KEYS`: the account's key ids, the account's names, then per key its record and, with stride
/// 2 (a single server), its hash index. `ARGV`: the stride, then per key: key id, name, key JSON,
/// hash (hex), hash index value. Returns `{ok}`, or `{name_taken, i}` / `{exists, i}` for the
/// first entry refused (`i` from 1).
pub(super) fn create_keys() -> String {
    format!("{FOLD_NAMES}{CREATE_KEYS}")
}

const CREATE_KEYS: &str = r#"
fold_names(KEYS[2])
local stride = tonumber(ARGV[1])
local n = (#ARGV - 1) / 5
local names, ids, hashes = {}, {}, {}
for i = 1, n do
  local a, k = 1 + (i - 1) * 5, 2 + (i - 1) * stride
  local folded = string.lower(ARGV[a + 2])
  if names[folded] or redis.call('HEXISTS', KEYS[2], folded) == 1 then
    return {'name_taken', tostring(i)}
  end
  if ids[ARGV[a + 1]] or hashes[ARGV[a + 4]] or redis.call('EXISTS', KEYS[k + 1]) == 1 then
    return {'exists', tostring(i)}
  end
  if stride == 2 and redis.call('EXISTS', KEYS[k + 2]) == 1 then return {'exists', tostring(i)} end
  names[folded], ids[ARGV[a + 1]], hashes[ARGV[a + 4]] = true, true, true
end
for i = 1, n do
  local a, k = 1 + (i - 1) * 5, 2 + (i - 1) * stride
  redis.call('HSET', KEYS[k + 1], 'json', ARGV[a + 3], 'name', ARGV[a + 2], 'hash', ARGV[a + 4])
  redis.call('SADD', KEYS[1], ARGV[a + 1])
  redis.call('HSET', KEYS[2], string.lower(ARGV[a + 2]), ARGV[a + 1])
  if stride == 2 then redis.call('SET', KEYS[k + 2], ARGV[a + 5]) end
end
return {'ok'}
"#;

/// Replaces a key record, moving its name in the account's names (keyed ignoring ASCII case; a
/// key may change the case of its own name).
///
/// `KEYS`: key record, the account's names. `ARGV`: key id, name, key JSON, hash (hex).
/// Returns `{ok}`, `{not_found}`, `{name_taken}`, or `{hash, stored hash}` when the record's
/// hash is not the one given (the caller keeps the stored one, which the hash index points at).
pub(super) fn update_key() -> String {
    format!("{FOLD_NAMES}{UPDATE_KEY}")
}

const UPDATE_KEY: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'name', 'hash')
if not cur[1] then return {'not_found'} end
if cur[2] ~= ARGV[4] then return {'hash', cur[2]} end
if cur[1] ~= ARGV[2] then
  fold_names(KEYS[2])
  local folded = string.lower(ARGV[2])
  local owner = redis.call('HGET', KEYS[2], folded)
  if owner and owner ~= ARGV[1] then return {'name_taken'} end
  local old = string.lower(cur[1])
  if redis.call('HGET', KEYS[2], old) == ARGV[1] then redis.call('HDEL', KEYS[2], old) end
  redis.call('HSET', KEYS[2], folded, ARGV[1])
end
redis.call('HSET', KEYS[1], 'json', ARGV[3], 'name', ARGV[2])
return {'ok'}
"#;

/// Deletes a key record with its name and its place in the account's key ids.
///
/// `KEYS`: key record, the account's names, the account's key ids. `ARGV`: key id.
/// Returns the deleted key's JSON, or nil.
pub(super) const DELETE_KEY: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'json', 'name')
if not cur[1] then return false end
redis.call('DEL', KEYS[1])
if cur[2] then
  -- The entry under the folded name, or an older one under the name as given.
  for _, name in ipairs({string.lower(cur[2]), cur[2]}) do
    if redis.call('HGET', KEYS[2], name) == ARGV[1] then redis.call('HDEL', KEYS[2], name) end
  end
end
redis.call('SREM', KEYS[3], ARGV[1])
return cur[1]
"#;

/// Deletes an account with its keys and sites, if its key ids are still exactly the ones the
/// caller read (their records must be in `KEYS`); its audit log and usage stay, as history.
///
/// `KEYS`: account, key ids, names, sites, site names, then one key record per key id.
/// `ARGV`: the key ids, in the order of their records in `KEYS`.
/// Returns `{ok, key JSON…}`, `{not_found}` or `{changed}` (read the key ids again and retry).
pub(super) const DELETE_ACCOUNT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_found'} end
if redis.call('SCARD', KEYS[2]) ~= #ARGV then return {'changed'} end
for i = 1, #ARGV do
  if redis.call('SISMEMBER', KEYS[2], ARGV[i]) == 0 then return {'changed'} end
end
local out = {'ok'}
for i = 6, #KEYS do
  local json = redis.call('HGET', KEYS[i], 'json')
  if json then out[#out + 1] = json end
end
for i = 1, #KEYS do redis.call('DEL', KEYS[i]) end
return out
"#;

/// Adds a site if neither its id nor its name (origin) is taken in the account.
///
/// `KEYS`: sites, site names. `ARGV`: site id, name, site JSON. Returns 1, or 0 if taken.
pub(super) const CREATE_SITE: &str = r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
return 1
"#;

/// Deletes a site and frees its name.
///
/// `KEYS`: sites, site names. `ARGV`: site id. Returns 1, or 0 if there was none.
pub(super) const DELETE_SITE: &str = r#"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
local names = redis.call('HGETALL', KEYS[2])
for i = 1, #names, 2 do
  if names[i + 1] == ARGV[1] then redis.call('HDEL', KEYS[2], names[i]) end
end
return 1
"#;

/// Deletes a key only if it still holds the given value (a hash index entry that still points
/// at the key being removed, or a claim being undone).
///
/// `KEYS`: the key. `ARGV`: the value. Returns 1 if deleted, else 0.
pub(super) const DELETE_IF_EQUAL: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Replaces a value only if it is still the one read (compare-and-set): `''` stands for no value,
/// as old value (it must still be absent) and as new one (the key is deleted).
///
/// `KEYS`: the key. `ARGV`: the value read, the new value. Returns 1 if replaced, else 0.
pub(super) const SET_IF_EQUAL: &str = r#"
local now = redis.call('GET', KEYS[1]) or ''
if now ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2]) end
return 1
"#;

/// Appends an audit entry as the next link of its account's chain, if the chain's head is still
/// the one the entry was linked to; on a single server also to the all-accounts list.
///
/// `KEYS`: the account's audit list, its chain head, [the all-accounts audit list].
/// `ARGV`: the head the entry was linked to (`''` for none), entry JSON, the new head.
/// Returns `{ok}`, or `{moved, head now}` (`''` for none): link the entry again and retry.
pub(super) const APPEND_AUDIT: &str = r#"
local cur = redis.call('GET', KEYS[2]) or ''
if cur ~= ARGV[1] then return {'moved', cur} end
redis.call('LPUSH', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3])
if KEYS[3] then redis.call('LPUSH', KEYS[3], ARGV[2]) end
return {'ok'}
"#;

/// Takes tokens from shared window counters without letting any pass its limit.
///
/// `KEYS`: one counter per window. `ARGV`: per window, `limit`, `want`, `ttl` (seconds).
/// Returns per window the tokens granted and the counter after the take.
pub(super) const TAKE_TOKENS: &str = r#"
local out = {}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[3 * i - 2])
  local want = tonumber(ARGV[3 * i - 1])
  local cur = tonumber(redis.call('GET', KEYS[i]) or '0')
  local grant = math.max(0, math.min(want, limit - cur))
  if grant > 0 then
    cur = redis.call('INCRBY', KEYS[i], grant)
    if cur == grant then redis.call('EXPIRE', KEYS[i], tonumber(ARGV[3 * i])) end
  end
  out[#out + 1] = grant
  out[#out + 1] = cur
end
return out
"#;

/// Adds one usage batch's counts to the buckets of one cluster slot (the whole batch on a single
/// server), once per batch: if the writer's marker already holds this batch's number or a later
/// one, the batch was applied before (its answer was lost) and nothing changes. Marker and
/// counts change in one script, so they cannot part.
///
/// `KEYS`: the writer's marker, then per bucket its hash and its index (sorted set).
/// `ARGV`: the batch's number, the marker's TTL (seconds), then per bucket its index, its TTL
/// (seconds, `0` for none) and the six counters (`requests success error rate_limited bytes_in
/// bytes_out`). Returns 1 when applied, 0 when it had been already.
pub(super) const ADD_USAGE: &str = r#"
local last = redis.call('GET', KEYS[1])
if last and tonumber(last) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local fields = {'requests', 'success', 'error', 'rate_limited', 'bytes_in', 'bytes_out'}
for b = 1, (#KEYS - 1) / 2 do
  local bucket, index_key, a = KEYS[2 * b], KEYS[2 * b + 1], 2 + 8 * (b - 1)
  local wrote = false
  for f = 1, 6 do
    if ARGV[a + 2 + f] ~= '0' then
      redis.call('HINCRBY', bucket, fields[f], ARGV[a + 2 + f])
      wrote = true
    end
  end
  if not wrote then redis.call('HINCRBY', bucket, 'bytes_out', 0) end
  redis.call('ZADD', index_key, ARGV[a + 1], ARGV[a + 1])
  if ARGV[a + 2] ~= '0' then
    redis.call('EXPIRE', bucket, ARGV[a + 2])
    redis.call('EXPIRE', index_key, ARGV[a + 2])
  end
end
return 1
"#;

/// `EVAL script numkeys keys… args…`.
pub(super) fn eval<K: ToRedisArgs, A: ToRedisArgs>(script: &str, keys: &[K], args: &[A]) -> Cmd {
    let mut cmd = ::redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len());
    for key in keys {
        cmd.arg(key);
    }
    for arg in args {
        cmd.arg(arg);
    }
    cmd
}
