--- What the URLs smtppool reads share (Redis: `redis[s]://`, proxies:
-- `socks5://`, `http://`): percent-decoding, the credentials before `@`,
-- and the URL as shown in errors and logs, never with its password.
-- @module smtppool.url

local M = {}

--- Decodes %XX escapes (a password holding '@', ':' or '/' must be written so).
-- @tparam string s
-- @treturn string|nil the decoded text; nil for a bad escape
function M.unescape(s)
  if s:find("%%") and not s:find("%%%x%x") then return nil end
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

--- Splits `[userinfo@]rest` and decodes the credentials.
-- @tparam string s what follows `scheme://`
-- @tparam string alone what a userinfo without ':' is: `"password"` (Redis:
--   `redis://secret@host`) or `"user"` (a proxy's)
-- @treturn[1] string|nil user
-- @treturn[1] string|nil password
-- @treturn[1] string the rest (host, port, path)
-- @treturn[2] nil
-- @treturn[2] nil
-- @treturn[2] nil a bad %-escape
function M.userinfo(s, alone)
  local auth, rest = s:match("^(.*)@([^@]*)$")
  if not auth then return nil, nil, s end
  local u, pw = auth:match("^([^:]*):(.*)$")
  if not u then
    if alone == "password" then u, pw = "", auth else u, pw = auth, "" end
  end
  local user, password = M.unescape(u), M.unescape(pw)
  if not user or not password then return nil, nil, nil end
  return user ~= "" and user or nil, password, rest
end

--- The URL without its password (for errors and logs): `scheme://user:***@host`.
-- @tparam string url
-- @tparam[opt] string alone as for `userinfo`: with `"password"`, a
--   userinfo without ':' is hidden whole
-- @treturn string
function M.redact(url, alone)
  local s, n = url:gsub("^(%a[%w+.-]*://[^:@/]*:)[^@]*@", "%1***@")
  if n == 0 and alone == "password" then s = url:gsub("^(%a[%w+.-]*://)[^:@/]+@", "%1***@") end
  return s
end

return M
