//! The migration_frames target: the migration stream as either end reads
//! it (see `migration_frames`).

use std::io::Read;

use super::{guest_memory, restore_devices, Input};
use crate::memory::GuestMemory;
use crate::migration::destination::put_page;
use crate::migration::protocol::{self, Frame, FrameType, ProtocolError};
use crate::snapshot::VmSnapshot;

/// Frames per migration input.
const MAX_FRAMES: usize = 64;

/// The migration frame decoder, both ends: byte 0 bit 0 clear = the rest is
/// the raw stream; set = the rest is a list of frames, each a type byte
/// (`% 14`: the twelve types and two unknown ones; bit 7 spoils the
/// checksum), a u16 length and the payload, framed here with a valid header.
/// Bit 1 of byte 0 reads the stream a few bytes at a time. Each frame goes
/// where a destination or a source takes it: the hello's checks, pages and
/// zeros into a 64 KiB guest memory, every JSON body into its type.
pub fn migration_frames(data: &[u8]) {
    migration(data);
}

/// Each frame read: its type once handled, or what was wrong with it.
pub(super) fn migration(data: &[u8]) -> Vec<Result<FrameType, ProtocolError>> {
    let mut outcomes = Vec::new();
    let Some((&mode, rest)) = data.split_first() else {
        return outcomes;
    };
    let stream = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        frame_list(rest)
    };
    let mut reader = Dribble {
        data: &stream,
        step: if mode & 2 == 0 {
            usize::MAX
        } else {
            usize::from(mode >> 2) + 1
        },
    };
    let mem = guest_memory(&[]);
    let mut frame = Frame {
        kind: FrameType::Abort,
        payload: Vec::new(),
    };
    let mut hello = None;
    for _ in 0..MAX_FRAMES {
        if let Err(e) = protocol::read_frame_into(&mut reader, &mut frame) {
            let closed = matches!(e, ProtocolError::Closed);
            outcomes.push(Err(e));
            if closed {
                break;
            }
            continue;
        }
        assert!(frame.payload.len() <= protocol::MAX_PAYLOAD as usize);
        outcomes.push(receive(&mem, &frame, &mut hello).map(|()| frame.kind));
    }
    outcomes
}

/// Reads at most `step` bytes at a time, like a slow connection.
struct Dribble<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Dribble<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.step).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn frame_list(list: &[u8]) -> Vec<u8> {
    let mut input = Input(list);
    let mut stream = Vec::new();
    while !input.is_empty() {
        let kind = input.u8();
        let len = usize::from(input.u16());
        let payload = input.take(len);
        let mut crc = crc32fast::hash(payload);
        if kind & 0x80 != 0 {
            crc = !crc;
        }
        stream.extend_from_slice(&protocol::MAGIC);
        stream.extend_from_slice(&protocol::VERSION.to_le_bytes());
        stream.extend_from_slice(&(u16::from(kind & 0x7f) % 14).to_le_bytes());
        stream.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        stream.extend_from_slice(&crc.to_le_bytes());
        stream.extend_from_slice(payload);
    }
    stream
}

/// One frame as the end that receives it handles it; the first error.
fn receive(
    mem: &GuestMemory,
    frame: &Frame,
    hello: &mut Option<protocol::Hello>,
) -> Result<(), ProtocolError> {
    match frame.kind {
        FrameType::Hello => {
            let h = frame.expect::<protocol::Hello>(FrameType::Hello)?;
            check_hello(&h);
            *hello = Some(h);
        }
        FrameType::Pages => {
            for (gpa, page) in protocol::decode_pages(&frame.payload)? {
                assert_eq!(page.len(), protocol::PAGE);
                put_page(mem, gpa, page)?;
            }
        }
        FrameType::Zeros => {
            let addrs = protocol::decode_zeros(&frame.payload)?;
            assert_eq!(addrs.len() * 8 + 4, frame.payload.len());
            for gpa in addrs {
                put_page(mem, gpa, &[0u8; protocol::PAGE])?;
            }
        }
        FrameType::IterationEnd => {
            frame.json::<protocol::IterationEnd>()?;
        }
        FrameType::State => {
            let state = frame.json::<VmSnapshot>()?;
            if let Some(h) = hello {
                let _ = state.regions == h.regions && state.vcpus.len() == h.config.vcpus as usize;
            }
            restore_devices(&state);
        }
        FrameType::Welcome | FrameType::Ready | FrameType::Go => {
            frame.expect::<protocol::Empty>(frame.kind)?;
        }
        FrameType::Ack => {
            frame.expect::<protocol::Ack>(FrameType::Ack)?;
        }
        FrameType::Abort => {
            // What a source waiting for anything else makes of it.
            let _ = frame.expect::<protocol::Ack>(FrameType::Ack);
            frame.json::<protocol::Abort>()?;
        }
        FrameType::Query => {
            frame.expect::<protocol::Query>(FrameType::Query)?;
        }
        FrameType::Status => {
            frame.expect::<protocol::Status>(FrameType::Status)?;
        }
    }
    Ok(())
}

/// The destination's checks of a hello that need no host.
fn check_hello(h: &protocol::Hello) {
    let have = crate::arch::x86_64::cpuid::feature_words(&[kvm_bindings::kvm_cpuid_entry2 {
        function: 1,
        ecx: 0xffff_0000,
        edx: 0x0000_ffff,
        ..Default::default()
    }]);
    let _ = crate::arch::x86_64::cpuid::missing_features(&h.cpu_features, &have);
    if h.config.validate().is_ok() {
        let size = h.config.memory_mib << 20;
        let _ = h.regions == crate::arch::x86_64::layout::ram_regions(size);
    }
}
