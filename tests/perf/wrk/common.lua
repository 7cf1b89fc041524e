-- What requests.lua, mix.lua and refresh.lua share: options, reading a request line, a thread's slice
-- of a file, and the one WRK_JSON line done() prints (run_wrk parses it).
-- Each script loads it with dofile from its own folder, in every Lua state wrk makes.

local common = {}

-- The key=value options after the file (args[1]); an unknown one is an error naming the script.
function common.options(script, args, known)
   local opts = {}
   for i = 2, #args do
      local key, value = args[i]:match("^([%w_]+)=(.*)$")
      if not key or not known[key] then
         error(script .. ": unknown option '" .. args[i] .. "'")
      end
      opts[key] = value
   end
   return opts
end

local function unescape(hex)
   return string.char(tonumber(hex, 16))
end

-- A field of a request line, percent-decoded.
function common.decode(field)
   if not field:find("%", 1, true) then
      return field
   end
   return (field:gsub("%%(%x%x)", unescape))
end

-- The fields of a line of a request file (tests/perf/wrk.py write_requests): split at its tabs,
-- each still percent-encoded.
function common.split(line)
   local fields, start = {}, 1
   while true do
      local tab = line:find("\t", start, true)
      fields[#fields + 1] = line:sub(start, (tab or 0) - 1)
      if not tab then
         return fields
      end
      start = tab + 1
   end
end

-- The request of `fields` from index `first` on: method, path, body, then header name/value pairs.
-- Returns wrk.format's arguments, decoded: method, path, headers, body (nil for an empty body of a
-- GET or HEAD, so that no Content-Length: 0 goes out); nothing when the fields are not such a request.
function common.request(fields, first)
   local count = #fields - first + 1
   if count < 3 or count % 2 == 0 then
      return nil
   end
   local method = common.decode(fields[first])
   local path = common.decode(fields[first + 1])
   local body = common.decode(fields[first + 2])
   local headers = {}
   for i = first + 3, #fields, 2 do
      headers[common.decode(fields[i])] = common.decode(fields[i + 1])
   end
   if body == "" and (method == "GET" or method == "HEAD") then
      body = nil
   end
   return method, path, headers, body
end

-- A value for an application/x-www-form-urlencoded body (the refresh grant's token).
function common.form_escape(value)
   return (value:gsub("[^%w%-%._~]", function(c)
      return string.format("%%%02X", c:byte())
   end))
end

function common.encode(value)
   local kind = type(value)
   if kind == "table" then
      local parts = {}
      for key, item in pairs(value) do
         parts[#parts + 1] = common.encode(tostring(key)) .. ":" .. common.encode(item)
      end
      return "{" .. table.concat(parts, ",") .. "}"
   elseif kind == "number" then
      if value ~= value or value == math.huge or value == -math.huge then
         return "null"
      end
      return string.format("%.17g", value)
   elseif kind == "string" then
      return '"' .. value:gsub('[%c"\\]', function(c)
         return string.format("\\u%04x", c:byte())
      end) .. '"'
   elseif kind == "boolean" then
      return tostring(value)
   end
   return "null"
end

-- Call `each(line, index)` for the lines of `file` that belong to thread `tid` of `nthreads`: data
-- lines (not empty, not `#` comments) number 1, 2, ...; thread t takes t, t+N, t+2N, ... Returns
-- how many data lines the file has.
function common.each_line_of_thread(script, file, nthreads, tid, each)
   local handle, problem = io.open(file, "rb")
   if not handle then
      error(script .. ": cannot open " .. problem)
   end
   local index = 0
   for line in handle:lines() do
      if line ~= "" and line:sub(1, 1) ~= "#" then
         index = index + 1
         if (index - 1) % nthreads == tid - 1 then
            each(line, index)
         end
      end
   end
   handle:close()
   return index
end

-- Sum the threads' counters (sent, lines, exhausted, unexpected_<key>) and print the run's figures
-- with `fields` (the script's own: script, mode, expect).
function common.report(threads, summary, latency, fields)
   local totals = { sent = 0, exhausted = 0, lines = 0 }
   local unexpected = {}
   for _, thread in ipairs(threads) do
      for key in pairs(totals) do
         totals[key] = totals[key] + thread:get(key)
      end
      for key in thread:get("unexpected_seen"):gmatch("[^,]+") do
         unexpected[key] = (unexpected[key] or 0) + thread:get("unexpected_" .. key)
      end
   end
   local result = {
      threads = #threads,
      requests = summary.requests,
      duration_us = summary.duration,
      bytes = summary.bytes,
      errors = summary.errors,
      latency_us = {
         mean = latency.mean,
         stdev = latency.stdev,
         max = latency.max,
         p50 = latency:percentile(50),
         p90 = latency:percentile(90),
         p99 = latency:percentile(99),
         p999 = latency:percentile(99.9),
      },
      sent = totals.sent,
      lines = totals.lines,
      exhausted = totals.exhausted,
      unexpected = unexpected,
   }
   for key, value in pairs(fields) do
      result[key] = value
   end
   io.write("WRK_JSON " .. common.encode(result) .. "\n")
end

return common
