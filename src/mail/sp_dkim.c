#include "sp_dkim.h"

#include <ctype.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "sp_codec.h"
#include "sp_mime.h"

struct sp_dkim_key {
    EVP_PKEY *pkey;
    int alg;
};

sp_dkim_key *sp_dkim_key_new(const char *pem, size_t len, int alg, sp_error *err)
{
    char why[256];
    BIO *bio = NULL;
    if (memmem(pem, len, "-----BEGIN", 10)) {
        bio = BIO_new_mem_buf(pem, (int)len);
    } else {
        bio = BIO_new_file(pem, "r");
        if (!bio) {
            sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_NONE, "cannot read DKIM key file %s", pem);
            ERR_clear_error();
            return NULL;
        }
    }
    EVP_PKEY *k = bio ? PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    if (!k) {
        sp_openssl_reason(why, sizeof why);
        sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_NONE, "bad DKIM key: %s", why);
        return NULL;
    }
    int type = EVP_PKEY_get_base_id(k);
    if ((alg == SP_DKIM_RSA_SHA256 && type != EVP_PKEY_RSA) ||
        (alg == SP_DKIM_ED25519_SHA256 && type != EVP_PKEY_ED25519)) {
        EVP_PKEY_free(k);
        sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_NONE, "the DKIM key is not a %s key",
                     alg == SP_DKIM_RSA_SHA256 ? "RSA" : "Ed25519");
        return NULL;
    }
    if (alg == SP_DKIM_RSA_SHA256 && EVP_PKEY_get_bits(k) < 1024) {
        EVP_PKEY_free(k);
        sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_NONE, "RSA DKIM keys must have at least 1024 bits (RFC 8301)");
        return NULL;
    }
    sp_dkim_key *dk = calloc(1, sizeof *dk);
    if (!dk) {
        EVP_PKEY_free(k);
        sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_NONE, "out of memory");
        return NULL;
    }
    dk->pkey = k;
    dk->alg = alg;
    return dk;
}

sp_dkim_key *sp_dkim_key_ref(const sp_dkim_key *k)
{
    sp_dkim_key *r = malloc(sizeof *r);
    if (!r)
        return NULL;
    if (EVP_PKEY_up_ref(k->pkey) != 1) {
        free(r);
        return NULL;
    }
    r->pkey = k->pkey;
    r->alg = k->alg;
    return r;
}

void sp_dkim_key_free(sp_dkim_key *k)
{
    if (!k)
        return;
    EVP_PKEY_free(k->pkey);
    free(k);
}

/* ---- body ---- */

struct sp_dkim_body {
    EVP_MD_CTX *md;
    size_t blank_lines; /* empty lines not yet known to be inside the body */
    int ws;             /* whitespace seen since the last character */
    int nonempty;       /* the current line has content */
    int pending_cr;
    char buf[4096];
    size_t len;
};

sp_dkim_body *sp_dkim_body_new(void)
{
    sp_dkim_body *b = calloc(1, sizeof *b);
    if (!b)
        return NULL;
    b->md = EVP_MD_CTX_new();
    if (!b->md || EVP_DigestInit_ex(b->md, EVP_sha256(), NULL) != 1) {
        sp_dkim_body_free(b);
        return NULL;
    }
    return b;
}

void sp_dkim_body_free(sp_dkim_body *b)
{
    if (!b)
        return;
    EVP_MD_CTX_free(b->md);
    free(b);
}

static void emit(sp_dkim_body *b, const char *p, size_t n)
{
    if (b->len + n > sizeof b->buf) {
        EVP_DigestUpdate(b->md, b->buf, b->len);
        b->len = 0;
    }
    memcpy(b->buf + b->len, p, n);
    b->len += n;
}

static void body_char(sp_dkim_body *b, char c)
{
    if (c == '\n') {
        if (b->nonempty)
            emit(b, "\r\n", 2);
        else
            b->blank_lines++;
        b->ws = 0;
        b->nonempty = 0;
        return;
    }
    if (c == ' ' || c == '\t') {
        b->ws = 1;
        return;
    }
    while (b->blank_lines) { /* empty lines followed by content are kept */
        emit(b, "\r\n", 2);
        b->blank_lines--;
    }
    if (b->ws) {
        emit(b, " ", 1);
        b->ws = 0;
    }
    emit(b, &c, 1);
    b->nonempty = 1;
}

int sp_dkim_body_feed(sp_dkim_body *b, const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (b->pending_cr) {
            b->pending_cr = 0;
            if (c != '\n')
                body_char(b, '\r');
        }
        if (c == '\r') {
            b->pending_cr = 1;
            continue;
        }
        body_char(b, c);
    }
    return 0;
}

