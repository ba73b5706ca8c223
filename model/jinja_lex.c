/* Jinja lexer: template text to tokens, with jinja2's whitespace rules as
 * transformers configures them (trim_blocks, lstrip_blocks, keep_trailing_
 * newline off, newlines normalized to \n) and the -/+ markers on tags. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "model/jinja-impl.h"
#include "model/jinja-lex.h"

#define MAX_TOKENS (1u << 22)

struct lexer {
    struct jctx *c;
    const char *s;
    size_t n, pos;
    int line;
    struct jtok *t;
    size_t nt, cap;
    bool strip_next;      /* the last tag ended with '-': drop leading whitespace of the next text */
    bool line_starting;   /* the last token ended with a newline (jinja2's lstrip condition) */
};

static bool is_space(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\f' || ch == '\v';
}

static struct jtok *emit(struct lexer *L, enum jtok_type type)
{
    if (L->nt == L->cap) {
        if (L->cap >= MAX_TOKENS)
            jfail(L->c, MOE_JINJA_LIMIT, "template too large (more than %u tokens)", MAX_TOKENS);
        size_t cap = L->cap ? L->cap * 2 : 256;
        struct jtok *nt = ja_alloc(L->c, cap * sizeof(*nt));
        if (L->nt)
            memcpy(nt, L->t, L->nt * sizeof(*nt));
        L->t = nt;
        L->cap = cap;
    }
    struct jtok *t = &L->t[L->nt++];
    memset(t, 0, sizeof(*t));
    t->type = type;
    t->line = L->line;
    return t;
}

static void count_lines(struct lexer *L, size_t from, size_t to)
{
    for (size_t i = from; i < to; i++)
        L->line += L->s[i] == '\n';
}

static _Noreturn void lex_fail(struct lexer *L, const char *msg)
{
    L->c->line = L->line;
    jfail(L->c, MOE_JINJA_SYNTAX, "%s", msg);
}

/* Emits the text s[a..b) after the whitespace rules for the tag that follows
 * (tag_kind '{', '%' or '#', or 0 at the end; mod '-', '+' or 0). */
static void emit_text(struct lexer *L, size_t a, size_t b, char tag_kind, char mod)
{
    size_t start = a, end = b;
    if (L->strip_next)
        while (start < end && is_space(L->s[start]))
            start++;
    if (mod == '-') {
        while (end > start && is_space(L->s[end - 1]))
            end--;
    } else if (mod != '+' && (tag_kind == '%' || tag_kind == '#')) {
        size_t lp = end;
        while (lp > start && L->s[lp - 1] != '\n')
            lp--;
        bool at_line = lp > start || L->line_starting;
        bool ws = lp < end;
        for (size_t i = lp; i < end && ws; i++)
            ws = is_space(L->s[i]);
        if (at_line && ws)
            end = lp;
    }
    L->strip_next = false;
    if (end > start) {
        struct jtok *t = emit(L, T_DATA);
        t->s = L->s + start;
        t->len = end - start;
    }
    count_lines(L, a, b);
}

static size_t find_tag(const struct lexer *L, size_t from)
{
    for (size_t i = from; i + 1 < L->n; i++)
        if (L->s[i] == '{' && (L->s[i + 1] == '{' || L->s[i + 1] == '%' || L->s[i + 1] == '#'))
            return i;
    return L->n;
}

/* After a block or comment end: the -/trim rules. */
static void after_end(struct lexer *L, bool minus, bool plus, bool trim)
{
    if (minus) {
        L->strip_next = true;
        size_t p = L->pos;
        while (p < L->n && is_space(L->s[p]))
            p++;
        L->line_starting = p > L->pos && L->s[p - 1] == '\n';
        count_lines(L, L->pos, p);
        L->pos = p;
        L->strip_next = false;
        return;
    }
    L->line_starting = false;
    if (trim && !plus && L->pos < L->n && L->s[L->pos] == '\n') {
        L->pos++;
        L->line++;
        L->line_starting = true;
    }
}

