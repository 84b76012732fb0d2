/* sp_dkim: DKIM signatures (RFC 6376) with relaxed/relaxed
 * canonicalisation, RSA-SHA256 and Ed25519-SHA256 (RFC 8463).
 *
 * The body canonicaliser streams: sp_dkim_body_feed takes the body in
 * chunks of any size and keeps only a few bytes of state, so a large body
 * is hashed as it passes. */
#ifndef SP_DKIM_H
#define SP_DKIM_H

#include <stddef.h>

#include "sp_body.h"
#include "sp_buf.h"
#include "sp_error.h"

typedef struct sp_dkim_key sp_dkim_key;

enum { SP_DKIM_RSA_SHA256 = 1, SP_DKIM_ED25519_SHA256 = 2 };

/* Loads a private key from PEM text (or from a file when pem does not hold
 * "-----BEGIN"); alg must match the key's type. NULL with *err (kind config). */
sp_dkim_key *sp_dkim_key_new(const char *pem, size_t len, int alg, sp_error *err);
void sp_dkim_key_free(sp_dkim_key *k);
/* Another handle on the same key (the key itself is shared, counted): a
 * signing thread holds one, so the key outlives whoever loaded it. NULL
 * when memory runs out. Free it with sp_dkim_key_free. */
sp_dkim_key *sp_dkim_key_ref(const sp_dkim_key *k);

/* Streaming relaxed body canonicalisation and SHA-256. */
typedef struct sp_dkim_body sp_dkim_body;
sp_dkim_body *sp_dkim_body_new(void);
void sp_dkim_body_free(sp_dkim_body *b);
int sp_dkim_body_feed(sp_dkim_body *b, const char *p, size_t n);
/* Writes the base64 body hash (44 characters and a NUL) into out. */
int sp_dkim_body_final(sp_dkim_body *b, char out[45]);

/* Relaxed header canonicalisation of one field ("Name: value", folded or
 * not, without its final CRLF) appended to out with CRLF. */
int sp_dkim_canon_header(const char *field, size_t n, sp_buf *out);

/* Signs a whole message (headers, blank line, body; CRLF or LF line ends):
 * appends "DKIM-Signature: ..." CRLF, folded, to out.
 * headers: colon-separated lower-case names to sign, NULL for the default
 * set; t: signing time (0 leaves t= out). */
int sp_dkim_sign(const sp_dkim_key *k, const char *domain, const char *selector, const char *headers,
                 long long t, const char *msg, size_t len, sp_buf *out, sp_error *err);

/* The body hash of a body source (files read once, as they will be sent):
 * base64 into out. -1 with *err when a file cannot be read. */
int sp_dkim_body_hash_src(sp_body_src *src, char out[45], sp_error *err);
/* Signs a header block (the fields, no blank line) whose body hash is
 * known: the streaming path, where the body never sits in memory. */
int sp_dkim_sign_hashed(const sp_dkim_key *k, const char *domain, const char *selector, const char *headers,
                        long long t, const char *hdr, size_t hlen, const char *bhash, sp_buf *out,
                        sp_error *err);

#endif
