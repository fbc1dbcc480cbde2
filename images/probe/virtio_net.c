/* virtio-net: queue 0 receives, queue 1 transmits. Every frame carries the
 * 12-byte virtio_net_hdr (VERSION_1 layout) in front, in the same buffer. */
#include "virtio.h"

#define NET_RXQ 0
#define NET_TXQ 1

static uint8_t rx_bufs[NET_RX_BUFS][NET_RX_BUF_LEN] __attribute__((aligned(64)));
static uint8_t tx_buf[NET_HDR_LEN + 1514] __attribute__((aligned(64)));

const char *net_init(struct vdev *d, uint8_t mac[6]) {
    const char *err = virtio_init(d, VIRTIO_NET_F_MAC, 2);
    if (err)
        return err;
    for (int i = 0; i < 6; i++) /* config space: 8-bit fields take 8-bit reads */
        mac[i] = (d->acked & VIRTIO_NET_F_MAC) ? mmio_r8(d->base + VIRTIO_MMIO_CONFIG + i) : 0;
    return 0;
}

/* One frame (without header) of up to 1514 bytes; waits for its completion.
 * 0, VQ_TIMEOUT or VQ_NEEDS_RESET. */
int net_tx(struct vdev *d, const void *frame, uint32_t len, uint64_t cycles) {
    struct vq *q = &d->q[NET_TXQ];
    if (len > sizeof tx_buf - NET_HDR_LEN)
        len = sizeof tx_buf - NET_HDR_LEN;
    memset(tx_buf, 0, NET_HDR_LEN);
    memcpy(tx_buf + NET_HDR_LEN, frame, len);
    vq_set_desc(q, 0, PA(tx_buf), NET_HDR_LEN + len, 0, 0);
    vq_publish(q, 0);
    virtio_notify(d, NET_TXQ);
    return vq_wait_all(d, NET_TXQ, cycles);
}

static void rx_post(struct vdev *d, uint16_t i) {
    struct vq *q = &d->q[NET_RXQ];
    vq_set_desc(q, i, PA(rx_bufs[i]), NET_RX_BUF_LEN, VIRTQ_DESC_F_WRITE, 0);
    vq_publish(q, i);
}

/* Once per init: buffer i sits in descriptor i. */
void net_rx_post_all(struct vdev *d) {
    uint16_t n = d->q[NET_RXQ].size < NET_RX_BUFS ? d->q[NET_RXQ].size : NET_RX_BUFS;
    for (uint16_t i = 0; i < n; i++)
        rx_post(d, i);
    virtio_notify(d, NET_RXQ);
}

/* The next received frame, copied out without its header (frame must hold
 * NET_RX_BUF_LEN bytes); its buffer goes straight back to the device.
 * 1, VQ_TIMEOUT (rdtsc passed deadline) or VQ_NEEDS_RESET. */
int net_rx_next(struct vdev *d, uint8_t *frame, uint32_t *len, uint64_t deadline) {
    struct vq *q = &d->q[NET_RXQ];
    uint16_t nbufs = q->size < NET_RX_BUFS ? q->size : NET_RX_BUFS;
    for (uint32_t n = 1;; n++) {
        if (q->used->idx != q->last_used) {
            vmb();
            volatile struct virtq_used_elem *e = &q->used->ring[q->last_used & (q->size - 1)];
            uint32_t id = e->id, l = e->len;
            q->last_used++;
            virtio_ack_irq(d);
            if (l > NET_RX_BUF_LEN)
                l = NET_RX_BUF_LEN;
            l = l > NET_HDR_LEN ? l - NET_HDR_LEN : 0;
            *len = 0;
            if (id < nbufs) {
                memcpy(frame, rx_bufs[id] + NET_HDR_LEN, l);
                *len = l;
                rx_post(d, (uint16_t)id);
                virtio_notify(d, NET_RXQ);
            }
            return 1;
        }
        int late = (int64_t)(rdtsc() - deadline) > 0;
        if ((late || (n & 255) == 0) &&
            (vd_r32(d, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_NEEDS_RESET))
            return VQ_NEEDS_RESET;
        if (late)
            return VQ_TIMEOUT;
        cpu_relax();
    }
}

static uint8_t frame[NET_RX_BUF_LEN]; /* net_receive's copy of the frame */

/* "aa:bb:cc:dd:ee:ff" */
void net_mac_str(char *out, const uint8_t mac[6]) {
    for (int i = 0; i < 6; i++) {
        hex_fixed(out + 3 * i, mac[i], 2);
        out[3 * i + 2] = i < 5 ? ':' : 0;
    }
}

/* Waits (deadline renewed after each wanted frame) for n frames of
 * ethertype 0x88b5 and prints them unless quiet. Returns how many came;
 * *skipped counts the others. */
uint64_t net_receive(struct vdev *d, uint64_t n, uint64_t *skipped, uint64_t timeout, int quiet,
                     int *why) {
    uint64_t got = 0;
    uint64_t deadline = rdtsc() + timeout;
    *skipped = 0;
    *why = 0;
    while (got < n) {
        uint32_t len;
        int r = net_rx_next(d, frame, &len, deadline);
        if (r < 0) {
            *why = r;
            break;
        }
        if (len < 14 || (frame[12] << 8 | frame[13]) != ETHERTYPE_PROBE) {
            (*skipped)++;
            continue;
        }
        got++;
        deadline = rdtsc() + timeout;
        if (quiet)
            continue;
        char payload[41];
        uint32_t k = 0;
        for (; k < 40 && 14 + k < len && frame[14 + k]; k++) {
            uint8_t c = frame[14 + k];
            payload[k] = (c >= 0x20 && c < 0x7f) ? (char)c : '.';
        }
        payload[k] = 0;
        pr("PROBE net rx len=%u payload=%s\n", len, payload);
    }
    return got;
}