static void lex_comment(struct lexer *L)
{
    const char *e = NULL;
    for (size_t i = L->pos; i + 1 < L->n; i++) {
        if (L->s[i] == '#' && L->s[i + 1] == '}') {
            e = L->s + i;
            break;
        }
    }
    if (e == NULL)
        lex_fail(L, "unterminated comment: missing '#}'");
    size_t end = (size_t)(e - L->s);
    bool minus = end > L->pos && L->s[end - 1] == '-';
    count_lines(L, L->pos, end + 2);
    L->pos = end + 2;
    after_end(L, minus, false, true);
}

static bool is_name_start(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_';
}

static bool is_digit(char ch) { return ch >= '0' && ch <= '9'; }

/* {% raw %}...{% endraw %}: the text between verbatim. body is just past
 * "{%" and its marker; false if the tag is not raw. */
static bool lex_raw(struct lexer *L, size_t tag, char mod, size_t body)
{
    size_t p = body;
    while (p < L->n && is_space(L->s[p]))
        p++;
    if (L->n - p < 3 || memcmp(L->s + p, "raw", 3) != 0 || (p + 3 < L->n && (is_name_start(L->s[p + 3]) ||
                                                                          is_digit(L->s[p + 3]))))
        return false;
    p += 3;
    while (p < L->n && is_space(L->s[p]))
        p++;
    bool minus = p < L->n && L->s[p] == '-';
    if (minus)
        p++;
    if (L->n - p < 2 || L->s[p] != '%' || L->s[p + 1] != '}')
        return false;
    emit_text(L, L->pos, tag, '%', mod);
    count_lines(L, tag, p + 2);
    L->pos = p + 2;
    after_end(L, minus, true, false);
    for (size_t i = L->pos; i + 1 < L->n; i++) {
        if (L->s[i] != '{' || L->s[i + 1] != '%')
            continue;
        size_t q = i + 2;
        char emod = q < L->n && (L->s[q] == '-' || L->s[q] == '+') ? L->s[q++] : 0;
        while (q < L->n && is_space(L->s[q]))
            q++;
        if (L->n - q < 6 || memcmp(L->s + q, "endraw", 6) != 0)
            continue;
        q += 6;
        while (q < L->n && is_space(L->s[q]))
            q++;
        bool emin = q < L->n && L->s[q] == '-';
        if (emin)
            q++;
        if (L->n - q < 2 || L->s[q] != '%' || L->s[q + 1] != '}')
            continue;
        emit_text(L, L->pos, i, '%', emod);
        count_lines(L, i, q + 2);
        L->pos = q + 2;
        after_end(L, emin, false, true);
        return true;
    }
    lex_fail(L, "unterminated {% raw %} block: missing {% endraw %}");
}

static const char *const ops2[] = { "//", "**", "==", "!=", ">=", "<=", NULL };
static const char ops1[] = "+-/*%~[](){}<>=.:|,;";

static void lex_op(struct lexer *L, int *depth)
{
    const char *p = L->s + L->pos;
    size_t left = L->n - L->pos;
    for (int i = 0; ops2[i]; i++) {
        if (left >= 2 && memcmp(p, ops2[i], 2) == 0) {
            struct jtok *t = emit(L, T_OP);
            t->s = p;
            t->len = 2;
            L->pos += 2;
            return;
        }
    }
    if (strchr(ops1, *p) == NULL || *p == '\0')
        lex_fail(L, "unexpected character in a tag");
    if (*p == '(' || *p == '[' || *p == '{')
        (*depth)++;
    else if ((*p == ')' || *p == ']' || *p == '}') && *depth > 0)
        (*depth)--;
    struct jtok *t = emit(L, T_OP);
    t->s = p;
    t->len = 1;
    L->pos++;
}

