//! Data frames the read layer takes past tungstenite, for the driver. See
//! [`Head::parse`] for which frames qualify.

use tokio_tungstenite::tungstenite::{Bytes, Message, Utf8Bytes};

use crate::transport::Header;

/// Bytes a taken frame's reads may ask beyond its end, so that the read
/// that completes a frame with nothing behind it is short: tokio then
/// clears the socket's readiness, and the driver need not read again to
/// find nothing. Bytes of a next frame that land there go back to the spill.
const SLACK: usize = 64;

/// The header of a data frame the read layer may take whole: final, text or
/// binary, no reserved bits, masked exactly when the peer must mask, and no
/// longer than the limits. Everything else (control frames, fragments,
/// frames that break a rule or a limit) goes to tungstenite, which judges
/// them as before.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Head {
    /// The header as it was on the wire, for giving the frame back.
    raw: [u8; 14],
    /// Header bytes.
    pub(crate) header: usize,
    /// Payload bytes.
    pub(crate) len: usize,
    mask: Option<[u8; 4]>,
    text: bool,
}

impl Head {
    /// The head of the frame that starts `bytes`, if it qualifies and its
    /// header is whole.
    pub(crate) fn parse(bytes: &[u8], masked: bool, max_len: usize) -> Option<Self> {
        let header = Header::parse(bytes)?;
        let text = match header.first {
            0x81 => true,
            0x82 => false,
            _ => return None,
        };
        if header.mask.is_some() != masked {
            return None;
        }
        let len = usize::try_from(header.len)
            .ok()
            .filter(|&len| len <= max_len)?;
        let mut raw = [0; 14];
        raw[..header.size].copy_from_slice(&bytes[..header.size]);
        Some(Self {
            raw,
            header: header.size,
            len,
            mask: header.mask,
            text,
        })
    }
}

/// A taken frame while its payload arrives.
#[derive(Debug)]
pub(crate) struct Taking {
    pub(crate) head: Head,
    /// The payload as read (still masked); its spare capacity is where the
    /// next read goes.
    pub(crate) payload: Vec<u8>,
}

impl Taking {
    /// Starts taking the frame `head`, whose first payload bytes are `part`.
    pub(crate) fn new(head: Head, part: &[u8]) -> Self {
        // A frame that is whole already needs no room for reads.
        let room = if part.len() == head.len { 0 } else { SLACK };
        let mut payload = Vec::with_capacity(head.len + room);
        payload.extend_from_slice(part);
        Self { head, payload }
    }

    /// Payload bytes still to come.
    pub(crate) fn left(&self) -> usize {
        self.head.len.saturating_sub(self.payload.len())
    }

    /// The message, once the payload is whole (bytes read past it already
    /// moved out); or, for text that is not UTF-8, the frame's bytes as
    /// they were on the wire, for tungstenite to refuse.
    pub(crate) fn finish(self) -> Result<Message, Vec<u8>> {
        let Self { head, mut payload } = self;
        debug_assert_eq!(payload.len(), head.len);
        if let Some(mask) = head.mask {
            unmask(&mut payload, mask);
        }
        if !head.text {
            return Ok(Message::Binary(Bytes::from(payload)));
        }
        match String::from_utf8(payload) {
            Ok(text) => Ok(Message::Text(Utf8Bytes::from(text))),
            Err(e) => {
                let mut payload = e.into_bytes();
                if let Some(mask) = head.mask {
                    unmask(&mut payload, mask);
                }
                Err(head.wire(payload))
            }
        }
    }

    /// The frame's bytes so far, as they were on the wire (the payload is
    /// still masked until [`finish`](Self::finish)).
    pub(crate) fn give_back(self) -> Vec<u8> {
        self.head.wire(self.payload)
    }
}

