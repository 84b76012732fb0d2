#include "sp_error.h"

#include <openssl/err.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static const char *const kind_names[SP_KIND_COUNT] = {
    "none",     "transient", "permanent", "connection", "ambiguous",
    "protocol", "tls",       "auth",      "invalid",    "config",
};

static const char *const phase_names[SP_PHASE_COUNT] = {
    "none", "connect", "greeting", "ehlo",     "starttls", "auth", "mail",
    "rcpt", "data",    "data_end", "rset",     "noop",     "quit",
};

const char *sp_kind_name(sp_kind k) { return (unsigned)k < SP_KIND_COUNT ? kind_names[k] : "?"; }

const char *sp_phase_name(sp_phase p)
{
    return (unsigned)p < SP_PHASE_COUNT ? phase_names[p] : "?";
}

void sp_error_clear(sp_error *e) { memset(e, 0, sizeof *e); }

void sp_error_set(sp_error *e, sp_kind kind, sp_phase phase, const char *fmt, ...)
{
    va_list ap;
    sp_error_clear(e);
    e->kind = kind;
    e->phase = phase;
    va_start(ap, fmt);
    vsnprintf(e->text, sizeof e->text, fmt, ap);
    va_end(ap);
}

sp_kind sp_kind_of_code(int code)
{
    if (code == 421)
        return SP_KIND_CONNECTION;
    if (code >= 400 && code < 500)
        return SP_KIND_TRANSIENT;
    if (code >= 500 && code < 600)
        return SP_KIND_PERMANENT;
    return SP_KIND_PROTOCOL;
}

void sp_openssl_reason(char *buf, size_t n)
{
    unsigned long e = ERR_peek_last_error();
    if (e)
        ERR_error_string_n(e, buf, n);
    else
        snprintf(buf, n, "unknown OpenSSL error");
    ERR_clear_error();
}
