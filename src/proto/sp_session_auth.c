/* sp_session_auth: what follows EHLO (STARTTLS, AUTH and its mechanisms)
 * and the scrubber that keeps secrets out of replies kept as errors. */
#include "sp_session_int.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "sp_envelope.h"
#include "sp_sasl.h"

/* Remembers a string the server must not echo back into our errors. */
void sp_ss_add_redact(sp_session *s, const char *p, size_t n)
{
    if (n == 0 || s->nredact == SP_REDACT_MAX)
        return;
    char *c = malloc(n + 1);
    if (!c)
        return;
    memcpy(c, p, n);
    c[n] = 0;
    s->redact[s->nredact++] = c;
}

/* Where secret sec starts in hay, in any letter case and with line breaks
 * and blanks allowed between its characters (a server that folds an echo
 * over two reply lines, or lower-cases it); *span is how much of hay the
 * match covers. NULL when it is not there. */
static const char *find_loose(const char *hay, const char *sec, size_t *span)
{
    for (const char *h = hay; *h; h++) {
        const char *p = h, *q = sec;
        while (*q && *p) {
            if (p != h && (*p == '\n' || *p == '\r' || *p == ' ' || *p == '\t')) {
                p++;
                continue;
            }
            if (tolower((unsigned char)*p) != tolower((unsigned char)*q))
                break;
            p++;
            q++;
        }
        if (!*q) {
            *span = (size_t)(p - h);
            return h;
        }
    }
    return NULL;
}

/* Replaces every remembered secret in a reply's text with "[redacted]", so
 * a server that echoes the client's AUTH line, the password or its base64
 * (whole, folded over lines, in another case) cannot put the credentials
 * into an error, an event or a log. */
void sp_ss_scrub_reply(sp_session *s, sp_reply *r)
{
    static const char mark[] = "[redacted]";
    if (!r->text || s->nredact == 0)
        return;
    for (size_t k = 0; k < s->nredact; k++) {
        const char *sec = s->redact[k];
        size_t span;
        const char *hit = find_loose(r->text, sec, &span);
        if (!hit)
            continue;
        /* each match covers at least one character: the result is at most
         * text_len * sizeof mark long */
        size_t cap = (r->text_len + 1) * sizeof mark + 1;
        char *out = malloc(cap);
        if (!out) { /* cannot rewrite: drop the text rather than leak it */
            OPENSSL_cleanse(r->text, r->text_len);
            r->text[0] = 0;
            r->text_len = 0;
            return;
        }
        size_t o = 0;
        const char *p = r->text;
        while (hit) {
            memcpy(out + o, p, (size_t)(hit - p));
            o += (size_t)(hit - p);
            memcpy(out + o, mark, sizeof mark - 1);
            o += sizeof mark - 1;
            p = hit + span;
            hit = find_loose(p, sec, &span);
        }
        size_t rest = strlen(p);
        memcpy(out + o, p, rest + 1);
        o += rest;
        OPENSSL_cleanse(r->text, r->text_len);
        free(r->text);
        r->text = out;
        r->text_len = o;
    }
}

/* Queues an AUTH line holding a secret (not through snprintf's fixed buffer). */
static int queue_secret(sp_session *s, const char *prefix, const unsigned char *raw, size_t n)
{
    size_t pl = strlen(prefix), bl = sp_base64_encoded_len(n);
    char *b = malloc(bl + 1);
    if (!b)
        return -1;
    sp_base64_encode(raw, n, b);
    int rc = 0;
    if (sp_buf_append(&s->out, prefix, pl) < 0 || sp_buf_append(&s->out, b, bl) < 0 ||
        sp_buf_append(&s->out, "\r\n", 2) < 0)
        rc = -1;
    s->queued += pl + bl + 2;
    b[bl] = 0;
    sp_ss_add_redact(s, b, bl);
    OPENSSL_cleanse(b, bl);
    free(b);
    return rc < 0 ? -1 : sp_ss_await(s, CMD_AUTH, 0);
}

/* The first AUTH line of mechanism m (RFC 4954 4: with the initial
 * response when the mechanism has one). */
static int auth_begin(sp_session *s, unsigned m)
{
    s->auth_mech = m;
    s->auth_step = 0;
    sp_ss_set_state(s, SP_ST_AUTH);
    unsigned char *raw;
    size_t n;
    if (sp_sasl_initial(m, s->auth_user, s->auth_secret, &raw, &n) < 0)
        return -1;
    char line[32];
    snprintf(line, sizeof line, raw ? "AUTH %s " : "AUTH %s", sp_auth_mech_name(m));
    if (!raw)
        return sp_ss_queue_cmd(s, line, CMD_AUTH, 0);
    int rc = queue_secret(s, line, raw, n);
    sp_sasl_free(raw, n);
    return rc;
}

