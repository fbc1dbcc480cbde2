//! Every committed corpus and regression input through its entry point, the
//! seed corpus's generator, and hostile inputs whose error is checked.

use std::path::PathBuf;

use super::*;
use crate::migration::protocol::{write_frame, write_json, PageBatch, PAGE};

type Entry = fn(&[u8]);

/// Fuzz target name (fuzz/fuzz_targets/<name>.rs) and its entry point.
const TARGETS: [(&str, Entry); 6] = [
    ("virtio_blk", virtio_blk_requests),
    ("virtio_net_tx", virtio_net_tx),
    ("virtio_net_rx", virtio_net_rx),
    ("virtio_mmio", virtio_mmio_registers),
    ("snapshot_state", snapshot_state),
    ("migration_frames", migration_frames),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The inputs in fuzz/<kind>/<target>/ (READMEs and dot files aside).
fn inputs(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    saved_inputs(&fuzz_dir().join(kind).join(target))
}

#[test]
fn corpus_and_regression_inputs_run_clean() {
    let mut failed = Vec::new();
    for (target, entry) in TARGETS {
        let corpus = inputs("corpus", target);
        assert!(!corpus.is_empty(), "fuzz/corpus/{target} has no inputs");
        for (path, bytes) in corpus.iter().chain(&inputs("regressions", target)) {
            if std::panic::catch_unwind(|| entry(bytes)).is_err() {
                failed.push(path.display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "inputs that crash: {failed:#?}");
}

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const HDR: u64 = 0x400;
const DATA: u64 = 0x600;
const STATUS: u64 = 0xc00;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Guest memory contents, built by address.
#[derive(Default, Clone)]
struct Image(Vec<u8>);

impl Image {
    fn put(&mut self, addr: u64, bytes: &[u8]) -> &mut Self {
        let (start, end) = (addr as usize, addr as usize + bytes.len());
        if self.0.len() < end {
            self.0.resize(end, 0);
        }
        self.0[start..end].copy_from_slice(bytes);
        self
    }

    fn desc(&mut self, r: Rings, i: u16, addr: u64, len: u32, flags: u16, next: u16) -> &mut Self {
        let mut d = addr.to_le_bytes().to_vec();
        d.extend(len.to_le_bytes());
        d.extend(flags.to_le_bytes());
        d.extend(next.to_le_bytes());
        self.put(r.desc + 16 * u64::from(i), &d)
    }

    /// Descriptors `first..` chained in table order.
    fn chain(&mut self, r: Rings, first: u16, descs: &[(u64, u32, u16)]) -> &mut Self {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = first + i as u16;
            let last = usize::from(i - first) == descs.len() - 1;
            let flags = if last { flags } else { flags | NEXT };
            self.desc(r, i, addr, len, flags, i + 1);
        }
        self
    }

    /// Offers `heads` in the available ring.
    fn avail(&mut self, r: Rings, heads: &[u16]) -> &mut Self {
        self.put(r.avail + 2, &(heads.len() as u16).to_le_bytes());
        for (i, h) in heads.iter().enumerate() {
            self.put(r.avail + 4 + 2 * i as u64, &h.to_le_bytes());
        }
        self
    }

    fn blk_header(&mut self, at: u64, kind: u32, sector: u64) -> &mut Self {
        let mut h = kind.to_le_bytes().to_vec();
        h.extend([0; 4]);
        h.extend(sector.to_le_bytes());
        self.put(at, &h)
    }
}

fn used_idx(mem: &GuestMemory, r: Rings) -> u16 {
    mem.read_obj(GuestAddress(r.used + 2)).unwrap()
}

/// (id, len) of used ring entry `i`.
fn used(mem: &GuestMemory, r: Rings, i: u64) -> (u32, u32) {
    let at = r.used + 4 + 8 * i;
    (
        mem.read_obj(GuestAddress(at)).unwrap(),
        mem.read_obj(GuestAddress(at + 4)).unwrap(),
    )
}

fn byte_at(mem: &GuestMemory, addr: u64) -> u8 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

/// A queue of 4 entries: flags bits 2-4 = 2 for blk, bits 0-2 = 2 for net.
const Q4: Rings = Rings {
    desc: 0,
    avail: 64,
    used: 80,
};

/// A queue of 8 entries: flags bits 2-4 = 3 for blk.
const Q8: Rings = Rings {
    desc: 0,
    avail: 128,
    used: 152,
};

fn blk_input(flags: u8, sectors: u8, next_avail: u16, image: &Image) -> Vec<u8> {
    let mut v = vec![flags | (2 << 2), sectors];
    v.extend(next_avail.to_le_bytes());
    v.extend(&image.0);
    v
}

/// Two requests on a queue of 8: write sector 3, read it back.
fn write_then_read() -> Image {
    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7 + 1) as u8).collect();
    let mut m = Image::default();
    m.blk_header(HDR, 1, 3)
        .put(DATA, &pattern)
        .chain(Q8, 0, &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, WRITE)])
        .blk_header(HDR + 16, 0, 3)
        .chain(
            Q8,
            3,
            &[
                (HDR + 16, 16, 0),
                (DATA + 512, 512, WRITE),
                (STATUS + 1, 1, WRITE),
            ],
        )
        .avail(Q8, &[0, 3]);
    m
}

