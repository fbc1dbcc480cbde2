//! Frames of the migration protocol (see PROTOCOL.md beside this file):
//! a 16-byte header — magic, protocol version, frame type, payload length,
//! CRC-32 of the payload — then the payload. Control frames carry JSON;
//! page frames carry a binary list of guest addresses and the pages.

use std::io::{Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub const MAGIC: [u8; 4] = *b"BRTM";
/// Bumped on any change a peer of the previous version would misread.
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 16;
pub const PAGE: usize = 4096;
/// Pages per page frame: 1 MiB of data, one large write.
pub const PAGES_PER_FRAME: usize = 256;
/// No frame is larger than this; a header claiming more is refused before
/// anything is allocated. The state frame is the largest (tens of KiB per vCPU).
pub const MAX_PAYLOAD: u32 = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum FrameType {
    Hello = 1,
    Welcome = 2,
    Pages = 3,
    Zeros = 4,
    IterationEnd = 5,
    State = 6,
    Ready = 7,
    Go = 8,
    Ack = 9,
    Abort = 10,
    Query = 11,
    Status = 12,
}

impl FrameType {
    fn from_u16(v: u16) -> Option<FrameType> {
        use FrameType::*;
        [
            Hello,
            Welcome,
            Pages,
            Zeros,
            IterationEnd,
            State,
            Ready,
            Go,
            Ack,
            Abort,
            Query,
            Status,
        ]
        .into_iter()
        .find(|t| *t as u16 == v)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer closed the connection")]
    Closed,
    #[error("not a Berth migration stream (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("peer speaks migration protocol version {0}, this berth-vmm speaks {VERSION}")]
    Version(u16),
    #[error("unknown frame type {0}")]
    UnknownType(u16),
    #[error("frame of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLarge(u32),
    #[error("{0:?} frame is corrupt: checksum mismatch")]
    Checksum(FrameType),
    #[error("malformed {what} frame: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("expected a {expected:?} frame, got {got:?}")]
    Unexpected { expected: FrameType, got: FrameType },
    #[error("the peer aborted: {0}")]
    PeerAborted(String),
}

/// One frame read off the wire, checksum verified.
pub struct Frame {
    pub kind: FrameType,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ProtocolError> {
        serde_json::from_slice(&self.payload).map_err(|e| ProtocolError::Malformed {
            what: frame_name(self.kind),
            why: e.to_string(),
        })
    }

    /// This frame's JSON body if it is of `kind`; an Abort becomes the
    /// peer's reason.
    pub fn expect<T: DeserializeOwned>(&self, kind: FrameType) -> Result<T, ProtocolError> {
        if self.kind == FrameType::Abort && kind != FrameType::Abort {
            let abort: Abort = self.json()?;
            return Err(ProtocolError::PeerAborted(abort.reason));
        }
        if self.kind != kind {
            return Err(ProtocolError::Unexpected {
                expected: kind,
                got: self.kind,
            });
        }
        self.json()
    }
}

fn frame_name(kind: FrameType) -> &'static str {
    match kind {
        FrameType::Hello => "hello",
        FrameType::Welcome => "welcome",
        FrameType::Pages => "pages",
        FrameType::Zeros => "zeros",
        FrameType::IterationEnd => "iteration-end",
        FrameType::State => "state",
        FrameType::Ready => "ready",
        FrameType::Go => "go",
        FrameType::Ack => "ack",
        FrameType::Abort => "abort",
        FrameType::Query => "query",
        FrameType::Status => "status",
    }
}

fn header(kind: FrameType, len: usize, crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Writes one frame whose payload is the concatenation of `parts`.
pub fn write_frame(w: &mut impl Write, kind: FrameType, parts: &[&[u8]]) -> std::io::Result<usize> {
    let mut crc = crc32fast::Hasher::new();
    let mut len = 0usize;
    for p in parts {
        crc.update(p);
        len += p.len();
    }
    w.write_all(&header(kind, len, crc.finalize()))?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(HEADER_LEN + len)
}

pub fn write_json<T: Serialize>(
    w: &mut impl Write,
    kind: FrameType,
    body: &T,
) -> std::io::Result<usize> {
    let bytes = serde_json::to_vec(body).expect("plain data serialises");
    let n = write_frame(w, kind, &[&bytes])?;
    w.flush()?;
    Ok(n)
}

/// Reads one frame; every header field is checked before the payload is
/// allocated, and the payload's checksum before it is returned.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, ProtocolError> {
    let mut frame = Frame {
        kind: FrameType::Abort,
        payload: Vec::new(),
    };
    read_frame_into(r, &mut frame)?;
    Ok(frame)
}

/// `read_frame` into a frame whose payload buffer is reused: the page
/// stream would otherwise allocate (and fault in) a fresh megabyte per frame.
pub fn read_frame_into(r: &mut impl Read, frame: &mut Frame) -> Result<(), ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    match r.read_exact(&mut h) {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ProtocolError::Closed)
        }
        other => other?,
    }
    let magic: [u8; 4] = h[..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(ProtocolError::Version(version));
    }
    let raw_kind = u16::from_le_bytes([h[6], h[7]]);
    let kind = FrameType::from_u16(raw_kind).ok_or(ProtocolError::UnknownType(raw_kind))?;
    let len = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(len));
    }
    let crc = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
    frame.payload.clear();
    let got = r.take(u64::from(len)).read_to_end(&mut frame.payload)?;
    if got != len as usize {
        return Err(ProtocolError::Closed);
    }
    if crc32fast::hash(&frame.payload) != crc {
        return Err(ProtocolError::Checksum(kind));
    }
    frame.kind = kind;
    Ok(())
}

