/* Command-line words are "key=value" separated by spaces; modes read their
 * own "probe.<key>=" words with these helpers. */
#include "probe.h"

/* Copies the value of the last "probe.<key>=" word into out (truncated to
 * outsz - 1) and returns its full length, or -1 if the key is absent. */
int probe_arg(const char *cmdline, const char *key, char *out, size_t outsz) {
    size_t klen = strlen(key);
    int found = -1;
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *w = p;
        while (*p && *p != ' ')
            p++;
        if (p - w > (long)(6 + klen) && memcmp(w, "probe.", 6) == 0 &&
            memcmp(w + 6, key, klen) == 0 && w[6 + klen] == '=') {
            const char *v = w + 7 + klen;
            size_t n = p - v;
            found = (int)n;
            if (outsz) {
                if (n > outsz - 1)
                    n = outsz - 1;
                memcpy(out, v, n);
                out[n] = 0;
            }
        }
    }
    return found;
}

/* Decimal or 0x-prefixed hex; dflt if the key is absent or malformed. */
uint64_t probe_arg_u64(const char *cmdline, const char *key, uint64_t dflt) {
    char buf[24];
    int n = probe_arg(cmdline, key, buf, sizeof buf);
    if (n <= 0 || n >= (int)sizeof buf)
        return dflt;
    const char *s = buf;
    unsigned base = 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
        s += 2, base = 16;
    if (!*s)
        return dflt;
    uint64_t v = 0;
    for (; *s; s++) {
        unsigned d;
        if (*s >= '0' && *s <= '9')
            d = *s - '0';
        else if (base == 16 && (*s | 0x20) >= 'a' && (*s | 0x20) <= 'f')
            d = (*s | 0x20) - 'a' + 10;
        else
            return dflt;
        v = v * base + d;
    }
    return v;
}
