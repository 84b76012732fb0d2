--- Preparing a message for the wire: checks, composition, DKIM signing.
-- A prepared item is `{msg = {from, data, dsn}, to = {...}, user_msg = msg}`
-- or, when the message cannot be sent, `{msg = msg, to = {}, err = e}`
-- (that message's `invalid` outcome: nothing is sent). `data` is a string
-- or an array of segments (strings and `{path = file}`) that the C side
-- sends as they are: a DKIM signature is one more segment in front, never a
-- concatenation with the message.
-- @module smtppool.compose.prepare

local core = require("smtppool.core")
local errors = require("smtppool.errors")
local message = require("smtppool.compose.message")

local M = {}

local function check_raw(msg, fname, level)
  if type(msg) ~= "table" then
    error(fname .. ": message must be a table, got " .. type(msg), level)
  end
  if type(msg.from) ~= "string" then
    error(fname .. ": 'from' must be a string", level)
  end
  local to = msg.to
  if type(to) == "string" then to = { to } end
  if type(to) ~= "table" then
    error(fname .. ": 'to' must be a string or an array of strings", level)
  end
  for i, a in ipairs(to) do
    if type(a) ~= "string" then
      error(("%s: recipient %d must be a string, got %s"):format(fname, i, type(a)), level)
    end
  end
  if type(msg.data) ~= "string" then
    error(fname .. ": 'data' must be a string holding an RFC 5322 message", level)
  end
  if msg.require_tls ~= nil and type(msg.require_tls) ~= "boolean" then
    error(fname .. ": 'require_tls' must be a boolean", level)
  end
  if msg.dsn ~= nil and type(msg.dsn) ~= "table" then
    error(fname .. ": 'dsn' must be a table", level)
  end
  return to
end

local DKIM_FIELDS = { domain = "string", selector = "string", key = "string", algorithm = "string", headers = "table" }

-- Loads the DKIM keys of the `dkim` option (one table or an array of them):
-- a bad key is a config error at new, not at the first send.
function M.dkim_signers(cfg)
  if cfg == nil then return {} end
  local list = cfg[1] and cfg or { cfg }
  local out = {}
  for i, c in ipairs(list) do
    if type(c) ~= "table" then error("smtppool.new: dkim entries must be tables", 4) end
    for k, v in pairs(c) do
      if not DKIM_FIELDS[k] then error(("smtppool.new: unknown dkim option '%s'"):format(tostring(k)), 4) end
      if type(v) ~= DKIM_FIELDS[k] then error(("smtppool.new: dkim.%s must be a %s"):format(k, DKIM_FIELDS[k]), 4) end
    end
    for _, k in ipairs({ "domain", "selector", "key" }) do
      if not c[k] then error(("smtppool.new: dkim.%s is required"):format(k), 4) end
    end
    for _, k in ipairs({ "domain", "selector" }) do
      if not c[k]:match("^[%w._-]+$") then
        return nil, errors.new("config", ("dkim %d: %s '%s' is not a valid name"):format(i, k, c[k]))
      end
    end
    local alg = c.algorithm or "rsa-sha256"
    if alg ~= "rsa-sha256" and alg ~= "ed25519-sha256" then
      return nil, errors.new("config", ("dkim %d: algorithm must be rsa-sha256 or ed25519-sha256"):format(i))
    end
    local key, e = core.dkim_key(c.key, alg)
    if not key then
      e.text = ("dkim %d: %s"):format(i, e.text)
      return nil, e
    end
    local headers
    if c.headers then
      for _, h in ipairs(c.headers) do
        if type(h) ~= "string" or not h:match("^[!-9;-~]+$") then
          return nil, errors.new("config", ("dkim %d: bad header name '%s'"):format(i, tostring(h)))
        end
      end
      headers = table.concat(c.headers, ":"):lower()
    end
    out[#out + 1] = { key = key, domain = c.domain, selector = c.selector, headers = headers, alg = alg }
  end
  return out
end

-- The keys that sign one message: the pool's, unless the message says
-- `dkim = false` or gives its own configuration (keys loaded once, cached).
local function signers_for(msg, ctx)
  local d = msg.dkim
  if d == nil then return ctx.signers end
  if d == false then return {} end
  if type(d) ~= "table" then
    return nil, errors.new("invalid", "'dkim' must be false or a DKIM configuration", { attempts = 0 })
  end
  ctx.dkim_cache = ctx.dkim_cache or setmetatable({}, { __mode = "k" })
  local cached = ctx.dkim_cache[d]
  if cached then return cached end
  local ok, signers, err = pcall(M.dkim_signers, d)
  if not ok then
    return nil, errors.new("invalid", tostring(signers):gsub("^smtppool.new: ", ""), { attempts = 0 })
  end
  if not signers then
    return nil, errors.new("invalid", err.text, { attempts = 0 })
  end
  ctx.dkim_cache[d] = signers
  return signers
end

-- Prepends one DKIM-Signature per configured key (RSA and Ed25519 may sign
-- side by side), as a segment of its own.
--
-- With ctx.defer_sign (a batch with signing threads), a message held in one
-- string is not signed here: the third result says what to sign, and the
-- batch's signing stage (M.signing_stage) has worker threads do it.
local function sign(signers, data, ctx, t)
  if #signers == 0 then return data end
  t = t or os.time()
  if ctx.defer_sign then
    -- composed segments that are all strings (no file to stream) join into
    -- the one string a signing thread gets a copy of
    local flat = data
    if type(data) == "table" then
      for _, seg in ipairs(data) do
        if type(seg) ~= "string" then flat = nil break end
      end
      flat = flat and table.concat(data)
    end
    if flat then return flat, nil, { signers = signers, t = t } end
  end
  local sigs = {}
  if type(data) == "table" then
    -- Streaming segments: hash the body once (files read as they will be
    -- sent), then sign the header block with that hash for every key.
    local first = data[1]
    local he = first:find("\r\n\r\n", 1, true)
    local hdr = first:sub(1, he + 1)
    local body = { first:sub(he + 4) }
    for i = 2, #data do body[i] = data[i] end
    local bh, e = core.body_hash(body)
    if not bh then return nil, e end
    for i, s in ipairs(signers) do
      local h, se = s.key:sign_hashed(hdr, s.domain, s.selector, s.headers, t, bh)
      if not h then return nil, se end
      sigs[i] = h
    end
    local out = { table.concat(sigs) }
    for i = 1, #data do out[i + 1] = data[i] end
    return out
  end
  for i, s in ipairs(signers) do
    local h, e = s.key:sign(data, s.domain, s.selector, s.headers, t)
    if not h then return nil, e end
    sigs[i] = h
  end
  -- The signatures are one segment in front of the message: no copy of it.
  return { table.concat(sigs), data }
end

-- DSN options are checked here, so a bad one is that message's invalid
-- failure rather than an error raised in the middle of a batch.
local NOTIFY = { success = true, failure = true, delay = true, never = true }
local function check_dsn(d)
  if d == nil then return nil end
  if type(d) ~= "table" then return "'dsn' must be a table" end
  for k in pairs(d) do
    if k ~= "ret" and k ~= "envid" and k ~= "notify" and k ~= "orcpt" then
      return ("unknown dsn option '%s'"):format(tostring(k))
    end
  end
  if d.ret ~= nil and d.ret ~= "full" and d.ret ~= "hdrs" then return "dsn.ret must be 'full' or 'hdrs'" end
  if d.envid ~= nil and (type(d.envid) ~= "string" or #d.envid > 100 or d.envid:find("[%c\128-\255]")) then
    return "dsn.envid must be printable ASCII of at most 100 characters"
  end
  if d.notify ~= nil then
    if type(d.notify) ~= "table" or #d.notify == 0 then return "dsn.notify must be a non-empty array" end
    local seen = {}
    for _, w in ipairs(d.notify) do
      if not NOTIFY[w] or seen[w] or (w == "never" and #d.notify > 1) then
        return "dsn.notify takes success, failure and delay, or never alone"
      end
      seen[w] = true
    end
  end
  return nil
end

-- A composed message (no `data`): build the RFC 5322 text and envelope.
-- The transaction's parameters for the C side: the DSN fields, and
-- REQUIRETLS (RFC 8689) when the message asks for it.
local function tx_params(msg)
  if not msg.require_tls then return msg.dsn end
  local p = { requiretls = true }
  for k, v in pairs(msg.dsn or {}) do p[k] = v end
  return p
end

local function prepare_composed(msg, ctx)
  local signers, serr = signers_for(msg, ctx)
  if not signers then return { msg = msg, to = {}, err = serr } end
  local derr = check_dsn(msg.dsn)
  if derr then return { msg = msg, to = {}, err = errors.new("invalid", derr, { attempts = 0 }) } end
  local data, env = message.compose_segments(msg)
  local later
  if data then
    local signed, e
    signed, e, later = sign(signers or {}, data, ctx)
    if signed then data = signed else data, env = nil, e end
  end
  if not data then
    env.attempts = 0
    return { msg = msg, to = {}, err = env }
  end
  return { msg = { from = env.from, data = data, dsn = tx_params(msg), source = msg }, to = env.to, user_msg = msg,
           sign = later }
end

local function prepare(msg, fname, level, ctx)
  if type(msg) == "table" and msg.data == nil and (fname ~= "send_raw") then
    return prepare_composed(msg, ctx)
  end
  local to
  if level then
    to = check_raw(msg, fname, level + 1)
  else
    -- In a batch, a malformed message is that message's failure, not the batch's.
    local ok, r = pcall(check_raw, msg, fname, 1)
    if not ok then
      return { msg = msg, to = {}, err = errors.new("invalid", tostring(r):gsub("^[^:]*:%d+: ", ""), { attempts = 0 }) }
    end
    to = r
  end
  if #to == 0 then
    return { msg = msg, to = to, err = errors.new("invalid", "no recipients", { attempts = 0 }) }
  end
  local derr = check_dsn(msg.dsn)
  if derr then return { msg = msg, to = to, err = errors.new("invalid", derr, { attempts = 0 }) } end
  local signers, serr = signers_for(msg, ctx)
  if not signers then return { msg = msg, to = to, err = serr } end
  if #signers > 0 then
    local signed, e, later = sign(signers, msg.data, ctx)
    if not signed then
      e.attempts = 0
      return { msg = msg, to = to, err = e }
    end
    return { msg = { from = msg.from, data = signed, dsn = tx_params(msg) }, to = to, user_msg = msg, sign = later }
  end
  if msg.require_tls then
    return { msg = { from = msg.from, data = msg.data, dsn = tx_params(msg) }, to = to, user_msg = msg }
  end
  return { msg = msg, to = to }
end


M.prepare = prepare
M.prepare_composed = prepare_composed

--- Prepares a batch item: a message that raises while being prepared (a
-- template, a field of a strange type) is that item's `invalid` outcome.
function M.item(m, ctx)
  if m == nil or m == false then return m end -- false: the source has nothing now, more later
  local ok, item = pcall(prepare, m, "send_batch", nil, ctx)
  if ok then return item end
  return { msg = m, to = {}, err = errors.new("invalid", "cannot prepare the message: " .. tostring(item),
    { attempts = 0 }) }
end

--- The signing stage of a batch: wraps a source of prepared items so that
-- the DKIM signatures of the items that ask for one (`item.sign`, from a
-- context with `defer_sign`) are computed by worker threads (`core.signq`)
-- while the loop serves sockets. It hands out items whose signatures are
-- ready (in the order they become ready), answers `false` ("nothing now")
-- while signatures are on their way, and nil at the end. Up to `depth`
-- items are held at once.
-- @tparam function next_item the source of prepared items
-- @tparam table o `threads` (the queue's workers, made at the first item to
--   sign), `depth`, and `waiting(fds)`: called with the queue's fd when
--   signatures are on their way (the loop's wait must wake on it) and with
--   nil when none are
-- @treturn function the wrapped source
-- @treturn function `finish()`: stops the workers, and returns the items
--   taken and never handed out (a batch that stopped early reports them
--   cancelled)
local ON_LOOP = {} -- a context that signs where it is asked to

function M.signing_stage(next_item, o)
  local q, depth = nil, o.depth
  -- ready: a FIFO over ready[head..tail]; jobs: signatures on their way
  local waiting, held, ready, head, tail, done, id, jobs, raised = {}, 0, {}, 1, 0, false, 0, 0, nil
  local no_threads = false
  local function push(item)
    tail = tail + 1
    ready[tail] = item
  end
  local function finish(item)
    if item.sign_err then
      item.sign_err.attempts = 0
      item.err = item.sign_err
    else
      item.msg.data = { table.concat(item.sigs), item.msg.data }
    end
    item.sign, item.sigs, item.left, item.sign_err = nil, nil, nil, nil
    push(item)
  end
  local function collect()
    if jobs == 0 then return end
    for _, r in ipairs(q:take()) do
      local w = waiting[r[1]]
      waiting[r[1]] = nil
      jobs = jobs - 1
      if jobs == 0 then o.waiting(nil) end
      local item = w.item
      if r[2] then item.sigs[w.i] = r[2] else item.sign_err = item.sign_err or r[3] end
      item.left = item.left - 1
      if item.left == 0 then finish(item) end
    end
  end
  local function source()
    collect()
    while not done and held < depth do
      -- A source that raises: the items taken before it go out first, then
      -- its error does (the loop reports every message taken, then raises).
      local ok, item = pcall(next_item)
      if not ok then
        done, raised = true, { item }
        break
      end
      if item == nil then
        done = true
        break
      end
      if item == false then break end
      held = held + 1
      -- threads that cannot be had (a process out of them): sign on the loop
      if item.sign and not q and not no_threads then
        q = core.signq(o.threads)
        no_threads = not q
      end
      if item.sign and no_threads then
        local signed, e = sign(item.sign.signers, item.msg.data, ON_LOOP, item.sign.t)
        if signed then item.msg.data = signed else item.err, e.attempts = e, 0 end
        item.sign = nil
        push(item)
      elseif item.sign then
        if jobs == 0 then o.waiting(q:fd()) end
        item.sigs, item.left = {}, #item.sign.signers
        for i, s in ipairs(item.sign.signers) do
          id = id + 1
          jobs = jobs + 1
          waiting[id] = { item = item, i = i }
          q:submit(id, s.key, item.msg.data, s.domain, s.selector, s.headers, item.sign.t)
        end
      else
        push(item)
        -- nothing being signed: hand it out now, pulling no further ahead
        -- than the loop asks (a batch without DKIM stays as lazy as before)
        if jobs == 0 then break end
      end
    end
    if head <= tail then
      local item = ready[head]
      ready[head] = nil
      head = head + 1
      held = held - 1
      return item
    end
    if held > 0 or not done then return false end
    if raised then error(raised[1], 0) end
    return nil
  end
  local function finish()
    if q then q:close() end
    if jobs > 0 then o.waiting(nil) end
    local out = {}
    for i = head, tail do out[#out + 1] = ready[i] end
    local seen = {}
    for _, w in pairs(waiting) do
      if not seen[w.item] then
        seen[w.item] = true
        out[#out + 1] = w.item
      end
    end
    return out
  end
  return source, finish
end

return M
