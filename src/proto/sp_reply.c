#include "sp_reply.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sp_buf.h"

struct sp_reply_reader {
    sp_buf in;
    /* the reply being assembled across lines */
    sp_buf text;
    int code;
    size_t nlines;
    size_t reply_bytes;
    char enhanced[SP_ENHANCED_MAX];
    int failed;
    char err[160];
};

sp_reply_reader *sp_reply_reader_new(void)
{
    sp_reply_reader *r = calloc(1, sizeof *r);
    return r;
}

static void partial_reset(sp_reply_reader *r)
{
    sp_buf_reset(&r->text);
    r->code = 0;
    r->nlines = 0;
    r->reply_bytes = 0;
    r->enhanced[0] = '\0';
}

void sp_reply_reader_reset(sp_reply_reader *r)
{
    sp_buf_reset(&r->in);
    partial_reset(r);
    r->failed = 0;
    r->err[0] = '\0';
}

void sp_reply_reader_free(sp_reply_reader *r)
{
    if (!r)
        return;
    sp_buf_free(&r->in);
    sp_buf_free(&r->text);
    free(r);
}

int sp_reply_reader_feed(sp_reply_reader *r, const char *buf, size_t len)
{
    return sp_buf_append(&r->in, buf, len);
}

size_t sp_reply_reader_pending(const sp_reply_reader *r)
{
    return sp_buf_pending(&r->in) + (r->nlines > 0 ? 1 : 0);
}

const char *sp_reply_reader_error(const sp_reply_reader *r) { return r->err; }

void sp_reply_clear(sp_reply *rep)
{
    free(rep->text);
    memset(rep, 0, sizeof *rep);
}

static int is_digit(char c) { return c >= '0' && c <= '9'; }

/* Digits run of 1..max; returns its length or 0. */
static size_t digits(const char *s, size_t n, size_t max)
{
    size_t i = 0;
    while (i < n && i < max && is_digit(s[i]))
        i++;
    if (i < n && is_digit(s[i]))
        return 0; /* longer than allowed */
    return i;
}

size_t sp_enhanced_parse(const char *s, size_t n, int code, char out[SP_ENHANCED_MAX])
{
    /* class "." subject "." detail, class in {2,4,5} and equal to the reply class */
    size_t i = 0, d;
    out[0] = '\0';
    if (n < 5 || (s[0] != '2' && s[0] != '4' && s[0] != '5') || s[1] != '.')
        return 0;
    if (code && s[0] - '0' != code / 100)
        return 0;
    i = 2;
    if (!(d = digits(s + i, n - i, 3)))
        return 0;
    i += d;
    if (i >= n || s[i] != '.')
        return 0;
    i++;
    if (!(d = digits(s + i, n - i, 3)))
        return 0;
    i += d;
    if (i < n && s[i] != ' ')
        return 0;
    memcpy(out, s, i);
    out[i] = '\0';
    return i;
}

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static sp_reply_status fail(sp_reply_reader *r, const char *fmt, ...)
{
    va_list ap;
    r->failed = 1;
    va_start(ap, fmt);
    vsnprintf(r->err, sizeof r->err, fmt, ap);
    va_end(ap);
    return SP_REPLY_ERR;
}

/* Validates one line (without its terminator) and adds it to the reply.
 * Returns 1 when it was the last line, 0 when more follow, -1 on error. */
static int take_line(sp_reply_reader *r, const char *line, size_t n)
{
    size_t i;
    int code;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)line[i];
        if (c >= 0x80)
            return fail(r, "non-ASCII byte 0x%02x in reply", c), -1;
        if ((c < 0x20 && c != '\t') || c == 0x7f)
            return fail(r, "control byte 0x%02x in reply", c), -1;
    }
    if (n < 3 || !is_digit(line[0]) || !is_digit(line[1]) || !is_digit(line[2]))
        return fail(r, "reply line does not start with a 3-digit code"), -1;
    if (line[0] < '2' || line[0] > '5' || line[1] > '5')
        return fail(r, "reply code %d is outside 2yz..5yz", (line[0] - '0') * 100 +
                                                              (line[1] - '0') * 10 +
                                                              (line[2] - '0')),
               -1;
    if (n > 3 && line[3] != ' ' && line[3] != '-')
        return fail(r, "bad separator 0x%02x after reply code", (unsigned char)line[3]), -1;
    code = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
    if (r->nlines > 0 && code != r->code)
        return fail(r, "continuation line changes the reply code to %d", code), -1;
    r->reply_bytes += n + 2;
    if (r->reply_bytes > SP_REPLY_MAX)
        return fail(r, "reply longer than %d bytes", SP_REPLY_MAX), -1;

    const char *txt = n > 4 ? line + 4 : "";
    size_t tlen = n > 4 ? n - 4 : 0;
    char enh[SP_ENHANCED_MAX];
    size_t elen = sp_enhanced_parse(txt, tlen, code, enh);
    if (r->nlines == 0) {
        r->code = code;
        memcpy(r->enhanced, enh, sizeof enh);
    }
    if (elen) { /* drop "x.y.z " from each line's text */
        txt += elen;
        tlen -= elen;
        if (tlen && *txt == ' ') {
            txt++;
            tlen--;
        }
    }
    if ((r->nlines > 0 && sp_buf_append(&r->text, "\n", 1) < 0) ||
        sp_buf_append(&r->text, txt, tlen) < 0)
        return fail(r, "out of memory"), -1;
    r->nlines++;
    return (n == 3 || line[3] == ' ') ? 1 : 0;
}

sp_reply_status sp_reply_reader_next(sp_reply_reader *r, sp_reply *out)
{
    if (r->failed)
        return SP_REPLY_ERR;
    for (;;) {
        const char *p = sp_buf_head(&r->in);
        size_t avail = sp_buf_pending(&r->in);
        const char *nl = avail ? memchr(p, '\n', avail) : NULL;
        if (!nl) {
            if (avail > SP_REPLY_LINE_MAX)
                return fail(r, "reply line longer than %d bytes", SP_REPLY_LINE_MAX);
            return SP_REPLY_MORE;
        }
        size_t n = (size_t)(nl - p);
        size_t used = n + 1;
        if (n > 0 && p[n - 1] == '\r')
            n--; /* CRLF; a bare LF is tolerated as a line end */
        if (n > SP_REPLY_LINE_MAX)
            return fail(r, "reply line longer than %d bytes", SP_REPLY_LINE_MAX);
        int last = take_line(r, p, n);
        sp_buf_consume(&r->in, used);
        if (last < 0)
            return SP_REPLY_ERR;
        if (last) {
            char *t = malloc(sp_buf_pending(&r->text) + 1);
            if (!t)
                return fail(r, "out of memory");
            if (sp_buf_pending(&r->text))
                memcpy(t, sp_buf_head(&r->text), sp_buf_pending(&r->text));
            t[sp_buf_pending(&r->text)] = '\0';
            out->code = r->code;
            memcpy(out->enhanced, r->enhanced, sizeof out->enhanced);
            out->text = t;
            out->text_len = sp_buf_pending(&r->text);
            out->nlines = r->nlines;
            partial_reset(r);
            return SP_REPLY_OK;
        }
    }
}
