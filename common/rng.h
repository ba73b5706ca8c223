/* Small, fast, seedable PRNG for the sampler and the test-model generator:
 * splitmix64 to expand a seed, xoshiro256** for the stream (public-domain
 * algorithms by Vigna). Not for anything security-related. */
#ifndef MOE_COMMON_RNG_H
#define MOE_COMMON_RNG_H

#include <stdint.h>

static inline uint64_t moe_splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline uint64_t moe_rotl64(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

/* xoshiro256**: s must not be all zero (seed it with moe_splitmix64). */
static inline uint64_t moe_xoshiro256ss(uint64_t s[4])
{
    const uint64_t r = moe_rotl64(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = moe_rotl64(s[3], 45);
    return r;
}

#endif
