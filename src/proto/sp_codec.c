#include "sp_codec.h"

#include <string.h>

enum { MID = 0, START = 1, AFTER_CR = 2 };

void sp_dotstuff_init(sp_dotstuff *st)
{
    st->state = START;
    st->nostuff = 0;
}

int sp_dotstuff_feed(sp_dotstuff *st, const char *src, size_t n, sp_buf *out)
{
    size_t i = 0, run = 0; /* run: start of bytes copied verbatim */
    int s = st->state;
#define FLUSH(upto)                                                                    \
    do {                                                                               \
        if ((upto) > run && sp_buf_append(out, src + run, (upto)-run) < 0)             \
            return -1;                                                                 \
    } while (0)
    while (i < n) {
        char c = src[i];
        if (s == AFTER_CR) {
            /* the CR was already written; finish the line end */
            if (c == '\n') {
                FLUSH(i);
                if (sp_buf_append(out, "\n", 1) < 0)
                    return -1;
                run = ++i;
                s = START;
                continue;
            }
            FLUSH(i);
            if (sp_buf_append(out, "\n", 1) < 0)
                return -1;
            run = i;
            s = START;
            continue; /* reconsider c at a line start */
        }
        if (c == '\r') {
            FLUSH(i);
            if (sp_buf_append(out, "\r", 1) < 0)
                return -1;
            run = ++i;
            s = AFTER_CR;
            continue;
        }
        if (c == '\n') { /* bare LF */
            FLUSH(i);
            if (sp_buf_append(out, "\r\n", 2) < 0)
                return -1;
            run = ++i;
            s = START;
            continue;
        }
        if (s == START && c == '.' && !st->nostuff) {
            FLUSH(i);
            if (sp_buf_append(out, ".", 1) < 0)
                return -1;
            run = i; /* the original dot follows in the verbatim run */
        }
        s = MID;
        i++;
    }
    FLUSH(n);
#undef FLUSH
    st->state = s;
    return 0;
}

int sp_dotstuff_end_line(sp_dotstuff *st, sp_buf *out)
{
    if (st->state == AFTER_CR) {
        if (sp_buf_append(out, "\n", 1) < 0)
            return -1;
    } else if (st->state == MID) {
        if (sp_buf_append(out, "\r\n", 2) < 0)
            return -1;
    }
    st->state = START;
    return 0;
}

int sp_dotstuff_finish(sp_dotstuff *st, sp_buf *out)
{
    if (sp_dotstuff_end_line(st, out) < 0)
        return -1;
    return sp_buf_append(out, ".\r\n", 3);
}

void sp_body_scan(const char *p, size_t n, sp_body_info *info)
{
    size_t line = 0, lineno = 1;
    memset(info, 0, sizeof *info);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c == '\n' || c == '\r') {
            if (c == '\r' && i + 1 < n && p[i + 1] == '\n')
                i++;
            line = 0;
            lineno++;
            continue;
        }
        if (c >= 0x80)
            info->has_8bit = 1;
        else if (c == 0)
            info->has_nul = 1;
        if (++line > info->longest_line) {
            info->longest_line = line;
            if (line == 999 && !info->long_line_no)
                info->long_line_no = lineno;
        }
    }
}

static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

size_t sp_base64_encoded_len(size_t n) { return (n + 2) / 3 * 4; }

void sp_base64_encode(const unsigned char *in, size_t n, char *out)
{
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        unsigned v = (unsigned)in[i] << 16 | (unsigned)in[i + 1] << 8 | in[i + 2];
        *out++ = b64[v >> 18];
        *out++ = b64[(v >> 12) & 63];
        *out++ = b64[(v >> 6) & 63];
        *out++ = b64[v & 63];
    }
    if (n - i == 1) {
        unsigned v = (unsigned)in[i] << 16;
        *out++ = b64[v >> 18];
        *out++ = b64[(v >> 12) & 63];
        *out++ = '=';
        *out++ = '=';
    } else if (n - i == 2) {
        unsigned v = (unsigned)in[i] << 16 | (unsigned)in[i + 1] << 8;
        *out++ = b64[v >> 18];
        *out++ = b64[(v >> 12) & 63];
        *out++ = b64[(v >> 6) & 63];
        *out++ = '=';
    }
}

static int b64val(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

long sp_base64_decode(const char *in, size_t n, unsigned char *out)
{
    unsigned acc = 0;
    int bits = 0, pad = 0;
    long o = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)in[i];
        if (c == ' ' || c == '\t' || c == '\r' || c == '\n')
            continue;
        if (c == '=') {
            pad++;
            continue;
        }
        int v = b64val(c);
        if (v < 0 || pad)
            return -1; /* bad byte, or data after padding */
        acc = (acc << 6) | (unsigned)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    if (pad > 2 || bits >= 6)
        return -1;
    return o;
}
