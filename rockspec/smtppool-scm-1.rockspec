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
dependencies = {
   "lua >= 5.1",
}
external_dependencies = {
   OPENSSL = { header = "openssl/ssl.h" },
}
build = {
   type = "builtin",
   modules = {
      ["smtppool"] = "lua/smtppool/init.lua",
      ["smtppool.message"] = "lua/smtppool/message.lua",
      ["smtppool.rate"] = "lua/smtppool/rate.lua",
      ["smtppool.retry"] = "lua/smtppool/retry.lua",
      ["smtppool.template"] = "lua/smtppool/template.lua",
      ["smtppool.campaign"] = "lua/smtppool/campaign.lua",
      ["smtppool.csv"] = "lua/smtppool/csv.lua",
      ["smtppool.ngx"] = "lua/smtppool/ngx.lua",
      ["smtppool.core"] = {
         sources = {
            "src/sp_buf.c", "src/sp_error.c", "src/sp_reply.c", "src/sp_caps.c",
            "src/sp_codec.c", "src/sp_mime.c", "src/sp_body.c", "src/sp_dkim.c", "src/sp_session.c", "src/sp_tls.c", "src/sp_net.c", "src/lsmtppool.c",
         },
         defines = { "_GNU_SOURCE" },
         libraries = { "ssl", "crypto" },
         incdirs = { "$(OPENSSL_INCDIR)" },
         libdirs = { "$(OPENSSL_LIBDIR)" },
      },
   },
}
