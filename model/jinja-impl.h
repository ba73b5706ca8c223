/* Jinja interpreter internals shared by model/jinja_*.c.
 *
 * Memory: everything a compile or a render allocates comes from one arena
 * (struct jarena), freed at once; values are small structs passed by value
 * whose strings, lists and dicts live in the arena. Errors unwind with
 * longjmp to the compile or render entry point, which owns every resource
 * (the arena and the output buffer), so nothing leaks on an error path.
 */
#ifndef MOE_MODEL_JINJA_IMPL_H
#define MOE_MODEL_JINJA_IMPL_H

#include <setjmp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/buf.h"
#include "model/jinja.h"

/* ---- arena ---- */
struct jchunk {
    struct jchunk *next;
    size_t used, cap;
    _Alignas(16) unsigned char mem[];
};

struct jarena {
    struct jchunk *head;
    size_t total, limit;     /* bytes allocated, most allowed */
};

/* ---- values ---- */
enum jkind {
    JK_UNDEF, JK_NONE, JK_BOOL, JK_INT, JK_FLOAT, JK_STR, JK_LIST, JK_DICT,
    JK_NS, JK_FUNC, JK_MACRO, JK_METHOD, JK_LOOP,
};

struct jstr { size_t len; char s[]; };          /* NUL-terminated UTF-8 */
struct jlist;
struct jdict;
struct jmethod;
struct jloop;
struct jnode;
struct jctx;

struct jv {
    uint8_t k;          /* enum jkind */
    uint8_t safe;       /* STR: markupsafe.Markup (from |safe): `+` HTML-escapes a plain str operand */
    union {
        int64_t i;      /* INT, BOOL (0/1) */
        double f;
        struct jstr *s;
        struct jlist *l;
        struct jdict *d; /* DICT and NS */
        const struct jbuiltin *fn;
        const struct jnode *m;   /* MACRO */
        struct jmethod *mt;
        struct jloop *lp;
        const char *why; /* UNDEF: the message if it is used (may be NULL) */
    } u;
};

struct jlist { size_t n, cap; struct jv *v; bool tuple; };
struct jdict { size_t n, cap; struct jv *k, *v; };

typedef struct jv (*jbuiltin_fn)(struct jctx *c, const struct jv *self, struct jv *args, size_t n,
                                 const char *const *kw);
struct jbuiltin { const char *name; jbuiltin_fn fn; };
struct jmethod { struct jv self; const struct jbuiltin *b; };

struct jloop {
    const struct jlist *items;
    size_t i;
};

/* ---- syntax tree ---- */
enum jnode_kind {
    /* statements */
    N_BODY, N_TEXT, N_OUT, N_IF, N_FOR, N_SET, N_SETBLOCK, N_MACRO, N_BREAK, N_CONTINUE,
    /* expressions */
    E_CONST, E_NAME, E_ATTR, E_ITEM, E_SLICE, E_CALL, E_FILTER, E_TEST, E_NEG, E_POS, E_NOT,
    E_BIN, E_AND, E_OR, E_CMP, E_COND, E_LIST, E_TUPLE, E_DICT, E_NSREF,
};

enum jop {
    OP_ADD = 1, OP_SUB, OP_MUL, OP_DIV, OP_FLOORDIV, OP_MOD, OP_POW, OP_CONCAT,
    OP_EQ, OP_NE, OP_LT, OP_LE, OP_GT, OP_GE, OP_IN, OP_NOTIN,
};

struct jnode {
    uint8_t kind;
    uint8_t op;          /* E_BIN op; E_TEST negated; N_FOR has-else */
    int line;
    struct jnode *a, *b, *c, *d;
    struct jnode **list; /* children: body statements, call args, items, compare operands */
    const char **names;  /* keyword names parallel to list (NULL = positional) */
    uint8_t *ops;        /* E_CMP: op per operand */
    size_t n;
    const char *name;    /* E_NAME, E_ATTR, E_FILTER, E_TEST, N_MACRO, E_NSREF attr */
    struct jv cv;        /* E_CONST; N_TEXT text */
};

/* ---- render context ---- */
struct jscope {
    struct jscope *parent;
    size_t n, cap;
    const char **names;
    struct jv *vals;
};

struct jctx {
    jmp_buf jb;
    struct jarena *ar;
    struct moe_jinja_err *err;
    const struct moe_jinja_opts *opts;
    struct moe_buf *out;         /* current output (macros and set blocks swap it) */
    struct jscope *root, *scope;
    uint64_t iterations;
    int depth;                   /* macro calls */
    int rec;                     /* evaluation recursion */
    int line;                    /* of the node being evaluated */
    int brk;                     /* 1 break, 2 continue pending */
    struct moe_buf *tmp[256];    /* temporary buffers (macro output, set blocks, str()) */
    int ntmp;
};

