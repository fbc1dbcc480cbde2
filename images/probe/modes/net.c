/* virtio-net: the MAC, then probe.net_tx=<n> broadcast frames of ethertype
 * 0x88b5, then probe.net_rx=<n> frames of that ethertype received (others
 * counted and skipped). */
#include "virtio.h"

static void run(const char *cmdline) {
    uint64_t ntx = probe_arg_u64(cmdline, "net_tx", 0);
    uint64_t nrx = probe_arg_u64(cmdline, "net_rx", 0);
    uint64_t timeout = probe_arg_u64(cmdline, "rx_timeout", RX_TIMEOUT);

    virtio_scan(cmdline);
    struct vdev *d = virtio_find(VIRTIO_ID_NET);
    if (!d) {
        pr("PROBE net error=no_device\n");
        return;
    }
    uint8_t mac[6];
    const char *err = net_init(d, mac);
    if (err) {
        pr("PROBE net init fail=%s\n", err);
        return;
    }
    char ms[18];
    net_mac_str(ms, mac);
    pr("PROBE net mac=%s\n", ms);

    if (ntx) {
        uint64_t k = 0;
        int r = 0;
        for (; k < ntx; k++) {
            uint8_t f[60];
            memset(f, 0, sizeof f);
            memset(f, 0xff, 6);
            memcpy(f + 6, mac, 6);
            f[12] = ETHERTYPE_PROBE >> 8;
            f[13] = ETHERTYPE_PROBE & 0xff;
            static const char text[] = "BERTH-PROBE-FRAME ";
            memcpy(f + 14, text, sizeof text - 1);
            char num[24];
            int nl = 0;
            uint64_t v = k;
            do
                num[nl++] = '0' + v % 10;
            while (v /= 10);
            for (int i = 0; i < nl; i++)
                f[14 + sizeof text - 1 + i] = num[nl - 1 - i];
            r = net_tx(d, f, sizeof f, IO_TIMEOUT);
            if (r < 0)
                break;
        }
        if (r < 0)
            pr("PROBE net tx timeout done=%lu%s\n", k, r == VQ_NEEDS_RESET ? " needs_reset" : "");
        else
            pr("PROBE net tx sent=%lu\n", ntx);
    }

    if (nrx) {
        net_rx_post_all(d);
        pr("PROBE net rx ready\n");
        uint64_t skipped;
        int why;
        uint64_t got = net_receive(d, nrx, &skipped, timeout, 0, &why);
        if (got == nrx)
            pr("PROBE net rx done got=%lu skipped=%lu\n", got, skipped);
        else
            pr("PROBE net rx timeout got=%lu%s\n", got, why == VQ_NEEDS_RESET ? " needs_reset" : "");
    }
}

PROBE_MODE(net, run);