/// One request: header, one data buffer, status.
fn blk_request(kind: u32, sector: u64, data: (u64, u32, u16)) -> Image {
    let mut m = Image::default();
    m.blk_header(HDR, kind, sector)
        .chain(Q4, 0, &[(HDR, 16, 0), data, (STATUS, 1, WRITE)])
        .avail(Q4, &[0])
        .put(STATUS, &[0xff]);
    m
}

#[test]
fn blk_requests_are_served_and_hostile_ones_get_an_error_status() {
    assert_eq!((rings(4, 0), rings(8, 0)), (Q4, Q8));
    // A write, then a read of the same sector.
    let mut m = write_then_read();
    m.put(STATUS, &[0xff, 0xff]);
    let s = blk(&blk_input(3 << 2, 8, 0, &m)).unwrap();
    assert_eq!(used_idx(&s.mem, Q8), 2);
    assert_eq!(byte_at(&s.mem, STATUS), S_OK);
    assert_eq!(byte_at(&s.mem, STATUS + 1), S_OK);
    assert_eq!(used(&s.mem, Q8, 1), (3, 513));
    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7 + 1) as u8).collect();
    let mut back = vec![0u8; 512];
    s.mem
        .read_slice(&mut back, GuestAddress(DATA + 512))
        .unwrap();
    assert_eq!(back, pattern);

    let cases: [(&str, u8, Image, u8); 6] = [
        (
            "past the end",
            0,
            blk_request(0, 8, (DATA, 512, WRITE)),
            S_IOERR,
        ),
        (
            "sector * 512 overflows",
            0,
            blk_request(0, u64::MAX / 256, (DATA, 512, WRITE)),
            S_IOERR,
        ),
        (
            "outside guest memory",
            0,
            blk_request(0, 0, (u64::MAX - 8, 512, WRITE)),
            S_IOERR,
        ),
        (
            "not whole sectors",
            0,
            blk_request(0, 0, (DATA, 100, WRITE)),
            S_IOERR,
        ),
        (
            "write to a read-only disk",
            1,
            blk_request(1, 0, (DATA, 512, 0)),
            S_IOERR,
        ),
        (
            "unknown request type",
            0,
            blk_request(77, 0, (DATA, 512, 0)),
            S_UNSUPP,
        ),
    ];
    for (what, flags, image, status) in cases {
        let s = blk(&blk_input(flags, 8, 0, &image)).unwrap();
        assert_eq!(used_idx(&s.mem, Q4), 1, "{what}");
        assert_eq!(byte_at(&s.mem, STATUS), status, "{what}");
        assert!(!s.signals.needs_reset(), "{what}");
    }
}

#[test]
fn broken_blk_chains_and_rings_ask_for_a_reset() {
    let mut looping = blk_request(0, 0, (DATA, 512, WRITE));
    looping.desc(Q4, 2, STATUS, 1, WRITE | NEXT, 0);
    let mut bad_head = blk_request(0, 0, (DATA, 512, WRITE));
    bad_head.avail(Q4, &[9]);
    let mut no_status = Image::default();
    no_status
        .blk_header(HDR, 0, 0)
        .chain(Q4, 0, &[(HDR, 16, 0)])
        .avail(Q4, &[0]);
    let mut ahead = blk_request(0, 0, (DATA, 512, WRITE));
    ahead.put(Q4.avail + 2, &5u16.to_le_bytes());
    for (what, image) in [
        // virtio-queue ends a chain whose lengths pass 4 GiB.
        (
            "a chain of 4 GiB",
            blk_request(0, 0, (DATA, u32::MAX, WRITE)),
        ),
        ("a chain that loops", looping),
        ("a head index past the ring", bad_head),
        ("no status buffer", no_status),
        ("an avail index a ring ahead", ahead),
    ] {
        let s = blk(&blk_input(0, 8, 0, &image)).unwrap();
        assert!(s.signals.needs_reset(), "{what}");
        assert_eq!(used_idx(&s.mem, Q4), 0, "{what}");
    }
    // Rings that do not fit guest memory are never handed to the device.
    assert!(split_queue(&guest_memory(&[]), 256, MEM_SIZE - 0x800, false, 0).is_none());
}

fn net_input(flags: u8, image: &Image) -> Vec<u8> {
    let mut v = vec![flags | 2, 0, 0];
    v.extend(&image.0);
    v
}