/* A temporary output buffer, freed by jtmp_pop or, after an error, by the
 * render's entry point. */
struct moe_buf *jtmp_push(struct jctx *c);
struct jv jtmp_pop(struct jctx *c, struct moe_buf *b);   /* its text as a string value */
void jtmp_free_all(struct jctx *c);

/* arena (jinja_value.c) */
void *ja_alloc(struct jctx *c, size_t n);
void ja_free_all(struct jarena *a);
void *ja_alloc_raw(struct jarena *a, size_t n);  /* NULL when out of memory / over the limit */

/* errors: never return */
_Noreturn void jfail(struct jctx *c, enum moe_jinja_err_kind kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* values (jinja_value.c) */
static inline struct jv jv_undef(const char *why) { struct jv v = { .k = JK_UNDEF }; v.u.why = why; return v; }
static inline struct jv jv_none(void) { struct jv v = { .k = JK_NONE }; return v; }
static inline struct jv jv_bool(bool b) { struct jv v = { .k = JK_BOOL }; v.u.i = b; return v; }
static inline struct jv jv_int(int64_t i) { struct jv v = { .k = JK_INT }; v.u.i = i; return v; }
static inline struct jv jv_float(double f) { struct jv v = { .k = JK_FLOAT }; v.u.f = f; return v; }
struct jv jv_str(struct jctx *c, const char *s, size_t n);
struct jv jv_cstr(struct jctx *c, const char *s);
struct jv jv_strbuf(struct jctx *c, const struct moe_buf *b);
struct jv jv_list(struct jctx *c, size_t cap);
struct jv jv_dict(struct jctx *c, size_t cap);
void jl_push(struct jctx *c, struct jlist *l, struct jv v);
void jd_set(struct jctx *c, struct jdict *d, struct jv k, struct jv v);
struct jv *jd_get(const struct jdict *d, struct jv k);
struct jv *jd_gets(const struct jdict *d, const char *k);
const char *jv_type_name(struct jv v);
bool jv_truthy(struct jv v);
bool jv_equal(struct jv a, struct jv b);
int jv_compare(struct jctx *c, struct jv a, struct jv b);    /* <0, 0, >0; fails on mismatched types */
size_t jv_len(struct jctx *c, struct jv v);                 /* fails on unsized */
struct jv jv_to_str(struct jctx *c, struct jv v);           /* Python str() */
void jv_write_str(struct jctx *c, struct moe_buf *b, struct jv v);
void jv_write_repr(struct jctx *c, struct moe_buf *b, struct jv v);
size_t jv_format_float(char *o, double f);                 /* Python repr(float) into o[64] */
void jv_write_json(struct jctx *c, struct moe_buf *b, struct jv v, bool ascii, int indent,
                   const char *item_sep, const char *key_sep, bool sort_keys, int level);
struct jv jv_iterable(struct jctx *c, struct jv v);         /* list to iterate: str chars, dict keys */
void jbuf_put(struct jctx *c, struct moe_buf *b, const char *s, size_t n);
size_t ju8_count(const char *s, size_t n);
size_t ju8_offset(const char *s, size_t n, size_t cps);     /* byte offset of code point cps */
bool jv_is_str(struct jv v, const char *s);
_Noreturn void jv_undef_fail(struct jctx *c, struct jv v);

/* parsing (jinja_lex.c, jinja_parse.c) */
struct jtok;
struct jtok *jlex(struct jctx *c, const char *src, size_t len, size_t *n);
struct jnode *jparse(struct jctx *c, struct jtok *toks, size_t n);

/* evaluation (jinja_eval.c) */
struct jv jeval(struct jctx *c, const struct jnode *e);
void jexec_body(struct jctx *c, const struct jnode *body);
struct jv jcall(struct jctx *c, struct jv f, struct jv *args, size_t n, const char *const *kw);
void jscope_set(struct jctx *c, struct jscope *s, const char *name, struct jv v);
struct jv jgetattr(struct jctx *c, struct jv obj, const char *name);
struct jv jgetitem(struct jctx *c, struct jv obj, struct jv key);
void jcheck_iter(struct jctx *c);

/* builtins (jinja_builtins.c, jinja_filters.c) */
struct jv jfilter(struct jctx *c, const char *name, struct jv v, struct jv *args, size_t n,
                  const char *const *kw);
bool jtest(struct jctx *c, const char *name, struct jv v, struct jv *args, size_t n);
const struct jbuiltin *jglobal(const char *name);
const struct jbuiltin *jmethod_find(struct jv self, const char *name, bool llama_ext);
struct jv jarg(struct jv *args, size_t n, const char *const *kw, size_t pos, const char *name);
struct jv jv_str_strip(struct jctx *c, struct jv s, struct jv chars, bool left, bool right);
struct jv jv_tojson(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw);
struct jv jv_from_json_text(struct jctx *c, const char *s, size_t n);

#endif
