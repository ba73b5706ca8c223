/* common/queue.h: the intrusive FIFO. Order is first in, first out; the
 * count and the tail stay right through pops and removals from the head,
 * the middle and the end, so that a push after any of them links in the
 * right place. */
#include <stddef.h>

#include "common/queue.h"
#include "tests/harness.h"

struct item {
    int v;
    struct moe_qnode qn;
};

static int pop_v(struct moe_queue *q)
{
    struct moe_qnode *n = moe_queue_pop(q);
    return n ? moe_container_of(n, struct item, qn)->v : -1;
}

static void test_fifo(void)
{
    struct moe_queue q = { 0 };
    struct item it[4] = { { .v = 0 }, { .v = 1 }, { .v = 2 }, { .v = 3 } };
    CHECK(moe_queue_empty(&q) && moe_queue_peek(&q) == NULL && moe_queue_pop(&q) == NULL);
    for (int i = 0; i < 3; i++)
        moe_queue_push(&q, &it[i].qn);
    CHECK_INT(q.n, ==, 3);
    CHECK(moe_queue_peek(&q) == &it[0].qn);
    CHECK_INT(pop_v(&q), ==, 0);
    moe_queue_push(&q, &it[3].qn);
    CHECK_INT(pop_v(&q), ==, 1);
    CHECK_INT(pop_v(&q), ==, 2);
    CHECK_INT(pop_v(&q), ==, 3);
    CHECK_INT(pop_v(&q), ==, -1);
    CHECK(moe_queue_empty(&q) && q.tail == NULL && q.n == 0);
    /* a popped node can go into the queue again */
    moe_queue_push(&q, &it[2].qn);
    CHECK_INT(pop_v(&q), ==, 2);
}

static void test_remove(void)
{
    struct moe_queue q = { 0 };
    struct item it[5];
    for (int i = 0; i < 5; i++) {
        it[i].v = i;
        moe_queue_push(&q, &it[i].qn);
    }
    CHECK_INT(moe_queue_remove(&q, &it[2].qn), ==, 1);  /* middle */
    CHECK_INT(moe_queue_remove(&q, &it[2].qn), ==, 0);  /* no longer there */
    CHECK_INT(moe_queue_remove(&q, &it[0].qn), ==, 1);  /* head */
    CHECK_INT(moe_queue_remove(&q, &it[4].qn), ==, 1);  /* tail */
    CHECK_INT(q.n, ==, 2);
    CHECK(q.tail == &it[3].qn);
    moe_queue_push(&q, &it[4].qn);     /* links after the new tail */
    CHECK_INT(pop_v(&q), ==, 1);
    CHECK_INT(pop_v(&q), ==, 3);
    CHECK_INT(pop_v(&q), ==, 4);
    CHECK(moe_queue_empty(&q));
    /* the only node */
    moe_queue_push(&q, &it[1].qn);
    CHECK_INT(moe_queue_remove(&q, &it[1].qn), ==, 1);
    CHECK(q.head == NULL && q.tail == NULL && q.n == 0);
    CHECK_INT(moe_queue_remove(&q, &it[1].qn), ==, 0);
}

int main(void)
{
    MOE_TEST_RUN(test_fifo);
    MOE_TEST_RUN(test_remove);
    return moe_test_exit_code();
}
