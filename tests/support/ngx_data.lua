-- Test data shared by tests/support/ngx_app.lua (in nginx) and
-- tests/spec/ngx_spec.lua (which checks what the server received).
local M = {}

-- About 1.1 MB: 20,000 numbered lines, every seventh starting with a dot.
function M.big()
  local t = { "Subject: big\r\nX-Test-Id: big\r\n\r\n" }
  for i = 1, 20000 do
    t[#t + 1] = ("%sline %05d %s\r\n"):format(i % 7 == 0 and "." or "", i, ("abcdefghij"):rep(5))
  end
  return table.concat(t)
end

return M
