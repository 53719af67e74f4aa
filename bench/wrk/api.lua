-- wrk script for `make bench`: which requests to send, and a machine-readable summary.
--
--   wrk ... -s bench/wrk/api.lua http://127.0.0.1:3100 -- orders 4    POST /api/orders, products 1..4 in turn
--   wrk ... -s bench/wrk/api.lua http://127.0.0.1:3100 -- orders 1    POST /api/orders, product 1 only (hot)
--   wrk ... -s bench/wrk/api.lua http://127.0.0.1:3100 -- orders 4 5  the same, each connection pausing 5 ms
--                                                                      before each request (a paced load)
--   wrk ... -s bench/wrk/api.lua http://127.0.0.1:3100 -- keyed 4     the same, each with its own Idempotency-Key
--   wrk ... -s bench/wrk/api.lua http://127.0.0.1:3100 -- order 5000  GET /api/orders/:id, id random in 1..5000
--   wrk ... -s bench/wrk/api.lua http://127.0.0.1:3100 -- products    GET /api/products
--
-- Every request is formatted once in init(), so the Lua side costs the load generator as
-- little CPU as possible: it shares the two cores with the API and PostgreSQL.

local requests_to_send = {}
local next_request = 0
local random_ids = 0
-- keyed mode: the order bodies, and a counter that makes each request's key unique.
local keyed_bodies = nil
local keys_sent = 0
local run_id = 0

-- Numbers the threads, so each seeds its random generator differently.
local threads_set_up = 0
function setup(thread)
   threads_set_up = threads_set_up + 1
   thread:set("thread_number", threads_set_up)
end

function init(args)
   local mode = args[1]
   if mode == "orders" then
      local products = tonumber(args[2] or "4")
      -- Defined only for a paced load: wrk then waits delay() ms before each request.
      local pause = tonumber(args[3] or "0")
      if pause > 0 then
         delay = function() return pause end
      end
      local headers = { ["Content-Type"] = "application/json" }
      for product_id = 1, products do
         local body = string.format('{"userId":1,"items":[{"productId":%d,"quantity":1}]}', product_id)
         requests_to_send[product_id] = wrk.format("POST", "/api/orders", headers, body)
      end
   elseif mode == "keyed" then
      local products = tonumber(args[2] or "4")
      keyed_bodies = {}
      for product_id = 1, products do
         keyed_bodies[product_id] =
            string.format('{"userId":1,"items":[{"productId":%d,"quantity":1}]}', product_id)
      end
      -- Keys unique across threads and across runs on the same database.
      run_id = os.time()
   elseif mode == "order" then
      random_ids = tonumber(args[2])
      math.randomseed(os.time() * 100 + thread_number)
   elseif mode == "products" then
      requests_to_send[1] = wrk.format("GET", "/api/products")
   else
      error("unknown mode " .. tostring(mode) .. ": expected orders, keyed, order or products")
   end
end

function request()
   if keyed_bodies then
      keys_sent = keys_sent + 1
      next_request = next_request % #keyed_bodies + 1
      local headers = { ["Content-Type"] = "application/json",
                        ["Idempotency-Key"] = string.format("%d-%d-%d", run_id, thread_number, keys_sent) }
      return wrk.format("POST", "/api/orders", headers, keyed_bodies[next_request])
   end
   if random_ids > 0 then
      return wrk.format("GET", "/api/orders/" .. math.random(1, random_ids))
   end
   next_request = next_request % #requests_to_send + 1
   return requests_to_send[next_request]
end

-- One JSON object on the last line of wrk's output; bench/run.py reads it. Non-2xx/3xx
-- answers are counted by wrk in errors.status.
function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      '\nBENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