#[test]
fn net_transmit_sends_whole_frames_and_drops_what_it_cannot() {
    let mut m = Image::default();
    m.put(0x100, &[0xee; 12])
        .put(0x200, &[0x42; 60])
        .chain(Q4, 0, &[(0x100, 12, 0), (0x200, 60, 0)])
        .avail(Q4, &[0]);
    let s = net_tx(&net_input(0, &m)).unwrap();
    assert_eq!(s.frames.len(), 1);
    assert_eq!(s.frames[0].len(), 72);
    assert_eq!(&s.frames[0][..12], &[0; 12], "the header is cleared");
    assert_eq!(&s.frames[0][12..], &[0x42; 60][..]);
    assert_eq!(used(&s.mem, Q4, 0), (0, 0));

    let mut write_only = Image::default();
    write_only
        .chain(Q4, 0, &[(0x100, 12, 0), (0x200, 60, WRITE)])
        .avail(Q4, &[0]);
    let mut too_big = Image::default();
    too_big
        .chain(Q4, 0, &[(0x1000, 40_000, 0), (0x1000, 40_000, 0)])
        .avail(Q4, &[0]);
    let mut header_only = Image::default();
    header_only.chain(Q4, 0, &[(0x100, 12, 0)]).avail(Q4, &[0]);
    let mut outside = Image::default();
    outside
        .chain(Q4, 0, &[(0x100, 12, 0), (u64::MAX - 4, 60, 0)])
        .avail(Q4, &[0]);
    for (what, image) in [
        ("a device-writable buffer", write_only),
        ("more than a frame", too_big),
        ("no payload", header_only),
        ("outside guest memory", outside),
    ] {
        let s = net_tx(&net_input(0, &image)).unwrap();
        assert!(s.frames.is_empty(), "{what}");
        assert_eq!(s.dropped, 1, "{what}");
        assert_eq!(used_idx(&s.mem, Q4), 1, "{what}: completed all the same");
        assert!(!s.signals.needs_reset(), "{what}");
    }

    let mut looping = Image::default();
    looping
        .desc(Q4, 0, 0x100, 12, NEXT, 1)
        .desc(Q4, 1, 0x200, 60, NEXT, 0)
        .avail(Q4, &[0]);
    let s = net_tx(&net_input(0, &looping)).unwrap();
    assert!(s.signals.needs_reset());
    assert!(s.frames.is_empty());
}

fn rx_input(frames: &[&[u8]], image: &Image) -> Vec<u8> {
    let mut v = vec![2, 0, 0, frames.len() as u8];
    for f in frames {
        v.extend((f.len() as u16).to_le_bytes());
        v.extend(*f);
    }
    v.extend(&image.0);
    v
}

