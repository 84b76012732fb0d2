-- Pool options for `bin/smtppool send --config`. The demo overrides host
-- and port with a local exim; point them at your provider instead.
return {
  host = os.getenv("SMTP_HOST") or "127.0.0.1",
  port = tonumber(os.getenv("SMTP_PORT") or "25"),
  tls = os.getenv("SMTP_TLS") or "none",
  max_conns = 4,
  max_messages_per_conn = 5,              -- e.g. MailerSend's per-connection cap
  rate = { connections_per_min = 300 },
  from = "Newsletter <news@example.org>",
}
