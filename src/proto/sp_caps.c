#include "sp_caps.h"

#include <string.h>
#include <strings.h>

/* Case-insensitive: does word (length n) equal kw? */
static int word_is(const char *w, size_t n, const char *kw)
{
    return strlen(kw) == n && strncasecmp(w, kw, n) == 0;
}

static const char *const mech_names[SP_AUTH_COUNT] = {"PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"};

unsigned sp_auth_mech_of(const char *name, size_t n)
{
    for (unsigned i = 0; i < SP_AUTH_COUNT; i++)
        if (word_is(name, n, mech_names[i]))
            return 1u << i;
    return 0;
}

const char *sp_auth_mech_name(unsigned mech)
{
    for (unsigned i = 0; i < SP_AUTH_COUNT; i++)
        if (mech == 1u << i)
            return mech_names[i];
    return "?";
}

/* Parses a decimal number of at most 9 digits; returns 0 when malformed. */
static unsigned long number(const char *s, size_t n)
{
    unsigned long v = 0;
    if (n == 0 || n > 9)
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
        v = v * 10 + (unsigned long)(s[i] - '0');
    }
    return v;
}

static void auth_mechs(sp_caps *c, const char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        while (i < n && (s[i] == ' ' || s[i] == '=' || s[i] == '\t'))
            i++;
        size_t st = i;
        while (i < n && s[i] != ' ' && s[i] != '\t')
            i++;
        const char *w = s + st;
        size_t wl = i - st;
        c->auth |= sp_auth_mech_of(w, wl);
    }
}

/* RFC 9422: LIMITS SP limit *(SP limit), limit = name "=" value */
static void limits(sp_caps *c, const char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        while (i < n && s[i] == ' ')
            i++;
        size_t st = i;
        while (i < n && s[i] != ' ')
            i++;
        const char *eq = memchr(s + st, '=', i - st);
        if (!eq)
            continue;
        size_t nl = (size_t)(eq - (s + st));
        const char *v = eq + 1;
        size_t vl = (size_t)((s + i) - v);
        unsigned long val = number(v, vl);
        if (word_is(s + st, nl, "MAILMAX"))
            c->mailmax = (unsigned)val;
        else if (word_is(s + st, nl, "RCPTMAX"))
            c->rcptmax = (unsigned)val;
        else if (word_is(s + st, nl, "RCPTDOMAINMAX"))
            c->rcptdomainmax = (unsigned)val;
    }
}

void sp_caps_parse(sp_caps *c, const sp_reply *ehlo)
{
    memset(c, 0, sizeof *c);
    c->esmtp = 1;
    const char *p = ehlo->text ? ehlo->text : "";
    const char *end = p + ehlo->text_len;
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    if (!nl)
        return; /* only the greeting line: no extensions */
    p = nl + 1;
    while (p < end) {
        const char *le = memchr(p, '\n', (size_t)(end - p));
        if (!le)
            le = end;
        const char *kw = p;
        while (kw < le && (*kw == ' ' || *kw == '\t'))
            kw++;
        const char *ke = kw;
        while (ke < le && *ke != ' ' && *ke != '=')
            ke++;
        size_t kl = (size_t)(ke - kw);
        const char *args = ke < le ? ke + 1 : le;
        size_t al = (size_t)(le - args);
        if (word_is(kw, kl, "SIZE")) {
            c->flags |= SP_CAP_SIZE;
            c->size_max = number(args, al);
        } else if (word_is(kw, kl, "PIPELINING"))
            c->flags |= SP_CAP_PIPELINING;
        else if (word_is(kw, kl, "8BITMIME"))
            c->flags |= SP_CAP_8BITMIME;
        else if (word_is(kw, kl, "SMTPUTF8"))
            c->flags |= SP_CAP_SMTPUTF8;
        else if (word_is(kw, kl, "STARTTLS"))
            c->flags |= SP_CAP_STARTTLS;
        else if (word_is(kw, kl, "AUTH")) {
            c->flags |= SP_CAP_AUTH;
            auth_mechs(c, args, al);
        } else if (word_is(kw, kl, "ENHANCEDSTATUSCODES"))
            c->flags |= SP_CAP_ENHANCEDSTATUSCODES;
        else if (word_is(kw, kl, "DSN"))
            c->flags |= SP_CAP_DSN;
        else if (word_is(kw, kl, "CHUNKING"))
            c->flags |= SP_CAP_CHUNKING;
        else if (word_is(kw, kl, "BINARYMIME"))
            c->flags |= SP_CAP_BINARYMIME;
        else if (word_is(kw, kl, "REQUIRETLS"))
            c->flags |= SP_CAP_REQUIRETLS;
        else if (word_is(kw, kl, "LIMITS")) {
            c->flags |= SP_CAP_LIMITS;
            limits(c, args, al);
        }
        p = le < end ? le + 1 : end;
    }
}
