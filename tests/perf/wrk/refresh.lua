-- Chains refresh-token grants: each refresh token is usable once, and each answer holds the next.
--
--   wrk ... -s refresh.lua URL -- TOKENS threads=N [path=/api/v1/auth/token]
--
-- TOKENS: one refresh token a line (tests/perf/wrk.py write_tokens). threads=N (run_wrk adds it)
-- must be wrk's -t: thread i of N takes tokens i, i+N, i+2N, ... into its own queue.
-- request() takes the queue's first token and sends
--   POST <path>, Content-Type: application/x-www-form-urlencoded,
--   grant_type=refresh_token&refresh_token=<token>
-- response() puts the answer's "refresh_token" at the queue's end. wrk asks a connection for its
-- next request only once the previous answer on it was handled, so with at least as many tokens
-- per thread as connections per thread the queue never runs dry; should it, the request goes out
-- with a token the server cannot know (so it fails) and is counted in `exhausted`.
-- Every answer other than 200 is counted per status in `unexpected`, and a 200 without a
-- refresh_token under "200-without-refresh-token" (the chain breaks there).
-- done() prints one line: WRK_JSON {...}, which run_wrk parses.

local common = dofile((debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "") .. "common.lua")

local threads = {} -- main state: every thread, in setup order

function setup(thread)
   threads[#threads + 1] = thread
   thread:set("tid", #threads)
end

-- Thread state. Globals, so that done() can read them with thread:get().
sent = 0 -- requests handed to wrk
exhausted = 0 -- requests sent while the queue was empty
lines = 0 -- tokens of this thread's slice
unexpected_seen = "" -- the keys counted in unexpected_<key>, comma-separated

local queue = {}
local head, tail = 1, 0 -- queue[head..tail] are the tokens not used yet
local prefix -- the request up to Content-Length's value
-- wrk calls request() once on the first thread to check the request's syntax, and never sends that
-- one: the first call of thread 1 therefore takes no token.
local checking = false

local function count_unexpected(key)
   local name = "unexpected_" .. key
   local count = _G[name]
   if count == nil then
      unexpected_seen = unexpected_seen .. key .. ","
      count = 0
   end
   _G[name] = count + 1
end

function init(args)
   local file = args[1] or error("refresh.lua: no token file given")
   local opts = common.options("refresh.lua", args, { threads = true, path = true })
   local nthreads = tonumber(opts.threads) or error("refresh.lua: option threads=N missing")
   local path = opts.path or "/api/v1/auth/token"
   checking = tid == 1

   local index = common.each_line_of_thread("refresh.lua", file, nthreads, tid, function(line)
      tail = tail + 1
      queue[tail] = line
   end)
   lines = tail
   if lines == 0 then
      error("refresh.lua: " .. file .. " has " .. index .. " tokens, none for thread " .. tid .. " of " .. nthreads)
   end
   prefix = "POST " .. path .. " HTTP/1.1\r\n"
      .. "Host: " .. wrk.headers["Host"] .. "\r\n"
      .. "Content-Type: application/x-www-form-urlencoded\r\n"
      .. "Content-Length: "
end

local function grant(token)
   local body = "grant_type=refresh_token&refresh_token=" .. common.form_escape(token)
   return prefix .. #body .. "\r\n\r\n" .. body
end

function request()
   if checking then
      checking = false
      return grant(queue[head] or "check")
   end
   sent = sent + 1
   local token = queue[head]
   if token == nil then
      exhausted = exhausted + 1
      return grant("wrk-refresh-queue-ran-dry")
   end
   queue[head] = nil
   head = head + 1
   return grant(token)
end

function response(status, headers, body)
   if status ~= 200 then
      count_unexpected(status)
      return
   end
   local token = body:match('"refresh_token"%s*:%s*"([^"]+)"')
   if token == nil then
      count_unexpected("200-without-refresh-token")
      return
   end
   tail = tail + 1
   queue[tail] = (token:gsub("\\/", "/"))
end

function done(summary, latency, requests)
   common.report(threads, summary, latency, { script = "refresh", mode = "chain", expect = 200 })
end
