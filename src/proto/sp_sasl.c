#include "sp_sasl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "sp_caps.h"
#include "sp_codec.h"

unsigned sp_sasl_choose(unsigned offered, unsigned want, const char **why)
{
    if (want) {
        if (!(offered & want)) {
            *why = "the server does not offer the AUTH mechanism asked for";
            return 0;
        }
        return want;
    }
    static const unsigned order[] = {SP_AUTH_CRAM_MD5, SP_AUTH_PLAIN, SP_AUTH_LOGIN};
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++)
        if (offered & order[i])
            return order[i];
    *why = "no AUTH mechanism in common (smtppool speaks PLAIN, LOGIN, CRAM-MD5, XOAUTH2)";
    return 0;
}

int sp_sasl_initial(unsigned m, const char *user, const char *secret, unsigned char **out, size_t *n)
{
    size_t ul = strlen(user), pl = strlen(secret);
    *out = NULL;
    *n = 0;
    if (m == SP_AUTH_PLAIN) { /* RFC 4616: authzid NUL authcid NUL passwd */
        unsigned char *raw = malloc(ul + pl + 2);
        if (!raw)
            return -1;
        raw[0] = 0;
        memcpy(raw + 1, user, ul);
        raw[ul + 1] = 0;
        memcpy(raw + ul + 2, secret, pl);
        *out = raw;
        *n = ul + pl + 2;
    } else if (m == SP_AUTH_XOAUTH2) { /* user=U ^A auth=Bearer T ^A ^A */
        size_t len = 5 + ul + 1 + 12 + pl + 2;
        unsigned char *raw = malloc(len + 1);
        if (!raw)
            return -1;
        snprintf((char *)raw, len + 1, "user=%s\001auth=Bearer %s\001\001", user, secret);
        *out = raw;
        *n = len;
    }
    return 0;
}

int sp_sasl_cram_md5(const char *user, const char *secret, const char *chal_b64, size_t len, unsigned char **out,
                     size_t *n)
{
    unsigned char chal[1024];
    if (len > 4 * (sizeof chal / 3) - 4)
        return -2;
    long cl = sp_base64_decode(chal_b64, len, chal);
    if (cl < 0)
        return -2;
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int ml = 0;
    if (!HMAC(EVP_md5(), secret, (int)strlen(secret), chal, (size_t)cl, mac, &ml))
        return -2;
    size_t ul = strlen(user);
    size_t rn = ul + 1 + 2 * ml;
    unsigned char *raw = malloc(rn);
    if (!raw) {
        OPENSSL_cleanse(mac, sizeof mac);
        return -1;
    }
    memcpy(raw, user, ul);
    raw[ul] = ' ';
    static const char hex[] = "0123456789abcdef";
    for (unsigned i = 0; i < ml; i++) {
        raw[ul + 1 + 2 * i] = (unsigned char)hex[mac[i] >> 4];
        raw[ul + 2 + 2 * i] = (unsigned char)hex[mac[i] & 15];
    }
    OPENSSL_cleanse(mac, sizeof mac);
    *out = raw;
    *n = rn;
    return 0;
}

void sp_sasl_free(unsigned char *p, size_t n)
{
    if (!p)
        return;
    OPENSSL_cleanse(p, n);
    free(p);
}
