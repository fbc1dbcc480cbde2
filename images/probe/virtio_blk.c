/* virtio-blk requests: one request at a time, always the chain
 * desc 0 (header) -> desc 1 (data, if any) -> desc 2 (status byte). */
#include "virtio.h"

uint8_t blk_buf[BLK_BUF_SIZE] __attribute__((aligned(4096)));

static struct {
    uint32_t type, reserved;
    uint64_t sector;
} blk_hdr __attribute__((aligned(16)));
static volatile uint8_t blk_status __attribute__((aligned(16)));

const char *blk_init(struct vdev *d) {
    return virtio_init(d, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH, 1);
}

/* Config offset 0: u64 capacity in 512-byte sectors, read as two 32-bit halves. */
uint64_t blk_capacity(struct vdev *d) {
    uint64_t lo = vd_r32(d, VIRTIO_MMIO_CONFIG), hi = vd_r32(d, VIRTIO_MMIO_CONFIG + 4);
    return lo | hi << 32;
}

/* Returns the status byte the device wrote, VQ_TIMEOUT or VQ_NEEDS_RESET.
 * After a timeout or a reset request the device is marked broken and later
 * requests fail the same way at once (until the next init). */
int blk_request(struct vdev *d, uint32_t type, uint64_t sector, void *buf, uint32_t len) {
    if (d->broken)
        return d->broken;
    struct vq *q = &d->q[0];
    blk_hdr.type = type;
    blk_hdr.reserved = 0;
    blk_hdr.sector = sector;
    blk_status = 0xff;
    uint16_t data_flags = VIRTQ_DESC_F_NEXT;
    if (type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID)
        data_flags |= VIRTQ_DESC_F_WRITE;
    vq_set_desc(q, 0, PA(&blk_hdr), sizeof blk_hdr, VIRTQ_DESC_F_NEXT, 1);
    if (len) {
        vq_set_desc(q, 1, PA(buf), len, data_flags, 2);
        vq_set_desc(q, 2, PA(&blk_status), 1, VIRTQ_DESC_F_WRITE, 0);
    } else { /* FLUSH: header -> status */
        vq_set_desc(q, 1, PA(&blk_status), 1, VIRTQ_DESC_F_WRITE, 0);
    }
    vq_publish(q, 0);
    virtio_notify(d, 0);
    int r = vq_wait_all(d, 0, IO_TIMEOUT);
    if (r < 0) {
        d->broken = r;
        return r;
    }
    return blk_status;
}
