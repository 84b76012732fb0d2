--- Retry policies.
--
-- A policy is a function `(err, attempt, msg) -> delay_seconds | false`,
-- called after each failed attempt of a message with the error value, the
-- number of attempts made so far and the message. Returning a number sends
-- the message again (on a fresh connection when the old one died) after that
-- many seconds; `false` makes the failure final.
--
-- A message moved off a connection the server declared exhausted (a 421, or
-- a 4xx to MAIL after earlier transactions) is not charged an attempt and
-- the policy is not asked.
-- @api smtppool.engine.retry

local M = {}

-- Errors no retry can fix.
local FINAL = { permanent = true, invalid = true, config = true, auth = true, tls = true }

--- Exponential backoff with jitter (the default policy).
-- @tparam[opt] table o
--
-- * `attempts` (default 3): tries in all, the first included.
-- * `base` (seconds, default 1): the first delay; each later one doubles.
-- * `max` (seconds, default 60): the cap on one delay.
-- * `jitter` (0..1, default 0.5): the share of each delay drawn at random,
--   so a crowd of clients does not come back at the same moment.
-- * `ambiguous` (default false): whether to resend a message whose
--   connection was lost after the final dot. RFC 5321 section 6.1 warns that
--   this is how duplicates happen; say `true` if a duplicate is better than
--   a loss for your mail.
--
-- Permanent (5xx), invalid, config, auth and TLS errors are never retried.
-- @treturn function the policy
function M.backoff(o)
  o = o or {}
  for k, v in pairs(o) do
    local want = ({ attempts = "number", base = "number", max = "number", jitter = "number", ambiguous = "boolean" })[k]
    if not want then error(("smtppool.retry.backoff: unknown option '%s'"):format(tostring(k)), 2) end
    if type(v) ~= want then error(("smtppool.retry.backoff: '%s' must be a %s"):format(k, want), 2) end
  end
  local attempts, base, max = o.attempts or 3, o.base or 1, o.max or 60
  local jitter, ambiguous = o.jitter or 0.5, o.ambiguous or false
  -- Written so that NaN fails every test (it compares false with anything).
  if not (attempts >= 1 and attempts <= 1000 and attempts == math.floor(attempts)
      and base >= 0 and base < math.huge and max >= 0 and max < math.huge and jitter >= 0 and jitter <= 1) then
    error("smtppool.retry.backoff: attempts an integer from 1 to 1000, finite base >= 0 and max >= 0, "
      .. "0 <= jitter <= 1", 2)
  end
  return function(err, attempt)
    if attempt >= attempts then return false end
    local kind = err and err.kind
    if FINAL[kind] then return false end
    if kind == "ambiguous" and not ambiguous then return false end
    local d = math.min(max, base * 2 ^ (attempt - 1))
    return d * (1 - jitter) + d * jitter * math.random()
  end
end

--- A policy that never retries.
function M.none()
  return function() return false end
end

return M
