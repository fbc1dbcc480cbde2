/* A polling virtio-mmio (version 2) driver: device discovery from the
 * command line, device init/reset, split virtqueues, and the block and net
 * helpers the modes share. No interrupts: completions are found by polling
 * used->idx with an rdtsc deadline, so a silent device is a reported result. */
#ifndef PROBE_VIRTIO_H
#define PROBE_VIRTIO_H
#include "probe.h"

/* virtio-mmio registers */
#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MAGIC 0x74726976 /* "virt" */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG 4

/* Status bits */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

/* Feature bits */
#define VIRTIO_F_VERSION_1 (1ull << 32)
#define VIRTIO_BLK_F_RO (1ull << 5)
#define VIRTIO_BLK_F_FLUSH (1ull << 9)
#define VIRTIO_NET_F_MAC (1ull << 5)

/* Split virtqueue layout */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};
struct virtq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];
};
struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};
struct virtq_used {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[];
};

#define VQ_MAX_SIZE 256
#define VIRTIO_MAX_DEV 16
#define VIRTIO_MAX_QUEUES 2

struct vq {
    uint16_t size;      /* what was written to QueueNum */
    uint16_t avail_idx; /* next avail->idx the driver publishes */
    uint16_t last_used; /* used->idx the driver has consumed up to */
    volatile struct virtq_desc *desc;
    volatile struct virtq_avail *avail;
    volatile struct virtq_used *used;
};

struct vdev {
    int index;     /* position among the virtio_mmio.device= words */
    uint64_t base; /* physical = virtual (identity map) */
    uint64_t size;
    uint32_t irq;
    uint32_t id;   /* DeviceID, 0 if the transport is not a usable version-2 device */
    int usable;
    uint64_t offered, acked;
    int nq;
    int qslot[VIRTIO_MAX_QUEUES]; /* index into the queue-memory pool, -1 = none yet */
    struct vq q[VIRTIO_MAX_QUEUES];
    int broken; /* a request timed out or the device asked for a reset: no more requests */
};

extern struct vdev vdevs[VIRTIO_MAX_DEV];
extern int vdev_count;

/* Results of waiting for a completion (>= 0 is a device status byte). */
#define VQ_TIMEOUT (-1)
#define VQ_NEEDS_RESET (-2)

/* Timeouts in TSC cycles (generous: everything is slow under emulation). */
#define IO_TIMEOUT 10000000000ull  /* a normal request */
#define BAD_TIMEOUT 2000000000ull  /* a hostile request in mode bad */
#define RX_TIMEOUT 30000000000ull  /* between two wanted frames (probe.rx_timeout=) */

static inline uint32_t mmio_r32(uint64_t a) {
    uint32_t v;
    __asm__ volatile("movl (%1), %0" : "=r"(v) : "r"(a) : "memory");
    return v;
}
static inline uint8_t mmio_r8(uint64_t a) {
    uint8_t v;
    __asm__ volatile("movb (%1), %0" : "=q"(v) : "r"(a) : "memory");
    return v;
}
static inline void mmio_w32(uint64_t a, uint32_t v) {
    __asm__ volatile("movl %0, (%1)" ::"r"(v), "r"(a) : "memory");
}
/* Full barrier without SSE: a locked no-op on the stack. */
static inline void vmb(void) { __asm__ volatile("lock; addl $0, (%%rsp)" ::: "memory", "cc"); }

static inline uint32_t vd_r32(const struct vdev *d, uint32_t off) { return mmio_r32(d->base + off); }
static inline void vd_w32(const struct vdev *d, uint32_t off, uint32_t v) { mmio_w32(d->base + off, v); }

/* Guest-physical address of probe memory (identity map). */
#define PA(p) ((uint64_t)(uintptr_t)(p))

static inline void vq_set_desc(struct vq *q, uint16_t i, uint64_t addr, uint32_t len,
                               uint16_t flags, uint16_t next) {
    q->desc[i].addr = addr;
    q->desc[i].len = len;
    q->desc[i].flags = flags;
    q->desc[i].next = next;
}

/* virtio.c */
int virtio_scan(const char *cmdline); /* parses, probes and prints every device; returns count */
struct vdev *virtio_find(uint32_t id);
const char *virtio_init(struct vdev *d, uint64_t want, int nq); /* NULL on success, else a reason */
void virtio_reset(struct vdev *d);
void vq_publish(struct vq *q, uint16_t head);
void virtio_notify(struct vdev *d, int qi);
int vq_wait_moved(struct vdev *d, int qi, uint16_t from, uint64_t cycles);
int vq_wait_all(struct vdev *d, int qi, uint64_t cycles);
/* Batched use of a queue (the bench modes): vq_add() puts a chain head in the
 * avail ring without publishing it; vq_kick() publishes all added heads with
 * one avail->idx store and notifies unless the device set
 * VIRTQ_USED_F_NO_NOTIFY; vq_wait_used() polls until used->idx passes
 * last_used (0) or rdtsc passes deadline (VQ_TIMEOUT; VQ_NEEDS_RESET checked
 * every 256 polls and at the deadline); vq_next_used() takes one used element
 * (1) or finds none (0). */
#define VIRTQ_USED_F_NO_NOTIFY 1
void vq_kick(struct vdev *d, int qi);
int vq_wait_used(struct vdev *d, int qi, uint64_t deadline);
/* Inline, as they run once per request and the PVM emulates every
 * instruction at CPL0. */
static inline void vq_add(struct vq *q, uint16_t head) {
    q->avail->ring[q->avail_idx & (q->size - 1)] = head;
    q->avail_idx++;
}
static inline int vq_next_used(struct vq *q, uint32_t *id, uint32_t *len) {
    if (q->used->idx == q->last_used)
        return 0;
    /* x86 keeps loads in order, so the entry read after the index is at
     * least as new: a compiler barrier is enough here. */
    __asm__ volatile("" ::: "memory");
    volatile struct virtq_used_elem *e = &q->used->ring[q->last_used & (q->size - 1)];
    *id = e->id;
    *len = e->len;
    q->last_used++;
    return 1;
}
void virtio_ack_irq(struct vdev *d);
const char *vq_result_str(int r, char *buf); /* "0".."255", "timeout", "needs_reset" */
int parse_num(const char **p, uint64_t *v);  /* decimal or 0x-hex; advances *p, returns digit count */
void hex_fixed(char *out, uint64_t v, int digits);

/* virtio_blk.c */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define BLK_BUF_SIZE 65536
extern uint8_t blk_buf[BLK_BUF_SIZE];
const char *blk_init(struct vdev *d);
uint64_t blk_capacity(struct vdev *d);
int blk_request(struct vdev *d, uint32_t type, uint64_t sector, void *buf, uint32_t len);

/* virtio_net.c */
#define NET_HDR_LEN 12
#define NET_RX_BUFS 16
#define NET_RX_BUF_LEN (1526 + NET_HDR_LEN)
#define ETHERTYPE_PROBE 0x88b5
const char *net_init(struct vdev *d, uint8_t mac[6]);
int net_tx(struct vdev *d, const void *frame, uint32_t len, uint64_t cycles);
void net_rx_post_all(struct vdev *d);
int net_rx_next(struct vdev *d, uint8_t *frame, uint32_t *len, uint64_t deadline);
void net_mac_str(char *out, const uint8_t mac[6]);
uint64_t net_receive(struct vdev *d, uint64_t n, uint64_t *skipped, uint64_t timeout, int quiet,
                     int *why);
#endif
