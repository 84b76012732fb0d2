#include "sp_mime.h"

#include <stdint.h>
#include <string.h>

#include "sp_codec.h"

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

void sp_b64_stream_init(sp_b64_stream *st) { memset(st, 0, sizeof *st); }

static int b64_quad(sp_b64_stream *st, const unsigned char *in, size_t n, sp_buf *out)
{
    char q[6];
    unsigned v = (unsigned)in[0] << 16 | (n > 1 ? (unsigned)in[1] << 8 : 0) | (n > 2 ? in[2] : 0);
    q[0] = B64[v >> 18];
    q[1] = B64[(v >> 12) & 63];
    q[2] = n > 1 ? B64[(v >> 6) & 63] : '=';
    q[3] = n > 2 ? B64[v & 63] : '=';
    if (sp_buf_append(out, q, 4) < 0)
        return -1;
    st->col += 4;
    if (st->col == 76) {
        st->col = 0;
        return sp_buf_append(out, "\r\n", 2);
    }
    return 0;
}

int sp_b64_stream_feed(sp_b64_stream *st, const unsigned char *p, size_t n, sp_buf *out)
{
    size_t i = 0;
    while (st->ncarry && st->ncarry < 3 && i < n)
        st->carry[st->ncarry++] = p[i++];
    if (st->ncarry == 3) {
        if (b64_quad(st, st->carry, 3, out) < 0)
            return -1;
        st->ncarry = 0;
    }
    for (; i + 3 <= n; i += 3)
        if (b64_quad(st, p + i, 3, out) < 0)
            return -1;
    while (i < n)
        st->carry[st->ncarry++] = p[i++];
    return 0;
}

int sp_b64_stream_finish(sp_b64_stream *st, sp_buf *out)
{
    if (st->ncarry && b64_quad(st, st->carry, st->ncarry, out) < 0)
        return -1;
    st->ncarry = 0;
    if (st->col) {
        st->col = 0;
        return sp_buf_append(out, "\r\n", 2);
    }
    return 0;
}

void sp_qp_stream_init(sp_qp_stream *st) { memset(st, 0, sizeof *st); }

static const char HEX[] = "0123456789ABCDEF";

/* Writes the buffered line with a hard or soft break. */
static int qp_flush(sp_qp_stream *st, sp_buf *out, int hard)
{
    /* whitespace before a hard break must be escaped (RFC 2045 6.7 rule 3) */
    if (hard && st->len && (st->line[st->len - 1] == ' ' || st->line[st->len - 1] == '\t')) {
        char c = st->line[--st->len];
        char esc[3] = {'=', HEX[(unsigned char)c >> 4], HEX[c & 15]};
        if (sp_buf_append(out, st->line, st->len) < 0)
            return -1;
        /* the escape may not push the line past 76: soft-break before it */
        if (st->len + 3 > 76 && sp_buf_append(out, "=\r\n", 3) < 0)
            return -1;
        if (sp_buf_append(out, esc, 3) < 0)
            return -1;
    } else if (sp_buf_append(out, st->line, st->len) < 0) {
        return -1;
    }
    st->len = 0;
    return sp_buf_append(out, hard ? "\r\n" : "=\r\n", hard ? 2 : 3);
}

static int qp_put(sp_qp_stream *st, sp_buf *out, const char *tok, size_t n)
{
    /* 75 characters plus the soft-break '=' make the 76 allowed */
    if (st->len + n > 75 && qp_flush(st, out, 0) < 0)
        return -1;
    memcpy(st->line + st->len, tok, n);
    st->len += n;
    return 0;
}