#[test]
fn net_receive_fills_buffers_and_drops_frames_that_do_not_fit() {
    let frame: Vec<u8> = (0..72u8).collect();
    let mut m = Image::default();
    m.chain(Q4, 0, &[(0x1000, 40, WRITE), (0x2000, 100, WRITE)])
        .avail(Q4, &[0]);
    let s = net_rx(&rx_input(&[&frame], &m)).unwrap();
    assert_eq!(s.dropped, 0);
    assert_eq!(used(&s.mem, Q4, 0), (0, 72));
    let mut got = vec![0u8; 72];
    s.mem
        .read_slice(&mut got[..40], GuestAddress(0x1000))
        .unwrap();
    s.mem
        .read_slice(&mut got[40..], GuestAddress(0x2000))
        .unwrap();
    let mut expected = frame.clone();
    expected[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
    assert_eq!(got, expected);

    let mut small = Image::default();
    small.chain(Q4, 0, &[(0x1000, 40, WRITE)]).avail(Q4, &[0]);
    let mut read_only = Image::default();
    read_only.chain(Q4, 0, &[(0x1000, 4096, 0)]).avail(Q4, &[0]);
    let mut outside = Image::default();
    outside
        .chain(Q4, 0, &[(MEM_SIZE - 16, 4096, WRITE)])
        .avail(Q4, &[0]);
    for (what, image) in [
        ("a buffer too small", small),
        ("a device-readable buffer", read_only),
        ("a buffer past guest memory", outside),
    ] {
        let s = net_rx(&rx_input(&[&frame], &image)).unwrap();
        assert_eq!(s.dropped, 1, "{what}");
        assert_eq!(used(&s.mem, Q4, 0), (0, 0), "{what}");
        assert!(!s.signals.needs_reset(), "{what}");
    }

    // A runt shorter than the header is never delivered; no buffer, no loss.
    let s = net_rx(&rx_input(&[&frame[..5]], &m)).unwrap();
    assert_eq!(used_idx(&s.mem, Q4), 0);
    let s = net_rx(&rx_input(&[&frame], &Image::default())).unwrap();
    assert_eq!((used_idx(&s.mem, Q4), s.dropped), (0, 0));
}

/// virtio-mmio operations in the entry point's encoding.
struct Ops(Vec<u8>);

impl Ops {
    fn new(shape: u8) -> Ops {
        Ops(vec![shape])
    }

    fn write(&mut self, offset: u64, value: u32) -> &mut Self {
        self.0.extend([0, (offset / 4) as u8]);
        self.0.extend(value.to_le_bytes());
        self
    }

    fn read(&mut self, offset: u64) -> &mut Self {
        self.0.extend([2, (offset / 4) as u8]);
        self
    }

    fn access(&mut self, offset: u16, bytes: &[u8], write: bool) -> &mut Self {
        self.0.push(if write { 0x83 } else { 3 });
        self.0.extend(offset.to_le_bytes());
        self.0.push(bytes.len() as u8);
        if write {
            self.0.extend(bytes);
        }
        self
    }

    fn memory(&mut self, image: &Image) -> &mut Self {
        for (i, chunk) in image.0.chunks(255).enumerate() {
            self.0.push(4);
            self.0.extend(((i * 255) as u16).to_le_bytes());
            self.0.push(chunk.len() as u8);
            self.0.extend(chunk);
        }
        self
    }

    fn snapshot(&mut self) -> &mut Self {
        self.0.push(5);
        self
    }

    /// A driver's bring-up: features, queue `q` of 4 at `base`, DRIVER_OK.
    fn bring_up(&mut self, queues: &[(u32, u64)], features_hi: u32) -> &mut Self {
        self.write(0x070, 0)
            .write(0x070, 1)
            .write(0x070, 3)
            .write(0x014, 1)
            .read(0x010)
            .write(0x024, 1)
            .write(0x020, features_hi)
            .write(0x024, 0)
            .write(0x020, 0)
            .write(0x070, 0xb)
            .read(0x070);
        for &(q, base) in queues {
            let r = rings(4, base);
            self.write(0x030, q)
                .read(0x034)
                .write(0x038, 4)
                .write(0x080, r.desc as u32)
                .write(0x084, 0)
                .write(0x090, r.avail as u32)
                .write(0x094, 0)
                .write(0x0a0, r.used as u32)
                .write(0x0a4, 0)
                .write(0x044, 1);
        }
        self.write(0x070, 0xf)
    }
}

fn offered(base: u64) -> Image {
    let r = rings(4, base);
    let mut m = Image::default();
    m.chain(r, 0, &[(0x3000, 16, 0), (0x3100, 16, WRITE)])
        .avail(r, &[0]);
    m
}

fn status_of(t: &mut MmioTransport) -> u32 {
    read_u32(t, 0x070)
}

#[test]
fn mmio_bring_up_activates_and_broken_drivers_are_refused() {
    let mut ops = Ops::new(0);
    ops.memory(&offered(0))
        .bring_up(&[(0, 0)], 1)
        .access(0x100, &[0; 8], false)
        .snapshot()
        .write(0x050, 0);
    let (mut t, mem) = mmio(&ops.0).unwrap();
    assert_eq!(status_of(&mut t), 0xf);
    assert_eq!(used_idx(&mem, Q4), 1, "the device served the offered chain");

    // FEATURES_OK does not stick without VERSION_1, and a driver that goes
    // on to DRIVER_OK all the same finds the device FAILED.
    let mut ops = Ops::new(0);
    ops.bring_up(&[(0, 0)], 0);
    let (mut t, mem) = mmio(&ops.0).unwrap();
    assert_eq!(status_of(&mut t) & 8, 0);
    assert_ne!(status_of(&mut t) & 0x80, 0, "FAILED");
    assert_eq!(used_idx(&mem, Q4), 0, "never activated");

    // A queue outside guest memory makes the device ask for a reset.
    let mut ops = Ops::new(1);
    ops.bring_up(&[(0, 0), (1, 0xffff_0000)], 1);
    let (mut t, _) = mmio(&ops.0).unwrap();
    assert_ne!(status_of(&mut t) & 0x40, 0, "DEVICE_NEEDS_RESET");
    // ...which a reset clears.
    let mut ops2 = Ops(ops.0.clone());
    ops2.write(0x070, 0);
    let (mut t, _) = mmio(&ops2.0).unwrap();
    assert_eq!(status_of(&mut t), 0);

    // Only aligned 32-bit register accesses do anything.
    let mut t = mmio(&[0]).unwrap().0;
    let mut b = [0xffu8; 2];
    t.read(0, &mut b);
    assert_eq!(b, [0, 0]);
    t.write(0x070, &[1, 0]);
    assert_eq!(status_of(&mut t), 0);

    // Queue sizes no transport takes.
    assert!(mmio(&[5, 0, 0]).is_none());
    assert!(mmio(&[5, 3, 0]).is_none());
}

fn sample_state(vendor: &str, vcpus: usize) -> VmSnapshot {
    use crate::config::{KernelConfig, VmConfig};
    use crate::devices::virtio::mmio::TransportSnapshot;
    use crate::devices::virtio::QueueSnapshot;
    use crate::snapshot::state::{SerialSnapshot, VcpuState, VmState};

    let vcpu = || VcpuState {
        cpuid: vec![kvm_bindings::kvm_cpuid_entry2 {
            function: 1,
            ecx: 1,
            ..Default::default()
        }],
        mp_state: Default::default(),
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        lapic: Default::default(),
        msrs: vec![kvm_bindings::kvm_msr_entry {
            index: 0x10,
            data: 1,
            ..Default::default()
        }],
        events: Default::default(),
    };
    let r = rings(4, 0);
    VmSnapshot {
        kind: "full".into(),
        parent: None,
        dirty: None,
        cpu_vendor: vendor.into(),
        cpu_model: "fuzz".into(),
        kvm_flavour: "fuzz".into(),
        config: VmConfig {
            vcpus: vcpus.max(1) as u32,
            memory_mib: 32,
            kernel: KernelConfig {
                path: "/vmlinux".into(),
                initrd: None,
                cmdline: "console=ttyS0".into(),
            },
            serial: Default::default(),
            disks: Vec::new(),
            nics: Vec::new(),
            discovery: Default::default(),
            rng: None,
        },
        regions: vec![(0, SNAPSHOT_MEMORY)],
        vcpus: (0..vcpus).map(|_| vcpu()).collect(),
        vm: VmState {
            irqchips: Vec::new(),
            pit: Default::default(),
            clock: Default::default(),
        },
        serial: SerialSnapshot {
            line_status: 0x60,
            in_buffer: b"ab".to_vec(),
            ..Default::default()
        },
        i8042: Default::default(),
        virtio: vec![TransportSnapshot {
            device_type: crate::devices::virtio::TYPE_BLOCK,
            status: 0xf,
            driver_features: VIRTIO_F_VERSION_1,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            interrupt_status: 0,
            needs_reset: false,
            queues: vec![QueueSnapshot {
                max_size: QUEUE_MAX,
                size: 4,
                ready: true,
                desc_table: r.desc,
                avail_ring: r.avail,
                used_ring: r.used,
                ..Default::default()
            }],
            active: None,
        }],
    }
}

fn decode(text: &[u8]) -> Result<VmSnapshot, snapshot::SnapshotError> {
    snapshot::decode_state(Path::new("state.json"), text)
}

#[test]
fn snapshot_state_files_are_checked_before_use() {
    use crate::snapshot::SnapshotError as E;
    use berth_proto::vmm_process::snapshot::HeaderError as H;
    let host = berth_proto::vmm_process::host::cpu_vendor();
    let good = snapshot::encode_state(&sample_state(&host, 1));
    assert!(decode(&good).is_ok());
    snapshot_state(&[[0].as_slice(), &good].concat());

    let newline = good.iter().position(|&b| b == b'\n').unwrap();
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let later =
        String::from_utf8(good.clone())
            .unwrap()
            .replacen(snapshot::FORMAT_VERSION, "2.0.0", 1);
    let other = snapshot::encode_state(&sample_state("OtherVendor", 0));
    assert!(matches!(
        decode(b"BERTH-SNAPSHOT"),
        Err(E::Header(H::BadMagic(_)))
    ));
    assert!(matches!(
        decode(b"QEMU 1.0.0\n{}"),
        Err(E::Header(H::BadMagic(_)))
    ));
    assert!(matches!(
        decode(later.as_bytes()),
        Err(E::Header(H::Version { .. }))
    ));
    assert!(matches!(decode(&flipped), Err(E::Header(H::Checksum(_)))));
    assert!(matches!(
        decode(&good[..newline + 10]),
        Err(E::Header(H::Checksum(_)))
    ));
    assert!(matches!(
        decode(&other),
        Err(E::Header(H::CpuVendor { .. }))
    ));
    for body in [
        &b"{}"[..],
        b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
        b"{\"kind\": 1e999999}",
    ] {
        let text = with_valid_header(body);
        assert!(matches!(decode(&text), Err(E::Decode { .. })));
        snapshot_state(&[[1].as_slice(), body].concat());
    }
}

#[test]
fn snapshot_memory_layouts_that_cannot_be_mapped_are_refused() {
    use crate::snapshot::SnapshotError as E;
    let dir = scratch("layouts");
    let memory = dir.join(snapshot::MEMORY_FILE);
    File::create(&memory)
        .unwrap()
        .set_len(SNAPSHOT_MEMORY)
        .unwrap();
    let host = berth_proto::vmm_process::host::cpu_vendor();
    let mut state = sample_state(&host, 0);
    assert!(snapshot::load_memory(&dir, &state).is_ok());
    for (what, regions) in [
        (
            "sizes that add up past 2^64",
            vec![(0, u64::MAX), (1 << 40, 2)],
        ),
        (
            "a region past the address space",
            vec![(u64::MAX - 4095, SNAPSHOT_MEMORY)],
        ),
        ("regions that overlap", vec![(0, 8192), (4096, 8192)]),
        ("more than the memory file", vec![(0, SNAPSHOT_MEMORY * 2)]),
    ] {
        state.regions = regions;
        let e = snapshot::load_memory(&dir, &state).err();
        assert!(
            matches!(e, Some(E::MemorySize { .. } | E::Map(_))),
            "{what}: {e:?}"
        );
    }
    // A diff whose parent is itself.
    state.regions = vec![(0, SNAPSHOT_MEMORY)];
    state.kind = "diff".into();
    state.parent = Some(dir.clone());
    state.dirty = Some(vec![vec![1]]);
    std::fs::write(
        dir.join(snapshot::STATE_FILE),
        snapshot::encode_state(&state),
    )
    .unwrap();
    let e = snapshot::load_memory(&dir, &state).err();
    assert!(
        matches!(&e, Some(E::Decode { message, .. }) if message.contains("longer than 64")),
        "{e:?}"
    );
}

/// `kind`'s frame in the entry point's list encoding.
fn listed(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend((payload.len() as u16).to_le_bytes());
    v.extend(payload);
    v
}

fn sample_hello() -> protocol::Hello {
    let config = sample_state("fuzz", 1).config;
    protocol::Hello {
        token: "0123456789abcdef0123456789abcdef".into(),
        berth_version: "0.1.0".into(),
        cpu_vendor: "GenuineIntel".into(),
        cpu_model: "fuzz".into(),
        cpu_features: crate::arch::x86_64::cpuid::feature_words(&[]),
        regions: crate::arch::x86_64::layout::ram_regions(config.memory_mib << 20),
        config,
    }
}

/// A whole migration as the source writes it, frame by frame.
fn sample_stream() -> Vec<u8> {
    let mut w = Vec::new();
    write_json(&mut w, FrameType::Hello, &sample_hello()).unwrap();
    let mut batch = PageBatch::default();
    batch.push(0x1000, &[0x11; PAGE]);
    batch.push(0x3000, &[0x33; PAGE]);
    batch.flush(&mut w).unwrap();
    write_frame(
        &mut w,
        FrameType::Zeros,
        &[&protocol::encode_zeros(&[0x3000])],
    )
    .unwrap();
    write_json(
        &mut w,
        FrameType::IterationEnd,
        &protocol::IterationEnd {
            iteration: 1,
            pages: 2,
        },
    )
    .unwrap();
    write_json(&mut w, FrameType::State, &sample_state("fuzz", 0)).unwrap();
    write_json(&mut w, FrameType::Go, &protocol::Empty {}).unwrap();
    w
}

fn kinds(outcomes: &[Result<FrameType, ProtocolError>]) -> Vec<String> {
    outcomes
        .iter()
        .map(|o| match o {
            Ok(k) => format!("{k:?}"),
            Err(e) => format!("error: {e}"),
        })
        .collect()
}

#[test]
fn migration_streams_decode_in_any_read_sizes() {
    let stream = sample_stream();
    let whole = kinds(&migration(&[[0].as_slice(), &stream].concat()));
    assert_eq!(
        whole,
        [
            "Hello",
            "Pages",
            "Zeros",
            "IterationEnd",
            "State",
            "Go",
            "error: peer closed the connection"
        ]
    );
    for mode in [2u8, 6, 30, 254] {
        let dribbled = kinds(&migration(&[[mode].as_slice(), &stream].concat()));
        assert_eq!(dribbled, whole, "mode {mode}");
    }
}

fn header(kind: u16, len: u32) -> Vec<u8> {
    let mut h = protocol::MAGIC.to_vec();
    h.extend(protocol::VERSION.to_le_bytes());
    h.extend(kind.to_le_bytes());
    h.extend(len.to_le_bytes());
    h.extend(0u32.to_le_bytes());
    h
}

#[test]
fn hostile_migration_frames_are_refused() {
    fn first(stream: &[u8]) -> ProtocolError {
        match migration(&[[0].as_slice(), stream].concat()).remove(0) {
            Err(e) => e,
            Ok(k) => panic!("a {k:?} frame was accepted"),
        }
    }
    let mut four_gib = header(3, u32::MAX);
    four_gib.extend([0; 64]);
    assert!(matches!(
        first(&four_gib),
        ProtocolError::TooLarge(u32::MAX)
    ));
    // At the limit but cut short: no 64 MiB allocation, just a closed peer.
    let mut short = header(3, protocol::MAX_PAYLOAD);
    short.extend([0; 10]);
    assert!(matches!(first(&short), ProtocolError::Closed));
    assert!(matches!(
        first(&header(13, 0)),
        ProtocolError::UnknownType(13)
    ));
    assert!(matches!(
        first(b"GET / HTTP/1.1\r\n"),
        ProtocolError::BadMagic(_)
    ));
    let mut v2 = header(1, 0);
    v2[4] = 2;
    assert!(matches!(first(&v2), ProtocolError::Version(2)));

    fn listed_first(list: &[u8]) -> ProtocolError {
        match migration(&[[1].as_slice(), list].concat()).remove(0) {
            Err(e) => e,
            Ok(k) => panic!("a {k:?} frame was accepted"),
        }
    }
    assert!(matches!(
        listed_first(&listed(0x83, &[0; 8])),
        ProtocolError::Checksum(FrameType::Pages)
    ));
    let malformed = |e: ProtocolError| matches!(e, ProtocolError::Malformed { .. });
    let mut count_max = u32::MAX.to_le_bytes().to_vec();
    count_max.extend([0; 8 + PAGE]);
    fn page_at(gpa: u64) -> Vec<u8> {
        let mut p = 1u32.to_le_bytes().to_vec();
        p.extend(gpa.to_le_bytes());
        p.extend([1; PAGE]);
        listed(3, &p)
    }
    for (what, list) in [
        ("a page count of 2^32 - 1", listed(3, &count_max)),
        ("a page count with no room", listed(3, &[1, 0])),
        ("an unaligned page", page_at(0x1001)),
        ("a page outside guest RAM", page_at(MEM_SIZE)),
        (
            "a page at the top of the address space",
            page_at(u64::MAX - 4095),
        ),
        (
            "zeros that lie about their count",
            listed(4, &[3, 0, 0, 0, 1]),
        ),
        ("a hello that is not JSON", listed(1, b"{\"token\":")),
        ("a state nested too deep", listed(6, &[b'['; 4000])),
    ] {
        assert!(malformed(listed_first(&list)), "{what}");
    }
    let abort = serde_json::to_vec(&protocol::Abort {
        reason: "no room".into(),
    })
    .unwrap();
    assert_eq!(
        kinds(&migration(&[[1].as_slice(), &listed(10, &abort)].concat()))[0],
        "Abort"
    );
    // A hello claiming more memory than exists is decoded, checked, refused.
    let mut huge = sample_hello();
    huge.config.memory_mib = u64::MAX;
    let huge = serde_json::to_vec(&huge).unwrap();
    migration_frames(&[[1].as_slice(), &listed(1, &huge)].concat());
}

/// Seed inputs: (target, name, bytes). `write_seed_corpus` puts them in
/// fuzz/corpus/; they are small valid inputs for the fuzzer to start from.
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    // virtio_blk
    let rw = write_then_read();
    out.push(("virtio_blk", "write-read", blk_input(3 << 2, 8, 0, &rw)));
    out.push(("virtio_blk", "read-only", blk_input(3 << 2 | 1, 8, 0, &rw)));
    let mut misc = Image::default();
    misc.blk_header(HDR, 4, 0)
        .chain(Q8, 0, &[(HDR, 16, 0), (STATUS, 1, WRITE)])
        .blk_header(HDR + 16, 8, 0)
        .chain(
            Q8,
            2,
            &[(HDR + 16, 16, 0), (DATA, 20, WRITE), (STATUS + 1, 1, WRITE)],
        )
        .avail(Q8, &[0, 2]);
    out.push((
        "virtio_blk",
        "flush-get-id",
        blk_input(3 << 2 | 2, 1, 0, &misc),
    ));
    let mut looping = blk_request(0, 0, (DATA, 512, WRITE));
    looping.desc(Q4, 2, STATUS, 1, WRITE | NEXT, 0);
    out.push(("virtio_blk", "loop", blk_input(0, 8, 0xfffe, &looping)));

    // virtio_net_tx
    let mut tx = Image::default();
    tx.put(0x100, &[0; 12])
        .put(0x200, &[0x42; 60])
        .chain(Q4, 0, &[(0x100, 12, 0), (0x200, 60, 0)])
        .chain(Q4, 2, &[(0x100, 72, 0)])
        .avail(Q4, &[0, 2]);
    out.push(("virtio_net_tx", "two-frames", net_input(0, &tx)));
    out.push(("virtio_net_tx", "event-idx", net_input(8, &tx)));

    // virtio_net_rx
    let frame: Vec<u8> = (0..72u8).collect();
    let mut rx = Image::default();
    rx.chain(Q4, 0, &[(0x1000, 40, WRITE), (0x2000, 100, WRITE)])
        .chain(Q4, 2, &[(0x3000, 1600, WRITE)])
        .avail(Q4, &[0, 2]);
    out.push((
        "virtio_net_rx",
        "two-frames",
        rx_input(&[&frame, &frame], &rx),
    ));
    out.push((
        "virtio_net_rx",
        "no-buffer",
        rx_input(&[&frame], &Image::default()),
    ));

    // virtio_mmio
    let mut blk_ops = Ops::new(0);
    blk_ops
        .memory(&offered(0))
        .bring_up(&[(0, 0)], 1)
        .read(0x060)
        .write(0x064, 1)
        .access(0x100, &[0; 8], false)
        .access(0x100, &[1, 2, 3, 4], true)
        .snapshot()
        .write(0x050, 0)
        .write(0x070, 0);
    out.push(("virtio_mmio", "blk-bring-up", blk_ops.0));
    let mut net_ops = Ops::new(1);
    let mut both = offered(0);
    both.0.extend(vec![0; 0x200 - both.0.len()]);
    let r = rings(4, 0x200);
    both.chain(r, 0, &[(0x3000, 16, WRITE)]).avail(r, &[0]);
    net_ops
        .memory(&both)
        .bring_up(&[(0, 0), (1, 0x200)], 1)
        .snapshot()
        .access(0x102, &[0; 3], false);
    out.push(("virtio_mmio", "net-bring-up", net_ops.0));

    // snapshot_state: bodies behind a valid header, and whole files.
    let body = |s: &VmSnapshot| [[1u8].as_slice(), &serde_json::to_vec(s).unwrap()].concat();
    out.push((
        "snapshot_state",
        "full-body",
        body(&sample_state("@VENDOR@", 0)),
    ));
    let mut diff = sample_state("@VENDOR@", 0);
    diff.kind = "diff".into();
    diff.parent = Some("/p".into());
    diff.dirty = Some(vec![vec![0b101]]);
    out.push(("snapshot_state", "diff-body", body(&diff)));
    diff.parent = Some("/p1".into());
    out.push(("snapshot_state", "diff-loop-body", body(&diff)));
    out.push((
        "snapshot_state",
        "vcpu-body",
        body(&sample_state("@VENDOR@", 1)),
    ));
    for vendor in ["GenuineIntel", "AuthenticAMD"] {
        let file = snapshot::encode_state(&sample_state(vendor, 0));
        out.push((
            "snapshot_state",
            if vendor == "GenuineIntel" {
                "file-intel"
            } else {
                "file-amd"
            },
            [[0u8].as_slice(), &file].concat(),
        ));
    }

    // migration_frames: a source's stream, and the same frames listed.
    out.push((
        "migration_frames",
        "stream",
        [[0u8].as_slice(), &sample_stream()].concat(),
    ));
    let mut list = vec![1u8];
    list.extend(listed(1, &serde_json::to_vec(&sample_hello()).unwrap()));
    let mut page = 1u32.to_le_bytes().to_vec();
    page.extend(0x2000u64.to_le_bytes());
    page.extend([7; PAGE]);
    list.extend(listed(3, &page));
    list.extend(listed(4, &protocol::encode_zeros(&[0x1000, 0x2000])));
    list.extend(listed(
        5,
        &serde_json::to_vec(&protocol::IterationEnd {
            iteration: 3,
            pages: 9,
        })
        .unwrap(),
    ));
    list.extend(listed(
        6,
        &serde_json::to_vec(&sample_state("fuzz", 0)).unwrap(),
    ));
    for (kind, body) in [
        (2, "{}".to_string()),
        (7, "{}".into()),
        (8, "{}".into()),
        (9, "{\"resumed_at_ms\":5}".into()),
        (10, "{\"reason\":\"x\"}".into()),
        (11, "{\"token\":\"t\"}".into()),
        (12, "{\"state\":\"running\"}".into()),
    ] {
        list.extend(listed(kind, body.as_bytes()));
    }
    out.push(("migration_frames", "listed", list));
    let mut dribbled = sample_stream();
    dribbled.insert(0, 2 | (3 << 2));
    out.push(("migration_frames", "dribbled", dribbled));
    out
}

