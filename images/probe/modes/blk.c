/* virtio-blk: for every block device, capacity/ro/id, then optionally a
 * patterned write + flush + verify, a read with an FNV-1a hash, and a read
 * past the end of the disk. */
#include "virtio.h"

#define SECTOR 512
#define CHUNK_SECTORS (BLK_BUF_SIZE / SECTOR)

static uint8_t pattern_byte(uint64_t seed, int d, uint64_t s, uint32_t i) {
    return (uint8_t)(seed + (uint64_t)d + s * 131 + (uint64_t)i * 7);
}

static void fill_pattern(uint8_t *buf, uint64_t seed, int d, uint64_t s, uint32_t n) {
    for (uint32_t k = 0; k < n; k++, s++)
        for (uint32_t i = 0; i < SECTOR; i++)
            *buf++ = pattern_byte(seed, d, s, i);
}

/* "a:b[:c]" of decimal or 0x-hex numbers; returns how many were parsed. */
static int parse_list(const char *s, uint64_t *v, int max) {
    int n = 0;
    while (n < max) {
        if (!parse_num(&s, &v[n]))
            return n;
        n++;
        if (*s != ':')
            return *s ? n - 1 : n;
        s++;
    }
    return n;
}

static void print_id(struct vdev *d) {
    static char id[21];
    memset(blk_buf, 0, 20);
    int r = blk_request(d, VIRTIO_BLK_T_GET_ID, 0, blk_buf, 20);
    int n = 0;
    if (r == 0)
        for (; n < 20 && blk_buf[n]; n++)
            id[n] = (blk_buf[n] > 0x20 && blk_buf[n] < 0x7f) ? (char)blk_buf[n] : '.';
    id[n] = 0;
    pr(" id=%s\n", id);
}

static void do_write(struct vdev *d, int di, uint64_t start, uint64_t count, uint64_t seed) {
    char sb[8];
    int status = 0;
    for (uint64_t s = start; s < start + count && status == 0;) {
        uint64_t n = start + count - s;
        if (n > CHUNK_SECTORS)
            n = CHUNK_SECTORS;
        fill_pattern(blk_buf, seed, di, s, (uint32_t)n);
        status = blk_request(d, VIRTIO_BLK_T_OUT, s, blk_buf, (uint32_t)n * SECTOR);
        s += n;
    }
    pr("PROBE blk dev=%d write start=%lu count=%lu status=%s\n", di, start, count,
       vq_result_str(status, sb));
    int fs = blk_request(d, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
    pr("PROBE blk dev=%d flush status=%s\n", di, vq_result_str(fs, sb));
    if (status != 0)
        return;
    static uint8_t expect[SECTOR];
    for (uint64_t s = start; s < start + count;) {
        uint64_t n = start + count - s;
        if (n > CHUNK_SECTORS)
            n = CHUNK_SECTORS;
        int r = blk_request(d, VIRTIO_BLK_T_IN, s, blk_buf, (uint32_t)n * SECTOR);
        if (r != 0) {
            pr("PROBE blk dev=%d verify fail sector=%lu status=%s\n", di, s, vq_result_str(r, sb));
            return;
        }
        for (uint64_t k = 0; k < n; k++) {
            fill_pattern(expect, seed, di, s + k, 1);
            if (memcmp(expect, blk_buf + k * SECTOR, SECTOR) != 0) {
                pr("PROBE blk dev=%d verify fail sector=%lu\n", di, s + k);
                return;
            }
        }
        s += n;
    }
    pr("PROBE blk dev=%d verify ok\n", di);
}

static void do_read(struct vdev *d, int di, uint64_t start, uint64_t count) {
    char sb[8], hex[17];
    uint64_t h = 0xcbf29ce484222325ull;
    int status = 0;
    for (uint64_t s = start; s < start + count;) {
        uint64_t n = start + count - s;
        if (n > CHUNK_SECTORS)
            n = CHUNK_SECTORS;
        status = blk_request(d, VIRTIO_BLK_T_IN, s, blk_buf, (uint32_t)n * SECTOR);
        if (status != 0)
            break;
        for (uint32_t i = 0; i < n * SECTOR; i++) {
            h ^= blk_buf[i];
            h *= 0x100000001b3ull;
        }
        s += n;
    }
    hex_fixed(hex, h, 16);
    pr("PROBE blk dev=%d read start=%lu count=%lu status=%s fnv=%s\n", di, start, count,
       vq_result_str(status, sb), hex);
}

static void run(const char *cmdline) {
    char arg[64], sb[8];
    uint64_t wr[3], rd[2];
    int have_write = 0, have_read = 0;
    if (probe_arg(cmdline, "blk_write", arg, sizeof arg) > 0) {
        have_write = parse_list(arg, wr, 3) == 3;
        if (!have_write)
            pr("PROBE blk error=bad_blk_write\n");
    }
    if (probe_arg(cmdline, "blk_read", arg, sizeof arg) > 0) {
        have_read = parse_list(arg, rd, 2) == 2;
        if (!have_read)
            pr("PROBE blk error=bad_blk_read\n");
    }
    int oob = probe_arg_u64(cmdline, "blk_oob", 0) != 0;
    int hold = probe_arg_u64(cmdline, "blk_hold", 0) != 0;

    virtio_scan(cmdline);
    int di = 0;
    for (int i = 0; i < vdev_count; i++) {
        struct vdev *d = &vdevs[i];
        if (!d->usable || d->id != VIRTIO_ID_BLOCK)
            continue;
        const char *err = blk_init(d);
        if (err) {
            pr("PROBE blk dev=%d init fail=%s\n", di++, err);
            continue;
        }
        uint64_t cap = blk_capacity(d);
        pr("PROBE blk dev=%d capacity=%lu ro=%d", di, cap, (d->offered & VIRTIO_BLK_F_RO) ? 1 : 0);
        print_id(d);
        if (hold) {
            /* The device is live; wait for a byte (a snapshot can be taken
             * and restored meanwhile) before touching it again. */
            pr("PROBE blk dev=%d holding\n", di);
            serial_getc();
        }
        if (have_write)
            do_write(d, di, wr[0], wr[1], wr[2]);
        if (have_read)
            do_read(d, di, rd[0], rd[1]);
        if (oob)
            pr("PROBE blk dev=%d oob status=%s\n", di,
               vq_result_str(blk_request(d, VIRTIO_BLK_T_IN, cap, blk_buf, SECTOR), sb));
        di++;
    }
    if (di == 0)
        pr("PROBE blk error=no_device\n");
}

PROBE_MODE(blk, run);
