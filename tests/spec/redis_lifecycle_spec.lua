-- A campaign in Redis from start to end (issue 23): a worker started before
-- the list waits for it, a complete campaign's keys expire when asked, and
-- purge deletes a campaign (refused while workers hold claims).
local peers = require("peers")
local rcampaign = require("smtppool.campaign.redis")
local client = require("smtppool.redis.client")

local function setup_dir()
  local redis, f, dir = peers.redis(), peers.fault({}), peers.tmpdir()
  finally(function()
    redis:stop()
    f:stop()
    os.execute("rm -rf " .. peers.quote(dir))
  end)
  peers.write_file(dir .. "/cfg.lua", ('return { host = "127.0.0.1", port = %d, tls = "none", from = "n@x.test" }')
    :format(f.port))
  peers.write_file(dir .. "/body.txt", "Dear {{name}}\n")
  return redis, f, dir, "redis://127.0.0.1:" .. redis.port
end

local function cli(dir, url, cmd, extra)
  return ("lua5.4 bin/smtppool %s --config %s/cfg.lua --journal %s --name life --subject 'Hi {{name}}' "
    .. "--text %s/body.txt --quiet %s"):format(cmd, dir, url, dir, extra or "")
end

describe("a campaign in Redis, start to end", function()
  it("a worker started before the list waits for it, then both send each recipient once", function()
    local _, f, dir, url = setup_dir()
    peers.write_list(dir .. "/list.csv", "w", 1, 40)
    -- the worker first, in the background; the list comes 2 s later
    os.execute("(" .. cli(dir, url, "worker", "--wait-for-list 30") .. " >" .. peers.quote(dir .. "/worker.out")
      .. " 2>&1; echo exit=$? >>" .. peers.quote(dir .. "/worker.out") .. ") &")
    peers.wait_for(function() return (peers.read_file(dir .. "/worker.out") or ""):find("has no list yet") end, 20,
      "the worker to say it waits")
    local sender = peers.sh(cli(dir, url, "send", "--to " .. dir .. "/list.csv --expire-after 300") .. " 2>&1; echo exit=$?")
    assert.matches("exit=0", sender)
    peers.wait_for(function() return (peers.read_file(dir .. "/worker.out") or ""):find("exit=") end, 60,
      "the worker to end")
    local wout = peers.read_file(dir .. "/worker.out")
    assert.matches("exit=0", wout)
    assert.matches("waiting up to 30s", wout)
    -- each recipient once, between the two
    local per = {}
    for _, m in ipairs(f:select("message")) do
      for _, r in ipairs(m.rcpt or m.to or {}) do per[r] = (per[r] or 0) + 1 end
    end
    assert.equal(40, #f:select("message"))
    local distinct = 0
    for addr, n in pairs(per) do
      assert.equal(1, n, addr)
      distinct = distinct + 1
    end
    assert.equal(40, distinct)
  end)

  it("a worker gives up on a list that never comes with a clear error", function()
    local _, _, dir, url = setup_dir()
    local out = peers.sh(cli(dir, url, "worker", "--wait-for-list 1") .. " 2>&1; echo exit=$?")
    assert.matches("no campaign 'life'.*none was within 1s", out)
    assert.matches("exit=2", out)
    -- a worker that only waited leaves no trace (no ghost in status)
    assert.matches("no campaign 'life'", peers.sh(("lua5.4 bin/smtppool status --journal %s --name life 2>&1")
      :format(url)))
  end)

  it("a complete campaign's keys expire when asked, and purge deletes them now", function()
    local redis, _, dir, url = setup_dir()
    peers.write_list(dir .. "/list.csv", "e", 1, 10)
    local out = peers.sh(cli(dir, url, "send", "--to " .. dir .. "/list.csv --expire-after 500") .. " 2>&1; echo exit=$?")
    assert.matches("exit=0", out)
    assert.matches("keys in Redis expire in 500s", out)
    local c = assert(client.new(url))
    local keys = c:call("KEYS", "smtppool:campaign:life:*")
    assert.is_true(#keys >= 5, #keys .. " keys")
    for _, k in ipairs(keys) do
      local ttl = c:call("TTL", k)
      assert.is_true(ttl > 400 and ttl <= 500, k .. " ttl " .. tostring(ttl))
    end
    local p = peers.sh(("lua5.4 bin/smtppool purge --journal %s --name life 2>&1; echo exit=$?"):format(url))
    assert.matches("campaign life: " .. #keys .. " keys deleted", p)
    assert.equal(0, #c:call("KEYS", "smtppool:campaign:life:*"))
    assert.matches("no campaign life: nothing to delete",
      peers.sh(("lua5.4 bin/smtppool purge --journal %s --name life 2>&1"):format(url)))
    c:close()
    assert.truthy(redis)
  end)

  it("purge is refused while a worker holds claims, unless forced", function()
    local _, _, _, url = setup_dir()
    local j = assert(rcampaign.open(url, "held", { allow_volatile = true }))
    local rows = { { "a@y.test", "{}" }, { "b@y.test", "{}" } }
    local i = 0
    assert(j:load(function()
      i = i + 1
      if rows[i] then return rows[i][1], rows[i][2] end
    end))
    local src = j:source(2)
    assert.truthy(src()) -- claims both
    local n, e = rcampaign.purge(url, "held")
    assert.is_nil(n)
    assert.matches("is running: 2 recipients are claimed", e)
    n = assert(rcampaign.purge(url, "held", true))
    assert.is_true(n > 0)
    j:close()
  end)
end)