static void lex_number(struct lexer *L)
{
    size_t p = L->pos;
    while (p < L->n && (is_digit(L->s[p]) || (L->s[p] == '_' && p + 1 < L->n && is_digit(L->s[p + 1]))))
        p++;
    bool is_float = false;
    if (p + 1 < L->n && L->s[p] == '.' && is_digit(L->s[p + 1])) {
        is_float = true;
        p++;
        while (p < L->n && (is_digit(L->s[p]) || L->s[p] == '_'))
            p++;
    }
    if (p < L->n && (L->s[p] == 'e' || L->s[p] == 'E')) {
        size_t q = p + 1;
        if (q < L->n && (L->s[q] == '+' || L->s[q] == '-'))
            q++;
        if (q < L->n && is_digit(L->s[q])) {
            is_float = true;
            p = q;
            while (p < L->n && is_digit(L->s[p]))
                p++;
        }
    }
    char buf[64];
    size_t k = 0;
    for (size_t i = L->pos; i < p && k + 1 < sizeof(buf); i++)
        if (L->s[i] != '_')
            buf[k++] = L->s[i];
    buf[k] = '\0';
    struct jtok *t = emit(L, is_float ? T_FLOAT : T_INT);
    t->s = L->s + L->pos;
    t->len = p - L->pos;
    if (is_float) {
        t->f = strtod(buf, NULL);
    } else {
        char *end;
        errno = 0;
        t->i = strtoll(buf, &end, 10);
        if (errno || p - L->pos >= sizeof(buf) - 1)
            lex_fail(L, "integer literal out of range");
    }
    L->pos = p;
}

