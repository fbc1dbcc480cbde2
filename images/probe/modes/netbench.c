/* Net throughput for a host-side benchmark on the first net device: a
 * transmit burst that keeps the transmit ring full, then a receive phase
 * that keeps every receive descriptor stocked. The host times each phase by
 * the arrival of its lines: net_tx begin right before the first frame is
 * published, net_rx ready right after every receive buffer is posted (the
 * host starts sending then), end right after the last completion. */
#include "virtio.h"

#define NET_RXQ 0
#define NET_TXQ 1
#define NB_FRAME_MAX 1514
#define NB_FRAME_MIN 60
#define NB_TX_LEN 1536 /* >= NET_HDR_LEN + NB_FRAME_MAX, a multiple of 64 */
#define NB_RX_LEN NET_RX_BUF_LEN
#define NB_RX_TIMEOUT 156000000000ull /* ~60 s at 2.6 GHz, renewed by every frame */

static uint8_t tx_bufs[VQ_MAX_SIZE][NB_TX_LEN] NOINIT __attribute__((aligned(64)));
static uint8_t rx_bufs[VQ_MAX_SIZE][NB_RX_LEN] NOINIT __attribute__((aligned(64)));
static uint16_t tx_free[VQ_MAX_SIZE];

static void fill64(void *dst, uint64_t v, size_t n) {
    size_t q = n / 8;
    __asm__ volatile("rep stosq" : "+D"(dst), "+c"(q) : "a"(v) : "memory");
}

/* The payload starts "BENCH <seq> ". The sequence number is kept as ASCII
 * and incremented in place: the PVM emulates every CPL0 instruction, and a
 * binary-to-decimal conversion per frame would cost more than the rest of the
 * transmit path. seq_text holds the digits, a space and '.' filler; all
 * SEQ_TEXT bytes are stored into the frame (the filler matches the frame's). */
#define SEQ_TEXT 24
typedef uint64_t __attribute__((may_alias, aligned(1))) u64_unaligned;
static char seq_text[SEQ_TEXT] __attribute__((aligned(8)));
static int seq_len;

static void seq_reset(void) {
    memset(seq_text, '.', SEQ_TEXT);
    seq_text[0] = '0';
    seq_text[1] = ' ';
    seq_len = 1;
}

static inline void seq_inc(void) {
    int i = seq_len - 1;
    while (i >= 0 && seq_text[i] == '9')
        seq_text[i--] = '0';
    if (i >= 0) {
        seq_text[i]++;
    } else if (seq_len < SEQ_TEXT - 2) { /* 99..9 -> 100..0 */
        seq_text[0] = '1';
        seq_text[seq_len++] = '0';
        seq_text[seq_len] = ' ';
    }
}

static inline void seq_put(uint8_t *payload) {
    const u64_unaligned *src = (const u64_unaligned *)seq_text;
    u64_unaligned *dst = (u64_unaligned *)(payload + 6);
    dst[0] = src[0];
    dst[1] = src[1];
    dst[2] = src[2];
}

/* Returns 0, VQ_TIMEOUT or VQ_NEEDS_RESET. */
static int tx_phase(struct vdev *d, const uint8_t mac[6], uint64_t nframes, uint32_t flen) {
    struct vq *q = &d->q[NET_TXQ];
    uint32_t nbufs = q->size, nfree = 0;
    if (nbufs > nframes)
        nbufs = (uint32_t)nframes;
    for (uint32_t i = 0; i < nbufs; i++) {
        uint8_t *b = tx_bufs[i];
        fill64(b, 0x2e2e2e2e2e2e2e2eull, NB_TX_LEN); /* '.' filler */
        memset(b, 0, NET_HDR_LEN);
        uint8_t *f = b + NET_HDR_LEN;
        memset(f, 0xff, 6);
        memcpy(f + 6, mac, 6);
        f[12] = ETHERTYPE_PROBE >> 8;
        f[13] = ETHERTYPE_PROBE & 0xff;
        memcpy(f + 14, "BENCH ", 6);
        vq_set_desc(q, (uint16_t)i, PA(b), NET_HDR_LEN + flen, 0, 0);
        tx_free[nfree++] = (uint16_t)(nbufs - 1 - i);
    }
    uint64_t sent = 0, done = 0;
    seq_reset();
    int status = 0;
    pr("PROBE bench net_tx begin\n");
    uint64_t deadline = rdtsc() + IO_TIMEOUT;
    while (done < nframes) {
        int added = 0;
        while (nfree && sent < nframes) {
            uint16_t i = tx_free[--nfree];
            seq_put(tx_bufs[i] + NET_HDR_LEN + 14);
            seq_inc();
            sent++;
            vq_add(q, i);
            added = 1;
        }
        if (added)
            vq_kick(d, NET_TXQ);
        int r = vq_wait_used(d, NET_TXQ, deadline);
        if (r < 0) {
            status = r;
            break;
        }
        virtio_ack_irq(d);
        uint32_t id, len;
        while (vq_next_used(q, &id, &len)) {
            if (id >= nbufs)
                continue; /* not ours: that buffer never comes back, a timeout follows */
            tx_free[nfree++] = (uint16_t)id;
            done++;
        }
        deadline = rdtsc() + IO_TIMEOUT;
    }
    char sb[12];
    pr("PROBE bench net_tx end frames=%lu bytes=%lu status=%s\n", done, done * flen,
       vq_result_str(status, sb));
    return status;
}

