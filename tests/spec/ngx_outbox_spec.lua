-- The durable outbox inside nginx (issue 24): requests hand messages over
-- and get their ids at once; nginx is stopped gracefully mid-delivery and
-- started again, a worker is killed with SIGKILL, a worker outside nginx
-- drains the same outbox: every message reaches the server once, except at
-- most the killed worker's in-flight ones, which end ambiguous; every id
-- ends with an outcome.
local peers = require("peers")
local smtppool = require("smtppool")

local function workers_of(master)
  local out = {}
  for pid in peers.sh(peers.CLEAN .. "pgrep -P " .. master):gmatch("%d+") do out[#out + 1] = pid end
  return out
end

-- Waits until every id has an outcome; returns the count of each status.
local function outcomes_of(box, ids, seconds)
  local outcomes
  peers.wait_for(function()
    outcomes = { sent = 0, ambiguous = 0, failed = 0 }
    for _, id in ipairs(ids) do
      local o = box:outcome(id)
      if not o then return false end
      outcomes[o.status] = outcomes[o.status] + 1
    end
    return true
  end, seconds, "every message's outcome")
  return outcomes
end

describe("the outbox inside nginx", function()
  it("survives a graceful stop, a SIGKILLed worker and an outside worker: once each, every id an outcome",
    function()
    local redis = peers.redis()
    -- a slow server: each final dot waits for its reply
    local f = peers.fault({ rules = { { on = "DATA_END", ["do"] = "stall", seconds = 0.1, times = -1 } } })
    local ngx1, ngx2
    local name = "box" .. tostring(math.random(1e9))
    local dir = peers.tmpdir()
    finally(function()
      if ngx1 then ngx1.cleanup() end
      if ngx2 then ngx2.cleanup() end
      os.execute(peers.CLEAN .. "pkill -9 -f " .. peers.quote("outbox-name " .. name) .. " 2>/dev/null")
      redis:stop()
      f:stop()
      os.execute("rm -rf " .. peers.quote(dir))
    end)
    local q = ("cfg=outbox&port=%d&rport=%d&name=%s"):format(f.port, redis.port, name)
    ngx1 = peers.nginx(2)
    -- 300 requests at once: each answers with its id, stored before the answer
    local paths = {}
    for i = 1, 300 do paths[i] = ("oenqueue?%s&to=o%d@y.test"):format(q, i) end
    local lines = ngx1.parallel(paths, 60)
    local ids = {}
    for _, l in ipairs(lines) do
      local id = l:match("^id (%x+) [%d.e-]+$")
      assert(id, l)
      ids[#ids + 1] = id
    end
    assert.equal(300, #ids)
    -- a graceful stop mid-delivery: what was claimed and not started goes back
    peers.wait_for(function() return #f:arrived() >= 20 end, 60, "delivery to start")
    ngx1.stop("QUIT")
    local box = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none",
      outbox = "redis://127.0.0.1:" .. redis.port, outbox_name = name })
    local st = assert(box.outbox:stats())
    assert.equal(0, st.claimed) -- nothing left claimed by the stopped nginx
    local after_stop = #f:arrived()
    assert.truthy(after_stop < 300, after_stop)
    -- started again: the first request makes each worker's pool, whose agent drains the outbox
    ngx2 = peers.nginx(2)
    for _ = 1, 4 do ngx2.get("outcome?" .. q .. "&id=" .. ids[1]) end
    peers.wait_for(function() return #f:arrived() >= after_stop + 20 end, 60, "delivery to resume")
    -- a worker killed with SIGKILL mid-delivery
    local victims = workers_of(ngx2.pid())
    assert.truthy(#victims >= 1)
    os.execute("kill -9 " .. victims[1])
    -- a worker outside nginx joins; the replacement worker makes its pool on a request
    local out = dir .. "/worker.out"
    peers.write_file(dir .. "/relay.lua", ('return { host = "127.0.0.1", port = %d, tls = "none", max_conns = 1 }')
      :format(f.port))
    os.execute(("lua5.4 bin/smtppool worker --outbox redis://127.0.0.1:%d --outbox-name %s --config %s "
      .. "--until-empty >%s 2>&1 &"):format(redis.port, name, peers.quote(dir .. "/relay.lua"), peers.quote(out)))
    for _ = 1, 4 do ngx2.get("outcome?" .. q .. "&id=" .. ids[1]) end
    -- every id ends with an outcome
    local outcomes = outcomes_of(box, ids, 120)
    assert.equal(300, outcomes.sent + outcomes.ambiguous)
    -- the killed worker had at most its share of max_conns (2 across the nginx) in flight
    assert.truthy(outcomes.ambiguous <= 2, outcomes.ambiguous)
    local per, total = f:per_recipient()
    for addr, n in pairs(per) do assert.equal(1, n, addr) end
    assert.truthy(total >= 300 - outcomes.ambiguous and total <= 300, total)
    -- an outcome reads the same from nginx
    local o1 = box:outcome(ids[1])
    assert.equal("outcome " .. o1.status, ngx2.get("outcome?" .. q .. "&id=" .. ids[1]):match("^[^\n]+"))
    assert.matches("^failed invalid", ngx2.get("outcome?" .. q .. "&id=00ff"))
    box:close()
  end)

  it("reads Redis's replies behind: connections cut and scripts forgotten mid-delivery lose and double nothing",
    function()
    -- the agent's claims, marks and outcomes are posted and their replies
    -- read by a light thread as they come; cutting every connection and
    -- flushing the scripts while some are due must fail those posts
    -- loudly (then they go again), never lose or shift a reply
    local redis = peers.redis()
    local f = peers.fault({ rules = { { on = "DATA_END", ["do"] = "stall", seconds = 0.02, times = -1 } } })
    local n, box, admin
    local name = "cut" .. tostring(math.random(1e9))
    finally(function()
      if n then n.cleanup() end
      if box then box:close() end
      if admin then admin:close() end
      redis:stop()
      f:stop()
    end)
    local N = 150
    local url = "redis://127.0.0.1:" .. redis.port
    local q = ("cfg=outbox_short&port=%d&rport=%d&name=%s"):format(f.port, redis.port, name)
    n = peers.nginx(1)
    local ids = {}
    for _, l in ipairs(n.parallel((function()
      local paths = {}
      for i = 1, N do paths[i] = ("oenqueue?%s&to=c%d@y.test"):format(q, i) end
      return paths
    end)(), 60)) do
      ids[#ids + 1] = assert(l:match("^id (%x+) "), l)
    end
    assert.equal(N, #ids)
    admin = assert(require("smtppool.redis.client").new(url))
    peers.wait_for(function() return #f:arrived() >= 10 end, 30, "delivery to start")
    local cuts = 0
    for i = 1, 8 do
      if #f:arrived() >= N then break end
      if i % 2 == 1 then
        assert(admin:call("CLIENT", "KILL", "TYPE", "normal"))
        cuts = cuts + 1
      else
        assert.equal("OK", admin:call("SCRIPT", "FLUSH"))
      end
      peers.sleep(0.15)
    end
    assert.truthy(cuts >= 1)
    box = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none", outbox = url, outbox_name = name })
    local outcomes = outcomes_of(box, ids, 60)
    assert.same({ sent = N, ambiguous = 0, failed = 0 }, outcomes)
    local per, total = f:per_recipient()
    assert.equal(N, total)
    for addr, c in pairs(per) do assert.equal(1, c, addr) end
    -- no mark outlives its message (a batch redone after a cut re-marks
    -- one whose outcome it then repeats); nothing left claimed
    assert.same({}, admin:call("HGETALL", "smtppool:outbox:" .. name .. ":state"))
    assert.equal(0, assert(box.outbox:stats()).claimed)
  end)

  it("speaks rediss:// from nginx with the certificate verified, and refuses a name it does not hold", function()
    local certs = peers.certs()
    local redis = peers.redis({ persist = false, password = "tls-pw", tls = certs })
    local f = peers.fault({})
    local n
    finally(function()
      if n then n.cleanup() end
      redis:stop()
      f:stop()
    end)
    n = peers.nginx(1)
    local q = ("cfg=outbox_tls&port=%d&rport=%d&rpw=tls-pw"):format(f.port, redis.port)
    local line = n.get("oenqueue?" .. q .. "&sn=localhost&name=good&to=t1@y.test")
    local id = line:match("^id (%x+) ")
    assert(id, line)
    local ok = pcall(peers.wait_for, function()
      return n.get("outcome?" .. q .. "&sn=localhost&name=good&id=" .. id):match("^outcome sent") ~= nil
    end, 30)
    assert(ok, "not sent over rediss://: " .. n.get("outcome?" .. q .. "&sn=localhost&name=good&id=" .. id)
      .. "\n" .. n.log():sub(-3000))
    assert.equal(1, #f:arrived())
    -- a name the certificate does not hold: refused, as a configuration error, at once
    local t0 = require("smtppool.core").now()
    local bad = n.get("oenqueue?" .. q .. "&sn=wrong.test&name=bad&to=t2@y.test")
    assert.matches("^failed config .*certificate", bad, n.log():sub(-2000))
    assert.is_true(require("smtppool.core").now() - t0 < 5)
    -- nor does a wrong password ride on the connection the first pool logged in
    local q2 = ("cfg=outbox_tls&port=%d&rport=%d&rpw=wrong"):format(f.port, redis.port)
    assert.matches("^failed config ", n.get("oenqueue?" .. q2 .. "&sn=localhost&name=badpw&to=t3@y.test"))
    assert.equal(1, #f:arrived())
  end)
end)
