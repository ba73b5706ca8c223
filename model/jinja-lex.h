/* Jinja tokens, from model/jinja_lex.c to model/jinja_parse.c. */
#ifndef MOE_MODEL_JINJA_LEX_H
#define MOE_MODEL_JINJA_LEX_H

#include <stddef.h>
#include <stdint.h>

enum jtok_type {
    T_EOF, T_DATA, T_BLOCK_BEGIN, T_BLOCK_END, T_VAR_BEGIN, T_VAR_END,
    T_NAME, T_STRING, T_INT, T_FLOAT, T_OP,
};

struct jtok {
    enum jtok_type type;
    int line;
    const char *s;      /* DATA, NAME, OP: source text; STRING: decoded (arena, NUL-terminated) */
    size_t len;
    int64_t i;
    double f;
};

#endif