/// A batch of guest pages: `count` (u32), `count` guest addresses (u64),
/// then the pages themselves.
pub struct PageBatch {
    pub addrs: Vec<u64>,
    /// PAGES_PER_FRAME pages of room; the first `used` bytes are the batch.
    data: Vec<u8>,
    used: usize,
}

impl Default for PageBatch {
    fn default() -> Self {
        PageBatch {
            addrs: Vec::with_capacity(PAGES_PER_FRAME),
            data: vec![0; PAGES_PER_FRAME * PAGE],
            used: 0,
        }
    }
}

/// Whether a page (or any buffer of 16-byte multiples) is all zeros.
pub fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
}

impl PageBatch {
    pub fn push(&mut self, gpa: u64, page: &[u8]) {
        self.data[self.used..self.used + PAGE].copy_from_slice(page);
        self.used += PAGE;
        self.addrs.push(gpa);
    }

    /// Pages that still fit.
    pub fn room(&self) -> usize {
        PAGES_PER_FRAME - self.addrs.len()
    }

    /// Has `read` fill `pages` pages (at most `room()`) of guest memory
    /// starting at `gpa` straight into the batch, then keeps those that are
    /// not all zeros: one copy out of guest memory instead of two.
    pub fn read_nonzero<E>(
        &mut self,
        gpa: u64,
        pages: usize,
        read: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let start = self.used;
        read(&mut self.data[start..start + pages * PAGE])?;
        let mut keep = start;
        for i in 0..pages {
            let from = start + i * PAGE;
            if is_zero(&self.data[from..from + PAGE]) {
                continue;
            }
            if keep != from {
                self.data.copy_within(from..from + PAGE, keep);
            }
            self.addrs.push(gpa + (i * PAGE) as u64);
            keep += PAGE;
        }
        self.used = keep;
        Ok(())
    }

    pub fn is_full(&self) -> bool {
        self.addrs.len() >= PAGES_PER_FRAME
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// Sends the batch (if any) as one frame and empties it.
    pub fn flush(&mut self, w: &mut impl Write) -> std::io::Result<usize> {
        if self.addrs.is_empty() {
            return Ok(0);
        }
        let count = (self.addrs.len() as u32).to_le_bytes();
        let addrs: Vec<u8> = self.addrs.iter().flat_map(|a| a.to_le_bytes()).collect();
        let n = write_frame(
            w,
            FrameType::Pages,
            &[&count, &addrs, &self.data[..self.used]],
        )?;
        self.addrs.clear();
        self.used = 0;
        Ok(n)
    }
}

/// Splits a Pages payload into (address, page) pairs, checking the
/// lengths first. Addresses are checked against guest memory by the caller.
pub fn decode_pages(payload: &[u8]) -> Result<Vec<(u64, &[u8])>, ProtocolError> {
    let (count, rest) = decode_addrs_head(payload, "pages")?;
    let need = count
        .checked_mul(8 + PAGE)
        .ok_or_else(|| malformed("pages", "count overflows".into()))?;
    if rest.len() != need {
        return Err(malformed(
            "pages",
            format!("{count} pages need {need} bytes, got {}", rest.len()),
        ));
    }
    let (addrs, data) = rest.split_at(count * 8);
    Ok(addrs
        .chunks_exact(8)
        .map(|a| u64::from_le_bytes(a.try_into().expect("8 bytes")))
        .zip(data.chunks_exact(PAGE))
        .collect())
}

/// A Zeros payload: `count` (u32) and `count` guest addresses of pages that
/// became all-zero since they were sent.
pub fn encode_zeros(addrs: &[u64]) -> Vec<u8> {
    let mut out = (addrs.len() as u32).to_le_bytes().to_vec();
    out.extend(addrs.iter().flat_map(|a| a.to_le_bytes()));
    out
}

pub fn decode_zeros(payload: &[u8]) -> Result<Vec<u64>, ProtocolError> {
    let (count, rest) = decode_addrs_head(payload, "zeros")?;
    if rest.len() != count * 8 {
        return Err(malformed(
            "zeros",
            format!(
                "{count} addresses need {} bytes, got {}",
                count * 8,
                rest.len()
            ),
        ));
    }
    Ok(rest
        .chunks_exact(8)
        .map(|a| u64::from_le_bytes(a.try_into().expect("8 bytes")))
        .collect())
}

fn decode_addrs_head<'a>(
    payload: &'a [u8],
    what: &'static str,
) -> Result<(usize, &'a [u8]), ProtocolError> {
    if payload.len() < 4 {
        return Err(malformed(what, "shorter than its count".into()));
    }
    let count = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")) as usize;
    Ok((count, &payload[4..]))
}

