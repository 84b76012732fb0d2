--- Campaigns: personalised messages to a list, through one pool, with a
-- durable journal so a crash neither loses nor doubles mail.
--
--     local c = smtppool.campaign{
--       pool = pool,
--       recipients = "list.csv",            -- or an array, or an iterator
--       message = { from = "News <n@x.example>", subject = "Hi {{name}}",
--                   text = "Dear {{name}}", html = "<p>Dear {{name}}</p>" },
--       journal = "run.journal",
--     }
--     local report = assert(c:run())
--
-- The journal is an SQLite database (src/store/sp_journal.c; one run at a
-- time), keyed by the normalised address (so reordering, adding or removing
-- rows never re-sends), with the campaign's name. Per recipient: `P` (handed
-- to the pool again after an earlier run left it unsent; a new recipient has
-- no row before its `L`), `L` (its final dot is about to leave: committed
-- just before it), then the outcome:
-- `S` sent, `D` sent and possibly twice, `F` failed for good, `T` failed for
-- now (transient or connection: `retry_failed` sends it again), `A`
-- ambiguous. On resume, a recipient with no row or last seen `P` never
-- reached its final dot and is sent; one last seen `L` may have been
-- delivered and is recorded ambiguous (unless `resend_in_flight`): after
-- `kill -9`, at most one message per open connection is ambiguous over DATA,
-- `bdat_window` over BDAT.
--
-- An outage (the relay down, refusing connections, or failing every message
-- for a while) trips a circuit breaker after `outage_threshold` transient or
-- connection failures in a row: sending stops, every unsent recipient stays
-- pending, and the run either ends (`on_outage = "stop"`, the default;
-- `report.stopped = "outage"`) or waits and probes with a growing delay
-- (`"wait"`), sending the list on when the relay answers again.
-- @api smtppool.campaign

local core = require("smtppool.core")
local address_key = core.address_key
local csv = require("smtppool.compose.csv")
local template = require("smtppool.compose.template")
local loop = require("smtppool.engine.loop")
local policy = require("smtppool.engine.policy")
local redis_url = require("smtppool.redis.client").is_url

local M = {}

local Campaign = {}
Campaign.__index = Campaign

local err = require("smtppool.errors").new

local OPTIONS = { pool = "table", recipients = true, message = true, journal = "string", retry = "function",
                  progress = true, resend_in_flight = "boolean", report_json = "string", strict = "boolean",
                  name = "string", retry_failed = "boolean", outage_threshold = "number", on_outage = "string",
                  outage_wait = "number", outage_delay = "number", handle_signals = "boolean",
                  delimiter = "string", on_failure = "function", lease = "number",
                  allow_volatile_redis = "boolean", list_wait = "number", expire_after = "number" }

