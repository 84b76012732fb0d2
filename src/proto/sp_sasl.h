/* sp_sasl: the client side of the SASL mechanisms SMTP AUTH uses (RFC 4954):
 * PLAIN (RFC 4616), LOGIN, CRAM-MD5 (RFC 2195) and XOAUTH2. Pure functions:
 * they build the raw responses (base64 and the exchange itself are the
 * session's), and every buffer holding a secret is wiped when freed. */
#ifndef SP_SASL_H
#define SP_SASL_H

#include <stddef.h>

/* The mechanism to use: `want` when the server offers it, else the
 * strongest both speak (CRAM-MD5, then PLAIN, then LOGIN; XOAUTH2 only when
 * asked for). 0 when none, with *why saying so. */
unsigned sp_sasl_choose(unsigned offered, unsigned want, const char **why);

/* The raw initial response of PLAIN ("\0user\0secret") or XOAUTH2
 * ("user=U^Aauth=Bearer T^A^A"): 0 with *out malloc'd and *n its length, or
 * *out NULL for mechanisms that start without one; -1 when out of memory. */
int sp_sasl_initial(unsigned mech, const char *user, const char *secret, unsigned char **out, size_t *n);

/* The raw CRAM-MD5 response ("user hex(HMAC-MD5(secret, challenge))") to a
 * base64 challenge: 0, -1 out of memory, -2 a malformed challenge. */
int sp_sasl_cram_md5(const char *user, const char *secret, const char *chal_b64, size_t len, unsigned char **out,
                     size_t *n);

/* Wipes and frees a response. */
void sp_sasl_free(unsigned char *p, size_t n);

#endif
