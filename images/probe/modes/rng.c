/* rng: asks the virtio-rng device twice for probe.rng_bytes (default 256,
 * at most 4096) and reports, for each answer, the length the device
 * gave, how many distinct byte values it holds, and whether the two
 * answers differ. With probe.rng_hold=1 it then spins, so the host can
 * read the device's counters while the VM runs. */
#include "virtio.h"

#define RNG_MAX 4096

static uint8_t rng_buf[2][RNG_MAX] __attribute__((aligned(4096)));

static int request(struct vdev *d, uint8_t *buf, uint32_t n, uint32_t *len) {
    struct vq *q = &d->q[0];
    memset(buf, 0, n);
    vq_set_desc(q, 0, PA(buf), n, VIRTQ_DESC_F_WRITE, 0);
    vq_publish(q, 0);
    virtio_notify(d, 0);
    int r = vq_wait_all(d, 0, IO_TIMEOUT);
    if (r < 0)
        return r;
    *len = q->used->ring[(uint16_t)(q->last_used - 1) & (q->size - 1)].len;
    return 0;
}

static uint32_t distinct(const uint8_t *buf, uint32_t n) {
    uint8_t seen[256] = {0};
    uint32_t count = 0;
    for (uint32_t i = 0; i < n; i++)
        if (!seen[buf[i]]++)
            count++;
    return count;
}

static void run(const char *cmdline) {
    uint64_t n = probe_arg_u64(cmdline, "rng_bytes", 256);
    if (n == 0 || n > RNG_MAX)
        n = RNG_MAX;
    virtio_scan(cmdline);
    struct vdev *d = virtio_find(VIRTIO_ID_RNG);
    if (!d) {
        pr("PROBE rng error=no_device\n");
        return;
    }
    const char *err = virtio_init(d, 0, 1);
    if (err) {
        pr("PROBE rng init fail=%s\n", err);
        return;
    }
    uint32_t len[2] = {0, 0};
    for (int i = 0; i < 2; i++) {
        char sb[16];
        int r = request(d, rng_buf[i], (uint32_t)n, &len[i]);
        if (r < 0) {
            pr("PROBE rng read %d status=%s\n", i, vq_result_str(r, sb));
            return;
        }
        pr("PROBE rng read %d len=%u distinct=%u\n", i, len[i], distinct(rng_buf[i], len[i]));
    }
    int differ = len[0] != len[1] || memcmp(rng_buf[0], rng_buf[1], len[0]) != 0;
    pr("PROBE rng differ=%d\n", differ);
    if (probe_arg_u64(cmdline, "rng_hold", 0))
        for (;;)
            cpu_relax();
}

PROBE_MODE(rng, run);
