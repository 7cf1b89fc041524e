-- Sends the requests of a request file written by tests/perf/wrk.py (write_requests; the format is
-- documented there: one request a line, tab-separated percent-encoded fields).
--
--   wrk ... -s requests.lua URL -- FILE threads=N [mode=cycle|once] [expect=STATUS]
--
-- threads=N (run_wrk adds it) must be wrk's -t: thread i of N sends only lines i, i+N, i+2N, ...
-- mode=cycle (default): each thread sends its lines round robin, from a random start.
-- mode=once: each thread sends each of its lines at most once; past the end it starts again, and
--   every such request is counted in `exhausted` (a reuse the benchmark must report).
-- expect=STATUS: every answer with another status is counted, per status. Only then is
--   response() defined: without it wrk neither keeps headers nor bodies, which saves its CPU.
-- done() prints one line: WRK_JSON {...}, which run_wrk parses.

local common = dofile((debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "") .. "common.lua")

local threads = {} -- main state: every thread, in setup order

function setup(thread)
   threads[#threads + 1] = thread
   thread:set("tid", #threads)
end

local function build(line, number)
   local f = common.split(line)
   local method, path, headers, body = common.request(f, 1)
   if not method then
      error("requests.lua: line " .. number .. " has " .. #f .. " fields, wanted method, path, body, headers")
   end
   return wrk.format(method, path, headers, body)
end

-- Thread state. Globals, so that done() can read them with thread:get().
sent = 0 -- requests handed to wrk
exhausted = 0 -- in once mode: requests sent after this thread's lines ran out
lines = 0 -- lines of this thread's slice
unexpected_seen = "" -- the statuses counted in unexpected_<status>, comma-separated
mode = "cycle"
expect = nil -- the expected status, if given

local reqs = {}
local nextreq = 1
local once = false
-- wrk calls request() once on the first thread to check the request's syntax, and never sends that
-- one: the first call of thread 1 therefore takes no line.
local checking = false

function init(args)
   local file = args[1] or error("requests.lua: no request file given")
   local opts = common.options("requests.lua", args, { threads = true, mode = true, expect = true })
   local nthreads = tonumber(opts.threads) or error("requests.lua: option threads=N missing")
   mode = opts.mode or "cycle"
   if mode ~= "cycle" and mode ~= "once" then
      error("requests.lua: mode must be cycle or once, not " .. mode)
   end
   once = mode == "once"
   checking = tid == 1

   local index = common.each_line_of_thread("requests.lua", file, nthreads, tid, function(line, index)
      reqs[#reqs + 1] = build(line, index)
   end)
   lines = #reqs
   if lines == 0 then
      error("requests.lua: " .. file .. " has " .. index .. " requests, none for thread " .. tid .. " of " .. nthreads)
   end
   if not once then
      math.randomseed(os.time() * 1000 + tid)
      nextreq = math.random(lines)
   end

   if opts.expect then
      expect = tonumber(opts.expect) or error("requests.lua: expect must be a status, not " .. opts.expect)
      local wanted = expect
      response = function(status, headers, body)
         if status ~= wanted then
            local key = "unexpected_" .. status
            local count = _G[key]
            if count == nil then
               unexpected_seen = unexpected_seen .. status .. ","
               count = 0
            end
            _G[key] = count + 1
         end
      end
   end
end

function request()
   local req = reqs[nextreq]
   if checking then
      checking = false
      return req
   end
   sent = sent + 1
   if once and sent > lines then
      exhausted = exhausted + 1
   end
   nextreq = nextreq + 1
   if nextreq > lines then
      nextreq = 1
   end
   return req
end

function done(summary, latency, requests)
   common.report(threads, summary, latency, {
      script = "requests",
      mode = threads[1]:get("mode"),
      expect = threads[1]:get("expect"),
   })
end