/* Chooses the mechanism: the one asked for, else the strongest shared. */
static int start_auth(sp_session *s)
{
    if (!s->tls_active && !s->allow_plaintext_auth) {
        sp_ss_die_msg(s, SP_KIND_AUTH, SP_PHASE_AUTH,
                "refusing to send credentials over a connection without TLS "
                "(allow_plaintext_auth = true permits it)");
        return -1;
    }
    if (!(s->caps.flags & SP_CAP_AUTH)) {
        sp_ss_die_msg(s, SP_KIND_AUTH, SP_PHASE_AUTH, "the server does not offer AUTH");
        return -1;
    }
    const char *why = NULL;
    unsigned m = sp_sasl_choose(s->caps.auth, s->auth_want, &why);
    if (!m) {
        char t[160];
        if (s->auth_want)
            snprintf(t, sizeof t, "the server does not offer AUTH %s", sp_auth_mech_name(s->auth_want));
        else
            snprintf(t, sizeof t, "%s", why);
        sp_ss_die_msg(s, SP_KIND_AUTH, SP_PHASE_AUTH, t);
        return -1;
    }
    if (s->auth_gate) {
        /* the driver's caller spends its login window now, then lets it go */
        s->auth_waiting = 1;
        s->auth_mech_chosen = (int)m;
        sp_ss_set_state(s, SP_ST_AUTH);
        sp_ss_push_event(s, SP_EV_AUTH);
        return 0;
    }
    if (auth_begin(s, m) < 0) {
        sp_ss_die_oom(s);
        return -1;
    }
    return 0;
}

int sp_session_auth_go(sp_session *s)
{
    if (!s->auth_waiting)
        return -1;
    s->auth_waiting = 0;
    if (auth_begin(s, (unsigned)s->auth_mech_chosen) < 0) {
        sp_ss_die_oom(s);
        return -1;
    }
    return 0;
}

/* What follows a successful EHLO/HELO: STARTTLS, AUTH, or READY. */
int sp_ss_after_ehlo(sp_session *s)
{
    if (!s->tls_active && s->starttls != SP_STARTTLS_NO) {
        if (s->caps.flags & SP_CAP_STARTTLS) {
            sp_ss_set_state(s, SP_ST_STARTTLS);
            if (sp_ss_queue_cmd(s, "STARTTLS", CMD_STARTTLS, 0) < 0)
                return sp_ss_die_oom(s), -1;
            return 0;
        }
        if (s->starttls == SP_STARTTLS_REQUIRED) {
            sp_ss_die_msg(s, SP_KIND_TLS, SP_PHASE_STARTTLS,
                    "the server does not offer STARTTLS and tls = \"starttls\" requires it");
            return -1;
        }
    }
    if (s->auth_user && !s->authed)
        return start_auth(s);
    sp_ss_set_state(s, SP_ST_READY);
    sp_ss_push_event(s, SP_EV_READY);
    return 0;
}

/* RFC 2195: answer the base64 challenge with "user hex(HMAC-MD5(secret, challenge))". */
static int cram_md5_response(sp_session *s, const sp_reply *r)
{
    unsigned char *raw;
    size_t n;
    int rc = sp_sasl_cram_md5(s->auth_user, s->auth_secret, r->text, r->text_len, &raw, &n);
    if (rc < 0)
        return rc;
    rc = queue_secret(s, "", raw, n);
    sp_sasl_free(raw, n);
    return rc;
}

int sp_ss_on_auth_reply(sp_session *s, sp_reply *r)
{
    if (r->code == 235) {
        s->authed = 1;
        sp_ss_set_state(s, SP_ST_READY);
        sp_ss_push_event(s, SP_EV_READY);
        return 0;
    }
    if (r->code == 334) {
        int rc = 0;
        s->auth_step++;
        if (s->auth_mech == SP_AUTH_LOGIN && s->auth_step == 1)
            rc = queue_secret(s, "", (const unsigned char *)s->auth_user, strlen(s->auth_user));
        else if (s->auth_mech == SP_AUTH_LOGIN && s->auth_step == 2)
            rc = queue_secret(s, "", (const unsigned char *)s->auth_secret, strlen(s->auth_secret));
        else if (s->auth_mech == SP_AUTH_CRAM_MD5 && s->auth_step == 1)
            rc = cram_md5_response(s, r);
        else if (s->auth_mech == SP_AUTH_XOAUTH2 && s->auth_step == 1)
            rc = queue_secret(s, "", (const unsigned char *)"", 0); /* error details follow: ack them */
        else
            rc = -2;
        if (rc == -2) {
            sp_ss_die_msg(s, SP_KIND_PROTOCOL, SP_PHASE_AUTH, "unexpected 334 challenge in the AUTH exchange");
            return -1;
        }
        if (rc < 0)
            return sp_ss_die_oom(s), -1;
        return 0;
    }
    /* 535 bad credentials (and any 5xx) is final; 454 and other 4xx are transient. */
    sp_ss_die_reply(s, SP_PHASE_AUTH, r);
    if (r->code >= 500 || r->code == 421)
        s->err.kind = r->code == 421 ? SP_KIND_CONNECTION : SP_KIND_AUTH;
    return -1;
}
