-- Sends a mix file written by tests/perf/mix.py (write_mix): each line is KIND <TAB> EXPECT <TAB>
-- then a request line of tests/perf/wrk.py (tab-separated percent-encoded fields).
--
--   wrk ... -s mix.lua URL -- FILE threads=N [tokens=REFRESH_TOKENS]
--
-- threads=N (run_wrk adds it) must be wrk's -t: thread i of N sends only lines i, i+N, i+2N, ...,
-- in order, each at most once; past the end it starts again, and every such request is counted in
-- `exhausted` (a reuse the benchmark must report).
-- A line of kind `refresh` is sent as a refresh grant to its path with a token of the thread's
-- queue: the tokens file (one a line, thread i takes tokens i, i+N, ...) starts it, and every answer
-- holding a "refresh_token" (a refresh's, a signup's) adds that token at its end. Should the queue
-- be empty, the grant goes out with a token the server cannot know and counts in `exhausted`.
-- Every answer's status is counted (`statuses`); one that no line of the file expects is also
-- counted in `unexpected`. The requests sent of each kind are counted (`kinds`).
-- done() prints one line: WRK_JSON {...}, which run_wrk parses.

local common = dofile((debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "") .. "common.lua")

local threads = {} -- main state: every thread, in setup order

function setup(thread)
   threads[#threads + 1] = thread
   thread:set("tid", #threads)
end

-- Thread state. Globals, so that done() can read them with thread:get().
sent = 0 -- requests handed to wrk
exhausted = 0 -- requests sent after this thread's lines ran out, or refreshes without a token
lines = 0 -- lines of this thread's slice
unexpected_seen = "" -- the statuses counted in unexpected_<status>, comma-separated
statuses_seen = "" -- the statuses counted in status_<status>, comma-separated
kinds_seen = "" -- the kinds counted in kind_<kind>, comma-separated

local kinds = {} -- line -> kind
local reqs = {} -- line -> the request, or the path of a refresh
local expected = {} -- status -> true, for every status some line expects
local queue = {}
local head, tail = 1, 0
local nextreq = 1
local host
-- wrk calls request() once on the first thread to check the request's syntax, and never sends that
-- one: the first call of thread 1 therefore takes no line.
local checking = false

local function count(prefix, seen, key)
   local name = prefix .. key
   local value = _G[name]
   if value == nil then
      _G[seen] = _G[seen] .. key .. ","
      value = 0
   end
   _G[name] = value + 1
end

local function build(line, number)
   local f = common.split(line)
   local method, path, headers, body = common.request(f, 3)
   if not method then
      error("mix.lua: line " .. number .. " has " .. #f .. " fields, wanted kind, expect, method, path, body, headers")
   end
   local kind, expect = f[1], tonumber(f[2])
   if not kind:match("^[%w%-]+$") or not expect then
      error("mix.lua: line " .. number .. " has no kind and expected status")
   end
   expected[expect] = true
   if kind == "refresh" then
      return kind, path
   end
   return kind, wrk.format(method, path, headers, body)
end

local function grant(path, token)
   local body = "grant_type=refresh_token&refresh_token=" .. common.form_escape(token)
   return "POST " .. path .. " HTTP/1.1\r\n"
      .. "Host: " .. host .. "\r\n"
      .. "Content-Type: application/x-www-form-urlencoded\r\n"
      .. "Content-Length: " .. #body .. "\r\n\r\n" .. body
end

function init(args)
   local file = args[1] or error("mix.lua: no mix file given")
   local opts = common.options("mix.lua", args, { threads = true, tokens = true })
   local nthreads = tonumber(opts.threads) or error("mix.lua: option threads=N missing")
   checking = tid == 1
   host = wrk.headers["Host"]

   local index = common.each_line_of_thread("mix.lua", file, nthreads, tid, function(line, number)
      local kind, req = build(line, number)
      kinds[#kinds + 1] = kind
      reqs[#reqs + 1] = req
   end)
   lines = #reqs
   if lines == 0 then
      error("mix.lua: " .. file .. " has " .. index .. " lines, none for thread " .. tid .. " of " .. nthreads)
   end
   if opts.tokens then
      common.each_line_of_thread("mix.lua", opts.tokens, nthreads, tid, function(line)
         tail = tail + 1
         queue[tail] = line
      end)
   end
end

local function take(path)
   local token = queue[head]
   if token == nil then
      exhausted = exhausted + 1
      return grant(path, "wrk-mix-refresh-queue-ran-dry")
   end
   queue[head] = nil
   head = head + 1
   return grant(path, token)
end

function request()
   local n = nextreq
   if checking then
      checking = false
      if kinds[n] == "refresh" then
         return grant(reqs[n], "check")
      end
      return reqs[n]
   end
   sent = sent + 1
   if sent > lines then
      exhausted = exhausted + 1
   end
   nextreq = nextreq + 1
   if nextreq > lines then
      nextreq = 1
   end
   count("kind_", "kinds_seen", kinds[n])
   if kinds[n] == "refresh" then
      return take(reqs[n])
   end
   return reqs[n]
end

function response(status, headers, body)
   count("status_", "statuses_seen", status)
   if not expected[status] then
      count("unexpected_", "unexpected_seen", status)
   end
   if body and body:find('"refresh_token"', 1, true) then
      local token = body:match('"refresh_token"%s*:%s*"([^"]+)"')
      if token then
         tail = tail + 1
         queue[tail] = (token:gsub("\\/", "/"))
      end
   end
end

local function tally(prefix, seen)
   local totals = {}
   for _, thread in ipairs(threads) do
      for key in thread:get(seen):gmatch("[^,]+") do
         totals[key] = (totals[key] or 0) + thread:get(prefix .. key)
      end
   end
   return totals
end

function done(summary, latency, requests)
   common.report(threads, summary, latency, {
      script = "mix",
      mode = "once",
      kinds = tally("kind_", "kinds_seen"),
      statuses = tally("status_", "statuses_seen"),
   })
end
