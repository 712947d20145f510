/* A qemu-user TCG plugin that counts the guest instructions a program retires (issue 26's speed
 * proxy while no ARM hardware is at hand; BENCHMARKS.md). Equivalent to qemu's own
 * tests/plugin/insn.c, which Debian's qemu-user does not ship: each translated block adds its
 * instruction count to a counter every time it runs (an inline add, no callback), and the total
 * is printed at exit as "insns: N".
 *
 *   cc -O2 -shared -fPIC -o build/qemu_insn_count.so tools/qemu_insn_count.c
 *   qemu-aarch64 -plugin build/qemu_insn_count.so -d plugin -D insns.log PROGRAM ARGS...
 *
 * With the argument top=N (-plugin build/qemu_insn_count.so,arg=top=30) it also prints the N
 * translated blocks that retired the most instructions ("tb 0xADDR insns N"), for attributing
 * the count to functions (the guest's LD_DEBUG=files gives each library's load address).
 *
 * The counters are shared by every guest thread and not atomic: run the guest single-threaded
 * (OMP_NUM_THREADS=1). Written against the plugin API version 1 (qemu 4.2 to 7.2); only the
 * few declarations used are given here. */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t; /* not read here */
struct qemu_plugin_tb;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS };
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, qemu_plugin_vcpu_udata_cb_t cb,
                                          enum qemu_plugin_cb_flags flags, void *userdata);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op,
                                              void *ptr, uint64_t imm);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);
void qemu_plugin_outs(const char *string);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

static uint64_t insn_count;

/* top=N: one entry per (block address, length), in an open-addressing table */
#define TABLE_SIZE (1u << 20)
struct block { uint64_t vaddr, n_insns, execs; };
static struct block *table;
static unsigned top_n;

static struct block *block_of(uint64_t vaddr, uint64_t n) {
    uint64_t h = (vaddr * 0x9E3779B97F4A7C15ull) ^ n;
    for (unsigned i = 0; i < TABLE_SIZE; ++i) {
        struct block *b = &table[(h + i) & (TABLE_SIZE - 1)];
        if (b->n_insns == 0) {
            b->vaddr = vaddr;
            b->n_insns = n;
            return b;
        }
        if (b->vaddr == vaddr && b->n_insns == n) return b;
    }
    return NULL;
}

static void block_exec(unsigned int vcpu, void *p) {
    (void)vcpu;
    ((struct block *)p)->execs++;
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    (void)id;
    const size_t n = qemu_plugin_tb_n_insns(tb);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insn_count, n);
    if (table && n > 0) {
        struct block *b = block_of(qemu_plugin_tb_vaddr(tb), n);
        if (b) qemu_plugin_register_vcpu_tb_exec_cb(tb, block_exec, QEMU_PLUGIN_CB_NO_REGS, b);
    }
}

static int by_insns(const void *a, const void *b) {
    const struct block *x = a, *y = b;
    const uint64_t ix = x->n_insns * x->execs, iy = y->n_insns * y->execs;
    return ix < iy ? 1 : ix > iy ? -1 : 0;
}

static void at_exit(qemu_plugin_id_t id, void *p) {
    (void)id;
    (void)p;
    char buf[64];
    snprintf(buf, sizeof(buf), "insns: %" PRIu64 "\n", insn_count);
    qemu_plugin_outs(buf);
    if (!table) return;
    qsort(table, TABLE_SIZE, sizeof(struct block), by_insns);
    for (unsigned i = 0; i < top_n && i < TABLE_SIZE && table[i].execs; ++i) {
        char line[96];
        snprintf(line, sizeof(line), "tb 0x%" PRIx64 " insns %" PRIu64 "\n", table[i].vaddr,
                 table[i].n_insns * table[i].execs);
        qemu_plugin_outs(line);
    }
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id,
                                                               const qemu_info_t *info, int argc,
                                                               char **argv) {
    (void)info;
    for (int i = 0; i < argc; ++i)
        if (strncmp(argv[i], "top=", 4) == 0) top_n = (unsigned)atoi(argv[i] + 4);
    if (top_n) table = calloc(TABLE_SIZE, sizeof(struct block));
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
