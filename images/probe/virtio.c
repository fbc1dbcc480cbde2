/* virtio-mmio transport: find the devices named on the command line, bring
 * one up (or back up after a reset), publish buffers and poll for their
 * completion. Queue memory comes from a page-aligned pool in .bss; a device
 * keeps its queue pages across resets. */
#include "virtio.h"

#define GIB4 0x100000000ull

struct vdev vdevs[VIRTIO_MAX_DEV];
int vdev_count;

/* One 8 KiB block per queue: descriptors at 0 (256 * 16 = 4 KiB), the avail
 * ring at 4 KiB (<= 518 bytes), the used ring at 5 KiB (<= 2054 bytes). */
#define VQ_POOL 16
#define VQ_MEM 8192
#define VQ_AVAIL_OFF 4096
#define VQ_USED_OFF 5120
static uint8_t vq_pool[VQ_POOL][VQ_MEM] __attribute__((aligned(4096)));
static int vq_pool_used;

int parse_num(const char **p, uint64_t *v) {
    const char *s = *p;
    unsigned base = 10;
    int n = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
        s += 2, base = 16;
    *v = 0;
    for (;; s++, n++) {
        unsigned dg;
        if (*s >= '0' && *s <= '9')
            dg = *s - '0';
        else if (base == 16 && (*s | 0x20) >= 'a' && (*s | 0x20) <= 'f')
            dg = (*s | 0x20) - 'a' + 10;
        else
            break;
        *v = *v * base + dg;
    }
    *p = s;
    return n;
}

void hex_fixed(char *out, uint64_t v, int digits) {
    for (int i = digits - 1; i >= 0; i--, v >>= 4)
        out[i] = "0123456789abcdef"[v & 15];
    out[digits] = 0;
}

const char *vq_result_str(int r, char *buf) {
    if (r == VQ_TIMEOUT)
        return "timeout";
    if (r == VQ_NEEDS_RESET)
        return "needs_reset";
    char tmp[4];
    int i = 0, j = 0;
    unsigned v = (unsigned)r & 0xff;
    do
        tmp[i++] = '0' + v % 10;
    while (v /= 10);
    while (i)
        buf[j++] = tmp[--i];
    buf[j] = 0;
    return buf;
}

/* "<size>@<base>:<irq>[:<id>]", size with an optional K/M/G suffix, as
 * Linux's virtio_mmio.device= parameter. */
static int parse_device_word(const char *s, struct vdev *d) {
    uint64_t v;
    if (!parse_num(&s, &v))
        return 0;
    if ((*s | 0x20) == 'k')
        v <<= 10, s++;
    else if ((*s | 0x20) == 'm')
        v <<= 20, s++;
    else if ((*s | 0x20) == 'g')
        v <<= 30, s++;
    d->size = v;
    if (*s++ != '@' || !parse_num(&s, &d->base) || *s++ != ':' || !parse_num(&s, &v))
        return 0;
    d->irq = (uint32_t)v;
    return *s == 0 || *s == ' ' || *s == ':';
}

static void probe_device(struct vdev *d) {
    pr("PROBE virtio dev=%d base=0x%lx irq=%u", d->index, d->base, d->irq);
    if (d->base == 0 || d->size < 0x100 || d->base + d->size > GIB4 || d->base + d->size < d->base) {
        pr(" id=0 error=outside_identity_map\n");
        return;
    }
    uint32_t magic = vd_r32(d, VIRTIO_MMIO_MAGIC);
    if (magic != VIRTIO_MAGIC) {
        pr(" id=0 error=bad_magic:0x%x\n", magic);
        return;
    }
    uint32_t version = vd_r32(d, VIRTIO_MMIO_VERSION);
    d->id = vd_r32(d, VIRTIO_MMIO_DEVICE_ID);
    if (version != 2) {
        pr(" id=%u error=version:%u\n", d->id, version);
        d->id = 0;
        return;
    }
    pr(" id=%u\n", d->id);
    d->usable = d->id != 0; /* DeviceID 0: an empty transport slot */
}

/* The next device slot, cleared, with no queue slot assigned yet. */
static struct vdev *next_vdev(void) {
    struct vdev *d = &vdevs[vdev_count];
    memset(d, 0, sizeof *d);
    d->index = vdev_count++;
    for (int i = 0; i < VIRTIO_MAX_QUEUES; i++)
        d->qslot[i] = -1;
    return d;
}

