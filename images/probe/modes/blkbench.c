/* Block throughput for a host-side benchmark: sequential write, sequential
 * read and random 4 KiB reads on block device 0, each with several requests
 * in flight (completions reclaimed as they come, slots refilled at once).
 * The host times each phase by the arrival of its begin and end lines, so
 * begin is printed right before the first request is published and end right
 * after the last completion. */
#include "virtio.h"

#define SECTOR 512
#define BB_POOL (4u << 20)            /* data buffers: depth * request size */
#define BB_MAX_DEPTH (VQ_MAX_SIZE / 3) /* 3 descriptors per request */
#define RAND_LEN 4096

static uint8_t bb_buf[BB_POOL] NOINIT __attribute__((aligned(4096)));
static struct {
    uint32_t type, reserved;
    uint64_t sector;
} bb_hdr[BB_MAX_DEPTH] __attribute__((aligned(16)));
static volatile uint8_t bb_status[BB_MAX_DEPTH];
static uint32_t bb_len[BB_MAX_DEPTH]; /* data length of the request in slot s */
static uint8_t bb_free[BB_MAX_DEPTH];

enum { SEQ_WRITE, SEQ_READ, RAND_READ };

struct phase {
    int kind;
    uint32_t depth, req_len;
    uint64_t bytes;   /* seq: bytes to transfer from sector 0 */
    uint64_t ops;     /* rand: reads to do */
    uint64_t nblocks; /* rand: 4 KiB blocks to choose from */
    uint64_t lcg;
    uint64_t pos;     /* seq: next byte offset; rand: reads issued */
    uint64_t done;    /* bytes (seq) or reads (rand) completed with status 0 */
};

/* Fills with a 64-bit pattern; n is a multiple of 8. */
static void fill64(void *dst, uint64_t v, size_t n) {
    size_t q = n / 8;
    __asm__ volatile("rep stosq" : "+D"(dst), "+c"(q) : "a"(v) : "memory");
}

/* The next request of the phase into slot s; 0 if there is none left. */
static int next_request(struct phase *p, uint32_t s) {
    uint64_t off;
    uint32_t len;
    if (p->kind == RAND_READ) {
        if (p->pos >= p->ops)
            return 0;
        p->lcg = p->lcg * 6364136223846793005ull + 1442695040888963407ull;
        off = ((p->lcg >> 33) % p->nblocks) * RAND_LEN;
        len = RAND_LEN;
        p->pos++;
    } else {
        if (p->pos >= p->bytes)
            return 0;
        off = p->pos;
        len = p->bytes - off < p->req_len ? (uint32_t)(p->bytes - off) : p->req_len;
        p->pos += len;
    }
    bb_hdr[s].type = p->kind == SEQ_WRITE ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
    bb_hdr[s].reserved = 0;
    bb_hdr[s].sector = off / SECTOR;
    bb_status[s] = 0xff;
    bb_len[s] = len;
    return 1;
}

/* Runs one phase from its begin line to its end line; returns the first
 * non-zero status byte, VQ_TIMEOUT or VQ_NEEDS_RESET, or 0. */
