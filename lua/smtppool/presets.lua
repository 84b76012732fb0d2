--- Provider presets: published limits as data, never as code.
--
-- Each preset is a table of `smtppool.new` options with the `source` it
-- was taken from and the `date` it was read. `smtppool.preset(name, o)`
-- returns the options with yours on top (your `host`, `auth`,
-- a lower rate...). A number a provider does not publish is left out: the
-- pool still learns a session cap and honours `LIMITS` when the server
-- advertises them. Providers change their limits; check the source.
-- @api smtppool.presets

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

--- Twilio SendGrid SMTP relay: up to 5,000 messages per SMTP connection and
-- 10,000 concurrent connections from one server. The login is the literal
-- user `apikey` with an API key as the password: pass
-- `auth = { password = key }` and the user comes from the preset.
M.sendgrid = {
  host = "smtp.sendgrid.net", port = 587, tls = "starttls",
  max_messages_per_conn = 5000,
  auth = { user = "apikey" },
  source = "Twilio SendGrid docs, \"Integrating with the SMTP API\" (Rate limits) "
    .. "https://www.twilio.com/docs/sendgrid/for-developers/sending-email/integrating-with-the-smtp-api",
  date = "2026-11",
}

--- Microsoft 365 / Exchange Online SMTP AUTH client submission: 30 messages
-- a minute per mailbox, 3 concurrent connections per mailbox (more are
-- refused with `432 4.3.2 concurrent connection limit exceeded`), at most
-- 500 recipients per message. The 10,000 recipients a day per mailbox is
-- not a window the pool keeps: mind it in your campaign's size.
M.microsoft365 = {
  host = "smtp.office365.com", port = 587, tls = "starttls",
  max_conns = 3,
  max_recipients_per_message = 500,
  rate = { messages_per_min = 30 },
  source = "Microsoft Learn, \"Exchange Online limits\" (Sending limits) "
    .. "https://learn.microsoft.com/en-us/office365/servicedescriptions/exchange-online-service-description/"
    .. "exchange-online-limits; Exchange Team Blog, \"Changes coming to the SMTP Authenticated Submission "
    .. "client protocol\" (three concurrent connections per mailbox)",
  date = "2026-11",
}

--- Google Workspace SMTP relay service (`smtp-relay.gmail.com`): a registered
-- user relays at most 10,000 messages in 24 hours (`550 5.4.5 Daily SMTP
-- relay limit exceeded for user`), kept here as a 24-hour window. The
-- organisation-wide ceilings (4.6 million recipients a day, 319,444 per 10
-- minutes) are per customer, not per sender.
M.google_relay = {
  host = "smtp-relay.gmail.com", port = 587, tls = "starttls",
  rate = { messages_per_day = 10000 },
  source = "Google Workspace Admin Help, \"Route outgoing SMTP relay messages through Google\" "
    .. "(Review sending limits for the SMTP relay service) https://support.google.com/a/answer/2956491",
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
-- @tparam string name a preset's name (`"mailersend"`, `"ses"`, `"ses_sandbox"`, `"sendgrid"`,
--   `"microsoft365"`, `"google_relay"`)
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
