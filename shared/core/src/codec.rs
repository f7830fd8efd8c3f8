//! Fixed little-endian binary layouts for state kept in a host's shared data.
//!
//! Every piece of state that workers share is a few fixed-width integers. A [`Reader`] and a
//! [`Writer`] encode them in order, little-endian, with no padding; each state type documents
//! its layout beside its definition and in `docs/shared-data.md`. A value of the wrong length
//! decodes to `None`, which callers treat as "no state yet", so a corrupt or foreign value can
//! never panic a VM.

use alloc::string::String;
use alloc::vec::Vec;

/// `n` in decimal, as `format!("{n}")` writes it, in `buf` (without the formatting machinery,
/// which is slow in wasm and dominates the build time of a large hash ring).
pub fn decimal(n: u64, buf: &mut [u8; 20]) -> &str {
    let mut start = buf.len();
    let mut rest = n;
    for d in buf.iter_mut().rev() {
        *d = b'0' + (rest % 10) as u8;
        rest /= 10;
        start -= 1;
        if rest == 0 {
            break;
        }
    }
    // ASCII digits, so always valid UTF-8.
    buf.get(start..)
        .and_then(|digits| core::str::from_utf8(digits).ok())
        .unwrap_or("0")
}

/// Appends `n` in decimal to `out`: [`decimal`] for a string being built.
pub fn push_decimal(out: &mut String, n: u64) {
    out.push_str(decimal(n, &mut [0; 20]));
}

/// Appends fixed-width little-endian fields to a buffer.
#[derive(Debug, Default)]
pub struct Writer(Vec<u8>);

impl Writer {
    /// An empty buffer with room for `n` bytes.
    pub fn with_capacity(n: usize) -> Self {
        Writer(Vec::with_capacity(n))
    }
    /// Appends one byte.
    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    /// Appends a `u16`.
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a `u32`.
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a `u64`.
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends an `i64`.
    pub fn i64(mut self, v: i64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends raw bytes.
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
    /// The encoded bytes.
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// Reads fixed-width little-endian fields in order; every read returns `None` past the end.
#[derive(Debug)]
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// Reads from `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader(bytes)
    }
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    /// Reads one byte.
    pub fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    /// Reads a `u16`.
    pub fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    /// Reads a `u32`.
    pub fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    /// Reads a `u64`.
    pub fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    /// Reads an `i64`.
    pub fn i64(&mut self) -> Option<i64> {
        self.take().map(i64::from_le_bytes)
    }
    /// Reads `n` raw bytes.
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    /// The bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.0.len()
    }
    /// `Some(())` when every byte was read: a layout with trailing bytes is not the layout.
    pub fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_written_as_format_writes_them() {
        for n in [
            0,
            1,
            9,
            10,
            99,
            100,
            12_345,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut out = String::from("x");
            push_decimal(&mut out, n);
            assert_eq!(out, alloc::format!("x{n}"));
            assert_eq!(decimal(n, &mut [0; 20]), alloc::format!("{n}"));
        }
    }

    #[test]
    fn round_trips_fields_in_order() {
        let bytes = Writer::default()
            .u8(1)
            .u16(2)
            .u32(3)
            .u64(4)
            .i64(-5)
            .bytes(b"ab")
            .finish();
        assert_eq!(bytes.len(), 1 + 2 + 4 + 8 + 8 + 2);
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u8(), Some(1));
        assert_eq!(r.u16(), Some(2));
        assert_eq!(r.u32(), Some(3));
        assert_eq!(r.u64(), Some(4));
        assert_eq!(r.i64(), Some(-5));
        assert_eq!(r.bytes(2), Some(&b"ab"[..]));
        assert_eq!(r.end(), Some(()));
    }

    #[test]
    fn short_input_reads_none() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u32(), None);
        assert_eq!(r.bytes(4), None);
        assert_eq!(r.u16(), Some(0x0201));
        assert_eq!(r.end(), None);
    }
}
