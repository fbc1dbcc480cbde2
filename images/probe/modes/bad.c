/* Hostile descriptors. Each case sends one malformed request to block
 * device 0 and reports what the device did (the status byte it wrote, a
 * DEVICE_NEEDS_RESET, or nothing), recovers the device if needed and checks
 * that a plain read of sector 0 still works. Then, with a net device, a
 * transmit from an address outside guest RAM, after which the receive queue
 * must still deliver a frame. */
#include "virtio.h"

#define OOB_ADDR 0x7f0000000000ull

enum { C_OOB_ADDR, C_LOOP, C_ZERO_LEN, C_OVERSIZED, C_READONLY, C_AVAIL_JUMP, C_BAD_HEAD, C_COUNT };
static const char *const case_name[C_COUNT] = {
    "oob_addr", "loop", "zero_len", "oversized", "readonly_buffer", "avail_jump", "bad_head",
};

static struct {
    uint32_t type, reserved;
    uint64_t sector;
} hdr __attribute__((aligned(16)));
static volatile uint8_t status __attribute__((aligned(16)));
static uint8_t data[512] __attribute__((aligned(512)));

/* >= 0: the status byte (0xff = completed but never written),
 * VQ_NEEDS_RESET, or VQ_TIMEOUT for no completion. */
static int run_case(struct vdev *d, int c) {
    struct vq *q = &d->q[0];
    hdr.type = VIRTIO_BLK_T_IN;
    hdr.reserved = 0;
    hdr.sector = 0;
    status = 0xff;
    uint64_t daddr = PA(data);
    uint32_t dlen = sizeof data;
    uint16_t dflags = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE;
    uint16_t sflags = VIRTQ_DESC_F_WRITE;
    switch (c) {
    case C_OOB_ADDR:
        daddr = OOB_ADDR;
        break;
    case C_LOOP: /* status -> header again */
        sflags |= VIRTQ_DESC_F_NEXT;
        break;
    case C_ZERO_LEN:
        dlen = 0;
        break;
    case C_OVERSIZED:
        dlen = 0xffffff00u;
        break;
    case C_READONLY:
        dflags = VIRTQ_DESC_F_NEXT;
        break;
    }
    vq_set_desc(q, 0, PA(&hdr), sizeof hdr, VIRTQ_DESC_F_NEXT, 1);
    vq_set_desc(q, 1, daddr, dlen, dflags, 2);
    vq_set_desc(q, 2, PA(&status), 1, sflags, 0);

    uint16_t before = q->used->idx;
    if (c == C_AVAIL_JUMP) { /* one real entry, but the index jumps by size + 5 */
        q->avail->ring[q->avail_idx & (q->size - 1)] = 0;
        vmb();
        q->avail_idx += q->size + 5;
        q->avail->idx = q->avail_idx;
        vmb();
    } else {
        vq_publish(q, c == C_BAD_HEAD ? q->size : 0);
    }
    virtio_notify(d, 0);
    int r = vq_wait_moved(d, 0, before, BAD_TIMEOUT);
    if (vd_r32(d, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_NEEDS_RESET)
        return VQ_NEEDS_RESET;
    return r == 0 ? status : VQ_TIMEOUT;
}

static void blk_cases(struct vdev *d) {
    const char *err = blk_init(d);
    if (err) {
        pr("PROBE bad error=init_fail:%s\n", err);
        return;
    }
    for (int c = 0; c < C_COUNT; c++) {
        int o = run_case(d, c);
        int ok = 1;
        if (o < 0) /* needs_reset or no_completion: reset and start over */
            ok = blk_init(d) == 0;
        if (ok)
            ok = blk_request(d, VIRTIO_BLK_T_IN, 0, blk_buf, 512) == 0;
        if (o >= 0)
            pr("PROBE bad case=%s outcome=status:%u", case_name[c], (unsigned)o);
        else
            pr("PROBE bad case=%s outcome=%s", case_name[c],
               o == VQ_NEEDS_RESET ? "needs_reset" : "no_completion");
        pr(" recovered=%s\n", ok ? "ok" : "fail");
        if (!ok) /* give the next case a clean device */
            blk_init(d);
    }
}

static void net_case(struct vdev *d, uint64_t timeout) {
    uint8_t mac[6];
    const char *err = net_init(d, mac);
    if (!err) {
        struct vq *q = &d->q[1]; /* transmit */
        vq_set_desc(q, 0, OOB_ADDR, NET_HDR_LEN + 60, 0, 0);
        vq_publish(q, 0);
        virtio_notify(d, 1);
        int r = vq_wait_all(d, 1, BAD_TIMEOUT);
        if (r == VQ_NEEDS_RESET ||
            (vd_r32(d, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_NEEDS_RESET))
            err = net_init(d, mac); /* a driver must reset such a device */
    }
    if (err) {
        pr("PROBE bad case=net_tx_oob rx_after=timeout init_fail=%s\n", err);
        return;
    }
    net_rx_post_all(d);
    pr("PROBE net rx ready\n");
    uint64_t skipped;
    int why;
    uint64_t got = net_receive(d, 1, &skipped, timeout, 1, &why);
    pr("PROBE bad case=net_tx_oob rx_after=%s\n", got ? "ok" : "timeout");
}

static void run(const char *cmdline) {
    virtio_scan(cmdline);
    struct vdev *b = virtio_find(VIRTIO_ID_BLOCK);
    if (b)
        blk_cases(b);
    else
        pr("PROBE bad error=no_block_device\n");
    struct vdev *n = virtio_find(VIRTIO_ID_NET);
    if (n)
        net_case(n, probe_arg_u64(cmdline, "rx_timeout", RX_TIMEOUT));
    pr("PROBE bad done\n");
}

PROBE_MODE(bad, run);
