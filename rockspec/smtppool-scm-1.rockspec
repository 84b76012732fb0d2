package = "smtppool"
version = "scm-1"
source = {
   url = "git+https://example.invalid/smtppool.git",
}
description = {
   summary = "A pooled, limit-aware SMTP client with a C core",
   detailed = [[
smtppool sends mail over a pool of SMTP connections that never reuses a dead
connection, rotates connections before a server's per-session cap and reports
one honest outcome per message. The protocol machine, codecs and socket driver
are C (OpenSSL for TLS); the pool is Lua.
]],
   license = "MIT",
}
-- The Lua modules run under Lua 5.1, LuaJIT 2.1 and Lua 5.4:
-- tests/spec/rockspec_spec.lua builds this rockspec with LuaRocks for each
-- and loads it, and `make test` runs every spec under Lua 5.4 and LuaJIT.
-- For LuaJIT, pass LUA_INCDIR=/usr/include/luajit-2.1. The CLI needs
-- argparse and dkjson.
dependencies = {
   "lua >= 5.1, < 5.5",
   "argparse",
   "dkjson",
}
external_dependencies = {
   OPENSSL = { header = "openssl/ssl.h" },
   HIREDIS = { header = "hiredis/hiredis.h" },
   CARES = { header = "ares.h" },
   SQLITE = { header = "sqlite3.h" },
}
build = {
   type = "builtin",
   modules = {
      ["smtppool"] = "lua/smtppool/init.lua",
      ["smtppool.compose.message"] = "lua/smtppool/compose/message.lua",
      ["smtppool.limits.windows"] = "lua/smtppool/limits/windows.lua",
      ["smtppool.engine.retry"] = "lua/smtppool/engine/retry.lua",
      ["smtppool.compose.template"] = "lua/smtppool/compose/template.lua",
      ["smtppool.campaign"] = "lua/smtppool/campaign.lua",
      ["smtppool.compose.csv"] = "lua/smtppool/compose/csv.lua",
      ["smtppool.ngx"] = "lua/smtppool/ngx.lua",
      ["smtppool.errors"] = "lua/smtppool/errors.lua",
      ["smtppool.options"] = "lua/smtppool/options.lua",
      ["smtppool.compose.prepare"] = "lua/smtppool/compose/prepare.lua",
      ["smtppool.engine.policy"] = "lua/smtppool/engine/policy.lua",
      ["smtppool.engine.scheduler"] = "lua/smtppool/engine/scheduler.lua",
      ["smtppool.engine.events"] = "lua/smtppool/engine/events.lua",
      ["smtppool.engine.learning"] = "lua/smtppool/engine/learning.lua",
      ["smtppool.engine.loop"] = "lua/smtppool/engine/loop.lua",
      ["smtppool.driver.native"] = "lua/smtppool/driver/native.lua",
      ["smtppool.presets"] = "lua/smtppool/presets.lua",
      ["smtppool.engine.relays"] = "lua/smtppool/engine/relays.lua",
      ["smtppool.limits.process"] = "lua/smtppool/limits/process.lua",
      ["smtppool.limits.shdict"] = "lua/smtppool/limits/shdict.lua",
      ["smtppool.limits.redis"] = "lua/smtppool/limits/redis.lua",
      ["smtppool.redis.client"] = "lua/smtppool/redis/client.lua",
      ["smtppool.redis.queue"] = "lua/smtppool/redis/queue.lua",
      ["smtppool.outbox"] = "lua/smtppool/outbox.lua",
      ["smtppool.url"] = "lua/smtppool/url.lua",
      ["smtppool.campaign.redis"] = "lua/smtppool/campaign/redis.lua",
      ["smtppool.driver.ngx"] = "lua/smtppool/driver/ngx.lua",
      ["smtppool.core"] = {
         sources = {
            "src/proto/sp_buf.c", "src/proto/sp_error.c", "src/proto/sp_reply.c", "src/proto/sp_caps.c",
            "src/proto/sp_codec.c", "src/proto/sp_session.c", "src/proto/sp_session_auth.c", "src/proto/sp_session_tx.c",
            "src/proto/sp_sasl.c", "src/proto/sp_envelope.c",
            "src/mail/sp_mime.c", "src/mail/sp_body.c", "src/mail/sp_dkim.c", "src/mail/sp_signq.c",
            "src/mail/sp_pump.c",
            "src/net/sp_tls.c", "src/net/sp_net.c", "src/net/sp_net_connect.c", "src/net/sp_proxy.c",
            "src/net/sp_resolve.c",
            "src/lua/lsmtppool.c", "src/lua/lerror.c", "src/lua/lsession.c", "src/lua/lconn.c",
            "src/lua/lmail.c", "src/lua/ljournal.c", "src/lua/lredis.c", "src/lua/llist.c", "src/lua/ltemplate.c",
            "src/store/sp_journal.c",
         },
         defines = { "_GNU_SOURCE" },
         libraries = { "ssl", "crypto", "hiredis", "cares", "sqlite3", "pthread" },
         incdirs = { "$(OPENSSL_INCDIR)", "$(HIREDIS_INCDIR)", "$(CARES_INCDIR)", "$(SQLITE_INCDIR)", "src/proto", "src/mail", "src/net", "src/store", "src/lua" },
         libdirs = { "$(OPENSSL_LIBDIR)", "$(HIREDIS_LIBDIR)", "$(CARES_LIBDIR)", "$(SQLITE_LIBDIR)" },
      },
   },
   install = {
      bin = { smtppool = "bin/smtppool" },
   },
}
