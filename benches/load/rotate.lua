-- wrk script used for every contender of benches/load/run.sh, so that all of them get the same
-- wrk command and the same generator work per request.
--
--   KEYS_FILE   file with one API key per line; request i carries key (i mod n) in X-API-Key.
--               An empty or missing file sends no key header.
--   KEY_OFFSET  where in the file to start (run.sh passes the number of requests already sent to
--               this contender, so warm-up and rounds form one continuous rotation).
--   CONNECTION_CLOSE  1: every request asks to close its connection (new-connection runs)
--   STAT_FILE   where to append the cpu0/cpu1 lines of /proc/stat at the start and the end of
--               the measured window (after init, which may take a second for 1M keys) and the
--               run's summary.
--
-- The requests are formatted once in init(), so the per-request Lua work is one table read and
-- does not grow with the number of keys.

local reqs = {}
local n = 0
local i = 0

local function cpu_lines(tag)
  local f = io.open("/proc/stat", "r")
  if not f then return "" end
  local out = {}
  for line in f:lines() do
    if line:match("^cpu[01] ") then
      out[#out + 1] = tag .. " " .. line
    end
  end
  f:close()
  return table.concat(out, "\n") .. "\n"
end

local function append(text)
  local path = os.getenv("STAT_FILE")
  if not path or path == "" then return end
  local f = io.open(path, "a")
  if f then f:write(text); f:close() end
end

init = function(args)
  local path = os.getenv("KEYS_FILE")
  local f = path and path ~= "" and io.open(path, "r") or nil
  if f then
    for key in f:lines() do
      if key ~= "" then
        n = n + 1
        local headers = { ["X-API-Key"] = key }
        -- CONNECTION_CLOSE=1: every request on a new connection (the TLS handshake runs).
        if os.getenv("CONNECTION_CLOSE") == "1" then headers["Connection"] = "close" end
        reqs[n] = wrk.format("GET", "/", headers)
      end
    end
    f:close()
  end
  if n == 0 then
    n = 1
    reqs[1] = wrk.format("GET", "/")
  end
  i = (tonumber(os.getenv("KEY_OFFSET") or "0") or 0) % n
  append(cpu_lines("before"))
end

request = function()
  i = i + 1
  if i > n then i = 1 end
  return reqs[i]
end

done = function(summary, latency, requests)
  local e = summary.errors
  append(cpu_lines("after"))
  append(string.format(
    "result requests=%d duration_us=%d p50_us=%d p99_us=%d status_errors=%d socket_errors=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