int sp_dkim_body_final(sp_dkim_body *b, char out[45])
{
    if (b->pending_cr) {
        b->pending_cr = 0;
        body_char(b, '\r');
    }
    if (b->nonempty)
        emit(b, "\r\n", 2); /* RFC 6376 3.4.4: a non-empty body ends with CRLF */
    b->nonempty = 0;
    unsigned char h[32];
    unsigned int hl = 0;
    if (EVP_DigestUpdate(b->md, b->buf, b->len) != 1 || EVP_DigestFinal_ex(b->md, h, &hl) != 1)
        return -1;
    b->len = 0;
    sp_base64_encode(h, 32, out);
    out[44] = '\0';
    return 0;
}

/* ---- headers ---- */

int sp_dkim_canon_header(const char *f, size_t n, sp_buf *out)
{
    const char *colon = memchr(f, ':', n);
    if (!colon)
        return -1;
    size_t nl = (size_t)(colon - f);
    while (nl && (f[nl - 1] == ' ' || f[nl - 1] == '\t'))
        nl--;
    for (size_t i = 0; i < nl; i++) {
        char c = (char)tolower((unsigned char)f[i]);
        if (sp_buf_append(out, &c, 1) < 0)
            return -1;
    }
    if (sp_buf_append(out, ":", 1) < 0)
        return -1;
    int ws = 0, started = 0;
    for (const char *p = colon + 1; p < f + n; p++) {
        if (*p == '\r' || *p == '\n')
            continue; /* unfold */
        if (*p == ' ' || *p == '\t') {
            ws = 1;
            continue;
        }
        if (ws && started && sp_buf_append(out, " ", 1) < 0)
            return -1;
        ws = 0;
        started = 1;
        if (sp_buf_append(out, p, 1) < 0)
            return -1;
    }
    return sp_buf_append(out, "\r\n", 2);
}

typedef struct field {
    const char *p;
    size_t n;
} field;

static const char DEFAULT_HEADERS[] =
    "from:reply-to:sender:subject:date:message-id:to:cc:mime-version:content-type:"
    "content-transfer-encoding:in-reply-to:references:list-unsubscribe:list-unsubscribe-post";

int sp_dkim_body_hash_src(sp_body_src *src, char out[45], sp_error *err)
{
    sp_dkim_body *b = sp_dkim_body_new();
    if (!b) {
        sp_error_set(err, SP_KIND_INVALID, SP_PHASE_NONE, "out of memory");
        return -1;
    }
    const char *p;
    size_t n;
    int r;
    while ((r = sp_body_src_next(src, &p, &n, err)) == 1)
        sp_dkim_body_feed(b, p, n);
    if (r == 0 && sp_dkim_body_final(b, out) < 0) {
        sp_error_set(err, SP_KIND_INVALID, SP_PHASE_NONE, "DKIM body hash failed");
        r = -1;
    }
    sp_dkim_body_free(b);
    return r;
}

static int sign_core(const sp_dkim_key *k, const char *domain, const char *selector, const char *headers,
                     long long t, const char *msg, size_t len, const char *given_bh, sp_buf *out, sp_error *err);

int sp_dkim_sign_hashed(const sp_dkim_key *k, const char *domain, const char *selector, const char *headers,
                        long long t, const char *hdr, size_t hlen, const char *bhash, sp_buf *out, sp_error *err)
{
    return sign_core(k, domain, selector, headers, t, hdr, hlen, bhash, out, err);
}

int sp_dkim_sign(const sp_dkim_key *k, const char *domain, const char *selector, const char *headers,
                 long long t, const char *msg, size_t len, sp_buf *out, sp_error *err)
{
    return sign_core(k, domain, selector, headers, t, msg, len, NULL, out, err);
}