static void rx_phase(struct vdev *d, uint64_t want, uint64_t timeout) {
    struct vq *q = &d->q[NET_RXQ];
    uint32_t nbufs = q->size;
    for (uint32_t i = 0; i < nbufs; i++) {
        vq_set_desc(q, (uint16_t)i, PA(rx_bufs[i]), NB_RX_LEN, VIRTQ_DESC_F_WRITE, 0);
        vq_add(q, (uint16_t)i);
    }
    uint64_t frames = 0, bytes = 0;
    int status = 0, end = want == 0;
    vq_kick(d, NET_RXQ);
    pr("PROBE bench net_rx ready\n");
    uint64_t deadline = rdtsc() + timeout;
    while (!end) {
        int r = vq_wait_used(d, NET_RXQ, deadline);
        if (r < 0) {
            status = r;
            break;
        }
        virtio_ack_irq(d);
        uint32_t id, len;
        int added = 0;
        while (!end && vq_next_used(q, &id, &len)) {
            if (id >= nbufs)
                continue;
            const uint8_t *f = rx_bufs[id] + NET_HDR_LEN;
            uint32_t fl = len > NB_RX_LEN ? NB_RX_LEN - NET_HDR_LEN
                                          : (len > NET_HDR_LEN ? len - NET_HDR_LEN : 0);
            if (fl >= 14 && f[12] == (ETHERTYPE_PROBE >> 8) && f[13] == (ETHERTYPE_PROBE & 0xff)) {
                if (fl >= 17 && f[14] == 'E' && f[15] == 'N' && f[16] == 'D') {
                    end = 1;
                } else {
                    frames++;
                    bytes += fl;
                    end = frames >= want;
                }
            }
            vq_add(q, (uint16_t)id); /* the descriptor still points at its buffer */
            added = 1;
        }
        if (end)
            break;
        if (added)
            vq_kick(d, NET_RXQ);
        deadline = rdtsc() + timeout;
    }
    char sb[12];
    pr("PROBE bench net_rx end frames=%lu bytes=%lu status=%s\n", frames, bytes,
       vq_result_str(status, sb));
}

static void run(const char *cmdline) {
    uint64_t ntx = probe_arg_u64(cmdline, "bench_tx_frames", 50000);
    uint64_t nrx = probe_arg_u64(cmdline, "bench_rx_frames", 50000);
    uint64_t flen = probe_arg_u64(cmdline, "bench_frame", NB_FRAME_MAX);
    uint64_t timeout = probe_arg_u64(cmdline, "bench_rx_timeout", NB_RX_TIMEOUT);
    if (flen > NB_FRAME_MAX)
        flen = NB_FRAME_MAX;
    if (flen < NB_FRAME_MIN)
        flen = NB_FRAME_MIN;

    virtio_scan(cmdline);
    struct vdev *d = virtio_find(VIRTIO_ID_NET);
    if (!d) {
        pr("PROBE bench error=no_device\n");
        return;
    }
    uint8_t mac[6];
    const char *err = net_init(d, mac);
    if (err) {
        pr("PROBE bench init fail=%s\n", err);
        return;
    }
    char ms[18];
    net_mac_str(ms, mac);
    pr("PROBE bench mac=%s frame=%lu\n", ms, flen);
    if (tx_phase(d, mac, ntx, (uint32_t)flen) < 0 && (err = net_init(d, mac)) != 0) {
        pr("PROBE bench init fail=%s\n", err); /* the reset after a failed transmit */
        return;
    }
    rx_phase(d, nrx, timeout);
}

PROBE_MODE(netbench, run);
