-- wrk script for benchmarks/service_load.py: replays a seeded sequence of request bodies.
-- Arguments (after `--`): path, content type, bodies file, offsets file ("start length" per
-- line), order file (one body number per line, 0-based). Each thread starts at its own place in
-- the sequence. Prints one line "RESULT {json}" with requests by status and latency percentiles.

local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  path, ctype = args[1], args[2]
  local file = assert(io.open(args[3], "rb"))
  local data = file:read("*a")
  file:close()
  bodies = {}
  for line in io.lines(args[4]) do
    local start, length = line:match("(%d+) (%d+)")
    start, length = tonumber(start), tonumber(length)
    table.insert(bodies, data:sub(start + 1, start + length))
  end
  order = {}
  for line in io.lines(args[5]) do
    table.insert(order, tonumber(line) + 1)
  end
  headers = { ["Content-Type"] = ctype }
  counter = id * 7919
  ok, shed, other = 0, 0, 0
end

function request()
  counter = counter + 1
  return wrk.format("POST", path, headers, bodies[order[(counter % #order) + 1]])
end

function response(status, response_headers, body)
  if status == 200 then
    ok = ok + 1
  elseif status == 503 then
    shed = shed + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local total_ok, total_shed, total_other = 0, 0, 0
  for _, thread in ipairs(threads) do
    total_ok = total_ok + thread:get("ok")
    total_shed = total_shed + thread:get("shed")
    total_other = total_other + thread:get("other")
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "ok": %d, "shed": %d, "other_status": %d, "connect": %d, ' ..
    '"read": %d, "write": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "duration_us": %d}\n',
    summary.requests, total_ok, total_shed, total_other, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), summary.duration))
end