int sp_qp_stream_feed(sp_qp_stream *st, const unsigned char *p, size_t n, sp_buf *out)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        if (st->pending_cr) {
            st->pending_cr = 0;
            if (qp_flush(st, out, 1) < 0)
                return -1;
            if (c == '\n')
                continue;
        }
        if (c == '\r') {
            st->pending_cr = 1;
            continue;
        }
        if (c == '\n') {
            if (qp_flush(st, out, 1) < 0)
                return -1;
            continue;
        }
        int esc = c == '=' || c > 126 || (c < 32 && c != '\t');
        if (st->len == 0 && (c == '.' || (c == 'F' && i + 4 < n && memcmp(p + i, "From ", 5) == 0)))
            esc = 1;
        if (esc) {
            char e[3] = {'=', HEX[c >> 4], HEX[c & 15]};
            if (qp_put(st, out, e, 3) < 0)
                return -1;
        } else {
            char ch = (char)c;
            if (qp_put(st, out, &ch, 1) < 0)
                return -1;
        }
    }
    return 0;
}

int sp_qp_stream_finish(sp_qp_stream *st, sp_buf *out)
{
    if (st->pending_cr) {
        st->pending_cr = 0;
        return qp_flush(st, out, 1);
    }
    if (st->len)
        return qp_flush(st, out, 1);
    return 0;
}

int sp_is_plain_ascii(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c > 126 || (c < 32 && c != '\t'))
            return 0;
    }
    return 1;
}

