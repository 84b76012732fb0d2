--- Provider presets: published limits as data, never as code.
--
-- Each preset is a table of `smtppool.new` options with the `source` it
-- was taken from and the `date` it was read. `smtppool.preset(name, o)`
-- returns the options with yours on top (your `host`, `auth`,
-- a lower rate...). A number a provider does not publish is left out: the
-- pool still learns a session cap and honours `LIMITS` when the server
-- advertises them. Providers change their limits; check the source.
-- @module smtppool.presets

local M = {}

--- MailerSend SMTP relay: 5 transactions per connection, 120 AUTH per
-- minute per user, 300 connections per minute per IP.
M.mailersend = {
  host = "smtp.mailersend.net", port = 587, tls = "starttls",
  max_messages_per_conn = 5,
  rate = { auth_per_min = 120, connections_per_min = 300 },
  source = "MailerSend, \"How to configure SMTP connections correctly (421: Service not available error)\"",
  date = "2026-11",
}

--- Amazon SES SMTP (out of the sandbox): 50 recipients per message; the
-- sending rate is per account (set `rate.messages_per_sec` to yours). SES
-- does not publish a per-session message count; it asks for a fixed number
-- of messages and a bounded lifetime per connection, and closes a session
-- that ran too long with a 421 ("Maximum message count per session reached"),
-- which the pool learns from.
M.ses = {
  port = 587, tls = "starttls",
  max_recipients_per_message = 50,
  max_conn_lifetime = 300,
  source = "AWS, \"Service quotas in Amazon SES\" (SES Developer Guide) and \"Amazon SES SMTP Recommendations\" "
    .. "(AWS Messaging & Targeting Blog)",
  date = "2026-11",
}

--- Amazon SES in the sandbox: 1 message a second and 50 recipients per message.
M.ses_sandbox = {
  port = 587, tls = "starttls",
  max_recipients_per_message = 50,
  max_conn_lifetime = 300,
  rate = { messages_per_sec = 1 },
  source = "AWS, \"Service quotas in Amazon SES\" (SES Developer Guide)",
  date = "2026-11",
}

local META = { source = true, date = true }

local function copy(t)
  local o = {}
  for k, v in pairs(t) do o[k] = type(v) == "table" and copy(v) or v end
  return o
end

--- The options of a preset with overrides on top (tables such as `rate`
-- are merged key by key).
-- @tparam string name a preset's name (`"mailersend"`, `"ses"`, `"ses_sandbox"`)
-- @tparam[opt] table overrides options that win over the preset's
-- @treturn table options for `smtppool.new`
function M.options(name, overrides)
  local p = type(name) == "string" and rawget(M, name)
  if type(p) ~= "table" then
    local names = {}
    for k, v in pairs(M) do if type(v) == "table" then names[#names + 1] = k end end
    table.sort(names)
    error(("smtppool.preset: unknown preset '%s' (known: %s)"):format(tostring(name), table.concat(names, ", ")), 2)
  end
  local o = {}
  for k, v in pairs(p) do
    if not META[k] then o[k] = type(v) == "table" and copy(v) or v end
  end
  for k, v in pairs(overrides or {}) do
    if type(v) == "table" and type(o[k]) == "table" then
      for k2, v2 in pairs(v) do o[k][k2] = v2 end
    else
      o[k] = v
    end
  end
  return o
end

return M
