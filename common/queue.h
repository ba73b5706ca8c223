/* An intrusive FIFO: the element embeds a struct moe_qnode and the queue
 * links those, so pushing never allocates and cannot fail. Header-only.
 * A node is in at most one queue at a time. A zeroed struct moe_queue is
 * empty. Not thread-safe: the owner's lock guards the queue. */
#ifndef MOE_COMMON_QUEUE_H
#define MOE_COMMON_QUEUE_H

#include <stddef.h>

struct moe_qnode {
    struct moe_qnode *next;
};

struct moe_queue {
    struct moe_qnode *head, *tail;
    size_t n;
};

/* The struct that embeds `member` at ptr. */
#define moe_container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

static inline void moe_queue_push(struct moe_queue *q, struct moe_qnode *n)
{
    n->next = NULL;
    if (q->tail)
        q->tail->next = n;
    else
        q->head = n;
    q->tail = n;
    q->n++;
}

/* NULL when empty. */
static inline struct moe_qnode *moe_queue_pop(struct moe_queue *q)
{
    struct moe_qnode *n = q->head;
    if (n == NULL)
        return NULL;
    q->head = n->next;
    if (q->head == NULL)
        q->tail = NULL;
    q->n--;
    n->next = NULL;
    return n;
}

static inline int moe_queue_empty(const struct moe_queue *q)
{
    return q->head == NULL;
}

/* The first node, left in the queue; NULL when empty. */
static inline struct moe_qnode *moe_queue_peek(const struct moe_queue *q)
{
    return q->head;
}

/* Unlinks n wherever it is in q (a walk from the head: for the rare
 * removal from the middle, such as a cancelled request). 1 if n was in q,
 * 0 if not (q unchanged). */
static inline int moe_queue_remove(struct moe_queue *q, struct moe_qnode *n)
{
    struct moe_qnode *prev = NULL;
    for (struct moe_qnode *it = q->head; it != NULL; prev = it, it = it->next) {
        if (it != n)
            continue;
        if (prev)
            prev->next = n->next;
        else
            q->head = n->next;
        if (q->tail == n)
            q->tail = prev;
        q->n--;
        n->next = NULL;
        return 1;
    }
    return 0;
}

#endif
