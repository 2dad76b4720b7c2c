//! A minimal writer of NumPy `.npy` files (format version 1.0), so that any independent
//! implementation can read the inputs and outputs of a step (`twilight demo --dump`).
//!
//! A file is the magic `\x93NUMPY`, the version bytes `1, 0`, the header length as a
//! little-endian `u16`, then the header: a Python dict literal
//! `{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3), }` padded with spaces and ended by
//! `\n` so that the data starts at a multiple of 64 bytes. The data follows in C order,
//! little-endian, with no padding.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::{Error, Result};

/// The magic string every `.npy` file starts with.
pub const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Data starts at a multiple of this many bytes.
pub const ALIGN: usize = 64;

/// An element type this writer knows: its NumPy `descr` and little-endian bytes.
pub trait NpyElement: Copy {
    /// The `descr` of the header, e.g. `<f4`.
    const DESCR: &'static str;
    /// Bytes per element.
    const SIZE: usize;
    /// Appends the little-endian bytes of `self`.
    fn push_le(self, out: &mut Vec<u8>);
}

impl NpyElement for half::f16 {
    const DESCR: &'static str = "<f2";
    const SIZE: usize = 2;
    fn push_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bits().to_le_bytes());
    }
}

impl NpyElement for f32 {
    const DESCR: &'static str = "<f4";
    const SIZE: usize = 4;
    fn push_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl NpyElement for i32 {
    const DESCR: &'static str = "<i4";
    const SIZE: usize = 4;
    fn push_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

/// The shape as a Python tuple: `()`, `(5,)`, `(2, 3)`.
fn shape_tuple(shape: &[usize]) -> String {
    match shape {
        [] => "()".to_string(),
        [n] => format!("({n},)"),
        _ => {
            let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            format!("({})", dims.join(", "))
        }
    }
}

/// The magic, version, header length and padded header of an array: everything before the
/// data. Its length is a multiple of [`ALIGN`].
pub fn header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dict = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': {}, }}",
        shape_tuple(shape)
    );
    // 6 magic + 2 version + 2 length, then the dict, spaces, and the final newline.
    let unpadded = MAGIC.len() + 2 + 2 + dict.len() + 1;
    let total = unpadded.next_multiple_of(ALIGN);
    let header_len = total - (MAGIC.len() + 2 + 2);
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header_len as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    out
}

/// The whole file of an array, in memory.
///
/// # Errors
/// [`Error::Npy`] when `data` does not hold `product(shape)` elements, or the header would not
/// fit the 16-bit length of version 1.0.
pub fn encode<E: NpyElement>(shape: &[usize], data: &[E]) -> Result<Vec<u8>> {
    let count = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if count != Some(data.len()) {
        let count = count.map_or("more than usize::MAX".to_string(), |n| n.to_string());
        return Err(Error::Npy(format!(
            "shape {shape:?} holds {count} elements but {} were given",
            data.len()
        )));
    }
    let mut out = header(E::DESCR, shape);
    if out.len() > u16::MAX as usize {
        return Err(Error::Npy(format!(
            "the header of shape {shape:?} is too long for format 1.0"
        )));
    }
    out.reserve(data.len() * E::SIZE);
    for &x in data {
        x.push_le(&mut out);
    }
    Ok(out)
}

/// Writes an array of any [`NpyElement`] to `path`.
///
/// # Errors
/// As [`encode`], or [`Error::Write`] naming the file that cannot be written.
pub fn write<E: NpyElement>(path: &Path, shape: &[usize], data: &[E]) -> Result<()> {
    let bytes = encode(shape, data)?;
    let write_all = || -> std::io::Result<()> {
        let mut file = BufWriter::new(File::create(path)?);
        file.write_all(&bytes)?;
        file.flush()
    };
    write_all().map_err(|source| Error::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `f16` values as `<f2`.
///
/// # Errors
/// As [`write`].
pub fn write_f16(path: &Path, shape: &[usize], data: &[half::f16]) -> Result<()> {
    write(path, shape, data)
}

/// Writes `f32` values as `<f4`.
///
/// # Errors
/// As [`write`].
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    write(path, shape, data)
}

/// Writes `i32` values as `<i4`.
///
/// # Errors
/// As [`write`].
pub fn write_i32(path: &Path, shape: &[usize], data: &[i32]) -> Result<()> {
    write(path, shape, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_i32_file_has_the_exact_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        write_i32(&path, &[2], &[1, -1]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let dict = b"{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }";
        let mut want = Vec::new();
        want.extend_from_slice(b"\x93NUMPY\x01\x00");
        // 10 bytes of prefix and a 57-byte dict do not fit 64: the data starts at 128, so the
        // header (dict, spaces, newline) is 118 bytes long, as NumPy itself writes it.
        assert_eq!(dict.len(), 57);
        want.extend_from_slice(&[118, 0]);
        want.extend_from_slice(dict);
        want.extend(std::iter::repeat_n(b' ', 118 - dict.len() - 1));
        want.push(b'\n');
        assert_eq!(want.len(), 128);
        want.extend_from_slice(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(bytes, want);
    }

    #[test]
    fn f16_and_f32_values_are_little_endian() {
        let f16 = encode(
            &[1, 2],
            &[half::f16::from_f32(1.0), half::f16::from_f32(-2.0)],
        )
        .unwrap();
        assert_eq!(&f16[128..], &[0x00, 0x3c, 0x00, 0xc0]);
        assert!(f16[10..128]
            .starts_with(b"{'descr': '<f2', 'fortran_order': False, 'shape': (1, 2), }"));
        let f32 = encode(&[1], &[1.5f32]).unwrap();
        assert_eq!(&f32[128..], &1.5f32.to_le_bytes());
        assert!(
            f32[10..128].starts_with(b"{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }")
        );
    }

    #[test]
    fn headers_are_aligned_for_every_rank() {
        for shape in [
            vec![],
            vec![0],
            vec![7],
            vec![3, 4],
            vec![123_456, 8, 16, 128],
            vec![1; 20],
            vec![usize::MAX / 4, 99_999_999_999, 1],
        ] {
            let h = header("<f4", &shape);
            assert_eq!(h.len() % ALIGN, 0, "{shape:?}");
            assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
            let len = u16::from_le_bytes([h[8], h[9]]) as usize;
            assert_eq!(10 + len, h.len(), "{shape:?}");
            assert_eq!(*h.last().unwrap(), b'\n');
            let text = std::str::from_utf8(&h[10..]).unwrap();
            assert!(text.contains(&format!("'shape': {}, }}", shape_tuple(&shape))));
        }
        assert_eq!(shape_tuple(&[]), "()");
        assert_eq!(shape_tuple(&[5]), "(5,)");
        assert_eq!(shape_tuple(&[2, 3, 4]), "(2, 3, 4)");
    }

    #[test]
    fn a_wrong_length_is_an_error() {
        let err = encode(&[2, 3], &[1i32; 5]).unwrap_err();
        assert!(matches!(err, Error::Npy(_)));
        assert!(err.to_string().contains("6 elements"));
        assert!(encode(&[usize::MAX, 2], &[1i32]).is_err());
        let dir = tempfile::tempdir().unwrap();
        assert!(write_f32(&dir.path().join("x.npy"), &[3], &[1.0]).is_err());
        let missing = dir.path().join("no-such-dir").join("x.npy");
        let err = write_f32(&missing, &[1], &[1.0]).unwrap_err();
        assert!(err.to_string().contains("no-such-dir"), "{err}");
    }
}