static void put_utf8(char *o, size_t *k, uint32_t cp)
{
    if (cp < 0x80) {
        o[(*k)++] = (char)cp;
    } else if (cp < 0x800) {
        o[(*k)++] = (char)(0xC0 | (cp >> 6));
        o[(*k)++] = (char)(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
        o[(*k)++] = (char)(0xE0 | (cp >> 12));
        o[(*k)++] = (char)(0x80 | ((cp >> 6) & 0x3f));
        o[(*k)++] = (char)(0x80 | (cp & 0x3f));
    } else {
        o[(*k)++] = (char)(0xF0 | (cp >> 18));
        o[(*k)++] = (char)(0x80 | ((cp >> 12) & 0x3f));
        o[(*k)++] = (char)(0x80 | ((cp >> 6) & 0x3f));
        o[(*k)++] = (char)(0x80 | (cp & 0x3f));
    }
}

static int hexval(char ch)
{
    if (is_digit(ch))
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* Python's unicode-escape decoding of a literal's body [a, b). */
static size_t unescape(struct lexer *L, size_t a, size_t b, char *o)
{
    size_t k = 0;
    for (size_t i = a; i < b; i++) {
        char ch = L->s[i];
        if (ch != '\\' || i + 1 >= b) {
            o[k++] = ch;
            continue;
        }
        char e = L->s[++i];
        static const char from[] = "\\'\"abfnrtv\n", to[] = "\\'\"\a\b\f\n\r\t\v";
        const char *f = strchr(from, e);
        if (f && e) {
            if (e != '\n')
                o[k++] = to[f - from];
            continue;
        }
        int digits = e == 'x' ? 2 : e == 'u' ? 4 : e == 'U' ? 8 : 0;
        if (digits) {
            uint32_t cp = 0;
            if (i + (size_t)digits >= b)
                lex_fail(L, "truncated \\x, \\u or \\U escape in a string literal");
            for (int d = 1; d <= digits; d++) {
                int h = hexval(L->s[i + (size_t)d]);
                if (h < 0)
                    lex_fail(L, "bad \\x, \\u or \\U escape in a string literal");
                cp = cp * 16 + (uint32_t)h;
            }
            if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
                lex_fail(L, "escape in a string literal is not a valid code point");
            put_utf8(o, &k, cp);
            i += (size_t)digits;
            continue;
        }
        if (e >= '0' && e <= '7') {
            uint32_t cp = 0;
            int d = 0;
            while (d < 3 && i < b && L->s[i] >= '0' && L->s[i] <= '7') {
                cp = cp * 8 + (uint32_t)(L->s[i] - '0');
                i++;
                d++;
            }
            i--;
            put_utf8(o, &k, cp);
            continue;
        }
        if (e == 'N')
            lex_fail(L, "\\N{...} escapes are not supported in string literals");
        o[k++] = '\\';
        o[k++] = e;
    }
    return k;
}

static void lex_string(struct lexer *L)
{
    char q = L->s[L->pos];
    size_t p = L->pos + 1;
    while (p < L->n && L->s[p] != q) {
        if (L->s[p] == '\\')
            p++;
        p++;
    }
    if (p >= L->n)
        lex_fail(L, "unterminated string literal");
    char *o = ja_alloc(L->c, (p - L->pos) * 2 + 8);
    size_t k = unescape(L, L->pos + 1, p, o);
    o[k] = '\0';
    struct jtok *t = emit(L, T_STRING);
    t->s = o;
    t->len = k;
    count_lines(L, L->pos, p + 1);
    L->pos = p + 1;
}

/* Inside {% %} or {{ }}: tokens up to the matching end (ignored while a
 * bracket is open, as jinja2's balancing stack does). */
static void lex_tag(struct lexer *L, char kind)
{
    int depth = 0;
    char close = kind == '%' ? '%' : '}';
    for (;;) {
        while (L->pos < L->n && is_space(L->s[L->pos])) {
            L->line += L->s[L->pos] == '\n';
            L->pos++;
        }
        if (L->pos >= L->n)
            lex_fail(L, kind == '%' ? "unexpected end of template: missing '%}'" : "unexpected end of template: "
                     "missing '}}'");
        const char *p = L->s + L->pos;
        size_t left = L->n - L->pos;
        if (depth == 0) {
            bool minus = left >= 3 && p[0] == '-' && p[1] == close && p[2] == '}';
            bool plus = kind == '%' && left >= 3 && p[0] == '+' && p[1] == '%' && p[2] == '}';
            if (minus || plus || (left >= 2 && p[0] == close && p[1] == '}')) {
                emit(L, kind == '%' ? T_BLOCK_END : T_VAR_END);
                L->pos += minus || plus ? 3 : 2;
                after_end(L, minus, plus, kind == '%');
                return;
            }
        }
        if (is_name_start(*p)) {
            size_t e = L->pos;
            while (e < L->n && (is_name_start(L->s[e]) || is_digit(L->s[e])))
                e++;
            struct jtok *t = emit(L, T_NAME);
            t->s = p;
            t->len = e - L->pos;
            L->pos = e;
        } else if (is_digit(*p)) {
            lex_number(L);
        } else if (*p == '\'' || *p == '"') {
            lex_string(L);
        } else {
            lex_op(L, &depth);
        }
    }
}

static void lex_root(struct lexer *L)
{
    while (L->pos < L->n) {
        size_t tag = find_tag(L, L->pos);
        if (tag >= L->n) {
            emit_text(L, L->pos, L->n, 0, 0);
            L->pos = L->n;
            break;
        }
        char kind = L->s[tag + 1];
        char mod = tag + 2 < L->n && (L->s[tag + 2] == '-' || L->s[tag + 2] == '+') ? L->s[tag + 2] : 0;
        size_t body = tag + 2 + (mod != 0);
        if (kind == '%' && lex_raw(L, tag, mod, body))
            continue;
        emit_text(L, L->pos, tag, kind, mod);
        L->pos = body;
        if (kind == '#') {
            lex_comment(L);
            continue;
        }
        emit(L, kind == '%' ? T_BLOCK_BEGIN : T_VAR_BEGIN);
        lex_tag(L, kind);
    }
    emit(L, T_EOF);
}

struct jtok *jlex(struct jctx *c, const char *src, size_t len, size_t *n)
{
    /* jinja2 normalizes every newline to \n and drops one trailing newline */
    char *s = ja_alloc(c, len + 1);
    size_t k = 0;
    for (size_t i = 0; i < len; i++) {
        if (src[i] == '\r') {
            s[k++] = '\n';
            if (i + 1 < len && src[i + 1] == '\n')
                i++;
        } else {
            s[k++] = src[i];
        }
    }
    if (k > 0 && s[k - 1] == '\n')
        k--;
    s[k] = '\0';
    struct lexer L = { .c = c, .s = s, .n = k, .line = 1, .line_starting = true };
    lex_root(&L);
    *n = L.nt;
    return L.t;
}