/* Length of the UTF-8 sequence at p (1..4), or 0 when it is invalid. */
static size_t utf8_len(const unsigned char *p, size_t n)
{
    unsigned char c = p[0];
    size_t len;
    unsigned min, cp;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2;
        cp = c & 0x1f;
        min = 0x80;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        cp = c & 0x0f;
        min = 0x800;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        cp = c & 0x07;
        min = 0x10000;
    } else {
        return 0;
    }
    if (len > n)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((p[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (p[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

int sp_utf8_valid(const char *p, size_t n)
{
    const unsigned char *u = (const unsigned char *)p;
    for (size_t i = 0; i < n;) {
        /* ASCII, the common case, eight bytes at a time (a list's every
         * line and a message's every field come through here) */
        uint64_t w;
        if (n - i >= 8 && (memcpy(&w, u + i, 8), (w & 0x8080808080808080ull) == 0)) {
            i += 8;
            continue;
        }
        if (u[i] < 0x80) {
            i++;
            continue;
        }
        size_t l = utf8_len(u + i, n - i);
        if (!l)
            return 0;
        i += l;
    }
    return 1;
}

/* Appends encoded-words for p (UTF-8, base64), each at most 75 characters
 * and sized to the room left on the line, which is already *col characters
 * long; later words follow a space or a fold (CRLF SP). A UTF-8 sequence is
 * never split between words. */
static int encoded_words(sp_buf *out, const char *p, size_t n, size_t *col)
{
    const unsigned char *u = (const unsigned char *)p;
    size_t i = 0;
    int first = 1;
    while (i < n) {
        size_t sep = first ? 0 : 1;
        size_t room = 78 > *col + sep ? 78 - *col - sep : 0;
        /* "=?UTF-8?B?" and "?=" take 12; 4 base64 characters carry 3 bytes */
        size_t maxb = room > 12 ? (room - 12) / 4 * 3 : 0;
        if (maxb > 45)
            maxb = 45;
        size_t take = 0, l = 1;
        while (i + take < n) {
            l = utf8_len(u + i + take, n - i - take);
            if (!l)
                l = 1; /* invalid UTF-8 was refused by the caller; stay safe */
            if (take + l > maxb)
                break;
            take += l;
        }
        if (take == 0) {
            if (*col > 1) { /* no room here: fold and try again */
                if (sp_buf_append(out, "\r\n ", 3) < 0)
                    return -1;
                *col = 1;
                first = 1;
                continue;
            }
            take = l; /* a fresh line always takes one character */
        }
        if (!first) {
            if (sp_buf_append(out, " ", 1) < 0)
                return -1;
            (*col)++;
        }
        char enc[64];
        size_t el = sp_base64_encoded_len(take);
        sp_base64_encode(u + i, take, enc);
        if (sp_buf_append(out, "=?UTF-8?B?", 10) < 0 || sp_buf_append(out, enc, el) < 0 ||
            sp_buf_append(out, "?=", 2) < 0)
            return -1;
        *col += 12 + el;
        i += take;
        first = 0;
    }
    return 0;
}

int sp_header_append(sp_buf *out, const char *name, const char *value, size_t vlen, int encode)
{
    for (size_t i = 0; i < vlen; i++)
        if (value[i] == '\r' || value[i] == '\n' || value[i] == '\0')
            return -2;
    size_t nl = strlen(name);
    if (sp_buf_append(out, name, nl) < 0 || sp_buf_append(out, ":", 1) < 0)
        return -1;
    size_t col = nl + 1;
    int ascii = !encode || sp_is_plain_ascii(value, vlen);
    /* The span from the first to the last non-ASCII word is encoded as one
     * run: whitespace between encoded-words vanishes on decoding (RFC 2047
     * 6.2), so the spaces inside the span must travel inside the words. */
    size_t span_a = vlen, span_b = 0;
    if (!ascii) {
        for (size_t k = 0; k < vlen;) {
            while (k < vlen && (value[k] == ' ' || value[k] == '\t'))
                k++;
            size_t w0 = k;
            while (k < vlen && value[k] != ' ' && value[k] != '\t')
                k++;
            if (k > w0 && !sp_is_plain_ascii(value + w0, k - w0)) {
                if (w0 < span_a)
                    span_a = w0;
                span_b = k;
            }
        }
    }
    /* Word by word: runs of non-space, each preceded by its whitespace. */
    size_t i = 0;
    while (i < vlen) {
        size_t ws = i;
        while (i < vlen && (value[i] == ' ' || value[i] == '\t'))
            i++;
        size_t ws_len = i - ws;
        size_t w = i;
        while (i < vlen && value[i] != ' ' && value[i] != '\t')
            i++;
        size_t wl = i - w;
        if (wl == 0)
            break; /* trailing whitespace is dropped */
        if (!ascii && w == span_a) {
            if (sp_buf_append(out, " ", 1) < 0)
                return -1;
            col++;
            if (encoded_words(out, value + span_a, span_b - span_a, &col) < 0)
                return -1;
            i = span_b;
            continue;
        }
        size_t sep = ws_len ? ws_len : (col == nl + 1 ? 1 : 0);
        if (col + sep + wl > 78 && col > nl + 1) {
            /* fold: the whitespace moves to the start of the next line */
            if (sp_buf_append(out, "\r\n", 2) < 0)
                return -1;
            col = 0;
            if (!sep)
                sep = 1;
        }
        if (sep) {
            if (ws_len) {
                if (sp_buf_append(out, value + ws, ws_len) < 0)
                    return -1;
            } else if (sp_buf_append(out, " ", 1) < 0) {
                return -1;
            }
            col += sep;
        }
        /* a single word longer than a line: 998 is the hard limit */
        if (col + wl > 998)
            return -3;
        if (sp_buf_append(out, value + w, wl) < 0)
            return -1;
        col += wl;
    }
    return sp_buf_append(out, "\r\n", 2);
}

static int is_atext(unsigned char c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return 1;
    return c && strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL;
}

int sp_phrase_append(sp_buf *out, const char *p, size_t n)
{
    if (!sp_is_plain_ascii(p, n)) {
        size_t col = 0;
        return encoded_words(out, p, n, &col);
    }
    int plain = n > 0;
    for (size_t i = 0; i < n; i++)
        if (!is_atext((unsigned char)p[i]) && p[i] != ' ')
            plain = 0;
    if (plain)
        return sp_buf_append(out, p, n);
    if (sp_buf_append(out, "\"", 1) < 0)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if ((p[i] == '"' || p[i] == '\\') && sp_buf_append(out, "\\", 1) < 0)
            return -1;
        if (sp_buf_append(out, p + i, 1) < 0)
            return -1;
    }
    return sp_buf_append(out, "\"", 1);
}