static int run_phase(struct vdev *d, struct phase *p, const char *name) {
    struct vq *q = &d->q[0];
    uint32_t nfree = p->depth, inflight = 0;
    uint16_t data_flags = VIRTQ_DESC_F_NEXT | (p->kind == SEQ_WRITE ? 0 : VIRTQ_DESC_F_WRITE);
    for (uint32_t s = 0; s < p->depth; s++) {
        bb_free[s] = (uint8_t)(p->depth - 1 - s);
        uint16_t h = (uint16_t)(3 * s);
        vq_set_desc(q, h, PA(&bb_hdr[s]), sizeof bb_hdr[s], VIRTQ_DESC_F_NEXT, h + 1);
        vq_set_desc(q, h + 1, PA(bb_buf + (uint64_t)s * p->req_len), p->req_len, data_flags, h + 2);
        vq_set_desc(q, h + 2, PA(&bb_status[s]), 1, VIRTQ_DESC_F_WRITE, 0);
    }
    int status = d->broken;
    pr("PROBE bench %s begin\n", name);
    uint64_t deadline = rdtsc() + IO_TIMEOUT;
    while (status >= 0) {
        int added = 0;
        while (status == 0 && nfree) {
            uint32_t s = bb_free[nfree - 1];
            if (!next_request(p, s))
                break;
            q->desc[3 * s + 1].len = bb_len[s];
            vq_add(q, (uint16_t)(3 * s));
            nfree--, inflight++, added = 1;
        }
        if (added)
            vq_kick(d, 0);
        if (!inflight)
            break;
        int r = vq_wait_used(d, 0, deadline);
        if (r < 0) {
            status = d->broken = r;
            break;
        }
        virtio_ack_irq(d);
        uint32_t id, len;
        while (vq_next_used(q, &id, &len)) {
            uint32_t s = id / 3;
            if (id % 3 || s >= p->depth)
                continue; /* not one of ours: the slot never comes back, so a timeout follows */
            uint8_t st = bb_status[s];
            if (st != 0 && status == 0)
                status = st; /* no new requests; the ones in flight are drained */
            else if (st == 0)
                p->done += p->kind == RAND_READ ? 1 : bb_len[s];
            bb_free[nfree++] = (uint8_t)s;
            inflight--;
        }
        deadline = rdtsc() + IO_TIMEOUT;
    }
    char sb[12];
    pr("PROBE bench %s end %s=%lu status=%s\n", name, p->kind == RAND_READ ? "ops" : "bytes",
       p->done, vq_result_str(status, sb));
    return status;
}

static void run(const char *cmdline) {
    uint64_t mib = probe_arg_u64(cmdline, "bench_mib", 1024);
    uint64_t req_kib = probe_arg_u64(cmdline, "bench_req_kib", 64);
    uint64_t depth = probe_arg_u64(cmdline, "bench_depth", 8);
    uint64_t ops = probe_arg_u64(cmdline, "bench_ops", 20000);

    virtio_scan(cmdline);
    struct vdev *d = virtio_find(VIRTIO_ID_BLOCK);
    if (!d) {
        pr("PROBE bench error=no_device\n");
        return;
    }
    const char *err = blk_init(d);
    if (err) {
        pr("PROBE bench init fail=%s\n", err);
        return;
    }
    uint64_t disk = blk_capacity(d) * SECTOR;
    uint64_t bytes = mib > (disk >> 20) ? disk : mib << 20;
    pr("PROBE bench size bytes=%lu\n", bytes);

    uint64_t max_depth = d->q[0].size / 3;
    if (max_depth > BB_MAX_DEPTH)
        max_depth = BB_MAX_DEPTH;
    if (depth > max_depth)
        depth = max_depth;
    if (depth < 1)
        depth = 1;
    uint64_t max_kib = BB_POOL / 1024 / depth;
    if (req_kib > max_kib)
        req_kib = max_kib;
    if (req_kib < 1)
        req_kib = 1;
    if (bytes < RAND_LEN)
        ops = 0; /* no 4 KiB block to read */
    pr("PROBE bench config req_kib=%lu depth=%lu ops=%lu\n", req_kib, depth, ops);

    /* Write data: any non-zero pattern, set up before the clock starts. */
    fill64(bb_buf, 0x434e424854524542ull, depth * req_kib * 1024); /* "BERTHBNC" */

    struct phase p = {.depth = (uint32_t)depth, .req_len = (uint32_t)(req_kib * 1024), .bytes = bytes};
    p.kind = SEQ_WRITE;
    run_phase(d, &p, "seq_write");
    p.kind = SEQ_READ;
    p.pos = p.done = 0;
    run_phase(d, &p, "seq_read");

    p.kind = RAND_READ;
    p.pos = p.done = 0;
    p.req_len = RAND_LEN;
    p.nblocks = bytes / RAND_LEN;
    p.ops = ops;
    p.lcg = 1;
    run_phase(d, &p, "rand_read");
}

PROBE_MODE(blkbench, run);