#[test]
fn seeds_reach_the_parsers() {
    for (target, name, bytes) in seeds() {
        let entry = TARGETS.iter().find(|(t, _)| *t == target).unwrap().1;
        entry(&bytes);
        let reached = match target {
            "virtio_blk" => blk(&bytes).is_some(),
            "virtio_net_tx" => net_tx(&bytes).is_some_and(|s| !s.frames.is_empty()),
            "virtio_net_rx" => net_rx(&bytes).is_some(),
            "virtio_mmio" => mmio(&bytes).is_some(),
            "snapshot_state" => match decode(&state_text(bytes[0], &bytes[1..])) {
                Ok(_) => true,
                // Whole files name a vendor: one of the pair matches the host.
                Err(snapshot::SnapshotError::Header(
                    berth_proto::vmm_process::snapshot::HeaderError::CpuVendor { .. },
                )) => bytes[0] & 1 == 0,
                Err(_) => false,
            },
            _ => migration(&bytes).iter().filter(|o| o.is_ok()).count() >= 5,
        };
        assert!(reached, "seed {target}/{name} does not reach the parser");
    }
}

/// Regenerates fuzz/corpus/*/seed-*: `cargo test -p berth-vmm --lib
/// fuzzing::tests::write_seed_corpus -- --ignored`.
#[test]
#[ignore]
fn write_seed_corpus() {
    for (target, name, bytes) in seeds() {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }
}