static int sign_core(const sp_dkim_key *k, const char *domain, const char *selector, const char *headers,
                     long long t, const char *msg, size_t len, const char *given_bh, sp_buf *out, sp_error *err)
{
    /* Split the header block into fields. */
    field fs[256];
    size_t nf = 0, i = 0;
    while (i < len) {
        const char *le = memchr(msg + i, '\n', len - i);
        size_t ll = le ? (size_t)(le - (msg + i)) : len - i;
        size_t content = ll && msg[i + ll - 1] == '\r' ? ll - 1 : ll;
        if (content == 0) { /* the blank line */
            i += ll + (le ? 1 : 0);
            break;
        }
        if ((msg[i] == ' ' || msg[i] == '\t') && nf) {
            fs[nf - 1].n = (size_t)(msg + i + content - fs[nf - 1].p);
        } else if (nf < sizeof fs / sizeof fs[0]) {
            fs[nf].p = msg + i;
            fs[nf].n = content;
            nf++;
        }
        i += ll + (le ? 1 : 0);
    }
    const char *body = msg + (i <= len ? i : len);
    size_t blen = len - (size_t)(body - msg);

    char bhash[45];
    if (given_bh) {
        snprintf(bhash, sizeof bhash, "%s", given_bh);
    } else {
        sp_dkim_body *bh = sp_dkim_body_new();
        if (!bh || sp_dkim_body_feed(bh, body, blen) < 0 || sp_dkim_body_final(bh, bhash) < 0) {
            sp_dkim_body_free(bh);
            sp_error_set(err, SP_KIND_INVALID, SP_PHASE_NONE, "DKIM body hash failed");
            return -1;
        }
        sp_dkim_body_free(bh);
    }

    /* Pick the fields to sign: for each name, every instance, bottom-up. */
    sp_buf data, hlist;
    sp_buf_init(&data);
    sp_buf_init(&hlist);
    const char *names = headers ? headers : DEFAULT_HEADERS;
    int have_from = 0, rc = -1;
    for (const char *nm = names; *nm;) {
        const char *ne = strchr(nm, ':');
        size_t nlen = ne ? (size_t)(ne - nm) : strlen(nm);
        for (size_t j = nf; j-- > 0;) {
            const char *c = memchr(fs[j].p, ':', fs[j].n);
            size_t fl = c ? (size_t)(c - fs[j].p) : 0;
            while (fl && (fs[j].p[fl - 1] == ' ' || fs[j].p[fl - 1] == '\t'))
                fl--;
            if (fl != nlen || strncasecmp(fs[j].p, nm, nlen) != 0)
                continue;
            if (nlen == 4 && !strncasecmp(nm, "from", 4))
                have_from = 1;
            if ((hlist.len && sp_buf_append(&hlist, ":", 1) < 0) || sp_buf_append(&hlist, nm, nlen) < 0 ||
                sp_dkim_canon_header(fs[j].p, fs[j].n, &data) < 0)
                goto oom;
        }
        nm = ne ? ne + 1 : nm + nlen;
    }
    if (!have_from) {
        sp_error_set(err, SP_KIND_INVALID, SP_PHASE_NONE, "DKIM: the message has no From header to sign");
        goto done;
    }
    char tbuf[32] = "";
    if (t > 0)
        snprintf(tbuf, sizeof tbuf, " t=%lld;", t);
    sp_buf value;
    sp_buf_init(&value);
    char head[600];
    snprintf(head, sizeof head, "v=1; a=%s; c=relaxed/relaxed; d=%s; s=%s;%s h=",
             k->alg == SP_DKIM_RSA_SHA256 ? "rsa-sha256" : "ed25519-sha256", domain, selector, tbuf);
    if (sp_buf_append_str(&value, head) < 0 || sp_buf_append(&value, sp_buf_head(&hlist), hlist.len - hlist.off) < 0 ||
        sp_buf_append_str(&value, "; bh=") < 0 || sp_buf_append_str(&value, bhash) < 0 ||
        sp_buf_append_str(&value, "; b=") < 0) {
        sp_buf_free(&value);
        goto oom;
    }
    /* The signature field itself, b= empty, canonicalised, no final CRLF. */
    sp_buf sigf;
    sp_buf_init(&sigf);
    if (sp_buf_append_str(&sigf, "DKIM-Signature: ") < 0 ||
        sp_buf_append(&sigf, sp_buf_head(&value), sp_buf_pending(&value)) < 0 ||
        sp_dkim_canon_header(sp_buf_head(&sigf), sp_buf_pending(&sigf), &data) < 0) {
        sp_buf_free(&sigf);
        sp_buf_free(&value);
        goto oom;
    }
    sp_buf_free(&sigf);
    data.len -= 2;

    unsigned char sig[1024];
    size_t siglen = sizeof sig;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = 0;
    if (ctx) {
        if (k->alg == SP_DKIM_RSA_SHA256) {
            ok = EVP_DigestSignInit(ctx, NULL, EVP_sha256(), NULL, k->pkey) == 1 &&
                 EVP_DigestSign(ctx, sig, &siglen, (const unsigned char *)sp_buf_head(&data),
                                sp_buf_pending(&data)) == 1;
        } else { /* RFC 8463: PureEdDSA over the SHA-256 of the data */
            unsigned char d[32];
            unsigned int dl = 0;
            ok = EVP_Digest(sp_buf_head(&data), sp_buf_pending(&data), d, &dl, EVP_sha256(), NULL) == 1 &&
                 EVP_DigestSignInit(ctx, NULL, NULL, NULL, k->pkey) == 1 &&
                 EVP_DigestSign(ctx, sig, &siglen, d, dl) == 1;
        }
        EVP_MD_CTX_free(ctx);
    }
    if (!ok) {
        char why[256];
        sp_openssl_reason(why, sizeof why);
        sp_error_set(err, SP_KIND_INVALID, SP_PHASE_NONE, "DKIM signing failed: %s", why);
        sp_buf_free(&value);
        goto done;
    }
    char b64[1400];
    sp_base64_encode(sig, siglen, b64);
    if (sp_buf_append(&value, b64, sp_base64_encoded_len(siglen)) < 0 ||
        sp_header_append(out, "DKIM-Signature", sp_buf_head(&value), sp_buf_pending(&value), 0) < 0) {
        sp_buf_free(&value);
        goto oom;
    }
    sp_buf_free(&value);
    rc = 0;
    goto done;
oom:
    sp_error_set(err, SP_KIND_INVALID, SP_PHASE_NONE, "out of memory");
done:
    sp_buf_free(&data);
    sp_buf_free(&hlist);
    return rc;
}