fn malformed(what: &'static str, why: String) -> ProtocolError {
    ProtocolError::Malformed { what, why }
}

/// The source's opening frame.
#[derive(Serialize, Deserialize)]
pub struct Hello {
    pub token: String,
    pub berth_version: String,
    pub cpu_vendor: String,
    pub cpu_model: String,
    /// The CPUID feature bits the guest was given.
    pub cpu_features: Vec<crate::arch::x86_64::cpuid::FeatureWord>,
    pub config: crate::config::VmConfig,
    /// Guest RAM regions, (guest address, size).
    pub regions: Vec<(u64, u64)>,
}

#[derive(Serialize, Deserialize, Default)]
pub struct Empty {}

#[derive(Serialize, Deserialize)]
pub struct IterationEnd {
    pub iteration: u32,
    pub pages: u64,
}

#[derive(Serialize, Deserialize)]
pub struct Abort {
    pub reason: String,
}

#[derive(Serialize, Deserialize)]
pub struct Ack {
    /// Wall clock (Unix ms) at which the destination started the vCPUs.
    pub resumed_at_ms: u64,
}

#[derive(Serialize, Deserialize)]
pub struct Query {
    pub token: String,
}

/// The destination's answer to a Query.
#[derive(Serialize, Deserialize, PartialEq, Eq, Debug, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum DestinationState {
    /// State loaded, waiting for Go: the source is still authoritative
    /// unless it already sent Go.
    Ready,
    /// Go received: the VM runs here.
    Running,
}

#[derive(Serialize, Deserialize)]
pub struct Status {
    pub state: DestinationState,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_damage_is_caught() {
        let mut wire = Vec::new();
        write_json(&mut wire, FrameType::Abort, &Abort { reason: "x".into() }).unwrap();
        let f = read_frame(&mut wire.as_slice()).unwrap();
        assert_eq!(f.kind, FrameType::Abort);
        assert_eq!(f.json::<Abort>().unwrap().reason, "x");

        let mut bad = wire.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(
            read_frame(&mut bad.as_slice()),
            Err(ProtocolError::Checksum(FrameType::Abort))
        ));
        let mut bad = wire.clone();
        bad[4] = 9;
        assert!(matches!(
            read_frame(&mut bad.as_slice()),
            Err(ProtocolError::Version(9))
        ));
        let mut bad = wire.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_frame(&mut bad.as_slice()),
            Err(ProtocolError::TooLarge(_))
        ));
        assert!(matches!(
            read_frame(&mut &wire[..wire.len() - 1]),
            Err(ProtocolError::Closed)
        ));
        let mut bad = wire.clone();
        bad[0] = b'X';
        assert!(matches!(
            read_frame(&mut bad.as_slice()),
            Err(ProtocolError::BadMagic(_))
        ));
    }

    #[test]
    fn page_batches_decode_and_bad_lengths_are_refused() {
        let mut batch = PageBatch::default();
        batch.push(0x1000, &[7u8; PAGE]);
        batch.push(0x5000, &[9u8; PAGE]);
        let mut wire = Vec::new();
        batch.flush(&mut wire).unwrap();
        assert!(batch.is_empty());
        let f = read_frame(&mut wire.as_slice()).unwrap();
        let pages = decode_pages(&f.payload).unwrap();
        assert_eq!(pages.len(), 2);
        assert_eq!(pages[1].0, 0x5000);
        assert!(pages[1].1.iter().all(|&b| b == 9));
        // A count that promises more than the payload holds.
        let mut lying = f.payload.clone();
        lying[..4].copy_from_slice(&3u32.to_le_bytes());
        assert!(decode_pages(&lying).is_err());
        assert!(decode_pages(&[1, 0]).is_err());
        let mut huge = f.payload.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_pages(&huge).is_err());
        assert_eq!(decode_zeros(&encode_zeros(&[1, 2])).unwrap(), vec![1, 2]);

        // Read straight in: the zero page in the middle is dropped.
        let mut batch = PageBatch::default();
        batch
            .read_nonzero(0x10000, 3, |buf: &mut [u8]| {
                buf[..PAGE].fill(1);
                buf[PAGE..2 * PAGE].fill(0);
                buf[2 * PAGE..].fill(3);
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(batch.addrs, vec![0x10000, 0x12000]);
        assert_eq!(batch.room(), PAGES_PER_FRAME - 2);
        let mut wire = Vec::new();
        batch.flush(&mut wire).unwrap();
        let f = read_frame(&mut wire.as_slice()).unwrap();
        let pages = decode_pages(&f.payload).unwrap();
        assert!(pages[0].1.iter().all(|&b| b == 1) && pages[1].1.iter().all(|&b| b == 3));
        assert!(decode_zeros(&encode_zeros(&[1, 2])[..11]).is_err());
    }
}
