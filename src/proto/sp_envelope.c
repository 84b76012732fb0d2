#include "sp_envelope.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sp_session.h"

int sp_xtext(sp_buf *o, const char *p)
{
    static const char hex[] = "0123456789ABCDEF";
    for (; *p; p++) {
        unsigned char c = (unsigned char)*p;
        if (c < 33 || c > 126 || c == '+' || c == '=') {
            char e[3] = {'+', hex[c >> 4], hex[c & 15]};
            if (sp_buf_append(o, e, 3) < 0)
                return -1;
        } else if (sp_buf_append(o, p, 1) < 0) {
            return -1;
        }
    }
    return 0;
}

/* A path must be printable ASCII (or UTF-8 with SMTPUTF8), no brackets and
 * at most 254 octets (RFC 5321 4.5.3.1.3 allows 256 with the brackets). */
static int check_path(const char *p, int *utf8, const char *what, sp_error *err)
{
    size_t n = strlen(p);
    if (n > 254) {
        sp_error_set(err, SP_KIND_INVALID, SP_PHASE_NONE, "%s address longer than 254 octets", what);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c < 0x21 || c == 0x7f || c == '<' || c == '>') {
            sp_error_set(err, SP_KIND_INVALID, SP_PHASE_NONE,
                         "%s address contains a forbidden byte 0x%02x at offset %zu", what, c, i);
            return -1;
        }
        if (c >= 0x80)
            *utf8 = 1;
    }
    return 0;
}

int sp_envelope_check(const sp_tx_opts *o, const sp_caps *caps, int tls_active, int *utf8, sp_error *err)
{
    *utf8 = 0;
    if (o->nrcpt == 0) {
        sp_error_set(err, SP_KIND_INVALID, SP_PHASE_NONE, "no recipients");
        return -1;
    }
    if (check_path(o->from, utf8, "sender", err) < 0)
        return -1;
    for (size_t i = 0; i < o->nrcpt; i++) {
        if (!*o->rcpts[i]) {
            sp_error_set(err, SP_KIND_INVALID, SP_PHASE_NONE, "recipient %zu is empty", i + 1);
            return -1;
        }
        if (check_path(o->rcpts[i], utf8, "recipient", err) < 0)
            return -1;
    }
    if (*utf8 && !(caps->flags & SP_CAP_SMTPUTF8)) {
        sp_error_set(err, SP_KIND_INVALID, SP_PHASE_MAIL,
                     "an address is not ASCII and the server does not offer SMTPUTF8");
        return -1;
    }
    if (o->body_8bit && !(caps->flags & SP_CAP_8BITMIME) && !*utf8) {
        sp_error_set(err, SP_KIND_INVALID, SP_PHASE_MAIL,
                     "the message has 8-bit bytes and the server does not offer 8BITMIME; "
                     "encode it (quoted-printable or base64) first");
        return -1;
    }
    /* RFC 8689 4.2.1: a REQUIRETLS message goes only over TLS to a server
     * that offers REQUIRETLS (which servers advertise over TLS alone). */
    if (o->requiretls && (!tls_active || !(caps->flags & SP_CAP_REQUIRETLS))) {
        sp_error_set(err, SP_KIND_TLS, SP_PHASE_MAIL, "the message requires TLS at every hop (REQUIRETLS) and %s",
                     tls_active ? "the server does not offer REQUIRETLS" : "this connection is not TLS");
        return -1;
    }
    if ((caps->flags & SP_CAP_SIZE) && caps->size_max && o->size > caps->size_max) {
        sp_error_set(err, SP_KIND_PERMANENT, SP_PHASE_MAIL, "message of %lu bytes exceeds the server's SIZE limit of %lu",
                     o->size, caps->size_max);
        return -1;
    }
    return 0;
}

int sp_envelope_mail(sp_buf *out, const sp_tx_opts *o, const sp_caps *caps, int utf8, sp_error *err)
{
    char num[32];
    if (sp_buf_append_str(out, "MAIL FROM:<") < 0 || sp_buf_append_str(out, o->from) < 0 ||
        sp_buf_append_str(out, ">") < 0)
        goto oom;
    if ((caps->flags & SP_CAP_SIZE) && o->size) {
        snprintf(num, sizeof num, " SIZE=%lu", o->size);
        if (sp_buf_append_str(out, num) < 0)
            goto oom;
    }
    if (o->body_8bit && (caps->flags & SP_CAP_8BITMIME) && sp_buf_append_str(out, " BODY=8BITMIME") < 0)
        goto oom;
    if (utf8 && sp_buf_append_str(out, " SMTPUTF8") < 0)
        goto oom;
    if (o->requiretls && sp_buf_append_str(out, " REQUIRETLS") < 0)
        goto oom;
    if (caps->flags & SP_CAP_DSN) {
        if (o->dsn_ret && (sp_buf_append_str(out, " RET=") < 0 || sp_buf_append_str(out, o->dsn_ret) < 0))
            goto oom;
        if (o->dsn_envid) {
            size_t before = sp_buf_pending(out);
            if (sp_buf_append_str(out, " ENVID=") < 0 || sp_xtext(out, o->dsn_envid) < 0)
                goto oom;
            if (sp_buf_pending(out) - before - 7 > 200) { /* RFC 3461 4.4: 100 characters, xtext doubles at most */
                sp_error_set(err, SP_KIND_INVALID, SP_PHASE_MAIL, "DSN envelope id longer than 100 characters");
                return -1;
            }
        }
    }
    return 0;
oom:
    sp_error_set(err, SP_KIND_INVALID, SP_PHASE_NONE, "out of memory");
    return -1;
}

char *sp_envelope_rcpt_params(const sp_tx_opts *o, const sp_caps *caps, int *oom)
{
    *oom = 0;
    if (!(caps->flags & SP_CAP_DSN) || !o->dsn_notify)
        return NULL;
    size_t pl = strlen(o->dsn_notify) + 9;
    char *p = malloc(pl);
    if (!p) {
        *oom = 1;
        return NULL;
    }
    snprintf(p, pl, " NOTIFY=%s", o->dsn_notify);
    return p;
}

int sp_envelope_rcpt(sp_buf *o, const char *a, const char *params, int orcpt)
{
    if (sp_buf_append(o, "RCPT TO:<", 9) < 0 || sp_buf_append_str(o, a) < 0 || sp_buf_append(o, ">", 1) < 0)
        return -1;
    if (params && sp_buf_append_str(o, params) < 0)
        return -1;
    if (orcpt && (sp_buf_append_str(o, " ORCPT=rfc822;") < 0 || sp_xtext(o, a) < 0))
        return -1;
    return sp_buf_append(o, "\r\n", 2);
}
