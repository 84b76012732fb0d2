-- Sends N messages through one smtppool tree (its lua/ and its built core.so: build/lua5.4/, or lua/ in trees before it moved)
-- and prints the seconds taken: `make bench BASELINE=dir` runs it for an
-- older checkout and for this one, interleaved, in the same run.
-- Usage: lua5.4 bench/send_tree.lua TREE PORT CONNS PER_CONN N SIZE
local tree, port, conns, per, N, SIZE = arg[1], tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4]),
  tonumber(arg[5]), tonumber(arg[6])
package.path = tree .. "/lua/?.lua;" .. tree .. "/lua/?/init.lua;" .. package.path
package.cpath = tree .. "/build/lua5.4/?.so;" .. tree .. "/lua/?.so;" .. package.cpath
local smtppool = require("smtppool")
local send_loop = dofile(arg[0]:match("^(.*)/[^/]*$") .. "/send_loop.lua")
print(send_loop(smtppool, port, conns, per > 0 and per or nil, N, SIZE))