int virtio_scan(const char *cmdline) {
    static const char key[] = "virtio_mmio.device=";
    const size_t klen = sizeof key - 1;
    vdev_count = 0;
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *w = p;
        while (*p && *p != ' ')
            p++;
        if ((size_t)(p - w) <= klen || memcmp(w, key, klen) != 0)
            continue;
        if (vdev_count == VIRTIO_MAX_DEV) {
            pr("PROBE virtio error=too_many_devices max=%d\n", VIRTIO_MAX_DEV);
            break;
        }
        struct vdev *d = next_vdev();
        if (!parse_device_word(w + klen, d)) {
            pr("PROBE virtio dev=%d error=malformed\n", d->index);
            continue;
        }
        probe_device(d);
    }
    if (vdev_count)
        pr("PROBE virtio_source cmdline\n");
    else if (acpi.nvirtio) {
        pr("PROBE virtio_source acpi\n");
        for (uint32_t i = 0; i < acpi.nvirtio && vdev_count < VIRTIO_MAX_DEV; i++) {
            struct vdev *d = next_vdev();
            d->base = acpi.virtio[i].base;
            d->size = acpi.virtio[i].size;
            d->irq = acpi.virtio[i].gsi;
            probe_device(d);
        }
    }
    return vdev_count;
}

void virtio_ack_irq(struct vdev *d) {
    uint32_t isr = vd_r32(d, VIRTIO_MMIO_INTERRUPT_STATUS);
    if (isr)
        vd_w32(d, VIRTIO_MMIO_INTERRUPT_ACK, isr);
}

/* Status = 0, then wait (bounded) until the device reads back 0. */
void virtio_reset(struct vdev *d) {
    vmb();
    vd_w32(d, VIRTIO_MMIO_STATUS, 0);
    uint64_t start = rdtsc();
    while (vd_r32(d, VIRTIO_MMIO_STATUS) != 0 && rdtsc() - start < BAD_TIMEOUT)
        cpu_relax();
    for (int i = 0; i < VIRTIO_MAX_QUEUES; i++)
        d->q[i].avail_idx = d->q[i].last_used = 0;
}