--- Makes a campaign (nothing is sent until `run`).
-- @tparam table o
--
-- * `pool`: an smtppool pool.
-- * `recipients`: an array of tables, an iterator returning them, or the
--   path of a CSV file whose header row names the fields (streamed; `,`,
--   `;` or tab found from the header, or `delimiter`). Each recipient's
--   `email` field is the address (in a CSV, the column `email` in any case,
--   or `e-mail`, `mail`, `email address`); the other fields are template
--   variables.
-- * `message`: a table of templates (`from`, `subject`, `text`, `html`,
--   `list_unsubscribe`: `smtppool.template.FIELDS`; other fields as for
--   `pool:send`), or `function(recipient) -> message`.
-- * `journal` (path, optional): the durable record; without it a crash
--   forgets what was sent.
-- * `retry` (optional): the retry policy for this run (the pool's otherwise).
-- * `progress`: `true` for a live line on stderr (the default when stderr
--   is a terminal: sent, failed, ambiguous, deferred, rate, elapsed time and
--   ETA when the list's length is known), `false` for silence, or
--   `function(stats)` called with those numbers.
-- * `resend_in_flight` (default false), `report_json` (path for the final
--   report, written as JSON by dkjson as the command line writes its own;
--   when it cannot be written the report says why in `report_error`), `strict` (default true: a missing template variable is an error).
-- * `name` (default `"campaign"`): the campaign's name, written in the
--   journal's first line; a journal of another campaign is refused.
-- * `retry_failed` (default false): send again the recipients whose earlier
--   outcome was a transient or connection failure (`T`); permanent
--   failures are never sent again.
-- * `outage_threshold` (default 10): transient or connection failures in a
--   row that trip the circuit breaker; `on_outage` (`"stop"`, the default,
--   or `"wait"`); with `"wait"`, `outage_delay` (default 5 seconds, doubling
--   to 300) between probes and `outage_wait` (default 3600 seconds) before
--   giving up.
-- * `on_failure` (function, optional): `function(email, state, err, line)`
--   for each recipient that failed (`state` `F` or `T`) or is ambiguous
--   (`A`); `line` is its row's line in a CSV list.
-- * `allow_volatile_redis` (default false): run a campaign in a Redis that
--   keeps nothing on disk (no AOF, no RDB saves), which is refused otherwise:
--   a restart would lose its state.
-- * `list_wait` (seconds, default 0; Redis): a worker without a list
--   whose campaign is not loaded yet waits this long for another process to
--   load it (an `on_event` `{type = "list_wait"}` says so) instead of failing.
-- * `expire_after` (seconds; Redis): a run that ends with the campaign
--   complete (nothing queued or claimed by any worker) sets its keys,
--   addresses included, to expire after this long (`report.expires_in`);
--   `smtppool.campaign.purge(url, name)` deletes them at once.
-- * `handle_signals` (default false): SIGINT and SIGTERM stop the run
--   gracefully (nothing new starts, the messages on the wire finish, the
--   journal is flushed, `report.stopped = "interrupted"`); a second one
--   cuts the connections at once.
function M.new(o)
  if type(o) ~= "table" then error("smtppool.campaign: options must be a table", 2) end
  for k, v in pairs(o) do
    local want = OPTIONS[k]
    if not want then error(("smtppool.campaign: unknown option '%s'"):format(tostring(k)), 2) end
    if want ~= true and type(v) ~= want then
      error(("smtppool.campaign: option '%s' must be a %s"):format(k, want), 2)
    end
  end
  if not o.pool or not o.pool.send_batch then error("smtppool.campaign: 'pool' must be a pool", 2) end
  local r = o.recipients
  local shared = redis_url(o.journal)
  if not (shared and r == nil) and type(r) ~= "table" and type(r) ~= "function" and type(r) ~= "string" then
    error("smtppool.campaign: 'recipients' must be an array, an iterator or a CSV path", 2)
  end
  if type(o.message) ~= "table" and type(o.message) ~= "function" then
    error("smtppool.campaign: 'message' must be a table of templates or a function", 2)
  end
  if o.on_outage ~= nil and o.on_outage ~= "stop" and o.on_outage ~= "wait" then
    error("smtppool.campaign: on_outage must be \"stop\" or \"wait\"", 2)
  end
  for _, k in ipairs({ "outage_threshold", "outage_wait", "outage_delay", "expire_after" }) do
    local v = o[k]
    if v ~= nil and not (v > 0 and v < math.huge) then
      error(("smtppool.campaign: %s must be a positive finite number"):format(k), 2)
    end
  end
  if o.list_wait ~= nil and not (o.list_wait >= 0 and o.list_wait < math.huge) then
    error("smtppool.campaign: list_wait must be a finite number of seconds, 0 or more", 2)
  end
  if o.name ~= nil and not o.name:match("^[%w._%-]+$") then
    error("smtppool.campaign: name must be letters, digits, '.', '_' or '-'", 2)
  end
  return setmetatable({ o = o }, Campaign)
end

--- The journal key of an address: trimmed and lower-cased (local parts
-- are case-sensitive in theory and never in practice; a list that spells
-- one address two ways means one person).
function M.normalize(address)
  if address:find("^%s") or address:find("%s$") then
    address = address:gsub("^%s+", ""):gsub("%s+$", "")
  end
  return (address:lower())
end

--- The journal key of a recipient's address, or nil and why the row cannot
-- have one. An address with a control character (CR, LF, NUL, a tab...) is
-- never a key: trimmed, it would pose as another row's address, and a line
-- break in it would write a record of its own into the journal.
-- @param address the row's `email` field
-- @treturn[1] string the key
-- @treturn[2] nil
-- @treturn[2] string why
local NO_EMAIL = "invalid recipient (no email field)"
function M.key(address)
  if type(address) ~= "string" then return nil, NO_EMAIL end
  return address_key(address) -- M.normalize's trimming and case, in C (a row's hot path)
end

--- The journal's letters, one per recipient, in the SQLite journal and in
-- Redis alike: `P` prepared (safe to send: nothing left), `L` leaving (its
-- final dot or last chunk may have left), `S` sent, `D` sent but possibly
-- twice, `F` failed (permanent or invalid), `T` failed for now (sent again
-- with `retry_failed`), `A` ambiguous (it may have arrived).
-- (The letters are defined once, in the C core's journal: `core.letters`.)
local J = core.letters
M.LETTERS = { [J.prepared] = "prepared", [J.leaving] = "leaving", [J.sent] = "sent",
              [J.twice] = "sent, possibly twice", [J.failed] = "failed", [J.transient] = "failed for now",
              [J.ambiguous] = "ambiguous" }
-- the letters a later run skips (T too, unless retry_failed)
local FINAL = { [J.sent] = true, [J.twice] = true, [J.failed] = true, [J.ambiguous] = true }
local J_SENT, J_TWICE, J_LEAVING, J_TRANSIENT = J.sent, J.twice, J.leaving, J.transient

local GROUP_CLAIM = 32 -- recipients a Redis worker claims at a time
local GROUP = 16 -- recipients prepared at a time; the journal is synced to the disk once a group

--- Imports a text journal (versions 1 and 2, before the SQLite one) at
-- path into an SQLite journal at the same path; the text is kept beside it,
-- its name ending in `.v1.txt` or `.v2.txt`. Nothing to do when path is
-- absent or already a database.
-- @treturn[1] true
-- @treturn[2] nil
-- @treturn[2] string why (another campaign's journal, an unknown version, a file that is no journal)
function M.import_text_journal(path, name)
  local f = io.open(path, "rb")
  if not f then return true end
  local head = f:read(16) or ""
  f:close()
  if head == "" or head == "SQLite format 3\0" then return true end
  f = assert(io.open(path, "rb"))
  local first = f:read("l") or ""
  local version, jname = first:match("^# smtppool journal (%d+) campaign=([^%s]+)")
  if not version and first:match("^# smtppool journal") then
    f:close()
    return nil, ("journal %s has an unknown version header (%q); this smtppool reads text versions 1 and 2 "
      .. "and its own SQLite journals"):format(path, first:sub(1, 60))
  end
  if version and version ~= "2" then
    f:close()
    return nil, ("journal %s has version %s; this smtppool reads text versions 1 and 2 and its own SQLite journals")
      :format(path, version)
  end
  if not version and not first:match("^[PLSFTAD]\t[^\t]+") then
    f:close()
    return nil, ("journal %s is not an smtppool journal"):format(path)
  end
  if jname and jname ~= name then
    f:close()
    return nil, ("journal %s belongs to campaign '%s', not '%s'"):format(path, jname, name)
  end
  local tmp = path .. ".importing"
  os.remove(tmp)
  local j, e = core.journal_open(tmp, name)
  if not j then f:close() return nil, e end
  local function take(line)
    -- a torn last line (cut before the tab after its key) is ignored
    local st, key, info = line:match("^([PLSFTAD])\t([^\t]+)\t(.*)$")
    if not st then return true end
    if not version then key = M.normalize(key:match("^%d+:(.*)$") or key) end
    if not M.key(key) then return true end -- a control character: never a key
    return j:record(st, key, info)
  end
  local ok, re = true, nil
  if not version then ok, re = take(first) end
  for line in f:lines() do
    if not ok then break end
    ok, re = take(line)
  end
  f:close()
  if ok then ok, re = j:commit(true) end
  j:close()
  if not ok then os.remove(tmp) return nil, re end
  local kept = path .. (version and ".v2.txt" or ".v1.txt")
  local r1, e1 = os.rename(path, kept)
  if not r1 then os.remove(tmp) return nil, e1 end
  local r2, e2 = os.rename(tmp, path)
  if not r2 then return nil, e2 end
  os.remove(tmp .. "-wal")
  os.remove(tmp .. "-shm")
  return true
end

local function clean(s)
  s = tostring(s or "")
  if not s:find("[\t\r\n]") then return s end
  return (s:gsub("[\t\r\n]", " "))
end

-- Compiles the message templates once and checks their variables against
-- the CSV columns before anything is sent.
local function compile_message(msg, columns, path)
  if type(msg) == "function" then return msg end
  local render, e = template.compile_message(msg)
  if not render then return nil, "message." .. e end
  if columns then
    local probe = {}
    for _, c in ipairs(columns) do probe[c] = "x" end
    local ok, _, f, why = render(probe)
    if not ok then
      return nil, ("message.%s uses a column %s has not (%s); its columns: %s"):format(f, path, why,
        table.concat(columns, ", "))
    end
  end
  -- the row's address is the message's `to` unless a template sets one
  -- (prepare_one fills it in: no wrapper on a row's hot path)
  return render
end

local function isatty_stderr()
  return os.execute("test -t 2") == true
end

--- Runs the campaign to the end (or resumes it from its journal).
-- @treturn[1] table report: `total`, `sent`, `failed`, `ambiguous`,
--   `skipped` (done in an earlier run), `retried`, `elapsed`, `rate`
-- @return[2] nil
-- @treturn[2] table error value (kind `invalid` for a bad CSV or template,
--   `config` for a journal that cannot be written); nothing was sent
function Campaign:run()
  local o = self.o
  local t0 = core.now()
  -- Recipients: a CSV is checked whole before the first message.
  local source, columns
  if type(o.recipients) == "string" then
    -- Checked whole (streamed: memory stays flat) before the first message.
    local n, cols = csv.check(o.recipients, { delimiter = o.delimiter })
    if not n then return nil, err("invalid", cols) end
    columns = cols
    self.expected = n
    local col, why = csv.email_column(cols)
    if not col then return nil, err("invalid", o.recipients .. ": line 1: " .. why) end
    local it = assert(csv.rows(o.recipients, { delimiter = o.delimiter }))
    -- a row, no key of its own (a Redis claim's), its line (for failures)
    -- (a malformed line, met when the file changed since it was checked,
    -- raises a `{csv_error = text}` table: the run's end reports its text)
    source = function()
      local row, line = it()
      if row and col ~= "email" then row.email = row[col] end
      return row, nil, line
    end
  elseif type(o.recipients) == "table" then
    self.expected = #o.recipients
    local i = 0
    source = function()
      i = i + 1
      return o.recipients[i]
    end
  else
    source = o.recipients -- an iterator, or nil: a Redis worker that only takes part
  end
  if columns and not columns[1] then return nil, err("invalid", "the CSV has no columns") end
  local build, cerr = compile_message(o.message, columns, type(o.recipients) == "string" and o.recipients or "the list")
  if not build then return nil, err("invalid", cerr) end
  local templated = type(o.message) ~= "function" -- its messages go to the row's email

  local name = o.name or "campaign"
  -- A campaign shared through Redis (smtppool.campaign.redis): the list is loaded
  -- there, recipients come from claims, letters go there.
  local rj, loaded
  if redis_url(o.journal) then
    local re
    rj, re = require("smtppool.campaign.redis").open(o.journal, name, { lease = o.lease,
      dns_servers = o.pool and o.pool.opts and o.pool.opts.dns_servers,
      resend_in_flight = o.resend_in_flight, allow_volatile = o.allow_volatile_redis, list_wait = o.list_wait,
      on_wait = function(n, secs)
        local hook = o.pool.on_event
        if hook then pcall(hook, { type = "list_wait", name = n, seconds = secs }) end
      end })
    if not rj then return nil, err("config", re) end
    if source then
      local json, rows_read = require("dkjson"), 0
      local added, dups = rj:load(function()
        while true do
          local okr, r = pcall(source)
          if not okr then error(type(r) == "table" and r.csv_error or r, 0) end
          if r == nil then return nil end
          if type(r) == "table" then
            -- a row with no key is loaded under its place in the list, and fails when claimed
            rows_read = rows_read + 1
            return M.key(r.email) or ("#" .. rows_read), json.encode(r)
          end
        end
      end)
      if not added then return nil, err("connection", "loading the list into Redis: " .. tostring(dups)) end
      loaded = { added = added, duplicates = dups }
    end
    if o.retry_failed then rj:retry_failed() end
    source = rj:source(GROUP_CLAIM)
    self.expected = nil
  end
  -- The journal: an SQLite database (one run at a time), or without one a
  -- private temporary database that only deduplicates this run's rows;
  -- in Redis, the claims' states.
  local journal, states
  if rj then
    states = rj:states()
  else
    local je, jst
    if o.journal then
      local ok, ie = M.import_text_journal(o.journal, name)
      if not ok then return nil, err("config", ie) end
    end
    journal, je, jst = core.journal_open(o.journal, name)
    if not journal then return nil, err(jst == "full" and "journal" or "config", je) end
    states = journal
  end
  -- a full disk stops the run (resume later); anything else is a broken journal
  local function journal_error(e, st)
    if st == "full" then
      e = ("the journal cannot be written (%s); what it holds stands: make room, then run again with --resume "
        .. "(nothing recorded is sent twice)"):format(e)
    end
    return err(st == "full" and "journal" or "config", e)
  end
  local function journal_failed(e, st) error(journal_error(e, st), 0) end
  -- New recipients handed to the pool and not yet at their L or outcome:
  -- in the SQLite journal they have no row until then (a recipient with no
  -- row is sent on resume, as one at P would be), so a second row naming one
  -- of them is told a duplicate here.
  local pending = {}
  local on_failure, retry_failed, resend_in_flight = o.on_failure, o.retry_failed, o.resend_in_flight
  local jrecord = journal and journal.record
  local function record(state, key, info, e, line)
    pending[key] = nil
    if jrecord then
      local ok, je, jst = jrecord(journal, state, key, info) -- on one line: the journal cleans it
      if not ok then journal_failed(je, jst) end
    else
      rj:record(state, key, clean(info))
    end
    if on_failure and (state == J.failed or state == J.transient or state == J.ambiguous) then
      pcall(on_failure, key, state, e or err("invalid", tostring(info)), line)
    end
  end
  local function commit(sync)
    if not journal then return end
    local ok, je, jst = journal:commit(sync)
    if not ok then journal_failed(je, jst) end
  end
  local unsynced = 0 -- rows prepared since the journal's last sync to the disk (see GROUP)
  local function commit_turn()
    local sync = unsynced >= GROUP
    commit(sync)
    if sync then unsynced = 0 end
  end

  local report = { total = 0, sent = 0, failed = 0, ambiguous = 0, skipped = 0, retried = 0, deferred = 0,
                   possible_duplicates = 0, duplicates = 0, pending = 0 }
  local keys = setmetatable({}, { __mode = "k" }) -- message -> journal key
  local lines = setmetatable({}, { __mode = "k" }) -- message -> its CSV line (with on_failure)
  local resent = setmetatable({}, { __mode = "k" }) -- messages in flight in an earlier run, sent again
  local index = 0
  local pool = o.pool
  local show = o.progress
  if show == nil then show = isatty_stderr() end
  local last_draw = 0
  local function progress(final)
    if not show then return end
    local now = core.now()
    if not final and now - last_draw < 0.2 then return end
    last_draw = now
    local done = report.sent + report.failed + report.ambiguous
    local el = now - t0
    local rate = el > 0 and done / el or 0
    -- ETA from the pace so far, when the list's length is known (CSV, array)
    local expected = self.expected
    local left = expected and (expected - done - report.skipped) or nil
    local eta = (left and rate > 0) and left / rate or nil
    local st = { sent = report.sent, failed = report.failed, ambiguous = report.ambiguous, deferred = report.deferred,
                 rate = rate, elapsed = el, total = report.total, expected = expected, eta = eta,
                 skipped = report.skipped, final = final or nil, stopped = final and report.stopped or nil }
    if type(show) == "function" then
      show(st)
    else
      io.stderr:write("\r", M.progress_line(st), final and "\n" or "")
    end
  end

  -- Messages are prepared a few at a time. Their rows (a P for a recipient
  -- an earlier run left unsent, none for a new one) and the turn's L rows and
  -- outcomes are committed together just before the connections write; that
  -- commit also syncs the journal to the disk once GROUP rows have been
  -- prepared since the last sync, so a power loss forgets at most about a
  -- group's outcomes. (kill -9 forgets none: a commit is in the WAL before
  -- COMMIT returns.)
  local ready, ready_i = {}, 0
  local requeue = {}   -- built messages to send again (cancelled by a stop, or lost to an outage)
  local get = states.get
  local function prepare_one()
    if requeue[1] then return table.remove(requeue, 1) end
    while true do
      local rcpt, given_key, line = source()
      if not rcpt then return rcpt end -- false: nothing now (others hold the rest)
      index = index + 1
      report.total = report.total + 1
      local key, why, email
      if type(rcpt) ~= "table" then
        why = "invalid recipient (not a table)"
      else
        email = rcpt.email
        if type(email) == "string" then
          key, why = address_key(email) -- M.key, inline (a row's hot path)
        else
          why = NO_EMAIL
        end
      end
      if not key then
        -- the row's own key (a Redis claim's), or its place in this run's list
        record(J.failed, given_key or ("#" .. index), why, err("invalid", why), line)
        report.failed = report.failed + 1
      else
        local st, this_run, jst = get(states, key)
        if st == nil and this_run then journal_failed(this_run, jst) end
        if this_run or pending[key] then
          -- met earlier in this run: a list naming one address twice sends once
          report.duplicates = report.duplicates + 1
          report.total = report.total - 1
        elseif st ~= nil and (FINAL[st] or (st == J_TRANSIENT and not retry_failed)) then
          local okm, me, mst = states:meet(key)
          if not okm then journal_failed(me, mst) end
          report.skipped = report.skipped + 1
        elseif st == J_LEAVING and not resend_in_flight then
          -- Its final dot was leaving when an earlier run died: it may have been delivered.
          local why = "final dot on its way when an earlier run stopped"
          record(J.ambiguous, key, why, err("ambiguous", why), line)
          report.ambiguous = report.ambiguous + 1
        else
          -- New, retried (T), never past its P (safe to send), or L resent on request.
          local okb, m, e = pcall(build, rcpt)
          if not okb then
            m, e = nil, m
          elseif type(m) ~= "table" and m ~= nil then
            m, e = nil, "the message function returned a " .. type(m)
          end
          if not m then
            record(J.failed, key, "invalid: " .. tostring(e), nil, line)
            report.failed = report.failed + 1
          else
            if templated and not m.to then m.to = email end
            if journal and st == nil then
              pending[key] = true -- its first row is its L (see pending)
            else
              record(J.prepared, key, "")
            end
            keys[m] = key
            if on_failure then lines[m] = line end -- for on_failure alone
            if st == J_LEAVING then resent[m] = true end
            return m
          end
        end
      end
    end
  end
  local nready = 0 -- #ready
  local function next_message()
    if ready_i < nready then
      ready_i = ready_i + 1
      return ready[ready_i]
    end
    ready, ready_i, nready = {}, 0, 0
    for i = 1, GROUP do
      local m = prepare_one()
      if not m then
        if m == false and i == 1 then return false end
        break
      end
      ready[i], nready = m, i
    end
    unsynced = unsynced + nready
    if nready == 0 then return nil end
    ready_i = 1
    return ready[1]
  end

  -- The circuit breaker: transient or connection failures in a row.
  local threshold = o.outage_threshold or 10
  local streak, streak_msgs, tripped = 0, {}, nil
  local misconfigured -- a configuration failure (TLS mode, certificate, host name, login): the run stops
  if o.handle_signals then core.catch_signals() end
  local function should_stop()
    if o.handle_signals then
      local n = core.signalled()
      if n >= 2 then return "now" end
      if n >= 1 then return true end
    end
    return tripped ~= nil or misconfigured ~= nil
  end
  local function mark(m)
    local key = keys[m]
    if journal and key then return journal, key end
  end
  -- Redis: L is written by the loop itself, before the final dot leaves
  local function mark_async(m)
    local key = keys[m]
    if key then rj:record(J.leaving, key) end
  end

  local function on_result(m, res, rerr)
    local key = keys[m] or "?"
    if res then
      if streak > 0 then streak, streak_msgs = 0, {} end
      -- done with: its entries go now (weak keys would keep them to the
      -- next collection, and the table would grow and rehash meanwhile)
      keys[m] = nil
      report.sent = report.sent + 1
      local info = res.code .. " " .. (res.text or "")
      local r1 = res.rejected[1]
      if r1 then info = info .. " refused " .. r1.address .. " " .. (r1.code or "") end
      local dup = res.ambiguous or resent[m]
      if dup then
        resent[m] = nil
        report.possible_duplicates = report.possible_duplicates + 1
        record(J_TWICE, key, info .. " (possible duplicate: an earlier try may have arrived)")
      else
        record(J_SENT, key, info)
      end
    elseif rerr.kind == "cancelled" or policy.misconfigured(rerr) then
      -- Never started, or stopped by the configuration (the TLS mode, the
      -- certificate, the host name, the login), not by its recipient: its P
      -- stands, so a later run sends it; a waiting run re-feeds it.
      if rerr.kind ~= "cancelled" then misconfigured = misconfigured or rerr end
      requeue[#requeue + 1] = m
    elseif rerr.kind == "ambiguous" or rerr.ambiguous or resent[m] then
      -- it, or an earlier try of it, may have arrived
      report.ambiguous = report.ambiguous + 1
      record(J.ambiguous, key, tostring(rerr), rerr, lines[m])
    elseif rerr.kind == "transient" or rerr.kind == "connection" then
      report.failed = report.failed + 1
      record(J.transient, key, tostring(rerr), rerr, lines[m])
      streak = streak + 1
      streak_msgs[#streak_msgs + 1] = m
      if streak >= threshold and not tripped then tripped = rerr end
    else
      report.failed = report.failed + 1
      record(J.failed, key, tostring(rerr), rerr, lines[m])
    end
    -- retries that ended with this message are no longer waiting
    local attempts = (res or rerr).attempts
    if attempts and attempts > 1 then report.deferred = math.max(0, report.deferred - (attempts - 1)) end
    if show then progress(false) end
  end

  local function on_event(ev)
    if ev.type == "retry" then -- a message waiting for its next attempt
      report.retried = report.retried + 1
      report.deferred = report.deferred + 1
    end
  end
  local ok, e
  local waited, delay = 0, o.outage_delay or 5
  local function send_all()
    while true do
      ok, e = pcall(pool.send_batch, pool, next_message, { on_result = on_result, should_stop = should_stop,
        mark = not rj and mark or nil, mark_async = rj and mark_async or nil, poll = rj and 1 or nil,
        before_wait = journal and commit_turn or nil, retry = o.retry, on_event = on_event })
      if not ok then break end
      if o.handle_signals and core.signalled() > 0 then
        report.stopped = "interrupted"
        break
      end
      if misconfigured then
        report.stopped = "config"
        report.config_error = tostring(misconfigured)
        break
      end
      if not tripped then break end
      report.outage = tostring(tripped)
      if (o.on_outage or "stop") == "stop" or waited >= (o.outage_wait or 3600) then
        -- The failures that tripped the breaker were the relay's, not their
        -- recipients': back to pending (P), so a plain resume sends them.
        report.stopped = "outage"
        local okr, re = pcall(function()
          for _, m in ipairs(streak_msgs) do
            if keys[m] then record(J.prepared, keys[m], "") end
          end
          commit(false)
        end)
        report.failed = report.failed - #streak_msgs
        report.pending_outage = #streak_msgs
        if not okr then ok, e = false, re end
        break
      end
      -- Wait, then probe: the outage's victims and the cancelled go first.
      if pool.on_event then pcall(pool.on_event, { type = "outage_wait", seconds = delay, err = tripped }) end
      loop.sleep(delay)
      waited = waited + delay
      delay = math.min(delay * 2, 300)
      for i = #streak_msgs, 1, -1 do
        local m = streak_msgs[i]
        table.insert(requeue, 1, m)
        report.failed = report.failed - 1
      end
      streak, streak_msgs, tripped = 0, {}, nil
      if o.handle_signals and core.signalled() > 0 then
        report.stopped = "interrupted"
        break
      end
    end
  end
  -- In Redis, the claims, marks and outcomes are round trips made on the
  -- pool's loop: while one waits (Redis slow, or stopped), the open SMTP
  -- connections go on being served.
  if rj then
    local okl, le = pcall(pool.on_loop, pool, send_all)
    if not okl then ok, e = false, le end
  else
    send_all()
  end
  -- Still pending: cancelled by the stop, prepared and never handed out, or
  -- (for a list of known length) not read yet.
  report.pending = #requeue + math.max(0, #ready - ready_i) + (report.pending_outage or 0)
  report.pending_outage = nil
  if report.stopped and self.expected then
    report.pending = report.pending + math.max(0, self.expected - report.total - report.duplicates)
  end
  if journal then
    -- what the journal still holds unresolved (this run's and earlier runs'):
    -- failures and ambiguities a scripted caller must not miss
    local c = journal:counts()
    report.failed_total, report.retryable, report.ambiguous_total = (c.F or 0) + (c.T or 0), c.T or 0, c.A or 0
    local okc, ce, cst = journal:close() -- commits, ends the run, lets the next one in
    if ok and not okc then ok, e = false, journal_error(ce, cst) end
  end
  if rj then
    -- claimed here and not sent: back to the queue for anyone (the ones
    -- that were tried ended before a final dot left: an L written for them
    -- is void; one that came with an earlier run's L keeps it)
    local tried, back = {}, {}
    for _, m in ipairs(requeue) do
      if resent[m] then back[#back + 1] = keys[m] else tried[#tried + 1] = keys[m] end
    end
    for i = ready_i + 1, #ready do back[#back + 1] = keys[ready[i]] end
    rj:unclaim(tried, true)
    rj:unclaim(back)
  end
  if not ok then
    if type(e) == "table" and e.csv_error then e = e.csv_error end
    if type(e) == "table" and e.kind == "journal" then
      -- the disk is full: what was recorded stands; a resume once there is
      -- room goes on from it (a message whose outcome could not be written
      -- is ambiguous then, never sent twice)
      report.stopped = "journal"
      report.journal_error = e.text
    elseif type(e) == "table" and e.kind then
      return nil, e
    else
      error(e, 0)
    end
  end
  if rj then
    -- the whole campaign's, every worker's
    local st = require("smtppool.campaign.redis").status(o.journal, name)
    if st then
      report.campaign = st
      report.failed_total, report.retryable, report.ambiguous_total = st.failed + st.retryable, st.retryable,
        st.ambiguous
    end
    if loaded then report.loaded, report.duplicates = loaded.added, report.duplicates + loaded.duplicates end
    if o.expire_after and not report.stopped and rj:expire_when_done(o.expire_after) then
      report.expires_in = o.expire_after
    end
    rj:close()
  end
  report.elapsed = core.now() - t0
  report.rate = report.elapsed > 0 and (report.sent / report.elapsed) or 0
  report.expected = self.expected
  progress(true)
  report.deferred = nil
  if o.report_json then
    -- the one JSON writer the command line uses too (dkjson), keys sorted
    local keys = {}
    for k in pairs(report) do keys[#keys + 1] = k end
    table.sort(keys)
    local text = require("dkjson").encode(report, { keyorder = keys }) .. "\n"
    local f, we = io.open(o.report_json, "wb")
    local ok = f ~= nil
    if f then
      ok, we = f:write(text)
      local closed, ce = f:close()
      if ok and not closed then ok, we = false, ce end
    end
    if not ok then report.report_error = ("cannot write the report %s: %s"):format(o.report_json, tostring(we)) end
  end
  return report
end

--- The live progress line for a progress table (what `progress =
-- function(st)` receives): the bar and how much of the list is done,
-- earlier runs' share included, then this run's counts, its rate and time,
-- and an ETA, or at the end "done" or "stopped".
function M.progress_line(st)
  local done = st.sent + st.failed + st.ambiguous
  local skipped = st.skipped or 0
  local eta_s = st.final and (st.stopped and "stopped" or "done")
    or (st.eta and ("ETA %ds"):format(math.ceil(st.eta)) or "ETA ?")
  local of = st.expected and ("%d/%d done%s | "):format(done + skipped, st.expected,
    skipped > 0 and (" (%d before this run)"):format(skipped) or "") or ""
  return ("%s%s%d sent, %d failed, %d ambiguous, %d deferred | %.0f msg/s | %ds | %s   "):format(
    M.bar(done + skipped, st.expected), of, st.sent, st.failed, st.ambiguous, st.deferred or 0, st.rate or 0,
    math.floor(st.elapsed or 0), eta_s)
end

--- A 20-cell progress bar with its percentage, `"[#####.....]  25% "`, or
-- "" when the list's length is unknown.
function M.bar(done, expected)
  if not expected or expected <= 0 then return "" end
  local frac = math.max(0, math.min(1, done / expected))
  local cells = math.floor(frac * 20 + 0.5)
  return ("[%s%s] %3d%% "):format(("#"):rep(cells), ("."):rep(20 - cells), math.floor(frac * 100))
end

--- A one-line human summary of a report.
function M.summary(r)
  local dup = (r.possible_duplicates or 0) > 0
    and (" (%d of them possibly twice)"):format(r.possible_duplicates) or ""
  local extra = ""
  if (r.duplicates or 0) > 0 then
    -- a Redis worker's count includes the rows another worker (or an earlier run) loaded first
    extra = extra .. (r.loaded and ", %d rows already in the campaign (loaded before, or listed twice)"
      or ", %d duplicate rows sent once"):format(r.duplicates)
  end
  if (r.pending or 0) > 0 then extra = extra .. (", %d pending"):format(r.pending) end
  -- a stopped run has read part of the list: say of how many
  local of = (r.stopped and r.expected and r.expected > r.total) and (" of %d"):format(r.expected) or ""
  local line = ("%d%s recipients: %d sent%s, %d failed, %d ambiguous, %d skipped (done before), %d retries%s, %.1fs, "
    .. "%.0f msg/s"):format(r.total, of, r.sent, dup, r.failed, r.ambiguous, r.skipped, r.retried, extra, r.elapsed,
    r.rate)
  if r.expires_in then
    line = line .. ("\nthe campaign is complete: its keys in Redis expire in %gs"):format(r.expires_in)
  end
  if r.stopped == "outage" then
    line = line .. "\nstopped: the relay is failing (" .. tostring(r.outage) .. "); nothing pending was lost: "
      .. "run again with --resume --retry-failed when it is back"
  elseif r.stopped == "config" then
    line = line .. "\nstopped: " .. tostring(r.config_error) .. "; nothing pending was lost: "
      .. "fix the configuration and run again with --resume"
  elseif r.stopped == "journal" then
    line = line .. "\nstopped: " .. tostring(r.journal_error)
  elseif r.stopped == "interrupted" then
    line = line .. "\nstopped on a signal; run again with --resume to send the rest"
  end
  return line
end

--- Deletes a campaign in Redis (its list, states, counts and failures):
-- refused while workers hold claims, unless `force`.
-- @tparam string url `redis://...`
-- @tparam string name the campaign
-- @tparam[opt] boolean force even while it runs
-- @treturn[1] number the keys deleted (0: no such campaign)
-- @return[2] nil
-- @treturn[2] string why
function M.purge(url, name, force)
  return require("smtppool.campaign.redis").purge(url, name, force)
end

setmetatable(M, { __call = function(_, o) return M.new(o) end })

return M
