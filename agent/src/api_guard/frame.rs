//! Where a ttrpc byte stream is between frames: the guard reads no bytes
//! itself, it watches the ones ttrpc reads pass and learns from each frame
//! header (10 bytes: u32 payload length big-endian, u32 stream id, u8 type,
//! u8 flags) how much payload is still owed.

/// A ttrpc frame header's length on the wire.
pub const HEADER_LEN: usize = 10;

/// What the bytes just consumed completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameEvent {
    /// The first byte of a frame: its clock starts.
    Started,
    /// The header is whole and announces this payload length. A length of
    /// 0 also ends the frame.
    Header(u32),
    /// The last byte of a payload.
    Ended,
}

/// The position in the stream of frames.
#[derive(Clone, Debug, Default)]
pub struct FrameTracker {
    header: [u8; HEADER_LEN],
    /// Header bytes seen of the current frame (0 between frames).
    header_seen: usize,
    /// Payload bytes still owed once the header is whole.
    payload_left: u64,
}

impl FrameTracker {
    /// True while a frame is begun and not finished.
    pub fn in_frame(&self) -> bool {
        self.header_seen > 0
    }

    /// Consumes a prefix of `bytes` up to the next event and returns how
    /// many bytes it took and the event they complete, if any. Callers loop
    /// until `bytes` is used up, so every event is seen in order.
    pub fn advance(&mut self, bytes: &[u8]) -> (usize, Option<FrameEvent>) {
        if bytes.is_empty() {
            return (0, None);
        }
        if self.header_seen == 0 {
            // The first byte alone, so the caller starts the frame's clock
            // before it sees the rest.
            self.header[0] = bytes[0];
            self.header_seen = 1;
            return (1, Some(FrameEvent::Started));
        }
        if self.header_seen < HEADER_LEN {
            let take = (HEADER_LEN - self.header_seen).min(bytes.len());
            self.header[self.header_seen..self.header_seen + take].copy_from_slice(&bytes[..take]);
            self.header_seen += take;
            if self.header_seen < HEADER_LEN {
                return (take, None);
            }
            let length = u32::from_be_bytes([
                self.header[0],
                self.header[1],
                self.header[2],
                self.header[3],
            ]);
            self.payload_left = u64::from(length);
            if length == 0 {
                self.header_seen = 0;
            }
            return (take, Some(FrameEvent::Header(length)));
        }
        let take = usize::try_from(self.payload_left)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        self.payload_left -= take as u64;
        if self.payload_left > 0 {
            return (take, None);
        }
        self.header_seen = 0;
        (take, Some(FrameEvent::Ended))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32) -> Vec<u8> {
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0, 0, 0, 1, 1, 0]);
        bytes.extend(std::iter::repeat_n(7u8, len as usize));
        bytes
    }

    /// Every event of `bytes` fed in pieces of `piece` bytes.
    fn events(bytes: &[u8], piece: usize) -> Vec<FrameEvent> {
        let mut tracker = FrameTracker::default();
        let mut seen = Vec::new();
        for chunk in bytes.chunks(piece) {
            let mut rest = chunk;
            while !rest.is_empty() {
                let (used, event) = tracker.advance(rest);
                assert!(used > 0, "advance always makes progress");
                rest = &rest[used..];
                seen.extend(event);
            }
        }
        seen
    }

    #[test]
    fn frames_are_found_however_the_bytes_are_cut() {
        let mut stream = frame(5);
        stream.extend(frame(0));
        stream.extend(frame(300));
        let want = vec![
            FrameEvent::Started,
            FrameEvent::Header(5),
            FrameEvent::Ended,
            FrameEvent::Started,
            FrameEvent::Header(0),
            FrameEvent::Started,
            FrameEvent::Header(300),
            FrameEvent::Ended,
        ];
        for piece in [1, 2, 3, 9, 10, 11, 64, 4096] {
            assert_eq!(events(&stream, piece), want, "pieces of {piece}");
        }
    }

    #[test]
    fn a_half_sent_frame_stays_open() {
        let mut tracker = FrameTracker::default();
        let bytes = frame(4 << 20);
        let mut rest = &bytes[..HEADER_LEN + 3];
        let mut seen = Vec::new();
        while !rest.is_empty() {
            let (used, event) = tracker.advance(rest);
            rest = &rest[used..];
            seen.extend(event);
        }
        assert_eq!(seen, vec![FrameEvent::Started, FrameEvent::Header(4 << 20)]);
        assert!(tracker.in_frame());
    }

    #[test]
    fn a_huge_announced_length_is_reported_not_trusted() {
        let header = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 1, 0];
        assert_eq!(
            events(&header, 10),
            vec![FrameEvent::Started, FrameEvent::Header(u32::MAX)]
        );
    }
}