static const char *setup_queue(struct vdev *d, int qi) {
    struct vq *q = &d->q[qi];
    vd_w32(d, VIRTIO_MMIO_QUEUE_SEL, qi);
    if (vd_r32(d, VIRTIO_MMIO_QUEUE_READY) != 0)
        return "queue_already_ready";
    uint32_t max = vd_r32(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (max == 0)
        return "queue_unavailable";
    uint32_t size = 1;
    while (size * 2 <= max && size * 2 <= VQ_MAX_SIZE)
        size *= 2;
    if (d->qslot[qi] < 0) {
        if (vq_pool_used == VQ_POOL)
            return "out_of_queue_memory";
        d->qslot[qi] = vq_pool_used++;
    }
    uint8_t *mem = vq_pool[d->qslot[qi]];
    memset(mem, 0, VQ_MEM);
    q->size = (uint16_t)size;
    q->avail_idx = q->last_used = 0;
    q->desc = (volatile struct virtq_desc *)mem;
    q->avail = (volatile struct virtq_avail *)(mem + VQ_AVAIL_OFF);
    q->used = (volatile struct virtq_used *)(mem + VQ_USED_OFF);
    uint64_t desc = (uint64_t)(uintptr_t)q->desc, avail = (uint64_t)(uintptr_t)q->avail,
             used = (uint64_t)(uintptr_t)q->used;
    vmb();
    vd_w32(d, VIRTIO_MMIO_QUEUE_NUM, size);
    vd_w32(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)desc);
    vd_w32(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
    vd_w32(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)avail);
    vd_w32(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
    vd_w32(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)used);
    vd_w32(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
    vd_w32(d, VIRTIO_MMIO_QUEUE_READY, 1);
    return 0;
}

/* The whole virtio 1.x init sequence from a reset; usable again after a
 * reset. want = device feature bits to accept if offered (VERSION_1 is
 * always required). */
const char *virtio_init(struct vdev *d, uint64_t want, int nq) {
    if (!d->usable)
        return "not_usable";
    d->broken = 0;
    d->nq = nq;
    virtio_reset(d);
    if (vd_r32(d, VIRTIO_MMIO_STATUS) != 0)
        return "reset_not_done";
    uint32_t st = VIRTIO_STATUS_ACKNOWLEDGE;
    vd_w32(d, VIRTIO_MMIO_STATUS, st);
    st |= VIRTIO_STATUS_DRIVER;
    vd_w32(d, VIRTIO_MMIO_STATUS, st);

    vd_w32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    uint64_t lo = vd_r32(d, VIRTIO_MMIO_DEVICE_FEATURES);
    vd_w32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    uint64_t hi = vd_r32(d, VIRTIO_MMIO_DEVICE_FEATURES);
    d->offered = lo | hi << 32;
    if (!(d->offered & VIRTIO_F_VERSION_1)) {
        vd_w32(d, VIRTIO_MMIO_STATUS, st | VIRTIO_STATUS_FAILED);
        return "no_version_1";
    }
    d->acked = (d->offered & want) | VIRTIO_F_VERSION_1;
    vd_w32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    vd_w32(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)d->acked);
    vd_w32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    vd_w32(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(d->acked >> 32));
    st |= VIRTIO_STATUS_FEATURES_OK;
    vd_w32(d, VIRTIO_MMIO_STATUS, st);
    if (!(vd_r32(d, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
        vd_w32(d, VIRTIO_MMIO_STATUS, st | VIRTIO_STATUS_FAILED);
        return "features_not_ok";
    }
    for (int i = 0; i < nq; i++) {
        const char *err = setup_queue(d, i);
        if (err) {
            vd_w32(d, VIRTIO_MMIO_STATUS, st | VIRTIO_STATUS_FAILED);
            return err;
        }
    }
    st |= VIRTIO_STATUS_DRIVER_OK;
    vd_w32(d, VIRTIO_MMIO_STATUS, st);
    uint32_t now = vd_r32(d, VIRTIO_MMIO_STATUS);
    if (now & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED))
        return "device_failed";
    if (!(now & VIRTIO_STATUS_DRIVER_OK))
        return "driver_ok_not_set";
    return 0;
}

void vq_publish(struct vq *q, uint16_t head) {
    q->avail->ring[q->avail_idx & (q->size - 1)] = head;
    vmb(); /* the ring entry (and the descriptors) before the index */
    q->avail_idx++;
    q->avail->idx = q->avail_idx;
    vmb();
}

void virtio_notify(struct vdev *d, int qi) {
    vmb();
    vd_w32(d, VIRTIO_MMIO_QUEUE_NOTIFY, (uint32_t)qi);
}

/* Polls used->idx until done(); checks DEVICE_NEEDS_RESET now and then
 * (each MMIO read is a VM exit). 0, VQ_TIMEOUT or VQ_NEEDS_RESET. */
static int vq_poll(struct vdev *d, struct vq *q, int all, uint16_t from, uint64_t cycles) {
    uint64_t start = rdtsc();
    for (uint32_t n = 1;; n++) {
        uint16_t u = q->used->idx;
        int done = all ? (uint16_t)(u - q->last_used) >= (uint16_t)(q->avail_idx - q->last_used)
                       : u != from;
        if (done) {
            vmb(); /* the used entries and the buffers after the index */
            q->last_used = u;
            virtio_ack_irq(d);
            return 0;
        }
        int late = rdtsc() - start > cycles;
        if ((late || (n & 255) == 0) &&
            (vd_r32(d, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_NEEDS_RESET))
            return VQ_NEEDS_RESET;
        if (late)
            return VQ_TIMEOUT;
        cpu_relax();
    }
}

/* Until used->idx differs from `from`. */
int vq_wait_moved(struct vdev *d, int qi, uint16_t from, uint64_t cycles) {
    return vq_poll(d, &d->q[qi], 0, from, cycles);
}

/* Until the device has used everything published on the queue. */
int vq_wait_all(struct vdev *d, int qi, uint64_t cycles) {
    return vq_poll(d, &d->q[qi], 1, 0, cycles);
}

void vq_kick(struct vdev *d, int qi) {
    struct vq *q = &d->q[qi];
    vmb(); /* the ring entries (and the descriptors) before the index */
    q->avail->idx = q->avail_idx;
    vmb(); /* the index before reading used->flags */
    if (!(q->used->flags & VIRTQ_USED_F_NO_NOTIFY))
        vd_w32(d, VIRTIO_MMIO_QUEUE_NOTIFY, (uint32_t)qi);
}

int vq_wait_used(struct vdev *d, int qi, uint64_t deadline) {
    struct vq *q = &d->q[qi];
    for (uint32_t n = 1;; n++) {
        if (q->used->idx != q->last_used) {
            vmb(); /* the used entries and the buffers after the index */
            return 0;
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

/* The first usable device with this DeviceID, or NULL. */
struct vdev *virtio_find(uint32_t id) {
    for (int i = 0; i < vdev_count; i++)
        if (vdevs[i].usable && vdevs[i].id == id)
            return &vdevs[i];
    return 0;
}
