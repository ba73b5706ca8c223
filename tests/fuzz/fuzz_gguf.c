/* Fuzz entry for the GGUF reader: parse the bytes, and when they parse,
 * touch everything a caller could: every key and value (nested arrays and
 * strings included), every typed getter, every tensor's bytes by pread and
 * through the mapping. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "io/gguf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint64_t walk(const struct moe_gguf_value *v, unsigned depth)
{
    uint64_t h = (uint64_t)v->type;
    if (v->type == MOE_GGUF_STRING) {
        for (uint64_t i = 0; i < v->v.str.len; i++)
            h = h * 31 + (uint8_t)v->v.str.ptr[i];
    } else if (v->type == MOE_GGUF_ARRAY) {
        const enum moe_gguf_type et = v->v.arr.elem_type;
        if (et == MOE_GGUF_STRING) {
            const struct moe_gguf_str *s = v->v.arr.data;
            for (uint64_t i = 0; i < v->v.arr.n; i++)
                h += s[i].len + (s[i].len ? (uint8_t)s[i].ptr[s[i].len - 1] : 0);
        } else if (et == MOE_GGUF_ARRAY) {
            const struct moe_gguf_value *a = v->v.arr.data;
            for (uint64_t i = 0; i < v->v.arr.n && depth < 16; i++)
                h += walk(&a[i], depth + 1);
        } else {
            const uint8_t *p = v->v.arr.data;
            size_t n = (size_t)v->v.arr.n * moe_gguf_type_size(et);
            for (size_t i = 0; i < n; i++)
                h += p[i];
        }
    } else {
        h += v->v.u64;
    }
    return h;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct moe_gguf *g;
    struct moe_diag d = { 0 };
    if (moe_gguf_open_mem(&g, data, size, "fuzz.gguf", &d) != 0)
        return 0;
    volatile uint64_t sink = 0;
    for (uint64_t i = 0; i < moe_gguf_n_kv(g); i++) {
        const struct moe_gguf_kv *kv = moe_gguf_kv_at(g, i);
        sink += walk(&kv->value, 0) + strlen(kv->key);
        uint64_t u;
        int64_t s;
        float f;
        bool b;
        struct moe_gguf_str str;
        const struct moe_gguf_value *a;
        moe_gguf_get_u64(g, kv->key, &u, NULL);
        moe_gguf_get_i64(g, kv->key, &s, NULL);
        moe_gguf_get_f32(g, kv->key, &f, NULL);
        moe_gguf_get_bool(g, kv->key, &b, NULL);
        moe_gguf_get_str(g, kv->key, &str, NULL);
        moe_gguf_get_arr(g, kv->key, MOE_GGUF_TYPE_COUNT, &a, NULL);
        if (moe_gguf_find_kv(g, kv->key) != kv)
            __builtin_trap();
    }
    moe_gguf_map(g, NULL);
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        uint8_t buf[64];
        size_t n = t->size < sizeof(buf) ? (size_t)t->size : sizeof(buf);
        if (moe_gguf_pread(g, t, t->size - n, buf, n, NULL) != 0)
            __builtin_trap();
        const uint8_t *p = moe_gguf_tensor_data(g, t);
        if (memcmp(p + t->size - n, buf, n) != 0)
            __builtin_trap();
        if (moe_gguf_find_tensor(g, t->name) != t)
            __builtin_trap();
    }
    moe_gguf_close(g);
    return 0;
}