impl Head {
    /// This header followed by `payload`, in the payload's memory when it
    /// has room for the header (a frame read over several reads has its
    /// `SLACK`): the payload moves up by the header's length, but a large
    /// frame is not allocated a second time.
    fn wire(&self, mut payload: Vec<u8>) -> Vec<u8> {
        payload.splice(0..0, self.raw[..self.header].iter().copied());
        payload
    }
}

/// XORs `buf` with the 4-byte `mask`, from the payload's start (its own
/// inverse: masks and unmasks).
pub(crate) fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    let [a, b, c, d] = mask;
    let wide = u64::from_ne_bytes([a, b, c, d, a, b, c, d]);
    let mut words = buf.chunks_exact_mut(8);
    for word in &mut words {
        let v = u64::from_ne_bytes((&*word).try_into().expect("8 bytes")) ^ wide;
        word.copy_from_slice(&v.to_ne_bytes());
    }
    // Whole words are a multiple of 4 bytes: the rest starts at mask[0].
    for (i, byte) in words.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        crate::transport::tests::frame(opcode, payload, Some(mask))
    }

    fn take_whole(bytes: &[u8]) -> Result<Message, Vec<u8>> {
        let head = Head::parse(bytes, true, usize::MAX).expect("qualifies");
        Taking::new(head, &bytes[head.header..]).finish()
    }

    #[test]
    fn unmasking_matches_the_bytewise_rule_at_every_length() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for len in 0..40 {
            let plain: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(31)).collect();
            let mut buf = plain.clone();
            unmask(&mut buf, mask);
            let bytewise: Vec<u8> = plain
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(buf, bytewise, "len {len}");
        }
    }

    #[test]
    fn whole_text_and_binary_frames_of_each_length_encoding_become_messages() {
        for len in [0, 5, 125, 126, 300, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let text = take_whole(&masked(0x1, &payload, [1, 2, 3, 4])).unwrap();
            assert_eq!(
                text,
                Message::Text(String::from_utf8(payload.clone()).unwrap().into())
            );
            let binary = take_whole(&masked(0x2, &payload, [9, 0, 9, 0])).unwrap();
            assert_eq!(binary, Message::Binary(payload.into()), "len {len}");
        }
    }

    #[test]
    fn text_that_is_not_utf8_is_given_back_exactly_as_it_came() {
        let wire = masked(0x1, b"ok \xff\xfe not utf-8", [7, 7, 8, 8]);
        assert_eq!(take_whole(&wire), Err(wire));
    }

    #[test]
    fn only_final_unreserved_data_frames_masked_as_required_within_the_limit_qualify() {
        let wire = masked(0x2, &[0; 10], [1, 1, 1, 1]);
        let head = Head::parse(&wire, true, 10).expect("qualifies");
        assert_eq!((head.header, head.len), (6, 10));
        let not = |bytes: Vec<u8>, masked: bool, max: usize, why: &str| {
            assert!(Head::parse(&bytes, masked, max).is_none(), "{why}");
        };
        not(wire.clone(), true, 9, "over the limit");
        not(
            wire.clone(),
            false,
            10,
            "masked where the peer must not mask",
        );
        let mut fragment = wire.clone();
        fragment[0] = 0x02;
        not(fragment, true, 10, "not final");
        let mut continuation = wire.clone();
        continuation[0] = 0x80;
        not(continuation, true, 10, "a continuation");
        let mut reserved = wire.clone();
        reserved[0] |= 0x40;
        not(reserved, true, 10, "a reserved bit");
        not(masked(0x9, &[0; 4], [1, 1, 1, 1]), true, 10, "a ping");
        not(masked(0x8, &[3, 232], [1, 1, 1, 1]), true, 10, "a close");
        not(wire[..5].to_vec(), true, 10, "a partial header");
        let mut unmasked = vec![0x82, 3, 1, 2, 3];
        assert!(
            Head::parse(&unmasked, false, 10).is_some(),
            "a client's frame"
        );
        unmasked[1] |= 0x80;
        not(unmasked, false, 10, "masked, to a client");
    }
}
